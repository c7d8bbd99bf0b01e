"""The SMTP command state machine (RFC 5321 4.1, 4.3.2).

:class:`Dialogue` takes one command line at a time and answers with a
:class:`~relaymail.smtp.replies.Reply`, or a Deferred of one when a plugin
or the queue must answer first.  It knows nothing of sockets: the Twisted
protocol in :mod:`relaymail.smtp.server` feeds it, keeps replies in command
order and streams DATA through :class:`~relaymail.smtp.data.DataReader`.
"""

import re
import time

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from relaymail import address, dsn, logline
from relaymail.metrics import instruments
from relaymail.envelope import Envelope
from relaymail.interfaces import ISessionContext
from relaymail.smtp import chunking, data, filtering, mail_auth, replies
from relaymail.smtp.received import received_header
from relaymail.smtp.session_id import new_session_id
from relaymail.smtp.tls import fit_for_passwords

log = Logger(namespace="relaymail.smtp")

# Commands whose arrival means a web client or proxy abuse, not SMTP
# (SMTP-NOTES attack class 7).
_HTTP_VERBS = frozenset({b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT", b"OPTIONS", b"DELETE"})

# BINARYMIME (RFC 3030 3): CHUNKING is offered in every EHLO session, and
# MAIL parameters are taken only there, so it is accepted with any MAIL.
_SUPPORTED_BODIES = ("7BIT", "8BITMIME", "BINARYMIME")

_JUNK_VERBS = frozenset({b"NOOP", b"RSET", b"VRFY", b"EXPN", b"HELP"})
# A HELO or EHLO after the session already has one is junk too: one a
# minute was enough to hold a connection for ever.
_GREETING_VERBS = frozenset({b"HELO", b"EHLO"})


@implementer(ISessionContext)
class SessionContext:
    """What plugins may know about the client; see ISessionContext."""

    def __init__(self, client_ip, client_port=None, trusted=False, session_id=None):
        self.client_ip = client_ip
        self.client_port = client_port
        self.trusted = trusted
        self.helo = None
        self.sender = None
        self.authenticated_user = None
        #: "TLSv1.3 TLS_AES_256_GCM_SHA384" once a TLS handshake is done.
        self.tls = None
        #: relaymail-check's sessions say so (ISessionContext.dry_run).
        self.dry_run = False
        self.session_id = session_id or new_session_id()
        self.queue_id = None
        # Postfix's "unknown[ip]": no reverse lookup is done on the accept
        # path (relaymail.smtp.received), so the name is never known.
        self.client = (f"unknown[{client_ip}]" if client_port is None
                       else f"unknown[{client_ip}]:{client_port}")
        #: What every log line of the session starts with.
        self.label = f"{self.session_id} {self.client}"
        #: The same as fields of the log event (``[log] format = json``).
        self.log_fields = {"session": self.session_id, "client": self.client,
                           "client_ip": client_ip}


class Transaction:
    """One MAIL ... DATA transaction; replaced whole on RSET, HELO/EHLO and
    after every DATA, so nothing of a rejected transaction leaks into the
    next (SMTP-NOTES: left-over state has let servers skip checks)."""

    def __init__(self, sender, body, smtputf8, dsn_request=(None, None)):
        self.sender = sender
        self.body = body
        self.smtputf8 = smtputf8
        self.recipients = []
        #: MAIL's RET and ENVID (relaymail.dsn), each None when not given.
        self.dsn_ret, self.dsn_envid = dsn_request
        #: RCPT's NOTIFY and ORCPT: {address: [notify, orcpt]}.
        self.dsn_recipients = {}
        #: Recipients owed an "expanded" notice (relaymail.dsn.inherit).
        self.dsn_expanded = None
        #: The message while BDAT chunks come (relaymail.smtp.chunking).
        self.chunks = None
        #: MAIL said REQUIRETLS (RFC 8689): delivered only over verified TLS.
        self.requiretls = False
        #: The header section says "TLS-Required: No" (RFC 8689 5).
        self.tls_optional = False


class Dialogue:
    """One client's session, sans I/O.

    :param settings: the relaymail.config.Settings.
    :param policy: answers check_recipient/verify/expand/expand_recipients
        (relaymail.policy); each returns a Deferred.
    :param queue: an IMessageQueue.
    :param context: this session's SessionContext.
    """

    def __init__(self, settings, policy, queue, context, clock=time.time, submission=False,
                 tls=None, auth=None, transactions=None):
        """:param tls: a relaymail.smtp.tls.ServerTLS when STARTTLS may be
            offered, else None.
        :param auth: a relaymail.smtp.authentication.Authenticator when AUTH
            may be offered, else None.
        :param transactions: a relaymail.smtp.sessions.OpenTransactions this
            session's transaction is counted in, or None."""
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.context = context
        self.hostname = settings.server.hostname
        self._clock = clock
        self.submission = submission
        self.tls = tls
        self.auth = auth
        #: TLS is active on this connection (STARTTLS done, or an ssl: listener).
        self.tls_active = False
        #: The suite TLS negotiated (OpenSSL's name), set by the protocol
        #: once the handshake is done; AUTH needs one fit for passwords.
        self.tls_cipher = None
        #: Commands of the session by name, for its disconnect line
        #: (Postfix's "ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6").
        self.commands = {}
        #: Set when the reply just given is STARTTLS's 220: the protocol
        #: starts the handshake and calls tls_started().
        self.start_tls = False
        self._sasl = None
        # Postfix smtpd_junk_command_limit: past it, each NOOP, RSET, VRFY,
        # EXPN, HELP or repeated HELO/EHLO counts as an error; a queued message starts afresh.
        self._junk = 0
        #: The junk limit now; the protocol lowers it while the connection
        #: gate is stressed ([limits] stress_junk_commands).
        self.junk_limit = settings.limits.junk_commands
        #: The command just handled was junk over the limit.
        self.excess_junk = False
        #: The reply just given repeats an earlier error: a BDAT chunk
        #: discarded after a failed one, which the client had already sent
        #: (RFC 3030 2), so it does not count towards [limits] errors.
        self.repeated_error = False
        self.esmtp = False
        self.transaction = None
        self._transactions = transactions
        self._counted = False       # this session's transaction is in _transactions
        #: Set after DATA got 354: the protocol feeds message bytes here.
        self.data_reader = None
        self._writer = None
        #: Set when the reply just given ends the session.
        self.closing = False
        #: A connect plugin refused the client: only QUIT is answered.
        self.refused = False

    # -- what the protocol asks ------------------------------------------

    @property
    def enhanced_codes(self):
        """RFC 2034: enhanced codes only once EHLO advertised them."""
        return self.esmtp

    def greeting(self):
        return replies.greeting(self.hostname)

    def connected(self):
        """The first reply: the greeting, or what the connect plugins
        (``[plugins] connect``) answer instead; a Reply or a Deferred of one."""
        if not self.policy.asks_at_connect:
            return self.greeting()
        d = self.policy.check_connection(self.context)
        return d.addCallback(self._connection_decided)

    def _connection_decided(self, answer):
        decision, plugin = answer
        if decision.kind not in (decision.REJECT_KIND, decision.DEFER_KIND):
            return self.greeting()
        text = replies.decision_reply(decision, replies.OK, utf8=False).text
        if decision.kind == decision.REJECT_KIND:
            # RFC 5321 3.1: a 554 greeting, and the client should QUIT; until
            # it does every command is refused (Postfix answers 503 too).
            self.refused = True
            reply = replies.Reply(decision.code, None, f"{self.hostname} {text}")
        else:
            # 421 is the one temporary greeting: the connection closes.
            self.closing = True
            reply = replies.Reply(421, None, f"{self.hostname} {text}")
        logline.info(log, f"{self.context.label}: connect refused by {plugin}: "
                          f"{reply.code} {decision.enhanced} {text}",
                     plugin=plugin, code=reply.code, enhanced=decision.enhanced,
                     **self.context.log_fields)
        return reply

    def extensions(self):
        """The EHLO keywords after the greeting line."""
        keywords = [
            "PIPELINING",
            f"SIZE {self.settings.limits.message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "BINARYMIME",
            "DSN",
        ]
        if self.tls is not None and not self.tls_active:
            keywords.append("STARTTLS")
        if self.tls_active:
            # RFC 8689 3: offered only on a TLS session.
            keywords.append("REQUIRETLS")
        if self._auth_offered():
            keywords.append("AUTH PLAIN LOGIN")
        keywords.append("HELP")
        return keywords

    def _auth_offered(self):
        # RFC 4954 14: PLAIN and LOGIN send the password as it is; only
        # over TLS unless the site says otherwise, and only over a suite
        # fit for passwords (relaymail.smtp.tls: the port 25 list keeps
        # weak suites for old MTAs).
        return (self.auth is not None and self.context.authenticated_user is None
                and (self.settings.auth.allow_plaintext
                     or (self.tls_active and self.tls_cipher is not None
                         and fit_for_passwords(self.tls_cipher))))

    def _auth_available(self):
        """AUTH is offered on this session, or the client used it: MAIL's
        AUTH parameter is taken (relaymail.smtp.mail_auth)."""
        return self.context.authenticated_user is not None or self._auth_offered()

    def handle(self, line):
        """Answer one command line (bytes, without its line end)."""
        if self._sasl is not None:
            return self._sasl_line(line)
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        self.excess_junk = False
        self.repeated_error = False
        if verb in _JUNK_VERBS or (verb in _GREETING_VERBS and self.context.helo is not None):
            self._junk += 1
            self.excess_junk = self._junk > self.junk_limit
        if verb in _HTTP_VERBS or verb.endswith(b":"):
            # "Host:", "User-Agent:" and friends: a browser talking.
            self.closing = True
            return replies.http_request(self.hostname)
        handler = self._handlers.get(verb)
        if self.refused and verb != b"QUIT":
            handler = _refused
        if handler is None:
            self.commands["unknown"] = self.commands.get("unknown", 0) + 1
            return replies.EMPTY_COMMAND if not line.strip() else replies.COMMAND_UNRECOGNIZED
        name = _COMMAND_NAMES.get(verb, "unknown")
        self.commands[name] = self.commands.get(name, 0) + 1
        try:
            argument = rest.decode("utf-8")
        except UnicodeDecodeError:
            return replies.BAD_CHARACTERS
        if _has_control_characters(argument):
            return replies.BAD_CHARACTERS
        return handler(self, argument.strip(" "))

    def connection_lost(self):
        """Throw away a message still being received."""
        self._discard_writer()
        self._reset()
        # Counted no more: a sender plugin's late answer may still open a
        # transaction, which nothing would ever close.
        self._transactions = None

    # -- session commands ------------------------------------------------

    def _helo(self, argument):
        if not _looks_like_host(argument):
            return replies.HELO_NEEDS_DOMAIN if not argument else replies.BAD_HELO_DOMAIN
        if _too_long_for_a_host(argument):
            return replies.HELO_TOO_LONG
        return self._greeted(argument, esmtp=False)

    def _ehlo(self, argument):
        if not _looks_like_host(argument):
            return replies.EHLO_NEEDS_DOMAIN if not argument else replies.BAD_HELO_DOMAIN
        if _too_long_for_a_host(argument):
            return replies.HELO_TOO_LONG
        return self._greeted(argument, esmtp=True)

    def _greeted(self, helo, esmtp):
        """Start the session the HELO or EHLO names, once the HELO plugins
        (``[plugins] helo``) let it."""
        if not self.policy.asks_at_helo:
            return self._helo_accepted(helo, esmtp)
        d = self.policy.check_helo(helo, self.context)
        return d.addCallback(self._helo_decided, helo, esmtp)

    def _helo_decided(self, answer, helo, esmtp):
        decision, plugin = answer
        if decision.kind not in (decision.REJECT_KIND, decision.DEFER_KIND):
            return self._helo_accepted(helo, esmtp)
        # No HELO until one is accepted: MAIL now gets 503 (send HELO first).
        self.context.helo = None
        self._reset()
        reply = replies.decision_reply(decision, replies.OK, utf8=False)
        logline.info(log, f"{self.context.label}: helo=<{helo}> refused by {plugin}: "
                          f"{reply.code} {reply.enhanced} {reply.text}",
                     helo=helo, plugin=plugin, code=reply.code, enhanced=reply.enhanced,
                     **self.context.log_fields)
        return reply

    def _helo_accepted(self, helo, esmtp):
        self._start_session(helo, esmtp)
        if not esmtp:
            return replies.Reply(250, None, self.hostname)
        return replies.Reply(250, None, [f"{self.hostname} Hello {helo}"] + self.extensions())

    def command_counts(self):
        """``ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6``, in the order
        the commands first came, as Postfix's disconnect line has them."""
        counts = " ".join(f"{name}={count}" for name, count in self.commands.items())
        total = sum(self.commands.values())
        return f"{counts} commands={total}" if counts else "commands=0"

    def _start_session(self, helo, esmtp):
        self.context.helo = helo
        self.esmtp = esmtp
        self._reset()

    def _rset(self, argument):
        if argument:
            return replies.NO_ARGUMENTS_ALLOWED
        self._reset()
        return replies.OK

    def _noop(self, argument):
        # RFC 5321 4.1.1.9: a parameter to NOOP is allowed and ignored.
        return replies.OK

    def _quit(self, argument):
        if argument:
            return replies.NO_ARGUMENTS_ALLOWED
        self.closing = True
        return replies.closing(self.hostname)

    def _help(self, argument):
        return replies.help_reply(argument.upper() or None)

    def _reset(self):
        if self.transaction is not None and self.transaction.chunks is not None:
            # RSET, EHLO or a lost connection between BDAT chunks: the
            # message so far is thrown away (RFC 3030 2).
            self.transaction.chunks.fail()
        if self._counted:
            self._counted = False
            self._transactions.closed()
        self.transaction = None
        self.context.sender = None

    def _starttls(self, argument):
        if self.tls is None or self.tls_active:
            return replies.TLS_NOT_AVAILABLE if self.tls is None else replies.TLS_ALREADY_ACTIVE
        if argument:
            return replies.STARTTLS_SYNTAX
        if not self.esmtp:
            return replies.NEED_EHLO
        if self.transaction is not None:
            return replies.TRANSACTION_IN_PROGRESS
        self.start_tls = True
        return replies.READY_FOR_TLS

    def tls_started(self):
        """The protocol began the TLS handshake.  RFC 3207 4.2: forget
        everything learned before it; the client starts again with EHLO."""
        self.start_tls = False
        self.tls_active = True
        self.tls_cipher = None
        self.esmtp = False
        self.context.helo = None
        self.context.authenticated_user = None
        self._reset()

    # -- AUTH (RFC 4954) ---------------------------------------------------

    def _auth(self, argument):
        if self.auth is None:
            return replies.AUTH_NOT_ENABLED
        if not self.esmtp:
            return replies.NEED_EHLO
        if self.context.authenticated_user is not None:
            return replies.ALREADY_AUTHENTICATED
        if self.transaction is not None:
            return replies.TRANSACTION_IN_PROGRESS
        if not self._auth_offered():
            return replies.ENCRYPTION_REQUIRED
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            return replies.AUTH_SYNTAX
        refusal = self.auth.admit(self.context.client_ip, self.context.trusted)
        if refusal is not None:
            log.info("{session} {client}: AUTH refused: too many attempts",
                     **self.context.log_fields)
            return refusal
        try:
            self._sasl = self.auth.start(mechanism.upper(), initial or None)
        except self.auth.SASLError as error:
            return replies.Reply(error.reply_code, error.enhanced, error.text)
        return self._sasl_step()

    @property
    def in_sasl(self):
        """An AUTH exchange is waiting for the client's next line."""
        return self._sasl is not None

    def cancel_sasl(self):
        """Drop an AUTH exchange (its line could not be read)."""
        self._sasl = None

    def _sasl_line(self, line):
        try:
            text = line.decode("ascii")
            self._sasl.respond(text)
        except UnicodeDecodeError:
            self._sasl = None
            return replies.AUTH_BAD_RESPONSE
        except self.auth.SASLError as error:
            self._sasl = None
            return replies.Reply(error.reply_code, error.enhanced, error.text)
        return self._sasl_step()

    def _sasl_step(self):
        try:
            kind, value = self._sasl.next()
        except self.auth.SASLError as error:
            self._sasl = None
            return replies.Reply(error.reply_code, error.enhanced, error.text)
        if kind == "challenge":
            return replies.Reply(334, None, value)
        self._sasl = None
        try:
            d = self.auth.check(value, self.context.client_ip, self.context.trusted)
        except self.auth.Unavailable as busy:
            log.info("{session} {client}: AUTH refused: {reason}", reason=busy.reason,
                     **self.context.log_fields)
            return busy.reply
        d.addCallback(self._authenticated)
        return d

    def _authenticated(self, user):
        if user is None:
            log.info("{session} {client}: AUTH failed", **self.context.log_fields)
            instruments.auth_failed()
            return replies.AUTH_FAILED
        self.context.authenticated_user = user
        logline.info(log, f"{self.context.label}: AUTH as {user}", user=user,
                     **self.context.log_fields)
        return replies.AUTH_OK

    # -- the transaction -------------------------------------------------

    def _mail(self, argument):
        if self.context.helo is None:
            return replies.NEED_HELO
        if self.transaction is not None:
            return replies.NESTED_MAIL
        if self.submission and self.context.authenticated_user is None:
            return replies.AUTH_REQUIRED
        try:
            path, params = address.split_mail_argument(argument, "FROM")
        except address.ParameterError as e:
            return replies.bad_parameter(str(e))
        except address.AddressError as e:
            return replies.bad_sender(str(e)) if argument.upper().startswith("FROM:") else replies.MAIL_SYNTAX
        if params and not self.esmtp:
            # RFC 5321 4.1.1.11: parameters only in an EHLO session.
            return replies.unknown_parameter(next(iter(params)))
        body, smtputf8, problem = self._mail_parameters(params)
        if problem is not None:
            return problem
        try:
            dsn_request = dsn.parse_mail(params, smtputf8)
        except dsn.DSNParameterError as error:
            return replies.bad_parameter(str(error))
        try:
            sender = address.parse_reverse_path(path, smtputf8=smtputf8)
        except address.NeedsSMTPUTF8:
            return replies.NEEDS_SMTPUTF8
        except address.AddressError as e:
            return replies.bad_sender(str(e))
        # Only now, so a malformed MAIL still hears what is wrong with it;
        # before any DATA, so a full disk costs the client no upload.
        declared = int(params.get("SIZE") or 0)
        if not self.queue.has_room(declared):
            # A warning, as Postfix's: the administrator has a disk to see to.
            reply = replies.INSUFFICIENT_STORAGE
            log.warn("{session} {client}: mail from=<{sender}> size={size}: {code} {enhanced} "
                     "{text}: the queue's file system has less than [queue] min_free={min_free} "
                     "bytes to spare", sender=str(sender or ""), size=declared, code=reply.code,
                     enhanced=reply.enhanced, text=reply.text,
                     min_free=self.settings.queue.min_free, **self.context.log_fields)
            return reply
        requiretls = "REQUIRETLS" in params
        if self.policy.asks_at_mail:
            d = self.policy.check_sender(sender, params, self.context)
            return d.addCallback(self._sender_decided, sender, body, smtputf8, dsn_request,
                                 requiretls)
        return self._begin_transaction(sender, body, smtputf8, dsn_request=dsn_request,
                                       requiretls=requiretls)

    def _sender_decided(self, answer, sender, body, smtputf8, dsn_request, requiretls=False):
        decision, plugin = answer
        if decision.kind in (decision.REJECT_KIND, decision.DEFER_KIND):
            reply = replies.decision_reply(decision, replies.SENDER_OK, utf8=smtputf8)
            logline.info(log, f"{self.context.label}: mail from=<{sender or ''}> refused by "
                              f"{plugin}: {reply.code} {reply.enhanced} {reply.text}",
                         sender=str(sender or ""), plugin=plugin, code=reply.code,
                         enhanced=reply.enhanced, **self.context.log_fields)
            return reply
        return self._begin_transaction(
            sender, body, smtputf8, decision if decision.kind == decision.ACCEPT_KIND else None,
            dsn_request, requiretls)

    def _begin_transaction(self, sender, body, smtputf8, decision=None,
                           dsn_request=(None, None), requiretls=False):
        self.transaction = Transaction(sender, body, smtputf8, dsn_request)
        if self._transactions is not None and not self._counted:
            self._counted = True
            self._transactions.opened()
        self.transaction.requiretls = requiretls
        self.context.sender = sender
        if decision is None:
            return replies.SENDER_OK
        return replies.decision_reply(decision, replies.SENDER_OK, utf8=smtputf8)

    def _mail_parameters(self, params):
        """Check MAIL parameters: (body, smtputf8, error reply or None)."""
        body, smtputf8 = "7BIT", False
        for keyword, value in params.items():
            if keyword == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return body, smtputf8, replies.bad_parameter("SIZE takes a number of octets")
                if int(value) > self.settings.limits.message_size:
                    return body, smtputf8, replies.SIZE_EXCEEDED
            elif keyword == "BODY":
                if value is None or value.upper() not in _SUPPORTED_BODIES:
                    return body, smtputf8, replies.bad_parameter(
                        "BODY takes 7BIT, 8BITMIME or BINARYMIME")
                body = value.upper()
            elif keyword == "SMTPUTF8":
                if value is not None:
                    return body, smtputf8, replies.bad_parameter("SMTPUTF8 takes no value")
                smtputf8 = True
            elif keyword == "AUTH" and self._auth_available():
                problem = mail_auth.xtext_problem(value)
                if problem is not None:
                    return body, smtputf8, replies.bad_parameter(problem)
            elif keyword in ("RET", "ENVID"):
                pass                # DSN (RFC 3461): relaymail.dsn checks them
            elif keyword == "REQUIRETLS":
                if not self.tls_active:
                    return body, smtputf8, replies.REQUIRETLS_WITHOUT_TLS
                if value is not None:
                    return body, smtputf8, replies.bad_parameter("REQUIRETLS takes no value")
            else:
                return body, smtputf8, replies.unknown_parameter(keyword)
        return body, smtputf8, None

    def _rcpt(self, argument):
        if self.transaction is None:
            return replies.NEED_MAIL
        if self.transaction.chunks is not None:
            return replies.RCPT_AFTER_BDAT
        try:
            path, params = address.split_mail_argument(argument, "TO")
        except address.ParameterError as e:
            return replies.bad_parameter(str(e))
        except address.AddressError as e:
            return replies.bad_recipient(str(e)) if argument.upper().startswith("TO:") else replies.RCPT_SYNTAX
        unknown = [keyword for keyword in params
                   if keyword not in ("NOTIFY", "ORCPT") or not self.esmtp]
        if unknown:
            return replies.unknown_parameter(unknown[0])
        try:
            request = dsn.parse_rcpt(params, self.transaction.smtputf8)
        except dsn.DSNParameterError as error:
            return replies.bad_parameter(str(error))
        try:
            recipient = address.parse_forward_path(path, smtputf8=self.transaction.smtputf8)
        except address.NeedsSMTPUTF8:
            return replies.NEEDS_SMTPUTF8
        except address.AddressError as e:
            return replies.bad_recipient(str(e))
        if recipient.domain == "":
            recipient = self._postmaster()
        if len(self.transaction.recipients) >= self.settings.limits.recipients:
            return replies.TOO_MANY_RECIPIENTS
        transaction = self.transaction
        d = self.policy.decide_recipient(recipient, self.context)
        d.addCallback(self._recipient_decided, transaction, recipient, request)
        return d

    def _postmaster(self):
        """RFC 5321 4.5.1: ``RCPT TO:<Postmaster>`` with no domain must be
        accepted.  A relay has no mailbox of its own, so it stands for the
        postmaster of the first domain we relay for (or of this host), and
        the plugins decide as for any address there (the aliases plugin
        can say where it goes)."""
        domains = self.settings.relay.domains
        return address.Mailbox("postmaster", domains[0] if domains else self.hostname)

    def _recipient_decided(self, answer, transaction, recipient, request=(None, None)):
        decision, decider = answer
        reply = replies.decision_reply(decision, replies.RECIPIENT_OK,
                                       utf8=transaction.smtputf8)
        sender = transaction.sender or ""
        logline.info(
            log, f"{self.context.label}: rcpt from=<{sender}> to=<{recipient}> by={decider}: "
                 f"{reply.code} {reply.enhanced} {reply.text}",
            sender=str(sender), recipient=str(recipient), plugin=decider, code=reply.code,
            enhanced=reply.enhanced, **self.context.log_fields)
        if decision.kind == decision.ACCEPT_KIND and transaction is self.transaction:
            transaction.recipients.append(recipient)
            if request != (None, None):
                transaction.dsn_recipients.setdefault(str(recipient), list(request))
        return reply

    def _data(self, argument):
        if argument:
            return replies.NO_ARGUMENTS_ALLOWED
        if self.transaction is None:
            return replies.NEED_MAIL
        if self.transaction.chunks is not None:
            return replies.DATA_AFTER_BDAT
        if self.transaction.body == "BINARYMIME":
            return replies.BINARYMIME_NEEDS_BDAT
        if not self.transaction.recipients:
            return replies.NO_VALID_RECIPIENTS
        self._writer = self._start_queue_file()
        if self._writer is None:
            return replies.LOCAL_ERROR
        self.data_reader = self._content_reader(self._writer)
        return replies.START_DATA

    def _start_queue_file(self):
        """A queue file with our Received field in it, or None (logged,
        the transaction reset) when the queue cannot take one."""
        writer = None
        try:
            writer = self.queue.new_message()
            writer.write(self._received_header(writer.queue_id))
        except (OSError, RuntimeError) as error:
            # OSError from the disk (ENOSPC, EIO: no bug, so no traceback);
            # RuntimeError from a spool shutting down.
            log.error("{session} {client}: cannot start a queue file: {error}",
                      error=str(error), **self.context.log_fields)
        except Exception:
            log.failure("cannot start a queue file")
        else:
            return writer
        if writer is not None:
            writer.abort()
        self._reset()
        return None

    def _content_reader(self, writer, bdat=False):
        """The DataReader that checks the message on its way to ``writer``."""
        limits = self.settings.limits
        return data.DataReader(
            writer.write, limits.message_size, limits.line_length, limits.header_size,
            # [limits] hops counts the Received field written above too, as
            # Postfix counts its smtpd's own against hopcount_limit.
            max_received=limits.hops - 1, allow_nul=limits.allow_nul,
            split_long_lines=limits.long_lines == "split", stuffed=not bdat,
            binary_body=bdat and self.transaction.body == "BINARYMIME")

    # -- BDAT (RFC 3030) ---------------------------------------------------

    def _bdat(self, argument):
        """The BDAT line: the chunk's octets follow it whatever the reply,
        so every case ends in a :class:`~relaymail.smtp.chunking.ChunkReader`
        (storing or discarding) and the reply comes once they are read."""
        parsed = chunking.parse_command(argument)
        if parsed is None:
            self.closing = True
            return replies.BDAT_SYNTAX
        size, last = parsed
        reader = self._chunk_reader(size, last)
        if size == 0:
            return self._chunk_read(reader)
        self.data_reader = reader
        # None: no reply yet; the protocol feeds the chunk to data_reader.
        return None

    def _chunk_reader(self, size, last):
        transaction = self.transaction
        if transaction is None:
            return chunking.ChunkReader(size, last, refusal=replies.NEED_MAIL)
        if not transaction.recipients:
            return chunking.ChunkReader(size, last, refusal=replies.NO_VALID_RECIPIENTS)
        message = transaction.chunks
        if message is not None and message.failed:
            return chunking.ChunkReader(size, last, refusal=replies.chunk_discarded(size),
                                        repeats_error=True)
        if size == 0 and not last:
            refusal = replies.NULL_BDAT
        elif (message.received if message else 0) + size > self.settings.limits.message_size:
            # Known from the count alone: the chunk is read and thrown
            # away rather than stored (RFC 3030 2 still sends it).
            refusal = replies.CHUNK_TOO_BIG
        else:
            refusal = None
        if message is None:
            writer = None if refusal is not None else self._start_queue_file()
            if refusal is None and writer is None:
                # The transaction is reset; the octets are still the chunk.
                return chunking.ChunkReader(size, last, refusal=replies.LOCAL_ERROR)
            message = transaction.chunks = chunking.ChunkedMessage(
                writer, None if writer is None else self._content_reader(writer, bdat=True))
        if refusal is not None:
            message.fail()
            return chunking.ChunkReader(size, last, refusal=refusal)
        return chunking.ChunkReader(size, last, content=message.content)

    def _chunk_read(self, reader):
        """A chunk's octets are all read: its reply, or a Deferred of the
        queue's answer for the LAST one."""
        transaction = self.transaction
        self.repeated_error = reader.repeats_error
        if reader.refusal is not None:
            if reader.last and transaction is not None and transaction.chunks is not None:
                self._reset()       # LAST ends even a failed transaction
            return reader.refusal
        message = transaction.chunks
        message.received += reader.size
        if not reader.last:
            problem = message.problem()
            if problem is None:
                return replies.chunk_received(message.received)
            # Said now, not at LAST: the client stops sending (RFC 3030 2).
            self._refused_message(message.writer, problem, message.content.write_error)
            message.writer = None
            message.fail()
            return problem
        content, writer = message.content, message.writer
        content.end_content()
        transaction.chunks = None       # handed on: the reset must not abort it
        self._reset()
        return self._finish_message(content, writer, transaction)

    def _received_header(self, queue_id):
        transaction = self.transaction
        # RFC 3848 (S for TLS, A for AUTH) and RFC 6531 3.7.3 (UTF8).
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if transaction.smtputf8:
            protocol = "UTF8SMTP"
        if self.tls_active or self.context.authenticated_user is not None:
            protocol += ("S" if self.tls_active else "") + (
                "A" if self.context.authenticated_user is not None else "")
        single = transaction.recipients[0] if len(transaction.recipients) == 1 else None
        return received_header(
            helo=self.context.helo, client_ip=self.context.client_ip, hostname=self.hostname,
            protocol=protocol, queue_id=queue_id, recipient=single, when=self._clock())

    def finish_data(self):
        """The reader saw the final dot: store the message or say why not.

        :return: a Deferred firing with the reply to the DATA content.
        """
        reader = self.data_reader
        if isinstance(reader, chunking.ChunkReader):
            self.data_reader = None
            return self._chunk_read(reader)
        writer, transaction = self._writer, self.transaction
        self.data_reader = None
        self._writer = None
        self._reset()
        return self._finish_message(reader, writer, transaction)

    def _finish_message(self, reader, writer, transaction):
        """The whole message is in ``writer``, checked by ``reader``: queue
        it (through the filters) or say why not; a Deferred of the reply."""
        problem = chunking.content_problem(reader.outcome)
        if problem is not None:
            self._refused_message(writer, problem, reader.write_error)
            return defer.succeed(problem)
        # RFC 8689 5: the header field is ignored when MAIL said REQUIRETLS.
        transaction.tls_optional = reader.tls_optional and not transaction.requiretls
        d = self._queued_recipients(transaction)
        if self.policy.filters_enabled:
            d.addCallback(self._filter, writer, transaction, reader.message_id)
        else:
            d.addCallback(self._commit, writer, transaction, reader.size, reader.message_id)
        d.addErrback(self._commit_failed, writer)
        return d

    def _queued_recipients(self, transaction):
        """The recipients to queue, lists and aliases expanded: a Deferred.
        With DSN requests each recipient is expanded on its own, so that
        its members inherit what RFC 3461 6.2.7 says (relaymail.dsn)."""
        recipients = [str(r) for r in transaction.recipients]
        if not transaction.dsn_recipients:
            return self.policy.expand_recipients(recipients, self.context)
        d = defer.gatherResults([self.policy.expand_recipients([r], self.context)
                                 for r in recipients], consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure
                     if failure.check(defer.FirstError) else failure)

        def inherited(expansions):
            queued, transaction.dsn_recipients, transaction.dsn_expanded = dsn.inherit(
                recipients, expansions, transaction.dsn_recipients)
            return queued
        return d.addCallback(inherited)

    def _refused_message(self, writer, problem, write_error):
        writer.abort()
        # A disk error says which (ENOSPC, EIO): what the admin must fix.
        cause = f" ({write_error.strerror})" if write_error else ""
        log.info("{session} {client}: message {queue_id} refused: {code} {enhanced} "
                 "{text}{cause}", queue_id=writer.queue_id, code=problem.code,
                 enhanced=problem.enhanced, text=problem.text, cause=cause,
                 **self.context.log_fields)

    def _filter(self, recipients, writer, transaction, message_id):
        """[plugins] filters: they decide (relaymail.smtp.filtering), then
        the message is committed as :meth:`_commit` does, or not."""
        def commit(recipients, size, hold):
            return self._commit(recipients, writer, transaction, size, message_id, hold)
        return filtering.filter_then_commit(self.policy, self.context, writer,
                                            self._envelope(recipients, transaction), commit)

    def _envelope(self, recipients, transaction):
        requests = transaction.dsn_recipients
        return Envelope(
            sender=str(transaction.sender) if transaction.sender else "",
            recipients=recipients, body=transaction.body, smtputf8=transaction.smtputf8,
            client_ip=self.context.client_ip, helo=self.context.helo,
            authenticated_user=self.context.authenticated_user, received_at=self._clock(),
            dsn_ret=transaction.dsn_ret, dsn_envid=transaction.dsn_envid,
            # Only the queued recipients' (a filter may redirect the message).
            dsn_recipients={address: requests[address] for address in recipients
                            if address in requests} or None if requests else None,
            dsn_expanded=transaction.dsn_expanded,
            requiretls=transaction.requiretls, tls_optional=transaction.tls_optional)

    def _commit(self, recipients, writer, transaction, size, message_id=None, hold=False):
        envelope = self._envelope(recipients, transaction)
        d = writer.commit(envelope, hold=True) if hold else writer.commit(envelope)

        def queued(queue_id):
            self._junk = 0
            context = self.context
            rcpts = ",".join(f"<{r}>" for r in recipients)
            # HELO, Message-ID, AUTH user and TLS once per message, on the
            # line that ties the session to the queue id.
            extra = f" auth={context.authenticated_user}" if context.authenticated_user else ""
            if context.tls:
                extra += f" tls={context.tls}"
            logline.info(
                log, f"{context.label}: {queue_id}: queued from=<{envelope.sender}> to={rcpts} "
                     f"size={size} helo=<{context.helo or ''}>{extra} "
                     f"message-id={message_id or '-'}",
                queue_id=queue_id, sender=envelope.sender, recipients=recipients, size=size,
                helo=context.helo, message_id=message_id, auth=context.authenticated_user,
                tls=context.tls, **context.log_fields)
            return replies.queued(queue_id)
        return d.addCallback(queued)

    def _commit_failed(self, failure, writer):
        writer.abort()
        reply = replies.LOCAL_ERROR
        if failure.check(OSError, RuntimeError):
            # The disk refused (ENOSPC at the last flush or the record) or
            # the spool is stopping: one line, as for a failed write.
            log.error("{session} {client}: message {queue_id} not queued: {error}: {code} "
                      "{enhanced} {text}", queue_id=writer.queue_id, error=str(failure.value),
                      code=reply.code, enhanced=reply.enhanced, text=reply.text,
                      **self.context.log_fields)
        else:
            log.failure("message {queue_id} not queued", failure, queue_id=writer.queue_id)
        return reply

    def _discard_writer(self):
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self.data_reader = None

    # -- VRFY, EXPN ------------------------------------------------------

    def _vrfy(self, argument):
        access = self.settings.server.vrfy
        if access == "off":
            return replies.VRFY_DISABLED
        if access == "trusted" and not self._may_look_up():
            return replies.VRFY_NOT_ALLOWED
        if not argument:
            return replies.VRFY_SYNTAX
        argument, problem = _lookup_argument(argument, self.esmtp, replies.VRFY_SYNTAX)
        if problem is not None:
            return problem
        if not self._may_look_up():
            # vrfy = anyone: the same 252 whether or not the user exists
            # (RFC 5321 7.3), and no plugin asked, so no timing tells either.
            return replies.CANNOT_VRFY
        d = self.policy.verify(_strip_brackets(argument), self.context)
        return d.addCallback(self._verified)

    def _may_look_up(self):
        """Whether this client gets real VRFY and EXPN answers: trusted by
        network or logged in, as for relaying."""
        return bool(self.context.trusted or self.context.authenticated_user)

    def _verified(self, decision):
        if not decision.is_final:
            return replies.CANNOT_VRFY
        return replies.decision_reply(decision, replies.RECIPIENT_OK)

    def _expn(self, argument):
        # Only the command: the queue still expands lists to their members
        # (Policy.expand_recipients), whatever this says.
        access = self.settings.server.expn
        if access == "off":
            return replies.EXPN_DISABLED
        if access == "trusted" and not self._may_look_up():
            return replies.EXPN_NOT_ALLOWED
        if not argument:
            return replies.EXPN_SYNTAX
        argument, problem = _lookup_argument(argument, self.esmtp, replies.EXPN_SYNTAX)
        if problem is not None:
            return problem
        d = self.policy.expand(_strip_brackets(argument), self.context)
        return d.addCallback(self._expanded)

    def _expanded(self, members):
        if members is self.policy.FAILED:
            return replies.PLUGIN_FAILED
        if not members:
            return replies.NOT_A_LIST
        return replies.Reply(250, "2.1.5", [f"<{m}>" for m in members])

    _handlers = {
        b"HELO": _helo, b"EHLO": _ehlo, b"MAIL": _mail, b"RCPT": _rcpt, b"DATA": _data,
        b"RSET": _rset, b"NOOP": _noop, b"QUIT": _quit, b"VRFY": _vrfy, b"EXPN": _expn,
        b"HELP": _help, b"STARTTLS": _starttls, b"AUTH": _auth,
        b"BDAT": _bdat,
    }


_COMMAND_NAMES = {verb: verb.decode("ascii").lower() for verb in Dialogue._handlers}

#: Every command but QUIT after a connect plugin refused the client.
_ACCESS_DENIED = "Error: access denied for {client}"


def _refused(dialogue, argument):
    return replies.Reply(503, "5.7.0", _ACCESS_DENIED.format(client=dialogue.context.client))


# Tabs count: no SMTP argument needs one, and CR/LF/NUL inside an argument
# are how header and log injection start (SMTP-NOTES class 8).  So do the
# C1 controls (NEL U+0085 breaks a line for str.splitlines(), CSI U+009B
# drives a terminal) and U+2028/U+2029, which arrive as UTF-8: the set of
# relaymail.sanitize.UNSAFE_CLASS, plus TAB (a test keeps the two equal).
_has_control_characters = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]").search


# RFC 5321 4.5.3.1.2: a domain name is at most 255 octets.  An address
# literal is shorter still, so nothing longer is a host name, and a longer
# one would make our Received field too long for the next hop.
_MAX_HOST_OCTETS = 255


def _too_long_for_a_host(argument):
    return len(argument.encode("utf-8")) > _MAX_HOST_OCTETS


def _looks_like_host(argument):
    """A HELO argument: one word, a domain or an address literal.  Many real
    clients send names that are not valid domains (underscores, bare host
    names), so only emptiness and white space inside are refused here."""
    return bool(argument) and " " not in argument


# RFC 5321 4.1.2 String: a Quoted-string (backslash pairs inside), a
# <mailbox>, or an Atom-like word; what follows it is parameters.
_LOOKUP_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|<[^<>]*>|[^ ]+')


def _lookup_argument(argument, esmtp, syntax):
    """Split a VRFY or EXPN argument into the name and its parameters.

    RFC 6531 3.7.4.2 adds ``SMTPUTF8`` to both commands (curl sends it on
    every EXPN); it is the only parameter, accepted as it is on MAIL: only
    in an EHLO session, where SMTPUTF8 is advertised.  The name may be
    UTF-8 only with it, as for addresses in MAIL and RCPT (RFC 6531 3.2).

    :return: ``(name, None)``, or ``(None, reply)`` for a bad argument.
    """
    found = _LOOKUP_STRING.match(argument)
    if found is None:
        return None, syntax
    name = found.group()
    smtputf8 = False
    for keyword in argument[found.end():].split():
        if not esmtp or keyword.upper() != "SMTPUTF8":
            return None, replies.unknown_lookup_parameter(keyword)
        smtputf8 = True
    if not smtputf8 and not name.isascii():
        return None, replies.NEEDS_SMTPUTF8
    return name, None


def _strip_brackets(argument):
    if argument.startswith("<") and argument.endswith(">"):
        return argument[1:-1]
    return argument
