"""The contracts site plugins code against.

A site plugin is one ``.py`` file in a directory named by ``[plugins] path``.
At module level it holds an object that provides both
``twisted.plugin.IPlugin`` and :class:`IPluginFactory`; relaymail finds it
with ``twisted.plugin.getPlugins``.  The factory builds the object that does
the work, which provides one or more of the hook interfaces below; the
plugin runs at a hook when its name is listed in that hook's ``[plugins]``
key, in the order given (as Postfix's smtpd_*_restrictions):

==============  =========================  ===================================
``[plugins]``   interface                  asked
==============  =========================  ===================================
``connect``     :class:`IConnectionPolicy`  as a client connects
``helo``        :class:`IHeloPolicy`        at HELO and EHLO
``senders``     :class:`ISenderPolicy`      at MAIL
``recipients``  :class:`IRecipientValidator`  at RCPT and VRFY
``expanders``   :class:`IListExpander`      at EXPN and when a message is queued
``filters``     :class:`IMessageFilter`     after the final dot, before the 250
``routers``     :class:`IRouter`            when a recipient is delivered
``transports``  :class:`ITransport`         to deliver what a route names
==============  =========================  ===================================

Every hook answers with a :class:`Decision` (routers with a :class:`Route`,
transports with :class:`RecipientOutcome` values).  Addresses arrive as
:class:`relaymail.address.Mailbox` values; parse your own tables with
:mod:`relaymail.address` too.

The built-in plugins (``domains``, ``static``, ``aliases``) use exactly these
interfaces.  A minimal site plugin::

    from zope.interface import implementer, provider
    from twisted.plugin import IPlugin
    from relaymail.interfaces import (
        IPluginFactory, IRecipientValidator, Decision)

    @implementer(IRecipientValidator)
    class NoInterns:
        def check_recipient(self, recipient, context):
            if recipient.local_part.startswith("intern."):
                return Decision.reject(550, "5.1.1", "Interns cannot receive mail")
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION

    @provider(IPlugin, IPluginFactory)
    class no_interns:
        name = "no_interns"

        @staticmethod
        def build(context):
            return NoInterns()

Every ``[plugin:NAME]`` section may also hold two keys relaymail reads
itself, never passed to the plugin: ``cache_ttl`` (seconds; remember the
plugin's RCPT, VRFY and EXPN answers by address for that long, for plugins
whose answers depend on the address alone) and ``cache_size`` (the most
answers remembered, 10000 by default).  Table files of the built-in plugins
are read again when they change, and every plugin is built afresh on
SIGHUP.

Any method may return its result directly or as a Deferred, and must not
block the reactor: a plugin whose methods block (a database driver, a
``time.sleep``, a file read of a large message) says ``blocking = True`` on
the built object, and its methods then run in relaymail's plugin thread
pool.  A method that raises, answers something the contract does not allow,
or does not answer within ``[plugins] timeout`` seconds makes the client see
``451 4.3.0`` (a ``421 4.3.0`` at connect); the traceback is logged and the
session goes on.
"""

from zope.interface import Attribute, Interface


class Decision:
    """A plugin's answer at any hook: the one result contract.

    Every policy hook (connect, HELO, MAIL, RCPT, VRFY, message filter)
    answers with one of these.  Use the constructors:

    - ``Decision.ACCEPT`` / ``Decision.accept(text)``: yes; later plugins
      at the same hook are not asked.
    - ``Decision.reject(code, enhanced, text)``: no, for good (5xx).
    - ``Decision.defer(text, code, enhanced)``: not now (4xx).
    - ``Decision.NO_OPINION``: ask the next plugin.

    Message filters (:class:`IMessageFilter`) have three more:

    - ``Decision.hold(reason)``: accept (250) and put the message in
      ``hold/`` for an administrator (``relaymail-queue release``).
    - ``Decision.discard(reason)``: accept (250) and drop the message; the
      log says so with the reason.
    - ``Decision.redirect(recipients, reason)``: accept, and deliver to
      ``recipients`` (address strings) instead of the envelope's.

    and any of them except a reject or defer may carry header changes made
    with :meth:`with_headers`; ``Decision.NO_OPINION.with_headers(...)``
    changes the message and lets the next filter look at the result.  A
    filter that must change the content itself (dkim converts 8-bit mail
    to 7 bits before it signs, RFC 6376 5.3) replaces the whole message
    with :meth:`with_message`.

    The first decisive answer (anything but no opinion) wins, and the log
    line of that command names the plugin that gave it.
    """

    __slots__ = ("kind", "code", "enhanced", "text", "add_headers", "remove_headers",
                 "recipients", "message")

    ACCEPT_KIND = "accept"
    REJECT_KIND = "reject"
    DEFER_KIND = "defer"
    NO_OPINION_KIND = "no-opinion"
    HOLD_KIND = "hold"
    DISCARD_KIND = "discard"
    REDIRECT_KIND = "redirect"

    #: The kinds only a message filter may answer.
    FILTER_KINDS = frozenset({HOLD_KIND, DISCARD_KIND, REDIRECT_KIND})

    def __init__(self, kind, code=None, enhanced=None, text=None, add_headers=(),
                 remove_headers=(), recipients=(), message=None):
        self.kind = kind
        self.code = code
        self.enhanced = enhanced
        self.text = text
        #: Header fields to add at the top of the message, in order:
        #: a tuple of ``(name, value)`` strings.
        self.add_headers = tuple(add_headers)
        #: Names of header fields to remove (every field of that name,
        #: compared without case) before ``add_headers`` are added.
        self.remove_headers = tuple(remove_headers)
        #: For a redirect: the new recipients, address strings.
        self.recipients = tuple(recipients)
        #: The whole message in place of the one the filter saw (bytes), or
        #: None: see :meth:`with_message`.
        self.message = message

    @classmethod
    def accept(cls, text=None):
        """Accept; ``text`` replaces the default reply text."""
        return cls(cls.ACCEPT_KIND, 250, "2.1.5", text)

    @classmethod
    def reject(cls, code=550, enhanced="5.1.1", text="Recipient address rejected"):
        """Refuse for good: ``code`` is a 5xx reply code, ``enhanced`` its
        RFC 3463 code (``"5.1.1"``)."""
        if not 500 <= int(code) <= 599:
            raise ValueError(f"a rejection needs a 5xx code, not {code}")
        return cls(cls.REJECT_KIND, int(code), enhanced, text)

    @classmethod
    def defer(cls, text="Recipient address temporarily unavailable", code=450, enhanced="4.2.0"):
        """Refuse for now; the client should try again later."""
        if not 400 <= int(code) <= 499:
            raise ValueError(f"a deferral needs a 4xx code, not {code}")
        return cls(cls.DEFER_KIND, int(code), enhanced, text)

    @classmethod
    def hold(cls, reason="held by a filter"):
        """Message filters only: accept and keep the message in ``hold/``."""
        return cls(cls.HOLD_KIND, text=reason)

    @classmethod
    def discard(cls, reason="discarded by a filter"):
        """Message filters only: accept and drop the message (logged)."""
        return cls(cls.DISCARD_KIND, text=reason)

    @classmethod
    def redirect(cls, recipients, reason="redirected by a filter"):
        """Message filters only: accept and deliver to ``recipients`` (a
        non-empty list of address strings) instead."""
        recipients = tuple(recipients)
        if not recipients or not all(isinstance(r, str) for r in recipients):
            raise ValueError("a redirect needs a non-empty list of address strings")
        return cls(cls.REDIRECT_KIND, text=reason, recipients=recipients)

    def with_headers(self, add=(), remove=()):
        """This answer, with header changes: ``add`` a list of ``(name,
        value)`` to put at the top, ``remove`` a list of field names to take
        out first.  Changing a field is removing it and adding it again."""
        if self.kind in (self.REJECT_KIND, self.DEFER_KIND):
            raise ValueError("a refused message has no headers to change")
        return Decision(self.kind, self.code, self.enhanced, self.text,
                        self.add_headers + tuple(add), self.remove_headers + tuple(remove),
                        self.recipients, self.message)

    def with_message(self, data):
        """Message filters only: this answer, with the whole message
        replaced by ``data``: bytes from the first header field to the end
        of the body, every line ending in CRLF, as the queue stores it.
        The replacement comes first; this answer's :meth:`with_headers`
        changes are then made to it.  The next filter, delivery and every
        retry see the new message; the envelope stays as it was."""
        if self.kind in (self.REJECT_KIND, self.DEFER_KIND):
            raise ValueError("a refused message has no content to change")
        return Decision(self.kind, self.code, self.enhanced, self.text, self.add_headers,
                        self.remove_headers, self.recipients, data)

    @property
    def is_final(self):
        """True for every answer but no opinion: the next plugin is not asked."""
        return self.kind != self.NO_OPINION_KIND

    def _key(self):
        return (self.kind, self.code, self.enhanced, self.text, self.add_headers,
                self.remove_headers, self.recipients, self.message)

    def __eq__(self, other):
        if not isinstance(other, Decision):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        extra = ""
        if self.add_headers or self.remove_headers:
            extra += f", add_headers={self.add_headers!r}, remove_headers={self.remove_headers!r}"
        if self.recipients:
            extra += f", recipients={self.recipients!r}"
        if self.message is not None:
            extra += f", message=<{len(self.message)} bytes>"
        return (f"Decision({self.kind!r}, {self.code!r}, {self.enhanced!r}, "
                f"{self.text!r}{extra})")


Decision.ACCEPT = Decision.accept()
Decision.NO_OPINION = Decision(Decision.NO_OPINION_KIND)


class ISessionContext(Interface):
    """What a plugin may know about the client asking.  Read only."""

    client_ip = Attribute("The client's IP address as a string (the real one behind a proxy).")
    client_port = Attribute("The client's TCP port, an int, or None.")
    helo = Attribute("The HELO/EHLO name the client gave, or None.")
    sender = Attribute(
        "The envelope sender of the current transaction: a "
        "relaymail.address.Mailbox, or None for the null sender <> "
        "(and before MAIL).")
    trusted = Attribute("True when the client is in [server] trusted_networks.")
    authenticated_user = Attribute("The AUTH user name, or None.")
    session_id = Attribute(
        "The session's id, as its log lines carry it (8 characters); None "
        "when the relay asks about mail already in its queue (routers, "
        "queue-time expansion, a notice it writes), where no session is.")
    queue_id = Attribute(
        "The queue id of the message asked about when the relay asks about "
        "mail in its queue, as delivery's log lines carry it; None in a "
        "client's session (a message filter finds it on the message).")
    client = Attribute("The client as the log names it: 'unknown[192.0.2.1]:40000'.")
    tls = Attribute("'TLSv1.3 TLS_AES_256_GCM_SHA384' once TLS is up, else None.")
    dry_run = Attribute(
        "True when relaymail-check asks, not a client: a plugin that counts "
        "or records something should only look (ratelimit answers without "
        "counting).  False in a real session.")


class IRecipientValidator(Interface):
    """Decides whether a recipient is accepted (RCPT) and answers VRFY."""

    def check_recipient(recipient, context):
        """Decide about one RCPT TO address.

        :param recipient: a ``relaymail.address.Mailbox``.
        :param context: an :class:`ISessionContext`.
        :return: a :class:`Decision` (or a Deferred firing with one).
            ``Decision.NO_OPINION`` passes the question to the next plugin;
            when every plugin passes, the relay rule decides (trusted and
            authenticated clients may send anywhere, others get
            ``554 5.7.1 Relay access denied``).
        """

    def verify(address, context):
        """Answer VRFY for ``address``, the client's argument as a string
        (a bare name like ``postmaster`` or a full address).

        :return: a :class:`Decision` (or a Deferred firing with one):
            accept with a text naming the mailbox gives ``250``, reject gives
            the rejection, no opinion asks the next plugin; when none knows,
            the client gets ``252`` (cannot verify, but will try).
        """


class IListExpander(Interface):
    """Knows mailing lists or aliases: answers EXPN and expands at queue time."""

    def expand(address, context):
        """Return the members of the list ``address`` names.

        :param address: the client's argument as a string: a bare name
            (``staff``) or a full address (``staff@example.com``).
        :param context: an :class:`ISessionContext`.
        :return: a list of member addresses as strings, or None when
            ``address`` is not a list this plugin knows (or a Deferred
            firing with either).  Members may themselves be lists; relaymail
            expands them in turn, stopping at loops and at a depth limit.
        """


class IConnectionPolicy(Interface):
    """Decides about a client as it connects, before the greeting
    (``[plugins] connect``; Postfix's smtpd_client_restrictions)."""

    def check_connection(context):
        """:param context: an :class:`ISessionContext`; ``client_ip`` is the
            address PROXY reported when the listener takes PROXY.
        :return: a :class:`Decision`.  A reject becomes the greeting (a 554
            and its text; every command but QUIT then gets ``503 5.7.0``),
            a defer a ``421`` that closes the connection."""


class IHeloPolicy(Interface):
    """Decides about the HELO or EHLO name (``[plugins] helo``)."""

    def check_helo(helo, context):
        """:param helo: the name the client gave, a str.
        :return: a :class:`Decision`; a reject or defer is the reply to
            HELO/EHLO, and the session has no HELO until one is accepted."""


class ISenderPolicy(Interface):
    """Decides about the envelope sender at MAIL (``[plugins] senders``)."""

    def check_sender(sender, parameters, context):
        """:param sender: a :class:`relaymail.address.Mailbox`, or None for
            the null sender ``<>``.
        :param parameters: a dict of the MAIL parameters, upper-case
            keywords to their values (None for a keyword without one):
            ``{"SIZE": "1000", "BODY": "8BITMIME"}``.
        :return: a :class:`Decision`; a reject or defer is the reply to
            MAIL (default ``250 2.1.0`` otherwise)."""


class IMessage(Interface):
    """A complete message as a filter sees it, after the final dot and
    before the reply (or in the queue, as a transport sees it)."""

    queue_id = Attribute("The queue id, a str.")
    sender = Attribute("The envelope sender: a Mailbox, or None for <>.")
    recipients = Attribute("The envelope recipients: a list of Mailbox.")
    envelope = Attribute("The relaymail.envelope.Envelope as it will be queued.")
    headers = Attribute(
        "The header section parsed: a list of (name, value) str pairs in "
        "order, values unfolded (CRLF before white space removed) and "
        "decoded as UTF-8 with errors replaced.")
    size = Attribute("The message's size in bytes, as stored.")

    def open():
        """A new binary file object reading the whole message from its
        first byte (header section, blank line, body; CRLF line ends).
        Reading it blocks on the disk: a filter that reads a large message
        should declare ``blocking = True``."""


class IMessageFilter(Interface):
    """Looks at each message once it is complete, before the 250
    (``[plugins] filters``): content checks, signatures, added headers.
    Postfix's before-queue milters are the model."""

    def check_message(message, context):
        """:param message: an :class:`IMessage`.
        :param context: an :class:`ISessionContext`.
        :return: a :class:`Decision`: reject and defer are the reply to
            the DATA content; accept, hold, discard and redirect end the
            filtering; any of those or no opinion may carry header changes
            (:meth:`Decision.with_headers`), which the next filter sees."""


class Route:
    """Where a recipient's mail goes: ``transport`` names a transport
    (``smtp``, ``lmtp``, ``pipe`` or a site's), ``next_hop`` is what that
    transport makes of it (``[mx.example.com]:25`` for smtp, a socket path
    for lmtp, None for the transport's own default)."""

    __slots__ = ("transport", "next_hop")

    def __init__(self, transport, next_hop=None):
        self.transport = transport
        self.next_hop = next_hop

    def __eq__(self, other):
        if not isinstance(other, Route):
            return NotImplemented
        return (self.transport, self.next_hop) == (other.transport, other.next_hop)

    def __hash__(self):
        return hash((self.transport, self.next_hop))

    def __repr__(self):
        return f"Route({self.transport!r}, {self.next_hop!r})"


class IRouter(Interface):
    """Chooses a recipient's transport and next hop (``[plugins]
    routers``; Postfix's transport_maps).  The built-in router, ``[routes]``
    with the smarthost and MX lookup, answers when no router does."""

    def route(recipient, context):
        """:param recipient: a :class:`relaymail.address.Mailbox`.
        :param context: an :class:`ISessionContext` (for mail already in
            the queue: the relay itself as client, ``trusted`` true).
        :return: a :class:`Route`, or None for no opinion."""


class RecipientOutcome:
    """What a transport reports for one recipient.

    ``kind`` is ``delivered``, ``deferred`` (try again later) or
    ``bounced`` (give up: a bounce goes to the sender).  ``status`` is the
    RFC 3463 code (``"2.0.0"``, ``"4.4.1"``, ``"5.1.1"``), ``reason`` the
    text for the log, the bounce and the DSN (a next hop's reply, a
    command's exit status).

    A transport that spoke to a server may say more, all optional:
    ``code``, the server's reply code (the DSN's Diagnostic-Code is then
    ``smtp; CODE STATUS REASON``); ``remote``, the server that answered
    (``mx.example.com[192.0.2.1]:25``; else the log names the transport and
    next hop); ``tls``, the TLS the session used, for the delivery log."""

    __slots__ = ("kind", "status", "reason", "code", "remote", "tls")

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"

    def __init__(self, kind, status, reason, *, code=None, remote=None, tls=None):
        if kind not in (self.DELIVERED, self.DEFERRED, self.BOUNCED):
            raise ValueError(f"no outcome kind {kind!r}")
        self.kind = kind
        self.status = status
        self.reason = reason
        self.code = code
        self.remote = remote
        self.tls = tls

    # ``details``: code, remote, tls (above).
    @classmethod
    def delivered(cls, reason="delivered", status="2.0.0", **details):
        return cls(cls.DELIVERED, status, reason, **details)

    @classmethod
    def deferred(cls, reason, status="4.0.0", **details):
        return cls(cls.DEFERRED, status, reason, **details)

    @classmethod
    def bounced(cls, reason, status="5.0.0", **details):
        return cls(cls.BOUNCED, status, reason, **details)

    def _fields(self):
        return (self.kind, self.status, self.reason, self.code, self.remote, self.tls)

    def __eq__(self, other):
        if not isinstance(other, RecipientOutcome):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in ("code", "remote", "tls")
                        if getattr(self, name) is not None)
        return f"RecipientOutcome({self.kind!r}, {self.status!r}, {self.reason!r}{extra})"


class ITransport(Interface):
    """Delivers a queued message to some of its recipients (``[plugins]
    transports`` names the site's; ``smtp``, ``lmtp`` and ``pipe`` are
    built in).  Retries, bounces and DSNs are the queue's job: a transport
    only says what happened to each recipient it was given.

    The built-in ``smtp`` is one too
    (:class:`relaymail.delivery.smtp_transport.SMTPTransport`): its
    ``deliver()`` sends by the smarthost, ``[routes]`` or MX as a Route's
    next hop says, and its outcomes carry the server's reply code."""

    name = Attribute("The transport's name, as a Route names it.")

    def deliver(message, recipients, next_hop):
        """:param message: an :class:`IMessage` (from the queue).
        :param recipients: the addresses (str) routed to this transport
            and ``next_hop``, a subset of the message's.
        :param next_hop: the Route's ``next_hop``.
        :return: a Deferred firing with a dict from each of ``recipients``
            to a :class:`RecipientOutcome`.  A recipient missing from it,
            or a Deferred that fails, counts as deferred with the failure
            as reason: the message is never lost to a transport's bug."""


class IPluginFactory(Interface):
    """The module-level object of a plugin file.  Provide it together with
    ``twisted.plugin.IPlugin`` so ``getPlugins`` finds it."""

    name = Attribute("The name that enables this plugin in [plugins].")
    description = Attribute(
        "Optional: one line saying what the plugin does, for "
        "``twistd relaymail --list-plugins``; without it the built object's "
        "``description`` is shown, if it has one.")
    hooks = Attribute(
        "Optional: the [plugins] keys (``\"recipients\"``, ``\"expanders\"``...) "
        "whose interfaces the built object provides, so that "
        "``--list-plugins`` can say so without building it (building may "
        "need options).  Without it, --list-plugins builds the plugin with "
        "the configuration's [plugin:NAME] options and reports a failure to "
        "build as such.")

    def build(context):
        """Make the working plugin object.

        :param context: an :class:`IPluginContext`.
        :return: an object providing one or more of the hook interfaces
            (:class:`IConnectionPolicy`, :class:`IHeloPolicy`,
            :class:`ISenderPolicy`, :class:`IRecipientValidator`,
            :class:`IListExpander`, :class:`IMessageFilter`,
            :class:`IRouter`, :class:`ITransport`).  Its optional
            attributes: ``name`` (used in log lines), ``description`` (one
            line, for ``twistd relaymail --list-plugins``) and ``blocking``
            (True when its methods block: they then run in relaymail's
            plugin thread pool, ``[plugins] threads``, never on the
            reactor; such methods must return plain values, not Deferreds).
        :raise relaymail.config.ConfigError: for a bad setting in
            ``[plugin:NAME]``; use ``context.config_error(key, problem)``.
        """


class IPluginContext(Interface):
    """What a plugin factory gets to build its plugin."""

    name = Attribute("The plugin's name.")
    options = Attribute("A dict of the [plugin:NAME] keys and their string values.")
    settings = Attribute("The whole relaymail.config.Settings, read only.")

    def config_error(key, problem):
        """Return a ConfigError naming the config file, ``[plugin:NAME]``,
        ``key`` and ``problem``, for the factory to raise."""


class IMessageWriter(Interface):
    """One message on its way into the queue.  The body is streamed in as it
    arrives; nothing is visible to delivery until :meth:`commit` fires."""

    queue_id = Attribute("The message's queue id, a short str known from the start.")

    def write(data):
        """Append bytes of the message (already dot-unstuffed, CRLF line
        ends).  May raise OSError; the caller then aborts."""

    def commit(envelope, hold=False):
        """Make the message durable with its final
        :class:`relaymail.envelope.Envelope`; with ``hold`` true, straight
        into ``hold/`` (a message filter held it), where no delivery starts.

        :return: a Deferred firing with the queue id once the message is on
            stable storage (written, fsync'd, renamed into place, directory
            fsync'd), or failing if it could not be stored, in which case
            nothing of it is left in the queue.
        """

    def view(envelope):
        """The message written so far, as an :class:`IMessage` for the
        message filters (``[plugins] filters``); only asked when some are
        configured.

        :return: a Deferred firing with the IMessage (its header section is
            read off the reactor), or failing with nothing changed."""

    def rewrite(message):
        """Give the message the header fields of ``message``, a view from
        :meth:`view` that the filters changed.

        :return: a Deferred firing once done (the body is copied off the
            reactor), or failing with the message left as it was."""

    def abort():
        """Throw the message away; nothing of it stays in the queue."""


class IMessageQueue(Interface):
    """Where accepted mail goes.  The delivery engine reads from the same
    queue; the SMTP server only ever sees this interface."""

    def new_message():
        """Start a message: return an :class:`IMessageWriter`."""

    def has_room(size):
        """Whether a message of ``size`` bytes (0 when the client declared
        none) may be started now and leave the queue its reserve of free
        space (``[queue] min_free``).  Cheap enough to ask at every MAIL;
        advisory: :meth:`IMessageWriter.commit` still fails if the disk
        fills up after all."""
