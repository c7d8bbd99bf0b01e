"""Streaming a spooled message to the server during DATA.

The message is read from disk a chunk at a time and only when the transport
asks for more (a pull producer), so a slow server holds back our reads
instead of filling memory with the message.
"""

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from relaymail import tcp
from relaymail.delivery.stuffing import DotStuffer

# Large enough that a message costs few reactor turns, small enough that a
# few sessions in parallel keep memory flat.
CHUNK_SIZE = 64 * 1024


class StreamStopped(Exception):
    """The transport stopped the producer (the connection went away)."""


@implementer(IPullProducer)
class MessageProducer:
    """Writes a message file, dot-stuffed and terminated, to a consumer.

    :ivar done: fires with None once the final ``.CRLF`` is written; fails
        with :class:`StreamStopped` when the transport stops us, or with the
        ``OSError`` when the file cannot be read.
    """

    def __init__(self, file, consumer, chunk_size=CHUNK_SIZE, on_progress=None):
        self._file = file
        self._consumer = consumer
        self._chunk_size = chunk_size
        self._on_progress = on_progress
        self._stuffer = DotStuffer()
        self._ahead = None      # the chunk after the one being written
        self.done = Deferred()

    def start(self):
        """Register with the consumer, which then pulls the chunks."""
        self._consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self):
        """Write the next chunk, with the end of data if it is the last.

        A chunk is read ahead, so that the last one and the ``.CRLF`` go
        in one write: a message of one chunk (most of them) is then one
        write, sent at once (relaymail.tcp.write), rather than two the
        transport sends on two turns of the reactor.
        """
        if self.done.called:
            return
        if self._on_progress is not None:
            self._on_progress()
        try:
            chunk = self._ahead if self._ahead is not None else self._file.read(self._chunk_size)
            self._ahead = self._file.read(self._chunk_size) if chunk else b""
        except OSError:
            # The caller must drop the connection: ending DATA now would
            # deliver a truncated message.
            self._consumer.unregisterProducer()
            self.done.errback(Failure())
            return
        if self._ahead:
            self._consumer.write(self._stuffer.feed(chunk))
            return
        data = self._stuffer.feed(chunk) + self._stuffer.finish()
        # Unregistered first: a pull producer's write waits for the
        # transport's next turn, and nothing is left to pull.
        self._consumer.unregisterProducer()
        tcp.write(self._consumer, data)
        self.done.callback(None)

    def stopProducing(self):
        """The connection is going away."""
        if not self.done.called:
            self.done.errback(StreamStopped())


@implementer(IPullProducer)
class ChunkProducer:
    """Writes one BDAT chunk (RFC 3030 2): the ``BDAT n [LAST]`` line and
    the next ``length`` octets of the file as they are -- a chunk is framed
    by its length, so nothing is stuffed.  The file is read a piece at a
    time, only when the transport asks for more.

    ``done`` fires as :class:`MessageProducer`'s does; a file that ends
    before ``length`` octets fails it with an ``OSError`` (the chunk cannot
    be completed, so the caller drops the connection: a server stores
    nothing of a message whose LAST chunk never came).
    """

    def __init__(self, file, length, last, consumer, read_size=CHUNK_SIZE, on_progress=None):
        self._file = file
        self._left = length
        self._consumer = consumer
        self._read_size = read_size
        self._on_progress = on_progress
        self._line = b"BDAT %d%s\r\n" % (length, b" LAST" if last else b"")
        self.done = Deferred()

    def start(self):
        """Register with the consumer, which then pulls the pieces."""
        self._consumer.registerProducer(self, False)
        return self.done

    def resumeProducing(self):
        """Write the next piece (the BDAT line goes with the first)."""
        if self.done.called:
            return
        if self._on_progress is not None:
            self._on_progress()
        try:
            piece = self._file.read(min(self._read_size, self._left)) if self._left else b""
            if self._left and not piece:
                raise OSError("the message file is shorter than its size")
        except OSError:
            self._consumer.unregisterProducer()
            self.done.errback(Failure())
            return
        self._left -= len(piece)
        self._consumer.write(self._line + piece)
        self._line = b""
        if not self._left:
            self._consumer.unregisterProducer()
            self.done.callback(None)

    def stopProducing(self):
        """The connection is going away."""
        if not self.done.called:
            self.done.errback(StreamStopped())
