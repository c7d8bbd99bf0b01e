"""The queue as the SMTP server sees it: the spool, telling the scheduler
about each message the moment it is committed."""

from zope.interface import implementer

from relaymail.interfaces import IMessageQueue, IMessageWriter
from relaymail.metrics import instruments


@implementer(IMessageQueue)
class NotifyingQueue:
    """Wraps an IMessageQueue; ``on_committed(queue_id, record)`` is called
    after each successful commit, so delivery starts without polling the
    spool (``record`` is the committed queue record when the writer keeps
    it, else None)."""

    def __init__(self, queue, on_committed):
        self._queue = queue
        self._on_committed = on_committed

    def new_message(self):
        return _NotifyingWriter(self._queue.new_message(), self._on_committed)

    def has_room(self, size=0):
        return self._queue.has_room(size)


@implementer(IMessageWriter)
class _NotifyingWriter:
    def __init__(self, writer, on_committed):
        self._writer = writer
        self._on_committed = on_committed
        self.queue_id = writer.queue_id
        # The DATA path calls write once per block: no extra hop for it.
        self.write = writer.write
        self.abort = writer.abort

    def commit(self, envelope, hold=False):
        def committed(queue_id):
            instruments.message_queued()
            if not hold:
                # A held message is not delivery's until it is released
                # (the queue tool tells delivery then).
                self._on_committed(queue_id, getattr(self._writer, "record", None))
            return queue_id
        d = self._writer.commit(envelope, hold=True) if hold else self._writer.commit(envelope)
        return d.addCallback(committed)

    # The message filters' (relaymail.smtp.filtering).
    def view(self, envelope):
        return self._writer.view(envelope)

    def rewrite(self, view):
        return self._writer.rewrite(view)
