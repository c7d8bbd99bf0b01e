"""What a delivery process publishes for the master's scrape, every
:data:`INTERVAL` seconds: its scheduler's count of deferred messages (a
gauge, relaymail.metrics.exposition) and, with workers, its table of last
errors per destination (relaymail.metrics.last_errors).  Counting the
scheduler's due times is a pass over a dict, about 5 ms with 100,000
messages; the master's scrape never waits for a worker."""

import os

from twisted.application import service
from twisted.internet import task

from relaymail.metrics import instruments
from relaymail.metrics.last_errors import LAST_ERRORS
from relaymail.metrics.rundir import VARIABLE

INTERVAL = 1.0


class DeliveryGauges(service.Service):
    def __init__(self, scheduler, reactor, clock):
        self._scheduler = scheduler
        self._clock = clock
        self._directory = os.environ.get(VARIABLE)
        self._loop = task.LoopingCall(self.publish)
        self._loop.clock = reactor

    def startService(self):
        super().startService()
        self._loop.start(INTERVAL, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def publish(self):
        instruments.deferred_now(self._scheduler.deferred_count(self._clock()))
        if self._directory:
            try:
                LAST_ERRORS.write_to(self._directory)
            except OSError:
                pass        # the master removed the directory: it is stopping
