"""The ``[metrics] listen`` HTTP listener: ``/metrics`` and the status
page ``/``, read-only (GET and HEAD; any other method is 405).

The master runs it (or the one process, with ``[server] workers = 0``):
it binds in privilegedStartService like the SMTP listeners, so a port it
cannot have stops start-up with one line (relaymail.tap._cannot_listen),
and makes the run's metrics directory in startService, before the master
starts a worker.  It samples the delivered total once a minute for the
chart (relaymail.metrics.series).
"""

import os
import time

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, task, threads
from twisted.logger import Logger
from twisted.web import resource, server

import relaymail
from relaymail.metrics import status_page
from relaymail.metrics.exposition import Exposition
from relaymail.metrics.queue_view import REFRESH
from relaymail.metrics.series import INTERVAL, MinuteSeries

log = Logger(namespace="relaymail.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusSources:
    """Where the page's parts come from, which differs between the master
    and the one process: ``sources()``, the collectors (called at start,
    once the metrics directory exists); ``last_errors()``, (destination,
    when, text) triples; ``processes()``, (name, role, pid, uptime)."""

    def __init__(self, sources, last_errors, processes):
        self.sources = sources
        self.last_errors = last_errors
        self.processes = processes


class MetricsService(service.MultiService):
    """The listener, the per-minute samples and the run directory.

    :param rundir: the run's relaymail.metrics.rundir.RunDirectory, or None
        (one process: nothing is written to files).
    :param queue_view: a relaymail.metrics.queue_view.QueueView.
    """

    def __init__(self, settings, reactor, status, queue_view, rundir=None, clock=time.time):
        super().__init__()
        self._settings = settings
        self._reactor = reactor
        self._status = status
        self._queue_view = queue_view
        self._rundir = rundir
        self._clock = clock
        self.exposition = None
        self.series = MinuteSeries()
        self._sampler = None
        self._lister = None
        root = resource.Resource()
        root.putChild(b"", _Page(self._page))
        root.putChild(b"metrics", _Page(self._metrics, CONTENT_TYPE))
        site = server.Site(root)
        site.noisy = False
        site.log = lambda request: None     # no access line per scrape
        listener = StreamServerEndpointService(
            endpoints.serverFromString(reactor, settings.metrics.listen), site)
        # A port we cannot bind stops start-up (relaymail.tap.RelayService).
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def startService(self):
        if self._rundir is not None:
            self._rundir.prepare()
        self.exposition = Exposition(self._status.sources(), self._queue_view, self._clock)
        self._sampler = task.LoopingCall(lambda: self.series.sample(self.exposition.delivered()))
        self._sampler.clock = self._reactor
        self._sampler.start(INTERVAL, now=True)
        self._lister = task.LoopingCall(self._list_queue)
        self._lister.clock = self._reactor
        self._lister.start(REFRESH, now=True)
        super().startService()

    def _list_queue(self):
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                      self._queue_view.refresh)
        # A failure is logged and the next listing tried: the loop goes on.
        return d.addErrback(lambda failure: log.failure("listing the queue failed", failure))

    def stopService(self):
        for loop in (self._sampler, self._lister):
            if loop is not None and loop.running:
                loop.stop()
        d = super().stopService()
        if self._rundir is not None:
            d.addBoth(lambda result: (self._rundir.remove(), result)[1])
        return d

    def _metrics(self):
        return self.exposition.text()

    def _page(self):
        families = self.exposition.families()
        now = self._clock()
        snapshot = status_page.Snapshot(
            generated_at=now, refresh=self._settings.metrics.status_refresh,
            queue=self.exposition.queue_counts(families),
            oldest=self._queue_view.oldest_messages(now),
            per_minute=self.series.per_minute(self.exposition.delivered(families)),
            last_errors=self._status.last_errors(), workers=self._status.processes(),
            version=relaymail.__version__)
        return status_page.render(snapshot)


class _Page(resource.Resource):
    """One read-only document: GET, or HEAD (GET without the body)."""

    def __init__(self, produce, content_type="text/html; charset=utf-8"):
        super().__init__()
        self._produce = produce
        self._content_type = content_type

    def render(self, request):
        # Twisted says 501 for a method it does not know (PUT, DELETE):
        # 405 names the ones that work here.
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"read-only: GET or HEAD\n"
        return super().render(request)

    def render_GET(self, request):
        request.setHeader(b"content-type", self._content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'")
        return self._produce()


def single_process_status(started_at):
    """The page's sources with ``[server] workers = 0``."""
    from relaymail.metrics.exposition import single_process_sources
    from relaymail.metrics.last_errors import LAST_ERRORS
    pid = os.getpid()
    return StatusSources(single_process_sources, LAST_ERRORS.items,
                         lambda: [("relaymail", "single process", pid,
                                   time.monotonic() - started_at)])


def master_status(master, rundir):
    """The page's sources in the master of ``master``'s workers."""
    from relaymail.metrics.exposition import worker_sources
    from relaymail.metrics.last_errors import read_all
    return StatusSources(lambda: worker_sources(rundir.path), lambda: read_all(rundir.path),
                         master.running_workers)
