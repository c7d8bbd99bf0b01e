"""The ``lmtp`` transport: handing mail to a mailbox server by LMTP (RFC 2033).

LMTP is SMTP for a server without a queue (Dovecot, Cyrus): ``LHLO``
instead of ``EHLO``, and after the final dot one reply per accepted
recipient, in RCPT order (RFC 2033 4.2), because the server stores into
each mailbox in turn and one may fail (over quota) while another succeeds.
So a transaction reports per recipient even past the dot, which the SMTP
client (one reply for all) cannot.

One :meth:`LMTPTransport.deliver` call is one connection and, as a rule,
one transaction: greeting, LHLO, MAIL (with ``BODY=8BITMIME`` and ``SMTPUTF8``
when the message needs them), one RCPT per recipient, DATA, the message
dot-stuffed and streamed from its file (:mod:`relaymail.delivery.stream`),
one reply per accepted recipient, QUIT.  With PIPELINING (which RFC 2033 5
makes mandatory for servers; used only when advertised all the same) MAIL,
every RCPT and DATA go in one write, as RFC 2920 3.1 allows.  Recipients
refused as more than the server takes in one transaction (452 4.5.3) go
in further transactions on the same connection at once, as in the SMTP
client (:func:`relaymail.delivery.transaction.over_the_limit`); one
follows only a transaction ended by its replies after the dot, so there
is never an RSET, and QUIT ends any transaction.

The message is read from the queue file itself when the scheduler's view
of it is the file as it is, else from a temporary copy of what
``IMessage.open()`` gives when that cannot seek or be mapped: a further
transaction reads it again from the start, and the 8-bit conversion maps
it.

The bytes, timers and reply parsing are the SMTP client's
(:class:`relaymail.delivery.wire.ClientConnection`), and so are the command
builders and the checks before sending (:mod:`~relaymail.delivery.transaction`).

What becomes of each recipient:

* a reply decides it: 2xx delivered, 4xx deferred, 5xx bounced, with the
  server's enhanced code as the status and its reply in the reason;
* the connection lost, a timeout or a garbled reply before a recipient's
  reply: deferred (4.4.2, 4.5.0).  After the final dot that may deliver a
  message twice -- the server may have stored it and died before saying so
  -- which is the queue's contract: better twice than lost;
* a greeting or LHLO refused: deferred whatever the code.  The next hop is
  the site's own mailbox server, so a refusal there says nothing about the
  recipient and bouncing on it would return every message until the server
  is fixed (the reasoning of Postfix ``smtp_sasl_auth_soft_bounce``);
* a bad next hop (no port, port 25, a relative socket path): deferred
  4.3.5, logged as an error.  A typo in a route must not bounce mail;
  4.3.5 is "system incorrectly configured" (RFC 3463), the code Postfix
  gives its own configuration errors;
* 8-bit content for a server without 8BITMIME (RFC 2033 5 says SHOULD,
  not MUST): converted to 7 bits as the SMTP client does
  (:mod:`relaymail.delivery.downgrade`); a message that cannot be converted
  (8-bit inside multipart/signed, 8-bit headers without SMTPUTF8) is
  deferred, not bounced, for the same reason as a refused LHLO: the fix is
  the site's server, and the queue lifetime still ends the wait;
* a message over the server's SIZE, or MAIL refused with 5xx: bounced, as
  those are about the message;
* a "too many recipients" refusal left over (the server delivered to
  nobody, or a further transaction failed): deferred, an RFC 821 server's
  552 5.5.3 as 4.5.3 (RFC 5321 4.5.3.1.10);
* the call cancelled (``[delivery] transport_timeout``, a stop): the
  outcomes decided so far are still returned, the rest deferred,
  so that a recipient delivered is never sent again at the retry.

Over TCP, STARTTLS (RFC 3207) when the server offers it, opportunistic as
Postfix's ``may``: encrypted, the certificate not checked, plain text
when the server does not offer it or refuses.  A failed handshake defers
(4.7.5), as in the SMTP client.  Never over a Unix socket, where the
kernel carries the bytes and TLS would only cost.  LMTP runs by prior
arrangement on the same host or a private network (RFC 2033 1), so
there is no policy key to require or verify TLS yet.
"""

import functools
import io
import ipaddress
import os
import shutil
import tempfile

from twisted.internet import defer, threads
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from relaymail.delivery import downgrade, tls
from relaymail.delivery.client import ClientConfig, connect_problem, exchange_envelope
from relaymail.delivery.outcomes import DeliveryError
from relaymail.delivery.responses import parse_ehlo
from relaymail.delivery.transaction import (
    check_message, mail_command, over_the_limit, rcpt_command, result_from, too_many)
from relaymail.delivery.wire import ClientConnection
from relaymail.interfaces import ITransport, RecipientOutcome
from relaymail.queue.message_view import whole_file
from relaymail.queue.queue_file import open_message

__all__ = ["LMTPTransport", "NextHop", "parse_next_hop"]

log = Logger(namespace="relaymail.delivery")

# RFC 2033 1: "it MUST NOT be used on TCP port 25".
SMTP_PORT = 25


class NextHop:
    """Where an LMTP server listens: a Unix socket ``path``, or TCP
    ``host`` and ``port``.  ``label`` names it in reasons and logs."""

    __slots__ = ("path", "host", "port", "label")

    def __init__(self, path=None, host=None, port=None):
        self.path = path
        self.host = host
        self.port = port
        if path is not None:
            self.label = path
        elif ":" in host:
            self.label = f"[{host}]:{port}"
        else:
            self.label = f"{host}:{port}"

    def __eq__(self, other):
        if not isinstance(other, NextHop):
            return NotImplemented
        return (self.path, self.host, self.port) == (other.path, other.host, other.port)

    def __repr__(self):
        return f"NextHop({self.label!r})"


def parse_next_hop(next_hop):
    """Read a Route's next hop for LMTP.

    ``/run/dovecot/lmtp`` or ``unix:/run/dovecot/lmtp`` is a Unix socket
    (an absolute path: a relative one would depend on the working
    directory); ``[host]:port`` or ``host:port`` is TCP (``[::1]:24`` for
    IPv6).  LMTP has no port of its own, so one must be given.

    :return: a :class:`NextHop`.
    :raise ValueError: naming the problem, for the routing layer to report
        as a configuration error.
    """
    if not isinstance(next_hop, str) or not next_hop.strip():
        raise ValueError("an lmtp route needs a next hop: a socket path or host:port")
    text = next_hop.strip()
    if text.startswith("unix:"):
        text = text[len("unix:"):]
        if not text.startswith("/"):
            raise ValueError(f"{next_hop!r}: the socket path must be absolute")
    if text.startswith("/"):
        if "\0" in text:
            raise ValueError(f"{next_hop!r}: NUL in the socket path")
        return NextHop(path=text)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"{next_hop!r}: expected [host]:port")
        if not rest.startswith(":"):
            raise ValueError(f"{next_hop!r}: no port (LMTP has no default port, RFC 2033)")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            if "/" in text:
                raise ValueError(f"{next_hop!r}: the socket path must be absolute")
            raise ValueError(f"{next_hop!r}: no port (LMTP has no default port, RFC 2033)")
        if not host or ":" in host:
            raise ValueError(f"{next_hop!r}: expected host:port (write IPv6 as [address]:port)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{next_hop!r}: the port must be a number from 1 to 65535")
    if int(port_text) == SMTP_PORT:
        raise ValueError(f"{next_hop!r}: LMTP must not be used on port 25 (RFC 2033 1)")
    if any(char.isspace() for char in host):
        raise ValueError(f"{next_hop!r}: white space in the host name")
    return NextHop(host=host, port=int(port_text))


def client_config(settings):
    """The LHLO name and timeouts from ``[delivery]``: ``helo_name`` (or
    ``[server] hostname``), ``connect_timeout``, ``command_timeout`` (the
    greeting, LHLO, MAIL, RCPT), ``data_timeout`` (each recipient's reply
    after the final dot) and ``mime_nesting_limit`` (the 8-bit
    conversion).  The rest keeps the SMTP client's defaults: 3 minutes for
    the server to take a block of data, 10 s for QUIT."""
    delivery = settings.delivery
    return ClientConfig(
        helo_name=delivery.helo_name or settings.server.hostname,
        tls="may",          # over TCP only; see the module docstring
        connect_timeout=delivery.connect_timeout,
        command_timeout=delivery.command_timeout,
        data_timeout=delivery.data_timeout,
        mime_nesting_limit=delivery.mime_nesting_limit,
        chosen_hop=True,
    )


@implementer(ITransport)
class LMTPTransport:
    """The built-in ``lmtp`` transport (see the module docstring)."""

    name = "lmtp"

    def __init__(self, reactor, settings, config=None):
        self._reactor = reactor
        self._config = config if config is not None else client_config(settings)

    def deliver(self, message, recipients, next_hop):
        """Deliver ``message`` to ``recipients`` at the LMTP server
        ``next_hop`` names; see :meth:`relaymail.interfaces.ITransport.deliver`.

        :return: a Deferred firing with a dict from every one of
            ``recipients`` to a :class:`RecipientOutcome`; it never fails.
        """
        recipients = list(dict.fromkeys(recipients))
        try:
            hop = parse_next_hop(next_hop)
        except ValueError as exc:
            log.error("{queue_id}: lmtp: bad next hop: {problem}; deferring {count} "
                      "recipient(s) until the route is fixed",
                      queue_id=getattr(message, "queue_id", "?"), problem=str(exc),
                      count=len(recipients))
            reason = f"lmtp transport misconfigured: {exc}"
            return defer.succeed(
                {r: RecipientOutcome.deferred(reason, "4.3.5") for r in recipients})
        if not recipients:
            return defer.succeed({})
        session = _Session(self._reactor, hop, self._config, message, recipients)
        return defer.Deferred.fromCoroutine(session.run())


class _Session:
    """One connection, one transaction (and more for recipients over the
    server's limit); ``outcomes`` fills in as replies come, and whatever
    is left when something fails gets that failure."""

    def __init__(self, reactor, hop, config, message, recipients):
        self._reactor = reactor
        self._hop = hop
        self._config = config
        self._message = message
        self._recipients = recipients
        self._remote = hop.label
        self._connection = None
        self._size = None
        self._was_cut = False
        self.outcomes = {}

    async def run(self):
        files = []
        try:
            await self._transaction(files)
        except DeliveryError as error:
            self._settle_rest(error)
        except defer.CancelledError:
            self._cut()
        except Exception as exc:      # a bug here must not lose the message
            log.failure("{queue_id}: lmtp delivery to {remote} failed",
                        queue_id=self._message.queue_id, remote=self._remote)
            self._settle_rest(DeliveryError(
                temporary=True, code=None, enhanced="4.3.0",
                text=f"local error delivering by LMTP: {type(exc).__name__}: {exc}",
                remote=self._remote))
        finally:
            await self._end(files)
        return self.outcomes

    def _cut(self):
        """Cut by [delivery] transport_timeout or a stop (the Deferred
        cancelled): what is decided is still told, or a recipient
        delivered would be sent again at every retry; the rest deferred."""
        if self._connection is not None:
            self._connection.abort()
        if self._was_cut:
            return      # cancelled again while hanging up
        self._was_cut = True
        delivered = sum(o.kind == RecipientOutcome.DELIVERED for o in self.outcomes.values())
        self._settle_rest(DeliveryError(
            temporary=True, code=None, enhanced="4.4.2", text=self._cut_short(),
            remote=self._remote))
        log.warn("{queue_id}: {problem}; {delivered} of {total} recipient(s) delivered",
                 queue_id=self._message.queue_id, problem=self._cut_short(),
                 delivered=delivered, total=len(self._recipients))

    async def _end(self, files):
        """Hang up, then close the files: only once the connection is gone,
        as until then the body's producer may still be asked for a chunk."""
        try:
            if self._connection is not None:
                await self._hang_up()
        except defer.CancelledError:
            # Cancelled while waiting for QUIT's reply or the close (or a
            # second time): the outcomes stand as they are.
            self._cut()
            self._connection.wait_closed().addBoth(lambda _: _close_all(files))
            return
        except BaseException:
            _close_all(files)
            raise
        _close_all(files)

    # -- the dialogue ------------------------------------------------------

    async def _transaction(self, files):
        envelope = self._message.envelope
        spooled = await self._open_message()
        files.append(spooled)
        await self._connect()
        greeting = await self._reply("receiving the initial server greeting")
        if greeting.code != 220:
            raise self._refused(greeting, "the greeting")
        extensions = await self._hello()
        if self._hop.path is None and "STARTTLS" in extensions:
            extensions = await self._start_tls(extensions)
        file, size, body, smtputf8 = await self._fit(
            spooled, extensions, envelope.body, envelope.smtputf8,
            [envelope.sender, *self._recipients])
        if file is not spooled:
            files.append(file)
        check_message(extensions, size, body, smtputf8, self._remote)
        mail = mail_command(envelope.sender, extensions, size, body, smtputf8, self._remote)
        rcpts = self._rcpt_commands(smtputf8)
        if not rcpts:
            return
        said = {}
        note = None
        try:
            await self._one_transaction(extensions, mail, rcpts, file, said)
            note = await self._the_rest(extensions, mail, rcpts, file, said)
        except defer.CancelledError:
            note = self._cut_short()
            raise
        finally:
            # Also when a transaction failed part way.  A recipient a
            # failed further transaction did not decide still has its
            # latest refusal in ``said``, and waits with the note.
            # (Accepted there and stored, its reply lost, it is delivered
            # twice: better than lost.)
            for recipient, reply in said.items():
                if too_many(result_from(recipient, reply)):
                    self.outcomes[recipient] = self._held_back(recipient, note)

    async def _one_transaction(self, extensions, mail, rcpts, file, said):
        """MAIL, a RCPT for each of ``rcpts`` (recipient to command), DATA
        and the message.  Each recipient's outcome goes in ``outcomes``,
        and the reply that decided it in ``said``, as the replies come:
        a failure part way leaves what was decided decided."""
        accepted = await self._envelope(extensions, mail, rcpts, said)
        if accepted:
            await self._data(file, accepted, said)

    async def _the_rest(self, extensions, mail, rcpts, file, said):
        """The recipients the server refused as more than it takes in one
        transaction (transaction.over_the_limit) sent again at once in
        further transactions on this connection, as the SMTP client does
        (``OutboundSession._the_rest``): each as many as the server took
        before its first refusal, for as long as each delivers to someone.

        A further transaction that fails leaves what was decided decided.
        :return: None, or a note of that failure for the recipients still
            waiting, which :meth:`_transaction` defers (a 552 5.5.3 as
            well: RFC 5321 4.5.3.1.10).
        """
        order = list(rcpts)
        waiting = self._over_the_limit(order, said)
        room = max(order.index(waiting[0]), 1) if waiting else 0
        while waiting:
            batch, rest = waiting[:room], waiting[room:]
            again = {}
            try:
                file.seek(0)
                await self._one_transaction(
                    extensions, mail, {r: rcpts[r] for r in batch}, file, again)
            except DeliveryError as failure:
                self._connection.abort()
                return f"a further transaction failed: {self._failure_said(failure)}"
            finally:
                # However it ended (cancelled too): a recipient it decided
                # is not held back on its old refusal.
                said.update(again)
            if not any(again[r].positive for r in batch):
                break       # the rest wait for the retry, with their refusal
            waiting = self._over_the_limit(batch, again) + rest
        return None

    def _cut_short(self):
        return (f"delivery by LMTP to {self._remote} cut short by a stop or "
                "[delivery] transport_timeout")

    def _failure_said(self, failure):
        """A DeliveryError in a note: with the server's code when it has
        one and the text does not already quote the reply."""
        if failure.code is None or failure.text.startswith(f"host {self._remote} said:"):
            return failure.text
        return f"{failure.code} {failure.enhanced} {failure.text}"

    @staticmethod
    def _over_the_limit(recipients, said):
        """Those of ``recipients`` (in RCPT order) whose reply in ``said``
        refuses them as too many for one transaction."""
        results = [result_from(r, said[r]) for r in recipients]
        return [recipients[i] for i in over_the_limit(results)]

    def _held_back(self, recipient, note=None):
        """A recipient's "too many recipients" refusal as it waits for the
        retry: deferred, a 552 as 4.5.3 (RFC 5321 4.5.3.1.10 asks a client
        to read an RFC 821 server's 552 as a 452), with ``note`` on what
        else was tried."""
        outcome = self.outcomes[recipient]
        reason = outcome.reason if note is None else f"{outcome.reason} ({note})"
        if outcome.kind == "bounced":
            return RecipientOutcome.deferred(
                reason + " (taken as temporary: RFC 5321 4.5.3.1.10)", "4.5.3")
        return RecipientOutcome.deferred(reason, outcome.status)

    async def _hello(self):
        self._connection.send(b"LHLO " + self._config.helo_name.encode("ascii"))
        reply = await self._reply("receiving the reply to LHLO")
        if not reply.positive:
            raise self._refused(reply, "LHLO")
        return parse_ehlo(reply)

    async def _start_tls(self, extensions):
        """Opportunistic STARTTLS (Postfix's ``may``): encrypted when the
        server agrees, the certificate not checked; a refusal leaves the
        session in plain text and in step."""
        options = tls.client_options("may", self._hop.host)
        reply = await self._connection.start_tls(options, self._config.command_timeout)
        if reply.code != 220:
            return extensions
        # RFC 3207 4.2: what the server said before TLS is void; ask again.
        return await self._hello()

    def _rcpt_commands(self, smtputf8):
        """RCPT lines by recipient; one that cannot be sent at all (CR or
        LF in it) is bounced alone."""
        commands = {}
        for recipient in self._recipients:
            try:
                commands[recipient] = rcpt_command(recipient, smtputf8, self._remote)
            except DeliveryError as error:
                self.outcomes[recipient] = _from_error(error)
        return commands

    async def _envelope(self, extensions, mail, rcpts, said):
        """MAIL, the RCPTs and DATA; the recipients accepted when DATA got
        354 (empty when none was, or DATA was refused)."""
        connection = self._connection
        rcpt_replies, data_reply = await exchange_envelope(
            connection, self._reply, self._mail_refused, "PIPELINING" in extensions,
            mail, list(rcpts.values()), self._config.command_timeout)
        accepted = []
        for recipient, reply in zip(rcpts, rcpt_replies, strict=True):
            self._expect_decision(reply, "RCPT TO")
            if reply.positive:
                accepted.append(recipient)
            else:
                self._decide(recipient, reply, "RCPT TO", said)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # Ending the data now would store an empty message for
                # nobody; hanging up stores nothing.
                connection.abort()
            return []
        if data_reply.code == 354:
            return accepted
        if data_reply.positive:
            connection.abort()
            raise self._protocol_error(f"{data_reply} in reply to DATA")
        self._expect_decision(data_reply, "DATA")
        for recipient in accepted:
            self._decide(recipient, data_reply, "DATA", said)
        return []

    async def _data(self, file, accepted, said):
        """The message, then one reply per accepted recipient, in RCPT
        order (RFC 2033 4.2)."""
        connection = self._connection
        connection.expect_more_replies(len(accepted) - 1)
        await connection.send_message(file, self._config.data_block_timeout)
        for recipient in accepted:
            reply = await self._reply(
                f"receiving the reply for <{recipient}> after the end of data",
                self._config.data_timeout)
            self._expect_decision(reply, "end of DATA")
            self._decide(recipient, reply, "end of DATA", said)

    # -- the pieces --------------------------------------------------------

    async def _open_message(self):
        """The message as a file that can be read again from its start (a
        further transaction) and mapped (the 8-bit conversion); its size
        in ``_size``.  In a thread: it may block on the disk."""
        try:
            file, self._size = await self._in_thread(
                functools.partial(_rereadable, self._message))
            return file
        except OSError as exc:
            raise DeliveryError(temporary=True, code=None, enhanced="4.3.0",
                                text=f"cannot read the message file: {exc.strerror or exc}",
                                remote=self._remote) from None

    async def _connect(self):
        hop = self._hop
        self._connection = ClientConnection(self._reactor, self._remote, hop.host or "localhost")
        factory = Factory.forProtocol(lambda: self._connection)
        factory.noisy = False     # the scheduler logs deliveries itself
        try:
            await _endpoint(self._reactor, hop, self._config.connect_timeout).connect(factory)
        except BaseException as exc:
            self._connection = None      # never connected: nothing to hang up
            if not isinstance(exc, Exception) or isinstance(exc, defer.CancelledError):
                raise
            raise DeliveryError(temporary=True, code=None, enhanced="4.4.1",
                                text=f"connect to {self._remote}: {connect_problem(exc)}",
                                remote=self._remote) from None

    async def _fit(self, file, extensions, body, smtputf8, addresses):
        """The file, size and MAIL parameters for this server: as spooled,
        or converted to 7 bits for a server without 8BITMIME."""
        size = self._size
        if downgrade.fits(extensions, smtputf8) or body == "BINARYMIME":
            # Binary content is never converted (check_message refuses it
            # for a server without BINARYMIME, RFC 3030 3).
            return file, size, body, smtputf8
        work = functools.partial(
            downgrade.fit, file, size, body=body, smtputf8=smtputf8, addresses=addresses,
            extensions=extensions, nesting_limit=self._config.mime_nesting_limit)
        try:
            fitted = await self._in_thread(work)
        except downgrade.CannotSend as refusal:
            missing = "SMTPUTF8" if refusal.enhanced == "5.6.7" else "8BITMIME"
            raise DeliveryError(
                temporary=True, code=None, enhanced="4" + refusal.enhanced[1:],
                text=f"{refusal.reason}, and the LMTP server {self._remote} does not offer "
                     f"{missing} (deferred until it does)",
                remote=self._remote) from None
        except OSError as exc:
            raise DeliveryError(temporary=True, code=None, enhanced="4.3.0",
                                text=f"cannot convert the message to 7 bits: {exc.strerror or exc}",
                                remote=self._remote) from None
        return fitted.file, fitted.size, fitted.body, fitted.smtputf8

    def _in_thread(self, work):
        pool = getattr(self._reactor, "getThreadPool", None)
        if pool is None:          # a clock without threads (task.Clock)
            return defer.maybeDeferred(work)
        return threads.deferToThreadPool(self._reactor, pool(), work)

    def _reply(self, what, timeout=None):
        if timeout is None:
            timeout = self._config.command_timeout
        return self._connection.next_reply(timeout, what)

    def _expect_decision(self, reply, stage):
        """2xx, 4xx or 5xx; anything else (a 354 to RCPT, a 3xx after the
        dot) means the server is out of step with us."""
        if not (reply.positive or reply.transient or reply.permanent):
            self._connection.abort()
            raise self._protocol_error(f"{reply} in reply to {stage}")

    def _said(self, reply, stage):
        return (f"host {self._remote} said: {reply.code} {reply.enhanced_or_derived} "
                f"{reply.text} (in reply to {stage})").rstrip()

    def _decide(self, recipient, reply, stage, said):
        self.outcomes[recipient] = self._from_reply(reply, stage)
        said[recipient] = reply

    def _from_reply(self, reply, stage):
        status = reply.enhanced_or_derived
        reason = self._said(reply, stage)
        if reply.positive:
            return RecipientOutcome.delivered(reason, status)
        if reply.transient:
            return RecipientOutcome.deferred(reason, status)
        return RecipientOutcome.bounced(reason, status)

    def _refused(self, reply, stage):
        """A greeting or LHLO refusal: deferred whatever the code (see the
        module docstring), the server's reply kept in the reason."""
        enhanced = reply.enhanced_or_derived
        return DeliveryError(
            temporary=True, code=reply.code, enhanced="4" + enhanced[1:],
            text=self._said(reply, stage) + " (deferred: the LMTP server is not taking mail)",
            remote=self._remote)

    def _mail_refused(self, reply):
        if not (reply.transient or reply.permanent):
            self._connection.abort()
            return self._protocol_error(f"{reply} in reply to MAIL FROM")
        return DeliveryError(temporary=reply.transient, code=reply.code,
                             enhanced=reply.enhanced_or_derived,
                             text=self._said(reply, "MAIL FROM"), remote=self._remote)

    def _protocol_error(self, problem):
        return DeliveryError(temporary=True, code=None, enhanced="4.5.0",
                             text=f"protocol error from {self._remote}: {problem}",
                             remote=self._remote)

    def _settle_rest(self, error):
        for recipient in self._recipients:
            if recipient not in self.outcomes:
                self.outcomes[recipient] = _from_error(error)

    async def _hang_up(self):
        """QUIT when the server is still in step, else drop the line; either
        way the connection is gone when this returns."""
        connection = self._connection
        if connection.usable:
            connection.send(b"QUIT")
            try:
                await connection.next_reply(self._config.quit_timeout,
                                            "receiving the reply to QUIT")
            except DeliveryError:
                pass
            connection.close(self._config.quit_timeout)
        else:
            connection.abort()
        await connection.wait_closed()


def _from_error(error):
    if error.temporary:
        status = error.enhanced or "4.0.0"
        if not status.startswith("4"):
            status = "4" + status[1:]
        return RecipientOutcome.deferred(error.text, status)
    return RecipientOutcome.bounced(error.text, error.enhanced or "5.0.0")


def _close_all(files):
    for file in files:
        file.close()


def _rereadable(message):
    """``(file, size)``: ``message`` in a file that can seek and be mapped.
    The queue file itself for a message read whole from it (the
    scheduler's), else what ``message.open()`` gives, copied to a
    temporary file when it is not a real file from its start
    (IMessage.open promises a file to read, no more; a MessageView with
    changed fields is not one).  The size is the file's: SIZE= and a
    further transaction's re-read go by it, not by what a site's
    IMessage says."""
    path = whole_file(message)
    if path is not None:
        file = open_message(path, message.size)
        return file, file.size
    file = message.open()
    try:
        if file.seekable() and file.tell() == 0:
            # In place only when the descriptor's file is what read() gives:
            # a wrapper's (MessageFile: the queue record follows; gzip) or
            # a procfs file's fstat size is not; the copy's always is.
            size = os.fstat(file.fileno()).st_size
            if type(getattr(file, "raw", file)) is io.FileIO and size == message.size:
                return file, size
    except Exception:
        pass        # not a real file: only read() is sure
    try:
        copy = tempfile.TemporaryFile(prefix="relaymail-lmtp-")
        try:
            shutil.copyfileobj(file, copy, 1 << 20)
            size = copy.tell()
            copy.seek(0)
        except BaseException:
            copy.close()
            raise
    finally:
        close = getattr(file, "close", None)
        if close is not None:
            close()
    return copy, size


def _endpoint(reactor, hop, timeout):
    if hop.path is not None:
        return UNIXClientEndpoint(reactor, hop.path, timeout=timeout)
    try:
        version = ipaddress.ip_address(hop.host).version
    except ValueError:
        return HostnameEndpoint(reactor, hop.host, hop.port, timeout=timeout)
    kind = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
    return kind(reactor, hop.host, hop.port, timeout=timeout)
