"""An orderly stop: finish the work under way, then stop the services one
after another.

Twisted's MultiService stops its children all at once, so the spool could
stop while a delivery still had its outcome to write (which logged a
critical "the spool is not started" per message on every SIGTERM).
:class:`OrderlyService` stops in two steps:

1. every child that has a ``drain(grace)`` method is drained, all at once:
   listeners stop accepting, SMTP sessions finish what they are in
   (relaymail.smtp.sessions), deliveries in flight finish
   (Scheduler.drain), each within ``[server] shutdown_grace``;
2. then each child is stopped, the last started first, each waiting for
   the one before it (the spool, started first, stops last).
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="relaymail")


class OrderlyService(service.MultiService):

    def __init__(self, grace):
        super().__init__()
        self.grace = grace

    def stopService(self):
        service.Service.stopService(self)
        children = list(self)
        draining = [defer.maybeDeferred(child.drain, self.grace)
                    for child in children if hasattr(child, "drain")]
        done = defer.DeferredList(draining, consumeErrors=True)
        done.addCallback(_log_drain_failures)
        for child in reversed(children):
            done.addBoth(lambda _, child=child: _stop(child))
        return done


def _stop(child):
    if not child.running:
        return None
    return defer.maybeDeferred(child.stopService).addErrback(
        lambda failure: log.failure("stopping {child!r} failed", failure, child=child))


def _log_drain_failures(results):
    for succeeded, result in results:
        if not succeeded:
            log.failure("an orderly stop step failed", result)
