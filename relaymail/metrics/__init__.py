"""Prometheus metrics and the status page (``[metrics] listen``).

Every process counts its own events in :mod:`relaymail.metrics.instruments`
(prometheus_client).  With workers, each worker is started with
``PROMETHEUS_MULTIPROC_DIR`` naming the run's metrics directory
(:mod:`relaymail.metrics.rundir`), so its counters live in memory-mapped
files there, one set per pid, from its first import of prometheus_client
on.  The master serves HTTP (:mod:`relaymail.metrics.web`): on each scrape
it adds up those files (``MultiProcessCollector``), adds its own counters
(worker restarts, kept in its memory) and what it reads from the spool
itself (:mod:`relaymail.metrics.queue_view`), and writes the text format
(:mod:`relaymail.metrics.exposition`).  When a worker dies, its live
gauges' files go (``mark_process_dead``); its counters stay, they are
history, so a restart never makes a total go down.

With ``[server] workers = 0`` there is one process and no directory of
files: the same instruments count in memory and the same listener serves
them.

The wire, queue and delivery code each call one function per event
(``instruments.connection_opened()``...), so that what is counted and how
its labels are kept few (:mod:`relaymail.metrics.labels`) is here, not
spread over them.
"""
