"""The Twisted protocol and factory that feed :class:`Dialogue`.

Pipelining (RFC 2920) is kept correct by reading input strictly in order:
while a reply is still owed (a plugin or the queue has not answered), no
further input is looked at, so replies leave in command order and a DATA
after failed recipients sees the failures.  Input that piles up meanwhile
pauses the socket rather than growing without bound.

Every wait for the client has a timeout (:meth:`SMTPServerProtocol._period`):
``command_timeout`` between commands, ``data_timeout`` per DATA block (and
per block of a BDAT chunk, whose octets are fed to the dialogue's
``data_reader`` as DATA's are: :mod:`relaymail.smtp.chunking`), and
for a client outside ``trusted_networks`` while the connection gate is
stressed (the table nearly full) the shorter ``stress_timeout``, with
``stress_errors`` and ``stress_junk_commands`` for its error limits.  A
session follows the gate as it goes in and out of stress, so the sessions
already open shorten their waits too.
"""

import time

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from relaymail import logline, tcp
from relaymail.client_address import in_networks
from relaymail.metrics import instruments
from relaymail.smtp import proxy, replies
from relaymail.smtp.dialogue import Dialogue, SessionContext
from relaymail.tls_session import negotiated_cipher, negotiated_tls

log = Logger(namespace="relaymail.smtp")

# Command lines: RFC 5321 4.5.3.1.4 allows 512 octets plus what extensions
# add; Postfix reads up to 2048 (line_length_limit) before calling a line
# too long.
COMMAND_LINE_LIMIT = 2048
SASL_LINE_LIMIT = 12288
# Pipelined input held while a reply is pending, before the socket is paused.
_MAX_HELD_INPUT = 256 * 1024

# After QUIT (or any close) over TLS, how long the client has to answer our
# close_notify before the connection is cut: Twisted's TLS waits for the
# client's, and a client that never sends it must not keep a connection
# slot.  Postfix's smtpd waits for none; a few seconds lets a polite
# client finish its side.
_TLS_CLOSE_GRACE = 5.0


@implementer(IPushProducer)
class SMTPServerProtocol(Protocol, TimeoutMixin):
    """One inbound SMTP connection.

    It is also the producer of its replies: when a client pipelines
    commands but does not read the answers, the transport's buffer fills,
    the transport pauses us, and we stop reading commands until it drains,
    so no client can make the server hold replies without bound.
    """

    def __init__(self, factory):
        self.factory = factory
        # TimeoutMixin schedules through this; tests give a task.Clock.
        self.callLater = factory.reactor.callLater
        # When the client's present wait began, and when it runs out: a
        # stress that starts or ends moves the end, never the beginning.
        self._wait_since = self._wait_until = None
        self._buffer = b""
        self._waiting = False
        self._paused = False
        self._output_blocked = False
        self._closing = False
        self._producing = False      # registered as the transport's producer
        self._close_timer = None     # cuts a TLS close the client does not answer
        self._skipping_long_line = False
        self._errors = 0
        self._data_started = 0.0
        self._data_bytes = 0
        self._admitted = False
        self._stressed = False       # the gate is stressed and we are an outsider
        self._proxy_peer = None      # the proxy's address, until its header came
        self._ending = False         # the process is stopping: 421 at the next command
        self.dialogue = None
        self.context = None

    def connectionMade(self):
        tcp.no_delay(self.transport)
        instruments.connection_opened()
        if self.factory.sessions is not None:
            self.factory.sessions.add(self)
        if self._closing:
            return                  # ended at once: the process is stopping
        self.transport.registerProducer(self, True)
        self._producing = True
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", "") or ""
        port = getattr(peer, "port", None)
        self.setTimeout(self.factory.settings.limits.command_timeout)
        if self.factory.proxy:
            if not self.factory.is_proxy_trusted(ip):
                log.info("unknown[{ip}]:{port}: PROXY listener: not in proxy_trusted; closed",
                         ip=ip, port=port)
                self._close()
                return
            self._proxy_peer = (ip, port)
            return
        self._start_session(ip, port)

    def _start_session(self, ip, port):
        """The client is known: check the limits, greet it."""
        trusted = self.factory.is_trusted(ip)
        self.context = SessionContext(ip, port, trusted=trusted)
        self.dialogue = Dialogue(self.factory.settings, self.factory.policy, self.factory.queue,
                                 self.context, clock=self.factory.clock,
                                 submission=self.factory.submission,
                                 tls=self.factory.tls, auth=self.factory.auth,
                                 transactions=(self.factory.sessions.transactions
                                               if self.factory.sessions is not None else None))
        self.dialogue.tls_active = self.factory.implicit_tls
        refusal = self.factory.gate.admit(ip, exempt=trusted) if self.factory.gate else None
        if refusal is not None:
            log.info("{session} {client}: connect refused: {reason}", reason=refusal,
                     **self.context.log_fields)
            # In place of the greeting, but with its enhanced code, as
            # Postfix does: "421 4.7.0" is what limits are known by.
            reply = replies.Reply(421, "4.7.0", f"{self.dialogue.hostname} {refusal}")
            self.transport.write(reply.encode(enhanced=True))
            self._close()
            return
        self._admitted = self.factory.gate is not None
        if self._admitted and not trusted:
            # Trusted clients keep the normal limits: stress is for
            # shedding outsiders, and trusted ones have their reserve.
            self.factory.gate.watch(self._stress_changed)
            self._stress_changed(self.factory.gate.stressed)
        logline.info(log, f"{self.context.label}: connect trusted={'yes' if trusted else 'no'}",
                     client_port=port, trusted=trusted, **self.context.log_fields)
        self._answer(self.dialogue.connected())

    def connectionLost(self, reason):
        instruments.connection_closed()
        self._closing = True
        self.setTimeout(None)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self.factory.sessions is not None:
            self.factory.sessions.remove(self)
        if self._admitted:
            self._admitted = False
            self.factory.gate.unwatch(self._stress_changed)
            self.factory.gate.release(self.context.client_ip)
        if self.dialogue is not None:
            self.dialogue.connection_lost()
            counts = self.dialogue.command_counts()
            logline.info(log, f"{self.context.label}: disconnect {counts}",
                         commands=sum(self.dialogue.commands.values()),
                         **self.context.log_fields)

    def _stress_changed(self, stressed):
        """The gate went in or out of stress: take its limits, and move the
        end of the client's wait.  A stress gives a waiting client at most
        ``stress_timeout`` more; its end gives back the wait that applies
        without one, counted from where the wait began.  Restarting the
        whole wait at each change would let a client that can push the
        count in and out of stress keep idle sessions open for good."""
        if stressed == self._stressed:
            return
        self._stressed = stressed
        limits = self.factory.settings.limits
        self.dialogue.junk_limit = limits.stress_junk_commands if stressed else limits.junk_commands
        if self._waiting or self._closing:
            return
        if self._wait_since is None:        # no clock runs (timeOut is None too)
            self.setTimeout(self._period())
            return
        now = self.factory.reactor.seconds()
        if stressed:
            until = min(self._wait_until, now + self._period())
        else:
            until = self._wait_since + self._period()
        TimeoutMixin.setTimeout(self, max(0.0, until - now))
        self._wait_until = until

    def setTimeout(self, period):
        """TimeoutMixin's, noting when this wait began and ends."""
        self._wait_began(period)
        return TimeoutMixin.setTimeout(self, period)

    def resetTimeout(self):
        """TimeoutMixin's, noting when this wait began and ends."""
        TimeoutMixin.resetTimeout(self)
        self._wait_began(self.timeOut)

    def _wait_began(self, period):
        if period is None:
            self._wait_since = self._wait_until = None
        else:
            self._wait_since = self.factory.reactor.seconds()
            self._wait_until = self._wait_since + period

    def _period(self):
        """How long the client may keep us waiting now."""
        limits = self.factory.settings.limits
        in_data = self.dialogue is not None and self.dialogue.data_reader is not None
        period = limits.data_timeout if in_data else limits.command_timeout
        return min(period, limits.stress_timeout) if self._stressed else period

    def _restart_timer(self):
        """The client did its part: its next wait starts now."""
        if self.timeOut is None:
            return                  # our turn, not the client's: no clock runs
        period = self._period()
        if period == self.timeOut:
            self.resetTimeout()     # reuses the DelayedCall: cheaper per line
        else:
            self.setTimeout(period)

    def timeoutConnection(self):
        if self.dialogue is None:
            self._close()       # no PROXY header in time
            return
        log.info("{session} {client}: timeout", **self.context.log_fields)
        self.dialogue.connection_lost()
        self._reply(replies.timeout(self.dialogue.hostname), close=True)

    def _read_proxy_header(self):
        """Wait for the PROXY header; then start the session as the client
        it names.  Return True once the session has started."""
        try:
            result = proxy.parse(self._buffer)
        except proxy.ProxyHeaderError as error:
            log.info("unknown[{ip}]:{port}: bad PROXY header: {error}", ip=self._proxy_peer[0],
                     port=self._proxy_peer[1], error=str(error))
            self._close()
            return False
        if result is proxy.NEED_MORE:
            return False
        address, consumed = result
        self._buffer = self._buffer[consumed:]
        ip, port = (address.host, address.port) if address else self._proxy_peer
        self._proxy_peer = None
        self._start_session(ip, port)
        return True

    def dataReceived(self, data):
        if self._closing:
            return
        if self.dialogue is not None and self.dialogue.data_reader is not None:
            # RFC 5321 4.5.3.2.5: the DATA timeout is per block received;
            # the data rate bounds the whole DATA phase.
            self._restart_timer()
            self._data_bytes += len(data)
            if self._too_slow():
                return
        self._buffer += data
        if self._proxy_peer is not None and not self._read_proxy_header():
            return
        if self._waiting or self._output_blocked:
            self._update_reading()
            return
        self._process()

    # -- flow control --------------------------------------------------------

    def pauseProducing(self):
        """The transport's output buffer is full: stop answering."""
        self._output_blocked = True
        self._update_reading()

    def resumeProducing(self):
        self._output_blocked = False
        self._update_reading()
        self._process()

    def stopProducing(self):
        self._closing = True

    def _update_reading(self):
        """Stop reading from the socket once too much input waits for us.

        Only then: a TLS transport holds our output back until its handshake
        is done, and the handshake needs reading to go on."""
        pause = (self._output_blocked or self._waiting) and len(self._buffer) > _MAX_HELD_INPUT
        if pause and not self._paused and not self._closing:
            self._paused = True
            self.transport.pauseProducing()
        elif not pause and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # -- an orderly stop (relaymail.smtp.sessions) ------------------------------

    @property
    def waiting_for_queue(self):
        """A reply is owed to the client (its 250 after the final dot, or a
        plugin's answer): cutting now could lose what it was told."""
        return self._waiting

    def end_politely(self):
        """The process is stopping: end now if the client is between
        commands, else after the reply it is owed."""
        self._ending = True
        if self.dialogue is None:
            self._close()           # no session yet (a PROXY header awaited)
            return
        self._end_if_between_commands()

    def _end_if_between_commands(self):
        if (self._ending and not self._closing and not self._waiting
                and self.dialogue.data_reader is None):
            # RFC 5321 3.8: a server shutting down sends 421 and closes.
            self.dialogue.connection_lost()
            self._reply(replies.shutting_down(self.dialogue.hostname), close=True)

    def cut(self):
        """The grace is over: close with no more said."""
        if self.dialogue is not None:
            self.dialogue.connection_lost()
        self._closing = True
        self.setTimeout(None)
        self.transport.abortConnection()

    def _process(self):
        """Handle buffered input until it runs out or a reply is pending."""
        if self.dialogue is None:
            return          # still waiting for a PROXY header
        self._process_input()
        self._end_if_between_commands()

    def _process_input(self):
        while self._buffer and not self._waiting and not self._closing and not self._output_blocked:
            reader = self.dialogue.data_reader
            if reader is not None:
                end = reader.feed(self._buffer)
                if end is None:
                    self._buffer = b""
                    return
                self._buffer = self._buffer[end:]
                answer = self.dialogue.finish_data()
                # After finish_data: the data phase is over, so the wait
                # for the next command (after a chunk answered at once) is
                # a command wait, not one as long as data_timeout.
                self.setTimeout(self._period())
                self._answer(answer)
                continue
            limit = self._line_limit()
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > limit:
                    # Drop what we have and the rest of the line when it comes;
                    # its tail is never read as a command.
                    self._buffer = b""
                    if not self._skipping_long_line:
                        self._skipping_long_line = True
                        self._line_too_long()
                return
            if self._ending:
                return              # 421 in place of this command (above)
            line = self._buffer[:newline]
            self._buffer = self._buffer[newline + 1:]
            if self._skipping_long_line:
                self._skipping_long_line = False
                continue
            # A command timeout runs from one whole command to the next: a
            # byte now and then does not keep a session alive (slowloris).
            self._restart_timer()
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._line_too_long()
                continue
            if self.dialogue.tls_active and self.dialogue.tls_cipher is None:
                # A line came through TLS, so the handshake is done.
                self._tls_done()
                instruments.tls_session("in", self.transport)
            in_sasl = self.dialogue.in_sasl
            answer = self.dialogue.handle(line)
            if not in_sasl:
                instruments.command(line, answer)
            if answer is None:
                # BDAT: its chunk follows, and the reply comes once the
                # chunk is read (RFC 3030 2).
                self._data_phase_started()
                continue
            self._answer(answer)

    def _tls_done(self):
        self.dialogue.tls_cipher = negotiated_cipher(self.transport)
        self.context.tls = negotiated_tls(self.transport)
        logline.info(log, f"{self.context.label}: TLS {self.context.tls}", tls=self.context.tls,
                     **self.context.log_fields)

    def _line_too_long(self):
        # RFC 4954 4: an over-long line in an AUTH exchange ends it with
        # 500 5.5.6; any other is a command too long (RFC 5321 4.5.3.1.4).
        reply = replies.AUTH_LINE_TOO_LONG if self.dialogue.in_sasl else replies.LINE_TOO_LONG
        self.dialogue.cancel_sasl()
        self._reply(reply)

    def _line_limit(self):
        # RFC 4954 4: AUTH responses may be up to 12288 octets.
        return SASL_LINE_LIMIT if self.dialogue.in_sasl else COMMAND_LINE_LIMIT

    def _answer(self, result):
        """Send a reply now, or once its Deferred fires, holding input till then."""
        if not isinstance(result, defer.Deferred):
            self._reply(result)
            return
        early = []
        in_call = True

        def arrived(reply):
            if in_call:
                early.append(reply)
            else:
                self._late_reply(reply)

        result.addErrback(self._failed)
        result.addCallback(arrived)
        in_call = False
        if early:
            self._reply(early[0])
        else:
            # Our turn (a plugin, the queue's fsync): the client is not
            # idle, so its command timeout must not run out meanwhile.
            self._waiting = True
            self.setTimeout(None)

    def _failed(self, failure):
        log.failure("command failed for {client_ip}", failure, client_ip=self.context.client_ip)
        return replies.LOCAL_ERROR

    def _late_reply(self, reply):
        self._waiting = False
        if self.transport is None or self._closing:
            return
        # The clock was stopped while we, not the client, were busy.
        self.setTimeout(self._period())
        self._reply(reply)
        self._update_reading()
        self._process()

    def _reply(self, reply, close=False):
        if self._closing:
            return
        # Sent at once unless pipelined commands wait in the buffer: their
        # replies then go together, in one write after the last.
        tcp.write(self.transport, reply.encode(self.dialogue.enhanced_codes),
                  at_once=not self._buffer)
        instruments.reply_sent(reply)
        if reply is replies.START_DATA:
            self._data_phase_started()
        if self.dialogue.start_tls:
            self._start_tls()
            return
        if close or self.dialogue.closing:
            self._close()
            return
        if (reply.is_error and not self.dialogue.repeated_error) or self.dialogue.excess_junk:
            self._errors += 1
            limits = self.factory.settings.limits
            if self._errors >= (limits.stress_errors if self._stressed else limits.errors):
                log.info("{session} {client}: too many errors", **self.context.log_fields)
                self.transport.write(replies.too_many_errors(self.dialogue.hostname).encode(
                    self.dialogue.enhanced_codes))
                self._close()

    def _data_phase_started(self):
        """Message octets come now: the data timeout and rate apply."""
        self.setTimeout(self._period())
        self._data_started = self.factory.reactor.seconds()
        self._data_bytes = 0

    def _too_slow(self):
        """Postfix smtpd_min_data_rate: DATA may take data_timeout plus the
        time to send what came at min_data_rate bytes per second, no more,
        so a trickle of bytes cannot hold a session for ever."""
        limits = self.factory.settings.limits
        if not limits.min_data_rate:
            return False
        elapsed = self.factory.reactor.seconds() - self._data_started
        if elapsed <= limits.data_timeout + self._data_bytes / limits.min_data_rate:
            return False
        log.info("{session} {client}: data rate too low", **self.context.log_fields)
        self.dialogue.connection_lost()
        self._reply(replies.Reply(421, "4.4.2", f"{self.dialogue.hostname} {replies.DATA_TOO_SLOW}"),
                    close=True)
        return True

    def _start_tls(self):
        # SMTP-NOTES attack class 2 (CVE-2011-0411): whatever the client sent
        # after the STARTTLS line came in plain text and must not be read
        # as if it came over TLS.
        self._buffer = b""
        # The ServerTLS itself: it hands each new connection the certificate
        # loaded now, so a reload reaches the next STARTTLS.
        self.transport.startTLS(self.factory.tls)
        self.dialogue.tls_started()

    def _close(self):
        self._closing = True
        self._buffer = b""
        self.setTimeout(None)
        # RFC 5321 4.1.1.10: after the 221 the server closes.  A registered
        # producer holds a TLS transport's close back until it unregisters
        # (twisted.protocols.tls): no close_notify and no close went out, so
        # a TLS session stayed open after QUIT until the client hung up, and
        # a client that waits for the server's close (Exim) waited.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._close_timer is None and ISSLTransport.providedBy(self.transport):
            self._close_timer = self.callLater(_TLS_CLOSE_GRACE, self._cut)

    def _cut(self):
        self._close_timer = None
        if self.transport is not None and self.transport.connected:
            self.transport.abortConnection()


class SMTPFactory(ServerFactory):
    """Makes a protocol per connection; holds what all sessions share."""

    # Our own connect/disconnect lines say more than Twisted's start/stop ones.
    noisy = False

    def __init__(self, settings, policy, queue, clock=None, reactor=None, *,
                 submission=False, proxy=False, gate=None, tls=None, auth=None,
                 implicit_tls=False, sessions=None):
        """:param submission: MAIL needs AUTH first (port 587 style).
        :param proxy: connections start with a PROXY protocol header.
        :param gate: a relaymail.smtp.limits.ConnectionGate, shared by all
            listeners, or None for no connection limits.
        :param tls: a relaymail.smtp.tls.ServerTLS for STARTTLS, or None.
        :param auth: a relaymail.smtp.authentication.Authenticator, or None.
        :param implicit_tls: the listener is TLS from the first byte (an
            ``ssl:`` endpoint, port 465 style).
        :param sessions: a relaymail.smtp.sessions.OpenSessions shared by
            the process's listeners, so that a stop can end them in order;
            None keeps no account."""
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.clock = clock or time.time
        self.submission = submission
        self.proxy = proxy
        self.gate = gate
        self.tls = tls
        self.auth = auth
        self.implicit_tls = implicit_tls
        self.sessions = sessions
        self._trusted = settings.server.trusted_networks
        self._proxy_trusted = settings.server.proxy_trusted

    def buildProtocol(self, addr):
        return SMTPServerProtocol(self)

    def is_trusted(self, ip):
        return in_networks(ip, self._trusted)

    def is_proxy_trusted(self, ip):
        return in_networks(ip, self._proxy_trusted)

