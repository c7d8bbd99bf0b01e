"""The contracts site plugins code against.

A site plugin is one ``.py`` file in a directory named by ``[plugins] path``.
At module level it holds an object that provides both
``twisted.plugin.IPlugin`` and :class:`IPluginFactory`; relaymail finds it
with ``twisted.plugin.getPlugins`` and enables it when its ``name`` is listed
in ``[plugins] recipients`` or ``[plugins] expanders``.  The factory builds
the object that does the work: an :class:`IRecipientValidator`, an
:class:`IListExpander`, or both.

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

Any method may return its result directly or as a Deferred.  A method that
raises, or whose Deferred fails or does not fire within ``[plugins] timeout``
seconds, makes the client see ``451 4.3.0``; the traceback is logged and the
session goes on.
"""

from zope.interface import Attribute, Interface


class Decision:
    """A plugin's answer about one address.

    Use the constructors: ``Decision.ACCEPT``, ``Decision.NO_OPINION``,
    ``Decision.accept(text)``, ``Decision.reject(code, enhanced, text)`` and
    ``Decision.defer(text)``.
    """

    __slots__ = ("kind", "code", "enhanced", "text")

    ACCEPT_KIND = "accept"
    REJECT_KIND = "reject"
    DEFER_KIND = "defer"
    NO_OPINION_KIND = "no-opinion"

    def __init__(self, kind, code=None, enhanced=None, text=None):
        self.kind = kind
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @classmethod
    def accept(cls, text=None):
        """Accept the address; ``text`` replaces the default reply text."""
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

    @property
    def is_final(self):
        """True for every answer but no opinion: the next plugin is not asked."""
        return self.kind != self.NO_OPINION_KIND

    def __eq__(self, other):
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.kind, self.code, self.enhanced, self.text) == (
            other.kind, other.code, other.enhanced, other.text)

    def __hash__(self):
        return hash((self.kind, self.code, self.enhanced, self.text))

    def __repr__(self):
        return f"Decision({self.kind!r}, {self.code!r}, {self.enhanced!r}, {self.text!r})"


Decision.ACCEPT = Decision.accept()
Decision.NO_OPINION = Decision(Decision.NO_OPINION_KIND)


class ISessionContext(Interface):
    """What a plugin may know about the client asking.  Read only."""

    client_ip = Attribute("The client's IP address as a string (the real one behind a proxy).")
    client_port = Attribute("The client's TCP port, an int, or None.")
    helo = Attribute("The HELO/EHLO name the client gave, or None.")
    sender = Attribute(
        "The envelope sender of the current transaction: a "
        "relaymail.smtp.address.Mailbox, or None for the null sender <> "
        "(and before MAIL).")
    trusted = Attribute("True when the client is in [server] trusted_networks.")
    authenticated_user = Attribute("The AUTH user name, or None.")
    session_id = Attribute("The session's id, as its log lines carry it (8 characters).")
    client = Attribute("The client as the log names it: 'unknown[192.0.2.1]:40000'.")
    tls = Attribute("'TLSv1.3 TLS_AES_256_GCM_SHA384' once TLS is up, else None.")


class IRecipientValidator(Interface):
    """Decides whether a recipient is accepted (RCPT) and answers VRFY."""

    def check_recipient(recipient, context):
        """Decide about one RCPT TO address.

        :param recipient: a ``relaymail.smtp.address.Mailbox``.
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


class IPluginFactory(Interface):
    """The module-level object of a plugin file.  Provide it together with
    ``twisted.plugin.IPlugin`` so ``getPlugins`` finds it."""

    name = Attribute("The name that enables this plugin in [plugins].")

    def build(context):
        """Make the working plugin object.

        :param context: an :class:`IPluginContext`.
        :return: an object providing :class:`IRecipientValidator`,
            :class:`IListExpander`, or both.
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

    def commit(envelope):
        """Make the message durable with its final
        :class:`relaymail.envelope.Envelope`.

        :return: a Deferred firing with the queue id once the message is on
            stable storage (written, fsync'd, renamed into place, directory
            fsync'd), or failing if it could not be stored, in which case
            nothing of it is left in the queue.
        """

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
