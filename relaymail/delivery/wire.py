"""The Twisted side of the outbound client: one connection, commands out, replies in.

:class:`ClientConnection` knows bytes, replies, timers, the STARTTLS switch
and streaming; it knows nothing of the SMTP dialogue's order, which
:mod:`relaymail.delivery.client` drives.  Every wait has a timer, and the
first failure (timeout, malformed reply, lost connection, TLS failure) is
kept and handed to whoever waits next, so the session sees one clear
:class:`DeliveryError` whatever happens underneath.
"""

from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from relaymail import tcp
from relaymail.metrics import instruments
from relaymail.delivery import tls
from relaymail.delivery.outcomes import DeliveryError, error_from_reply
from relaymail.delivery.responses import MalformedReply, ReplyReader
from relaymail.delivery.stream import ChunkProducer, MessageProducer, StreamStopped

# A server may say something nobody asked for (a 421 before it hangs up);
# one that keeps doing so is out of step with us.
MAX_UNSOLICITED_REPLIES = 4


class _Wait:
    """A pending wait: the Deferred to fire, its timer and what we were doing
    (for the error text)."""

    __slots__ = ("deferred", "timer", "what")

    def __init__(self, deferred, what):
        self.deferred = deferred
        self.timer = None
        self.what = what

    def cancel_timer(self):
        if self.timer.active():
            self.timer.cancel()


@implementer(IHandshakeListener)
class ClientConnection(Protocol):
    """One SMTP client connection.

    :ivar remote: the hop's label, for error texts.
    :ivar tls_active: True once a TLS handshake (STARTTLS, or the one
        ``implicit_tls`` starts at once) has completed.
    :ivar lost: True once the connection is gone.
    """

    def __init__(self, clock, remote, server_name, implicit_tls=None):
        self._clock = clock
        # TLS client options to start TLS with before the first byte
        # (``wrapper``, port 465 style, RFC 8314 3.3), or None.
        self._implicit_tls = implicit_tls
        self._handshaking = False
        self.remote = remote
        self._server_name = server_name
        self._reader = ReplyReader()
        self._replies = deque()      # replies read before anyone asked for them
        self._owed = 1               # replies the server owes us; the greeting first
        self._unsolicited = 0
        self._wait = None            # the pending reply (or handshake) wait
        self._stream = None          # the message being sent, while it is
        self._tls_options = None     # set while the reply to STARTTLS is due
        self._tls_timeout = None
        self._tls_reply = None       # the 220, kept while the handshake runs
        self._error = None
        self._ended_by = None        # the server's 421, once it said one
        self._aborting = False
        self._closing = None         # the timer that ends a slow clean close
        self._closed_waiters = []
        self.tls_active = False
        self.lost = False
        #: Message bodies (DATA contents, BDAT chunks) begun on this
        #: connection: before a transaction's first, the server has
        #: nothing it could deliver (OutboundSession.drop_before_the_message).
        self.bodies_begun = 0

    # -- what the session uses -------------------------------------------

    @property
    def usable(self):
        """True while commands can still be sent."""
        return not self.lost and self._error is None and self._ended_by is None

    @property
    def error(self):
        """Why the connection is unusable (a DeliveryError), or None."""
        return self._error or self._ended_by

    def send(self, *lines):
        """Write command lines (bytes without CRLF) in one write."""
        for line in lines:
            if b"\r" in line or b"\n" in line:
                raise ValueError("a command line must not contain CR or LF")
        if self.usable:
            tcp.write(self.transport, b"".join(line + b"\r\n" for line in lines))
            self._owed += len(lines)

    def expect_more_replies(self, count):
        """The server owes ``count`` replies beyond one per command sent:
        an LMTP server answers the final dot once per accepted recipient
        (RFC 2033 4.2), and those replies must not count as unsolicited."""
        self._owed += count

    def next_reply(self, timeout, what):
        """A Deferred firing with the next :class:`ServerReply`, or failing
        with :class:`DeliveryError` (4.4.2 on timeout or a lost connection).

        :param what: what we are waiting for, for the error text
            (``'receiving the reply to MAIL FROM'``).
        """
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._error is not None:
            return defer.fail(self._error)
        if self._ended_by is not None and self._owed <= 0:
            # After its 421 the server owes no reply to anything we sent
            # (what we would have sent since was not): none will come.
            return defer.fail(self._ended_by)
        if self._wait is not None:
            raise RuntimeError("already waiting for a reply")
        deferred = defer.Deferred(self._cancelled)
        self._wait = self._timed_wait(deferred, timeout, what)
        return deferred

    def start_tls(self, options, timeout):
        """Send STARTTLS.  The Deferred fires with the server's reply: a
        refusal as it came, or the 220 once the TLS handshake is done.  A
        failed handshake fails it with :class:`DeliveryError` 4.7.5.

        Against STARTTLS injection (CVE-2011-0411) anything the server sent
        after its 220 in the same read is dropped unparsed; anything later
        goes to the TLS layer, where plain text fails the handshake.
        """
        if self._replies:
            # The server answered something we never asked; it is not in
            # step with us, and a stray 220 must not start TLS.
            return defer.fail(self._protocol_error("unexpected reply before STARTTLS"))
        self.send(b"STARTTLS")
        self._tls_options = options
        self._tls_timeout = timeout
        return self.next_reply(timeout, "receiving the reply to STARTTLS")

    def send_message(self, file, block_timeout):
        """Stream ``file`` as DATA content, dot-stuffed and terminated.

        Fires when the final ``.CRLF`` is handed to the transport; fails with
        :class:`DeliveryError` when the connection goes, when the server
        takes nothing for ``block_timeout`` seconds (RFC 5321 4.5.3.2.5), or
        when the file cannot be read (the connection is then dropped, as
        ending DATA would deliver a truncated message).
        """
        return self._send_stream(
            lambda progress: MessageProducer(file, self.transport, on_progress=progress),
            block_timeout)

    def send_chunk(self, file, length, last, block_timeout):
        """Stream one BDAT chunk (RFC 3030): the BDAT line and the next
        ``length`` octets of ``file``; fires and fails as
        :meth:`send_message` does.  Each chunk is owed one reply."""
        return self._send_stream(
            lambda progress: ChunkProducer(file, length, last, self.transport,
                                           on_progress=progress),
            block_timeout)

    def _send_stream(self, make_producer, block_timeout):
        if not self.usable:
            return defer.fail(self.error)
        if self._stream is not None:
            raise RuntimeError("already sending a message body")
        # The reply to the final dot (or to the chunk) is owed like a
        # command's: without this every reused connection drifted one
        # reply per message towards "unsolicited" and was dropped after a
        # few messages.
        self._owed += 1
        self.bodies_begun += 1
        deferred = defer.Deferred()
        self._stream = wait = self._timed_wait(deferred, block_timeout, "sending the message body")

        def progress():
            if wait.timer.active():
                wait.timer.reset(block_timeout)

        make_producer(progress).start().addCallbacks(self._stream_done, self._stream_failed)
        return deferred

    def unread_reply(self):
        """Take a reply nobody asked for, or None."""
        return self._replies.popleft() if self._replies else None

    def close(self, grace):
        """Close cleanly, after what is written has gone; drop the
        connection if that takes more than ``grace`` seconds (a TLS close
        waits for the server's close_notify, which may never come)."""
        if self.lost or self._closing is not None:
            return
        self._closing = self._clock.callLater(grace, self.abort)
        self.transport.loseConnection()

    def abort(self):
        """Drop the connection now."""
        if not self.lost and not self._aborting and self.transport is not None:
            self._aborting = True
            self.transport.abortConnection()

    def wait_closed(self):
        """A Deferred firing once the connection is gone."""
        if self.lost:
            return defer.succeed(None)
        deferred = defer.Deferred()
        self._closed_waiters.append(deferred)
        return deferred

    # -- Twisted callbacks -------------------------------------------------

    def connectionMade(self):
        tcp.no_delay(self.transport)
        if self._implicit_tls is not None:
            # Nothing has been read or written yet, so this is TLS from the
            # first byte; the greeting comes through it, and the wait for
            # the greeting bounds the handshake too.
            self._handshaking = True
            self.transport.startTLS(self._implicit_tls)

    def dataReceived(self, data):
        if self._error is not None:
            return
        self._reader.feed(data)
        while self._error is None:
            try:
                reply = self._reader.next_reply()
            except MalformedReply as exc:
                self._fail(self._protocol_error(f"malformed reply: {exc}"))
                return
            if reply is None:
                return
            if self._owed > 0:
                self._owed -= 1
            else:
                self._unsolicited += 1
                if self._unsolicited > MAX_UNSOLICITED_REPLIES:
                    self._fail(self._protocol_error("too many unsolicited replies"))
                    return
            if self._tls_options is not None:
                options, self._tls_options = self._tls_options, None
                if reply.code == 220:
                    self._switch_to_tls(options, reply)
                    return
            if reply.code == 421 and self._ended_by is None:
                # RFC 5321 3.8: the server closes the channel after a 421.
                # Nothing more is sent; replies that come before the close
                # are still handed over in order (an LMTP server answers
                # the final dot once a recipient, and a 250 after a 421
                # there is a delivery to record, not to repeat), and
                # whoever waits past them hears the 421, not "lost
                # connection".
                self._ended_by = error_from_reply(reply, self.remote)
            self._hand_over(reply)

    def handshakeCompleted(self):
        self.tls_active = True
        instruments.tls_session("out", self.transport)
        self._handshaking = False
        reply, self._tls_reply = self._tls_reply, None
        if reply is not None and self._error is None:
            self._hand_over(reply)

    def connectionLost(self, reason):
        self.lost = True
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        if self._error is None and self._ended_by is not None:
            self._error = self._ended_by
        if self._error is None:
            if self._tls_reply is not None or self._handshaking:
                self._error = DeliveryError(
                    temporary=True, code=None, enhanced="4.7.5",
                    text=f"TLS handshake with {self.remote} failed: "
                         f"{tls.describe_failure(reason, self._server_name)}",
                    remote=self.remote)
            else:
                pending = self._wait or self._stream
                while_ = f" while {pending.what}" if pending else ""
                self._error = DeliveryError(
                    temporary=True, code=None, enhanced="4.4.2",
                    text=f"lost connection with {self.remote}{while_}", remote=self.remote)
        self._fail_waits(self._error)
        waiters, self._closed_waiters = self._closed_waiters, []
        for deferred in waiters:
            deferred.callback(None)

    # -- inside ------------------------------------------------------------

    def _switch_to_tls(self, options, reply):
        # Whatever else came with the 220 was sent before the handshake and
        # would otherwise be read as the server's answer after it.
        self._reader.reset()
        self._replies.clear()
        self._owed = 0
        self._tls_reply = reply
        if self._wait is not None:
            self._wait.what = "performing the TLS handshake"
            self._wait.timer.reset(self._tls_timeout)
        self.transport.startTLS(options)

    def _hand_over(self, reply):
        wait, self._wait = self._wait, None
        if wait is None:
            self._replies.append(reply)
            return
        wait.cancel_timer()
        wait.deferred.callback(reply)

    def _timed_wait(self, deferred, timeout, what):
        wait = _Wait(deferred, what)
        wait.timer = self._clock.callLater(timeout, self._timed_out, wait)
        return wait

    def _timed_out(self, wait):
        # After a 421 the server owes nothing more: its 421 is the reason.
        self._fail(self._ended_by or DeliveryError(
            temporary=True, code=None, enhanced="4.4.2",
            text=f"conversation with {self.remote} timed out while {wait.what}",
            remote=self.remote))

    def _protocol_error(self, problem):
        return DeliveryError(temporary=True, code=None, enhanced="4.5.0",
                             text=f"protocol error from {self.remote}: {problem}",
                             remote=self.remote)

    def _fail(self, error):
        """The connection is unusable: keep the first reason, drop the
        connection and tell whoever waits."""
        if self._error is None:
            self._error = error
        self.abort()
        self._fail_waits(self._error)

    def _fail_waits(self, error):
        for name in ("_wait", "_stream"):
            wait = getattr(self, name)
            if wait is not None:
                setattr(self, name, None)
                wait.cancel_timer()
                wait.deferred.errback(error)

    def _cancelled(self, deferred):
        # A caller gave up on a reply: the dialogue is out of step, so the
        # connection cannot be used again.
        if self._wait is not None and self._wait.deferred is deferred:
            self._wait.cancel_timer()
            self._wait = None
        self.abort()

    def _stream_done(self, _):
        wait, self._stream = self._stream, None
        if wait is not None:
            wait.cancel_timer()
            wait.deferred.callback(None)

    def _stream_failed(self, failure):
        if failure.check(StreamStopped) or self._stream is None:
            # The connection is going; connectionLost tells the waiter why.
            return None
        self._fail(DeliveryError(
            temporary=True, code=None, enhanced="4.3.0",
            text=f"cannot read the message file: {failure.value}", remote=self.remote))
        return None

