"""What a scrape of ``/metrics`` returns, gathered in the master.

The families come from the processes' own counters (the workers' files
added up by prometheus_client's MultiProcessCollector, or the one
process's registry with ``[server] workers = 0``) and the master's own.
The queue's families are finished here: ``relaymail_queue_messages`` has
the delivery workers' count of deferred messages (they alone know when
each is due) and the master's listing of ``active/`` and ``hold/``
(relaymail.metrics.queue_view): active is what is in ``active/`` and not
deferred.
"""

import time

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily

from relaymail.metrics.instruments import MASTER_REGISTRY

QUEUE = "relaymail_queue_messages"
DELIVERED = "relaymail_messages_delivered"


def worker_sources(directory):
    """The collectors of a master whose workers count in ``directory``."""
    from prometheus_client.multiprocess import MultiProcessCollector
    return [MultiProcessCollector(None, path=directory), MASTER_REGISTRY]


def single_process_sources():
    """The collectors of the relay in one process."""
    return [REGISTRY, MASTER_REGISTRY]


class Exposition:
    def __init__(self, sources, queue_view, clock=time.time):
        self._sources = sources
        self._queue_view = queue_view
        self._clock = clock

    def families(self):
        """Every metric family, the queue's included."""
        families, deferred = [], 0.0
        for source in self._sources:
            for family in source.collect():
                if family.name == QUEUE:
                    deferred += sum(sample.value for sample in family.samples
                                    if sample.labels.get("state") == "deferred")
                    continue
                families.append(family)
        active, held = self._queue_view.counts()
        queue = GaugeMetricFamily(QUEUE, "Messages in the queue, by state.", labels=["state"])
        queue.add_metric(["active"], max(0.0, active - deferred))
        queue.add_metric(["deferred"], deferred)
        queue.add_metric(["hold"], held)
        families.append(queue)
        families.append(GaugeMetricFamily(
            "relaymail_queue_oldest_message_age_seconds",
            "Seconds since the oldest message in the queue was queued (0: empty).",
            value=self._queue_view.oldest_age(self._clock())))
        return families

    def queue_counts(self, families=None):
        """{state: count} for the status page."""
        for family in families or self.families():
            if family.name == QUEUE:
                return {sample.labels["state"]: int(sample.value) for sample in family.samples}
        return {}

    def delivered(self, families=None):
        """The total of delivered recipients so far."""
        for family in families or self.families():
            if family.name == DELIVERED:
                return sum(s.value for s in family.samples if s.name.endswith("_total"))
        return 0.0

    def text(self):
        """The exposition in Prometheus' text format (bytes)."""
        return generate_latest(_Families(self.families()))


class _Families:
    """A collector of families already gathered."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return iter(self._families)
