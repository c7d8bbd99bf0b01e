"""How a committed message reaches its delivery worker: a datagram with
its queue id (Postfix's smtpd and cleanup wake qmgr the same way, through
a trigger on a socket in the queue directory).

The master makes one UNIX datagram socket pair per delivery partition when
it starts and keeps both ends for its whole life.  Every inbound worker
gets the sending ends, the delivery worker of partition K the receiving
end of pair K.  Because the master holds the pair, datagrams sent while a
delivery worker is being restarted wait in the kernel for its successor.

The kernel holds a few hundred notices per socket (278 here); past that
the sender keeps them in memory and sends them as room comes.  The notice
is only a hint that saves a scan: the message is already durable in
``active/`` when it is sent, and a delivery worker schedules every message
of its partition when it starts, when the master tells it that an inbound
worker died, and every :data:`relaymail.process.master.PICKUP_INTERVAL`
seconds: a notice lost with its worker, or dropped here, delays a message
by that much at most.
"""

import errno

import collections
import socket

from twisted.internet import abstract
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IReadDescriptor

from relaymail.queue.partition import partition_of
from relaymail.queue.queue_id import LENGTH, is_queue_id

log = Logger(namespace="relaymail.process")

#: A full socket buffer is retried this often, in seconds.
RETRY_DELAY = 0.05

#: Notices kept while a delivery worker's buffer is full; past this the
#: oldest are dropped: the delivery worker's scan finds those messages.
MAX_PENDING = 100_000


def socket_pair():
    """A datagram socket pair for one partition: ``(receiving, sending)``,
    non-blocking, not inherited by accident (spawnProcess passes them on
    by name)."""
    receiving, sending = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for end in (receiving, sending):
        end.setblocking(False)
    return receiving, sending


class PickupSender:
    """Tells the delivery worker of each message's partition that it was
    committed.  ``message_queued`` has the signature NotifyingQueue wants.

    :param sockets: the sending sockets, one per partition, in order.
    """

    def __init__(self, reactor, sockets):
        self._reactor = reactor
        self._sockets = list(sockets)
        self._pending = collections.deque()
        self._retry = None
        self.dropped = 0

    def message_queued(self, queue_id, record=None):
        if self._pending:
            self._keep(queue_id)
            return
        if not self._send(queue_id):
            self._keep(queue_id)

    def _send(self, queue_id):
        end = self._sockets[partition_of(queue_id, len(self._sockets))]
        try:
            end.send(queue_id.encode("ascii"))
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno in (errno.ENOBUFS, errno.ENOMEM):
                return False        # out of buffers for now: as when full
            # Not expected (the master holds the other end): the delivery
            # worker's scan will find the message; say why it may be late.
            log.warn("Cannot tell delivery about {queue_id}: {error}", queue_id=queue_id,
                     error=error)
        return True

    def _keep(self, queue_id):
        if len(self._pending) >= MAX_PENDING:
            dropped = self._pending.popleft()
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warn("Delivery is not reading its notices: {count} dropped so far "
                         "(the last {queue_id}); the periodic pickup will find them",
                         count=self.dropped, queue_id=dropped)
        self._pending.append(queue_id)
        if self._retry is None:
            self._retry = self._reactor.callLater(RETRY_DELAY, self._flush)

    def _flush(self):
        self._retry = None
        while self._pending:
            if not self._send(self._pending[0]):
                self._retry = self._reactor.callLater(RETRY_DELAY, self._flush)
                return
            self._pending.popleft()

    def stop(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None


@implementer(IReadDescriptor)
class PickupReceiver(abstract.FileDescriptor):
    """Reads notices in a delivery worker and calls ``message_queued(id)``
    for each; anything that is not a queue id is dropped."""

    #: Notices read per wake-up before the reactor gets a turn.
    BATCH = 256

    def __init__(self, reactor, sock, message_queued):
        super().__init__(reactor)
        self._socket = sock
        self._message_queued = message_queued

    def fileno(self):
        return self._socket.fileno()

    def doRead(self):
        for _ in range(self.BATCH):
            try:
                data = self._socket.recv(64)
            except BlockingIOError:
                return None
            text = data.decode("ascii", "replace")
            if len(text) == LENGTH and is_queue_id(text):
                self._message_queued(text)
        return None

    def logPrefix(self):
        return "pickup"

    def connectionLost(self, reason):
        abstract.FileDescriptor.connectionLost(self, reason)
