"""relaymail's outbound ESMTP client: the API the delivery scheduler calls.

:func:`connect` opens a session to one :class:`Hop` -- greeting, EHLO (HELO
for old servers), STARTTLS as the TLS policy says (or TLS from the first
byte under ``wrapper``), AUTH when configured --
and :meth:`OutboundSession.deliver` runs one mail transaction on it, as
often as the scheduler likes.  Failures before per-recipient answers are
one :class:`DeliveryError`; per-recipient answers are
:class:`RecipientResult`.  A refusal that is about our own credentials or
TLS set-up (AUTH refused, a 530 asking for them, TLS required but not to be
had) is always a temporary error: it says nothing about the recipient, and
bouncing on it would lose every message until someone fixed the set-up.

The dialogue's order lives here; bytes, timers and TLS switching live in
:mod:`relaymail.delivery.wire`, the pure pieces in
:mod:`~relaymail.delivery.responses`, :mod:`~relaymail.delivery.transaction`,
:mod:`~relaymail.delivery.stuffing`, :mod:`~relaymail.delivery.sasl` and
:mod:`~relaymail.delivery.tls`.
"""

import functools
import ipaddress
from dataclasses import dataclass, field

from twisted.internet import defer, error, threads
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from relaymail.delivery import chunking, dane, downgrade, sasl, tls, tls_policy, tls_report
from relaymail.delivery.outcomes import DeliveryError, RecipientResult, error_from_reply, our_side
from relaymail.delivery.responses import parse_ehlo
from relaymail.delivery.transaction import (
    BODY_TYPES, assemble_results, check_message, delivered, dsn_commands, held_back,
    mail_command, over_the_limit, rcpt_command, result_from, too_many)
from relaymail.delivery.wire import ClientConnection
from relaymail.queue.queue_file import open_message
from relaymail.tls_session import negotiated_tls

__all__ = ["ClientConfig", "DeliveryError", "Hop", "OutboundSession", "RecipientResult", "connect"]

# RFC 5321 4.5.3.2.2: the client waits 2 minutes for the reply to DATA.
DATA_INITIATION_TIMEOUT = 120


@dataclass(frozen=True)
class Hop:
    """One place to try, as the routing module finds it.

    :ivar name: the host name (for TLS verification and logs), or the IP
        address when routed by an address literal.
    :ivar address: the IP address to connect to.
    :ivar port: the TCP port.
    :ivar security: a :class:`relaymail.delivery.tls_policy.HopSecurity`
        when the router holds this hop to TLS of its own (DANE, MTA-STS,
        [tls_policy], REQUIRETLS), else None: ``ClientConfig.tls`` decides.
    """

    name: str
    address: str
    port: int
    # Not part of equality: a hop is where to connect; what TLS it must
    # have is a note on it (tests and logs compare hops by place).
    security: object = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """Postfix style ``'name[address]:port'``, e.g.
        ``'mx.example.com[192.0.2.1]:25'``."""
        return f"{self.name}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class ClientConfig:
    """How to talk to a hop.  Timeouts are seconds, defaults from RFC 5321
    4.5.3.2 (commands 5 minutes, each data block 3, after the final dot 10).

    ``tls`` is ``'none'``, ``'may'``, ``'encrypt'`` or ``'verify'``, as
    Postfix's ``smtp_tls_security_level``, or ``'wrapper'``, TLS from the
    first byte checked as under ``verify`` (see :mod:`relaymail.delivery.tls`).
    ``auth_password`` stays out of ``repr`` so it cannot reach a log.
    """

    helo_name: str
    tls: str = "may"
    ca_file: str | None = None
    auth_user: str | None = None
    auth_password: str | None = field(default=None, repr=False)
    connect_timeout: float = 30
    command_timeout: float = 300       # initial 220, EHLO, MAIL, RCPT, STARTTLS, AUTH
    data_timeout: float = 600          # the reply after the final dot
    data_block_timeout: float = 180    # the server taking no data at all for this long
    quit_timeout: float = 10           # not in the RFC: QUIT must not hold a connection long
    mime_nesting_limit: int = downgrade.DEFAULT_NESTING_LIMIT   # for the 8-bit downgrade
    #: A hop the site chose (the smarthost, a route), not a recipient's MX:
    #: when it answers MAIL with 530, it wants credentials or TLS that our
    #: set-up does not bring, so the message waits for the fix.
    chosen_hop: bool = False
    #: A relaymail.delivery.tls_report.TLSReportRecorder counting the
    #: sessions held to DANE or MTA-STS, or None.
    tls_report: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.tls not in tls.POLICIES:
            raise ValueError(f"tls must be one of {', '.join(tls.POLICIES)}, not {self.tls!r}")
        name = self.helo_name
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise ValueError(f"helo_name must be one ASCII word, not {name!r}")


def connect(reactor, hop, config):
    """Open a session to ``hop``, ready for MAIL.

    Connects within ``connect_timeout``, reads the 220 greeting, says EHLO
    (HELO when EHLO gets a 5xx, RFC 5321 3.2), starts TLS as ``config.tls``
    says and authenticates when ``config.auth_user`` is set.

    :return: a Deferred firing with an :class:`OutboundSession`, or failing
        with :class:`DeliveryError` (the connection is then closed).
    """
    return defer.Deferred.fromCoroutine(_open_session(reactor, hop, config))


def tls_level(hop, config):
    """The TLS level ``hop`` is held to: its own, else the configuration's."""
    return hop.security.level if hop.security is not None else config.tls


async def _open_session(reactor, hop, config):
    implicit = None
    if tls_level(hop, config) == "wrapper":
        try:
            implicit = tls.client_options("wrapper", hop.name, config.ca_file)
        except (OSError, ValueError) as exc:
            raise DeliveryError(temporary=True, code=None, enhanced="4.7.5",
                                text=f"cannot set up TLS for {hop.label}: {exc}",
                                remote=hop.label) from None
    connection = ClientConnection(reactor, hop.label, hop.name, implicit_tls=implicit)
    endpoint = _endpoint(reactor, hop, config.connect_timeout)
    try:
        await endpoint.connect(_OneConnection(connection))
    except defer.CancelledError:
        raise
    except Exception as exc:
        raise DeliveryError(temporary=True, code=None, enhanced="4.4.1",
                            text=f"connect to {hop.label}: {connect_problem(exc)}",
                            remote=hop.label) from None
    session = OutboundSession(reactor, hop, config, connection)
    try:
        await session._start()
    except GeneratorExit:
        # The coroutine is being thrown away (at a worker's exit after a
        # drain gave its job back, the reactor has closed the socket): no
        # QUIT, which would be written to a closed socket, just let go.
        try:
            connection.abort()
        except Exception:
            pass
        raise
    except BaseException:
        session._hang_up()
        raise
    return session


class OutboundSession:
    """An open, greeted (and perhaps encrypted and authenticated) session.

    :ivar remote: the hop's label.
    :ivar extensions: EHLO keywords (upper-case) -> parameters, from the
        latest EHLO (the one after STARTTLS when TLS is on).
    :ivar tls: True when TLS is active.
    """

    def __init__(self, clock, hop, config, connection):
        self._clock = clock
        self._hop = hop
        self._config = config
        self._connection = connection
        self._busy = False
        self._needs_reset = False
        #: The connection's bodies_begun when the transaction under way began.
        self._bodies_before = 0
        self.remote = hop.label
        self.extensions = {}
        #: The TLS level held to (relaymail.delivery.tls_policy).
        self._level = tls_level(hop, config)
        #: What proved the server's certificate, once TLS is up: "DANE-EE",
        #: "DANE-TA" or "PKIX"; None when nothing was checked.
        self._verified_by = None
        #: Under MTA-STS testing, what enforce would have refused (for
        #: TLS-RPT), or None.
        self._testing_problem = None

    @property
    def tls(self):
        """True when TLS is active."""
        return self._connection.tls_active

    @property
    def tls_description(self):
        """For the delivery log line: ``"TLSv1.3 TLS_AES_256_GCM_SHA384
        verified"`` (the chain and name were checked: ``verify`` and
        ``wrapper``), ``"... verified by DANE-EE"`` (or DANE-TA),
        ``"... unverified"`` (``may``, ``encrypt``), or ``"none"``; then,
        for a hop the router chose the TLS of (every MX host), the policy
        that did: ``", tls_policy=dane"`` (``mta-sts``, ``mta-sts-testing``,
        ``dane-unusable`` or the configured level)."""
        if not self.tls:
            return self._with_policy("none")
        described = negotiated_tls(self._connection.transport) or "TLS"
        if self._verified_by == "PKIX":
            described += " verified"
        elif self._verified_by:
            described += f" verified by {self._verified_by}"
        else:
            described += " unverified"
        return self._with_policy(described)

    def _with_policy(self, described):
        """The TLS description with the policy that chose the level, when
        one other than the configuration's did (DANE, MTA-STS, ...)."""
        security = self._hop.security
        if security is None:
            return described
        return f"{described}, tls_policy={security.policy}"

    def is_open(self):
        """True while the connection can carry another transaction."""
        return self._connection.usable

    def deliver(self, sender, recipients, message_path, *, body="7BIT", smtputf8=False,
                envelope=None, size=None):
        """Run a mail transaction and report each recipient's result.

        ``sender`` ``''`` is the null sender.  ``message_path`` is the
        spooled message (CRLF line ends), streamed from disk.  MAIL carries
        SIZE when offered, BODY=8BITMIME when ``body`` says so and SMTPUTF8
        when ``smtputf8``.  To a server without 8BITMIME, 8-bit content is
        converted to 7 bits, and SMTPUTF8 is dropped for a server without it
        when the message does not need it (:mod:`relaymail.delivery.downgrade`).
        ``envelope``, the queue record's, carries the sender's DSN requests
        (RET, ENVID, NOTIFY, ORCPT: :mod:`relaymail.dsn`), passed on to a
        server that offers DSN.  ``size``, the message's length from its
        record, is how much of the queue file to send (None: the file
        says, relaymail.queue.queue_file).
        With PIPELINING (RFC 2920) MAIL, every RCPT and
        DATA go in one write.  Recipients the server refuses as more than
        it takes in one transaction ("452 4.5.3 too many recipients") go
        in further transactions on the connection straight after.

        :return: a Deferred firing with a list of :class:`RecipientResult`
            in the order of ``recipients``, or failing with
            :class:`DeliveryError` (MAIL refused, the message too big or
            needing an extension the server lacks, a timeout, a lost
            connection).  May be called again once it has fired.
        """
        return defer.Deferred.fromCoroutine(
            self._deliver(sender, list(recipients), message_path, body, smtputf8, envelope,
                          size))

    def ask_recipient(self, recipient):
        """Ask whether the server takes ``recipient`` without sending mail:
        ``MAIL FROM:<>`` and ``RCPT TO`` (a callout, as Postfix's
        reject_unverified_recipient or Exim's verify = recipient/callout
        ask).  The transaction is left open and reset by the next question
        or message; with PIPELINING that RSET, MAIL and RCPT go in one
        write (RFC 2920 3.1 lets all three stand anywhere in a group).

        :return: a Deferred firing with the :class:`RecipientResult` of the
            RCPT reply, or failing with :class:`DeliveryError` when the
            question could not be put (a refused MAIL FROM:<> included:
            it says nothing about the recipient).
        """
        return defer.Deferred.fromCoroutine(self._ask_recipient(recipient))

    def quit(self):
        """Say QUIT and close; wait for the 221 or the close, at most
        ``quit_timeout`` seconds.  Never fails."""
        return defer.Deferred.fromCoroutine(self._quit())

    def abort(self):
        """Drop the connection now."""
        self._connection.abort()

    def drop_before_the_message(self):
        """Drop the connection if the delivery under way has not begun to
        send its message: a server takes a message only at the end of its
        data (RFC 5321 4.1.1.4; with BDAT, at its last chunk: RFC 3030), so
        it then has nothing to deliver.

        :return: True if dropped; False if no delivery is under way or
            some of its message went (the server may deliver it)."""
        if not self._busy or self._connection.bodies_begun != self._bodies_before:
            return False
        self._connection.abort()
        return True

    def wait_closed(self):
        """A Deferred firing once the connection is gone."""
        return self._connection.wait_closed()

    # -- opening -----------------------------------------------------------

    async def _start(self):
        greeting = await self._reply("receiving the initial server greeting")
        if greeting.code != 220:
            raise error_from_reply(greeting, self.remote)
        await self._hello()
        try:
            await self._secure()
        except DeliveryError as exc:
            self._count_tls(exc)
            raise
        self._count_tls(None)
        security = self._hop.security
        if security is not None and security.requiretls and "REQUIRETLS" not in self.extensions:
            # RFC 8689 4.2.1: REQUIRETLS mail goes only to a server that
            # promises to keep the requirement on.  Permanent: the next
            # host may have it, and this one will not grow it.
            raise DeliveryError(temporary=False, code=None,
                                enhanced=tls_policy.REQUIRETLS_ENHANCED,
                                text=f"REQUIRETLS: host {self.remote} does not offer REQUIRETLS",
                                remote=self.remote)
        if self._config.auth_user is not None:
            await self._authenticate()
        if not self._connection.usable:
            # A session handed to the pool must be able to take a job: one
            # that cannot would be opened again and again, its jobs never run.
            raise (self._connection.error
                   or self._error("4.4.2", f"connection to {self.remote} closed while opening"))

    async def _secure(self):
        """STARTTLS (or not) as the level says, the certificate checked."""
        policy = self._level
        if policy == "wrapper":
            self._verified_by = "PKIX"
        elif policy != "none":
            if "STARTTLS" in self.extensions:
                await self._start_tls()
            elif tls.tls_required(policy):
                raise self._error(
                    "4.7.4", f"TLS is required, but was not offered by host {self.remote}")

    def _count_tls(self, error):
        """One session for TLS-RPT (RFC 8460), when the hop is held to a
        domain's DANE or MTA-STS policy: a success once the certificate
        was checked, a failure with the result type of ``error``."""
        recorder, security = self._config.tls_report, self._hop.security
        if recorder is None or not recorder.reported(security):
            return
        if error is not None and not self._after_tls(error):
            recorder.failure(security, tls_report.classify(error.text), self._hop.name,
                             self._hop.address)
        elif self._verified_by is not None:
            recorder.success(security, self._hop.name)
        elif security.policy == "mta-sts-testing":
            # Delivered either way; the report says how enforce would have gone.
            problem = ("TLS was not offered" if not self.tls
                       else self._testing_problem)
            if problem is None:
                recorder.success(security, self._hop.name)
            else:
                recorder.failure(security, tls_report.classify(problem), self._hop.name,
                                 self._hop.address)

    def _after_tls(self, error):
        """The session failed once TLS was up and checked, for a reason
        that is not TLS (a 5xx to the second EHLO)."""
        text = error.text
        return (self._verified_by is not None and error.code is not None
                and "TLS" not in text and "certificate" not in text)

    async def _hello(self):
        name = self._config.helo_name.encode("ascii")
        self._connection.send(b"EHLO " + name)
        reply = await self._reply("receiving the reply to EHLO")
        if reply.positive:
            self.extensions = parse_ehlo(reply)
            return
        if not reply.permanent:
            raise error_from_reply(reply, self.remote)
        # RFC 5321 3.2: a server that does not know EHLO says 5xx; HELO
        # still works, without any extension.
        self._connection.send(b"HELO " + name)
        reply = await self._reply("receiving the reply to HELO")
        if not reply.positive:
            raise error_from_reply(reply, self.remote)
        self.extensions = {}

    async def _start_tls(self):
        policy = self._level
        try:
            options = tls.client_options(policy, self._hop.name, self._config.ca_file)
        except (OSError, ValueError) as exc:
            raise self._error("4.7.5", f"cannot set up TLS for {self.remote}: {exc}") from None
        reply = await self._connection.start_tls(options, self._config.command_timeout)
        if reply.code == 421:
            # The server is closing the channel (RFC 5321 3.8): no plain
            # text to carry on in.  The next hop, if any, is the answer.
            raise error_from_reply(reply, self.remote)
        if reply.code != 220:
            if not tls.tls_required(policy):
                # Opportunistic TLS: a refusal leaves the session in plain
                # text and in step, so carry on as if it was not offered.
                return
            raise DeliveryError(
                temporary=True, code=reply.code, enhanced="4.7.4",
                text=f"TLS is required, but host {self.remote} refused to start TLS: {reply}",
                remote=self.remote)
        if policy == "dane":
            self._check_tlsa()
        elif policy == "verify":
            self._verified_by = "PKIX"
        # RFC 3207 4.2: everything learned before TLS is void; ask again.
        self.extensions = {}
        await self._hello()
        security = self._hop.security
        if (security is not None and security.policy == "mta-sts-testing"
                and self._config.tls_report is not None):
            self._testing_check()

    def _testing_check(self):
        """MTA-STS testing (RFC 8461 5): the certificate is checked as
        enforce would, only to be reported (TLS-RPT), never to refuse."""
        try:
            chain = tls.peer_chain(self._connection.transport)
            problem = tls.pkix_problem(chain, self._hop.name, self._config.ca_file)
        except Exception as exc:
            problem = f"unreadable certificate chain ({type(exc).__name__})"
        self._testing_problem = problem

    def _check_tlsa(self):
        """Hold the server's certificate chain to the hop's TLSA records
        (RFC 7672 3); a mismatch ends the session before EHLO is said
        again, so nothing of a message goes to an impostor."""
        security = self._hop.security
        try:
            chain = tls.peer_chain(self._connection.transport)
        except Exception as exc:
            match = dane.Match(False, text=f"unreadable certificate chain "
                                           f"({type(exc).__name__}: {exc})")
        else:
            match = dane.match_chain(security.tlsa, chain, list(security.names))
        if not match.ok:
            self._connection.abort()
            raise self._error("4.7.5", f"DANE: the certificate of {self.remote} matches none "
                                       f"of its TLSA records: {match.text}")
        self._verified_by = "DANE-TA" if match.usage == 2 else "DANE-EE"

    async def _authenticate(self):
        if not self.tls:
            raise self._error("4.7.0", "refusing to send credentials without TLS")
        offered = sasl.offered_mechanisms(self.extensions)
        if not offered:
            raise self._error("4.7.0", f"authentication is configured, but host {self.remote} "
                                       "does not offer AUTH")
        mechanism = sasl.choose_mechanism(offered)
        if mechanism is None:
            raise self._error("4.7.0", f"host {self.remote} offers no AUTH mechanism we support "
                                       f"({' '.join(sorted(offered))})")
        user = self._config.auth_user
        password = self._config.auth_password or ""
        send = self._connection.send
        what = f"receiving the reply to AUTH {mechanism}"
        if mechanism == "PLAIN":
            send(b"AUTH PLAIN " + sasl.plain_response(user, password).encode("ascii"))
            reply = await self._reply(what)
        else:
            send(b"AUTH LOGIN")
            reply = await self._reply(what)
            # Two challenges, user name then password (both 334).
            for answer in (user, password):
                if reply.code != 334:
                    break
                send(sasl.login_response(answer).encode("ascii"))
                reply = await self._reply(what)
        if reply.code == 334:
            # Still asking after the password: the exchange is not over, so
            # a QUIT now would be read as an answer.  Hang up instead.
            self._connection.abort()
        if reply.code == 235:
            return
        if reply.code == 421:
            # The server closing the channel, not judging our credentials.
            raise error_from_reply(reply, self.remote)
        if reply.transient or reply.permanent:
            # 535 5.7.8 (RFC 4954 6), 534 5.7.9, 538 5.7.11, 504 5.5.4 ...:
            # all say our credentials or mechanism will not do.
            raise our_side(reply, self.remote, f"SASL authentication ({mechanism})")
        raise error_from_reply(reply, self.remote)

    # -- transactions ------------------------------------------------------

    async def _deliver(self, sender, recipients, message_path, body, smtputf8, envelope=None,
                       length=None):
        if body not in BODY_TYPES:
            raise ValueError(f"body must be one of {', '.join(BODY_TYPES)}, not {body!r}")
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        if self._busy:
            raise RuntimeError("deliver() called while another transaction is running")
        self._busy = True
        self._bodies_before = self._connection.bodies_begun
        try:
            with self._open_message(message_path, length) as spooled:
                size = spooled.size
                file, size, body, smtputf8 = await self._fit(
                    spooled, size, body, smtputf8, [sender, *recipients])
                try:
                    check_message(self.extensions, size, body, smtputf8, self.remote)
                    mail = mail_command(sender, self.extensions, size, body, smtputf8,
                                        self.remote)
                    rcpts = [rcpt_command(r, smtputf8, self.remote) for r in recipients]
                    if envelope is not None and "DSN" in self.extensions:
                        mail, rcpts = dsn_commands(envelope, mail, rcpts, recipients)
                    if envelope is not None and envelope.get("requiretls"):
                        mail = self._with_requiretls(mail)
                    await self._ready_for_mail()
                    results = await self._transaction(mail, rcpts, recipients, file, size)
                    return await self._the_rest(results, mail, rcpts, recipients, file, size)
                finally:
                    if file is not spooled:
                        file.close()        # the converted copy
        finally:
            self._busy = False

    async def _the_rest(self, results, mail, rcpts, recipients, file, size):
        """``results``, with the recipients the server refused as over its
        per-transaction limit (transaction.over_the_limit) sent again in
        further transactions on this connection, at once rather than
        after a retry's backoff: each as many as the server took in the
        first, for as long as each delivers to someone.

        A recipient still refused that way at the end keeps its refusal,
        made temporary (RFC 5321 4.5.3.1.10) so that it is retried.  A
        further transaction that fails leaves what is decided decided:
        raising would have the pool send the delivered ones again.
        """
        waiting = over_the_limit(results)
        # How many RCPTs the server took before refusing more; at least
        # one, since it delivered to someone.
        room = max(waiting[0], 1) if waiting else 0
        while waiting:
            batch, rest = waiting[:room], waiting[room:]
            try:
                file.seek(0)
                await self._ready_for_mail()
                again = await self._transaction(
                    mail, [rcpts[i] for i in batch], [recipients[i] for i in batch], file, size)
            except DeliveryError as failure:
                self._connection.abort()
                said = (failure.text if failure.code is None
                        else f"{failure.code} {failure.enhanced} {failure.text}")
                for i in waiting:
                    results[i] = held_back(results[i], f"a further transaction failed: {said}")
                break
            for i, result in zip(batch, again, strict=True):
                results[i] = result
            if not any(delivered(result) for result in again):
                break       # the rest wait for the retry, with their refusal
            waiting = [batch[j] for j in over_the_limit(again)] + rest
        # Whatever is still refused as too many (with nobody delivered to
        # in the first transaction too): a 552 5.5.3 is no reason to bounce.
        return [held_back(result) if too_many(result) else result for result in results]

    def _with_requiretls(self, mail):
        """MAIL with REQUIRETLS (RFC 8689 4.2.1), on a session fit for it:
        the router sends such mail only by hops held to it (their own
        connections: tls_policy.with_demand), so this is a last guard
        against a job on the wrong session, never the decision."""
        security = self._hop.security
        if (security is None or not security.requiretls or not self._verified_by
                or "REQUIRETLS" not in self.extensions):
            raise DeliveryError(temporary=False, code=None,
                                enhanced=tls_policy.REQUIRETLS_ENHANCED,
                                text=f"REQUIRETLS: the session with {self.remote} is not "
                                     "verified TLS with REQUIRETLS", remote=self.remote)
        return mail + b" REQUIRETLS"

    async def _fit(self, file, size, body, smtputf8, addresses):
        """The file, size and MAIL parameters to send to this server: the
        message as spooled, or converted for a server without 8BITMIME."""
        if downgrade.fits(self.extensions, smtputf8) or body == "BINARYMIME":
            # Binary content is never converted (check_message refuses it
            # for a server without BINARYMIME, RFC 3030 3).
            return file, size, body, smtputf8
        work = functools.partial(
            downgrade.fit, file, size, body=body, smtputf8=smtputf8, addresses=addresses,
            extensions=self.extensions, nesting_limit=self._config.mime_nesting_limit)
        pool = getattr(self._clock, "getThreadPool", None)
        try:
            if pool is None:
                fitted = work()       # a clock without threads (task.Clock)
            else:
                # The scan and conversion take time in proportion to the
                # message (under a second for 10 MB of text, seconds for a
                # hostile one of 100,000 tiny parts): not on the reactor
                # thread that every session shares.
                fitted = await threads.deferToThreadPool(self._clock, pool(), work)
        except downgrade.CannotSend as refusal:
            missing = "SMTPUTF8" if refusal.enhanced == "5.6.7" else "8BITMIME"
            raise DeliveryError(temporary=False, code=None, enhanced=refusal.enhanced,
                                text=f"{refusal.reason}, and {self.remote} does not offer "
                                     f"{missing}",
                                remote=self.remote) from None
        except OSError as exc:
            raise DeliveryError(temporary=True, code=None, enhanced="4.3.0",
                                text=f"cannot convert the message to 7 bits: {exc.strerror or exc}",
                                remote=self.remote) from None
        return fitted.file, fitted.size, fitted.body, fitted.smtputf8

    def _open_message(self, path, length):
        try:
            return open_message(path, length)
        except OSError as exc:
            raise DeliveryError(temporary=True, code=None, enhanced="4.3.0",
                                text=f"cannot read the message file: {exc.strerror}",
                                remote=self.remote) from None

    async def _ready_for_mail(self):
        connection = self._connection
        stray = connection.unread_reply()
        if stray is not None:
            # Said while we were idle, typically 421 before a hang-up.
            connection.abort()
            raise error_from_reply(stray, self.remote)
        if not connection.usable:
            raise self._error("4.4.2", f"connection to {self.remote} is closed")
        if tls.tls_required(self._level) and not self.tls:
            raise self._error("4.7.4", f"TLS is required, but not active with {self.remote}")
        if self._needs_reset:
            connection.send(b"RSET")
            reply = await self._reply("receiving the reply to RSET")
            if not reply.positive:
                connection.abort()
                raise error_from_reply(reply, self.remote)
            self._needs_reset = False

    async def _transaction(self, mail, rcpts, recipients, file, size):
        connection = self._connection
        # Cleared only when the final reply after the message ends the
        # transaction (RFC 5321 4.1.1.4); any other ending leaves server
        # state that the next transaction resets first.
        self._needs_reset = True
        if "CHUNKING" in self.extensions:
            return await self._bdat_transaction(mail, rcpts, recipients, file, size)
        rcpt_replies, data_reply = await exchange_envelope(
            connection, self._reply, self._mail_refused, "PIPELINING" in self.extensions,
            mail, rcpts, self._config.command_timeout)
        self._raise_on_421(rcpt_replies if data_reply is None else [*rcpt_replies, data_reply])
        for reply in rcpt_replies:
            self._expect_decision(reply)
        if not any(reply.positive for reply in rcpt_replies):
            if data_reply is not None and data_reply.code == 354:
                # A server that takes DATA with no recipient: ending the
                # data would make an empty message; hanging up makes none.
                connection.abort()
            return assemble_results(recipients, rcpt_replies, None)
        if data_reply.code != 354:
            if data_reply.positive:
                # "250" to DATA: no message went, so nothing was delivered.
                connection.abort()
                raise error_from_reply(data_reply, self.remote)
            self._expect_decision(data_reply)
            return assemble_results(recipients, rcpt_replies, data_reply)
        try:
            await connection.send_message(file, self._config.data_block_timeout)
            final = await self._reply("receiving the reply to the end of data",
                                      self._config.data_timeout)
        except DeliveryError as error:
            error.met_after_data()
            raise
        self._needs_reset = False
        self._expect_decision(final)
        return assemble_results(recipients, rcpt_replies, final)

    async def _bdat_transaction(self, mail, rcpts, recipients, file, size):
        """The transaction with the message in BDAT chunks (RFC 3030):
        :mod:`relaymail.delivery.chunking`."""
        config = self._config
        timeouts = chunking.Timeouts(command=config.command_timeout, final=config.data_timeout,
                                     block=config.data_block_timeout)
        rcpt_replies, outcome, ended = await chunking.bdat_transaction(
            self._connection, self._reply, self._mail_refused,
            "PIPELINING" in self.extensions, mail, rcpts, file, size, timeouts)
        if outcome is None or not outcome.positive:
            # (A server that went on after its 421 and took the message
            # for the others has delivered it: no other hop then.)
            self._raise_on_421(rcpt_replies)
        for reply in rcpt_replies:
            self._expect_decision(reply)
        if outcome is not None:
            self._expect_decision(outcome)
        if ended:
            self._needs_reset = False
        return assemble_results(recipients, rcpt_replies, outcome)

    async def _ask_recipient(self, recipient):
        if self._busy:
            raise RuntimeError("ask_recipient() called while another transaction is running")
        self._busy = True
        try:
            smtputf8 = not recipient.isascii() and "SMTPUTF8" in self.extensions
            mail = mail_command("", {}, 0, "7BIT", smtputf8, self.remote)
            rcpt = rcpt_command(recipient, smtputf8, self.remote)
            reset = self._needs_reset
            if "PIPELINING" in self.extensions and reset:
                self._needs_reset = False       # the RSET goes in the group below
            await self._ready_for_mail()
            self._needs_reset = True
            if "PIPELINING" in self.extensions:
                commands = ([b"RSET"] if reset else []) + [mail, rcpt]
                self._connection.send(*commands)
                replies = [await self._reply(f"receiving the reply to {what}")
                           for what in (["RSET"] if reset else []) + ["MAIL FROM", "RCPT TO"]]
                if reset and not replies.pop(0).positive:
                    self._connection.abort()
                    raise self._error("4.5.0", f"{self.remote} refused RSET")
                mail_reply, rcpt_reply = replies
            else:
                self._connection.send(mail)
                mail_reply = await self._reply("receiving the reply to MAIL FROM")
                rcpt_reply = None
                if mail_reply.positive:
                    self._connection.send(rcpt)
                    rcpt_reply = await self._reply("receiving the reply to RCPT TO")
            if not mail_reply.positive:
                raise self._mail_refused(mail_reply)
            self._expect_decision(rcpt_reply)
            return result_from(recipient, rcpt_reply)
        finally:
            self._busy = False

    def _mail_refused(self, reply):
        """The error for a refused MAIL FROM.  530 is "authentication
        required" (RFC 4954 6) or "must issue STARTTLS first" (RFC 3207 4):
        the server wants credentials or TLS we did not bring.  From a hop
        the site chose, or when we brought credentials, that is our set-up
        to fix, not a reason to return the message; a recipient's MX that
        wants AUTH from the world refuses the message like any 5xx."""
        if reply.code == 530 and (self._config.chosen_hop or self._config.auth_user is not None):
            return our_side(reply, self.remote, "MAIL FROM (the server wants AUTH or TLS)")
        return error_from_reply(reply, self.remote)

    def _raise_on_421(self, replies):
        """A 421 to a RCPT or to DATA ended the session before the server
        took any message: the transaction failed as a whole, so that the
        pool tries the next hop, as it does when the wait for a later
        reply hears the 421."""
        for reply in replies:
            if reply.code == 421:
                self._connection.abort()
                raise error_from_reply(reply, self.remote)

    def _expect_decision(self, reply):
        """A reply that should accept or refuse (2xx, 4xx, 5xx); anything
        else means the server is out of step."""
        if not (reply.positive or reply.transient or reply.permanent):
            self._connection.abort()
            raise error_from_reply(reply, self.remote)

    # -- closing -----------------------------------------------------------

    async def _quit(self):
        connection = self._connection
        if not connection.usable:
            connection.abort()
            return None
        if not self._busy:
            connection.send(b"QUIT")
            try:
                await self._reply("receiving the reply to QUIT", self._config.quit_timeout)
            except DeliveryError:
                pass
        connection.close(self._config.quit_timeout)
        await connection.wait_closed()
        return None

    def _hang_up(self):
        """End a session that failed while opening: politely when the server
        is still in step (RFC 5321 3.1 asks for QUIT even after a refusal),
        at once otherwise."""
        connection = self._connection
        if connection.usable:
            connection.send(b"QUIT")
            connection.close(self._config.quit_timeout)
        else:
            connection.abort()

    # -- helpers -----------------------------------------------------------

    def _reply(self, what, timeout=None):
        if timeout is None:
            timeout = self._config.command_timeout
        return self._connection.next_reply(timeout, what)

    def _error(self, enhanced, text):
        """A temporary failure of our own making (no server reply)."""
        return DeliveryError(temporary=True, code=None, enhanced=enhanced, text=text,
                             remote=self.remote)


class _OneConnection(Factory):
    """Hands the endpoint our already-built protocol; quiet, because the
    scheduler opens many connections and logs them itself."""

    noisy = False

    def __init__(self, connection):
        self._connection = connection

    def buildProtocol(self, addr):
        self._connection.factory = self
        return self._connection


def _endpoint(reactor, hop, timeout):
    try:
        version = ipaddress.ip_address(hop.address).version
    except ValueError:
        return HostnameEndpoint(reactor, hop.address, hop.port, timeout=timeout)
    kind = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
    return kind(reactor, hop.address, hop.port, timeout=timeout)


async def exchange_envelope(connection, reply, mail_refused, pipelining, mail, rcpts,
                            command_timeout):
    """Send MAIL, each RCPT and DATA and read their replies: the one
    exchange SMTP and LMTP (RFC 2033) share.

    :param reply: the session's reader, ``reply(what, timeout=None)``.
    :param mail_refused: gives the exception to raise for a refused MAIL.
    :param pipelining: the server offers PIPELINING: all in one write.
    :return: ``(rcpt_replies, data_reply)``; ``data_reply`` is None when
        DATA was not sent (no recipient was accepted, unpipelined).
    """
    data_timeout = min(DATA_INITIATION_TIMEOUT, command_timeout)
    if pipelining:
        # RFC 2920 3.1: MAIL and RCPT may go anywhere in a group, DATA
        # only last.
        connection.send(mail, *rcpts, b"DATA")
        mail_reply = await reply("receiving the reply to MAIL FROM")
        rcpt_replies = [await reply("receiving the reply to RCPT TO") for _ in rcpts]
        data_reply = await reply("receiving the reply to DATA", data_timeout)
        if not mail_reply.positive:
            if data_reply.code == 354:
                connection.abort()
            raise mail_refused(mail_reply)
        return rcpt_replies, data_reply
    connection.send(mail)
    mail_reply = await reply("receiving the reply to MAIL FROM")
    if not mail_reply.positive:
        raise mail_refused(mail_reply)
    rcpt_replies = []
    for rcpt in rcpts:
        connection.send(rcpt)
        rcpt_replies.append(await reply("receiving the reply to RCPT TO"))
    data_reply = None
    if any(answer.positive for answer in rcpt_replies):
        connection.send(b"DATA")
        data_reply = await reply("receiving the reply to DATA", data_timeout)
    return rcpt_replies, data_reply


def connect_problem(exc):
    """The connect failure in the words Postfix logs use."""
    if isinstance(exc, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, error.TimeoutError):
        return "Connection timed out"
    if isinstance(exc, error.NoRouteError):
        return "No route to host"
    if isinstance(exc, error.ConnectError):
        # A transport closed while still connecting (a stop aborting it)
        # fails with ConnectError(string=<the Failure>), whose repr would
        # put "Traceback" in an ordinary log line: name what it wraps.
        for wrapped in (exc.osError, *exc.args):
            if isinstance(wrapped, Failure):
                return connect_problem(wrapped.value)
    return " ".join(str(exc).split()) or type(exc).__name__
