"""The services of each worker role, built from the same pieces as the
single-process relay (:func:`relaymail.tap.build_service`).

inbound
    the SMTP dialogue on listening sockets adopted from the master
    (``reactor.adoptStreamPort``), writing to the spool and telling the
    delivery worker of each new message's partition
    (:class:`relaymail.process.pickup.PickupSender`).  It never recovers
    or reads the queue: it starts in well under a second whatever the
    queue holds.
delivery
    the scheduler and the outbound client for one partition of the queue
    (:mod:`relaymail.queue.partition`): it recovers its partition, then
    schedules it, and takes notices of new messages and the master's
    control requests.
"""

import os
import socket
import time

from twisted.application import service
from twisted.internet import abstract, protocol
from twisted.logger import Logger

from relaymail.lifecycle import OrderlyService
from relaymail.policy.loader import build_hooks
from relaymail.policy.recipients import Policy
from relaymail.process.pickup import PickupReceiver, PickupSender
from relaymail.plugins.callout_cache import (
    share_between_workers as share_answers_between_workers)
from relaymail.plugins.ratelimit_counters import share_between_workers
from relaymail.process.shared_counts import SharedLimits
from relaymail.smtp.limits import RATE_WINDOW
from relaymail.smtp.sessions import EndSessions, OpenSessions
from relaymail.queue.control import ControlFactory
from relaymail.queue.intake import NotifyingQueue
from relaymail.queue.partition import owner_test
from relaymail.queue.spool import Spool

log = Logger(namespace="relaymail.process")


def build(arguments, settings, reactor, fds):
    """The MultiService of the worker ``arguments`` describes (see
    :mod:`relaymail.process.worker`)."""
    from relaymail.metrics import instruments
    instruments.enable(bool(settings.metrics.listen))
    shared = None
    if arguments.role == "inbound" and "limits" in fds:
        # The master's count of rows, passed with the region (never worked
        # out here from [server] workers = auto, whose CPU set may differ).
        shared = SharedLimits(fds.pop("limits"), arguments.limits_rows, arguments.limits_row,
                              settings, reactor, RATE_WINDOW)
        # Before the plugins are built: the ratelimit plugin's memory
        # counters and the callout plugin's answers are in the shared
        # region too.
        share_between_workers(shared.rate_limits)
        share_answers_between_workers(shared.known_recipients, shared.unknown_recipients)
    hooks = build_hooks(settings)
    policy = Policy.from_hooks(hooks, settings, reactor=reactor)
    if arguments.role == "inbound":
        return _inbound(arguments, settings, reactor, fds, policy, shared)
    return _delivery(arguments, settings, reactor, fds, policy, hooks)


def _inbound(arguments, settings, reactor, fds, policy, shared):
    from relaymail.tap import inbound_factories
    top = OrderlyService(settings.server.shutdown_grace)
    spool = Spool(settings.queue.path, reactor=reactor, min_free=settings.queue.min_free,
                  commit_delay=settings.queue.commit_delay)
    # Writing only, no recovery: the master emptied tmp/, the delivery
    # workers recover the rest.
    _Hooks(spool.start, spool.stop).setServiceParent(top)
    senders = [_socket(fds.pop(name)) for name in _ordered(fds, "pickup.")]
    pickup = PickupSender(reactor, senders)
    queue = NotifyingQueue(spool, pickup.message_queued)
    sessions = OpenSessions(reactor)
    spool.expect_commits_from(sessions.transactions)
    factories = inbound_factories(settings, reactor, top, policy, queue, shared=shared,
                                  sessions=sessions)
    listeners = AdoptedListeners(reactor, [fds.pop(name) for name in _ordered(fds, "listen.")],
                                 factories)
    listeners.setServiceParent(top)
    EndSessions([listeners], sessions).setServiceParent(top)
    top.sessions = sessions
    return top


def _delivery(arguments, settings, reactor, fds, policy, hooks):
    from relaymail.delivery.engine import delivery_scheduler
    top = OrderlyService(settings.server.shutdown_grace)
    owns = owner_test(arguments.partition, arguments.partitions)
    spool = Spool(settings.queue.path, reactor=reactor, min_free=settings.queue.min_free,
                  owns=owns, beside_writers=True)
    spool.setServiceParent(top)
    scheduler = delivery_scheduler(settings, reactor, spool, policy,
                                   rate_share=arguments.partitions, hooks=hooks)
    scheduler.setServiceParent(top)
    for companion in scheduler.companions:
        companion.setServiceParent(top)
    receiving = _socket(fds[f"pickup.{arguments.partition}"])
    _Hooks(lambda: reactor.addReader(PickupReceiver(reactor, receiving,
                                                    scheduler.message_queued))
           ).setServiceParent(top)
    control = fds["control"]
    _Hooks(lambda: _adopt_control(reactor, control, scheduler)).setServiceParent(top)
    if settings.metrics.listen:
        from relaymail.metrics.delivery_side import DeliveryGauges
        DeliveryGauges(scheduler, reactor, time.time).setServiceParent(top)
    return top


def _adopt_control(reactor, fd, scheduler):
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, ControlFactory(scheduler))
    os.close(fd)


def _ordered(fds, prefix):
    return sorted((name for name in fds if name.startswith(prefix)),
                  key=lambda name: int(name[len(prefix):]))


def _socket(fd):
    end = socket.socket(fileno=fd)
    end.setblocking(False)
    return end


class _Hooks(service.Service):
    """Runs ``start`` once the services before it have started, and
    ``stop`` (if any; its Deferred is waited for) when stopped."""

    def __init__(self, start, stop=None):
        self._start = start
        self._stop = stop

    def startService(self):
        super().startService()
        self._start()

    def stopService(self):
        super().stopService()
        if self._stop is not None:
            return self._stop()


class AdoptedListeners(service.Service):
    """Accepts on listening sockets the master bound, one factory each."""

    def __init__(self, reactor, fds, factories):
        if len(fds) != len(factories):
            raise ValueError(f"{len(fds)} listening sockets for {len(factories)} listeners")
        self._reactor = reactor
        self._pairs = list(zip(fds, factories))
        self._ports = []

    def startService(self):
        super().startService()
        for fd, factory in self._pairs:
            family = socket.socket(fileno=os.dup(fd)).family
            self._ports.append(self._reactor.adoptStreamPort(fd, family, factory))
            # adoptStreamPort made a copy of its own.
            os.close(fd)

    def stopService(self):
        super().stopService()
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()


class _MasterPipe(abstract.FileDescriptor):
    """Standard input, the master's pipe: at its end the master is gone
    (where the kernel does not say it with a signal)."""

    def __init__(self, reactor, stop):
        super().__init__(reactor)
        self._stop = stop
        os.set_blocking(0, False)

    def fileno(self):
        return 0

    def doRead(self):
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError as error:
            return error
        if not data:
            return protocol.connectionDone
        return None

    def connectionLost(self, reason):
        abstract.FileDescriptor.connectionLost(self, reason)
        if self.reactor.running:
            self._stop()


def watch_master(reactor, stop):
    """Call ``stop`` when the master's end of standard input closes."""
    reactor.addReader(_MasterPipe(reactor, stop))
