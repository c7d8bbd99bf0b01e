"""Who may send to whom: asks the configured plugins, in order, with a time
limit, and applies the relay rule when none of them knows.

Every plugin call is bounded by ``[plugins] timeout`` and a plugin that
fails, times out or answers nonsense becomes ``451 4.3.0`` for the client,
never a broken session (the fail-soft contract Haraka gives its plugins).
"""

import time

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger

from relaymail import header_section, sanitize
from relaymail.metrics import instruments
from relaymail.interfaces import Decision
from relaymail.policy import filters as message_filters
from relaymail.policy import routers as message_routers
from relaymail.policy.answer_cache import CACHEABLE, MISS
from relaymail.policy.threads import PluginThreads

log = Logger()

#: Refusal for a recipient the client may not relay to.
RELAY_DENIED = Decision.reject(554, "5.7.1", "Relay access denied")

#: The answer when a plugin fails or is too slow: the client tries again.
PLUGIN_FAILED = Decision.defer(
    code=451, enhanced="4.3.0", text="Temporary failure checking recipient, try again later")

#: A plugin call on the reactor thread that takes this long (seconds) is
#: logged as blocking: a quarter of a second is an age for a relay that
#: answers a command in well under a millisecond.
_BLOCKED_TOO_LONG = 0.25

#: Who decided a recipient when no plugin had an opinion: the relay rule
#: (trusted and authenticated clients may relay, others not).
RELAY_RULE = "relay-rule"

#: The temporary failure each hook answers for a plugin that failed.  At
#: connect it is a 421, which closes the connection (RFC 5321 3.1).
_FAILURE_ANSWERS = {
    "check_connection": Decision.defer(
        code=421, enhanced="4.3.0", text="Temporary failure checking the client, try again later"),
    "check_helo": Decision.defer(
        code=451, enhanced="4.3.0", text="Temporary failure checking HELO, try again later"),
    "check_sender": Decision.defer(
        code=451, enhanced="4.3.0", text="Temporary failure checking sender, try again later"),
    "check_recipient": PLUGIN_FAILED,
    "verify": PLUGIN_FAILED,
}

#: How many levels of lists inside lists are expanded.  Sendmail stops at
#: the same depth (MAXRCRSN, 10); a deeper member is delivered as written.
MAX_EXPANSION_DEPTH = 10

# Sender-specified routing in a local part: user@other@ours (RFC 5321
# source-route leftovers), user%other@ours (the "percent hack") and
# host!user@ours (UUCP bang paths).  Postfix refuses these from untrusted
# clients (allow_untrusted_routing = no) because a downstream MTA that
# honours them turns this relay into an open one.
_ROUTING_CHARACTERS = frozenset("@%!")


class _Failed:
    """The type of :attr:`Policy.FAILED`."""

    def __repr__(self):
        return "Policy.FAILED"


class ExpansionError(Exception):
    """A list expander failed while recipients were expanded for the queue."""

    def __init__(self, plugin, address):
        super().__init__(f"plugin {plugin} failed expanding {address!r}")
        self.plugin = plugin
        self.address = address


class _PluginTimedOut(Exception):
    """A plugin did not answer within ``[plugins] timeout``."""


class _BadAnswer(Exception):
    """A plugin answered with something the contract does not allow."""


class Policy:
    """Runs the plugins of every hook the SMTP server asks: connect, HELO,
    MAIL, RCPT and VRFY, EXPN and list expansion.

    :param validators: IRecipientValidator providers, asked in this order.
    :param expanders: IListExpander providers, asked in this order.
    :param settings: a ``relaymail.config.Settings``; ``plugins.timeout``
        bounds every plugin call (None for no limit), ``plugins.threads``
        the calls of blocking plugins running at once.
    :param clock: an IReactorTime for the timeouts; the global reactor
        when None.
    :param connect: IConnectionPolicy providers, asked in this order.
    :param helo: IHeloPolicy providers.
    :param senders: ISenderPolicy providers.
    :param reactor: the reactor blocking plugins' answers come back to;
        the global one when None.
    :param filters: IMessageFilter providers, asked in this order
        (:mod:`relaymail.policy.filters`).

    Plugins are named in log lines by their ``name`` attribute when they
    have a string one (the built-ins do), else by their class.
    """

    #: What :meth:`expand` fires with when an expander failed or timed out;
    #: the server answers ``451 4.3.0``.  Compare with ``is``.
    FAILED = _Failed()

    def __init__(self, validators, expanders, settings, clock=None, *, connect=(), helo=(),
                 senders=(), filters=(), routers=(), reactor=None, caches=None):
        if reactor is None:
            from twisted.internet import reactor
        if clock is None:
            clock = reactor
        self._validators = list(validators)
        self._expanders = list(expanders)
        self._connect = list(connect)
        self._helo = list(helo)
        self._senders = list(senders)
        self._filters = list(filters)
        self._routers = list(routers)
        self._timeout = settings.plugins.timeout
        #: [limits]: what a message filter's new message is held to.
        self.limits = getattr(settings, "limits", None)
        self._clock = clock
        self._threads = PluginThreads(reactor, getattr(settings.plugins, "threads", 10))
        #: id(plugin) -> AnswerCache, for plugins given [plugin:NAME] cache_ttl.
        self._caches = dict(caches or {})

    @classmethod
    def from_hooks(cls, hooks, settings, clock=None, reactor=None):
        """A Policy for the plugins :func:`relaymail.policy.loader.build_hooks`
        built."""
        return cls(hooks["recipients"], hooks["expanders"], settings, clock,
                   connect=hooks["connect"], helo=hooks["helo"], senders=hooks["senders"],
                   filters=hooks["filters"], routers=hooks.get("routers", ()), reactor=reactor,
                   caches=getattr(hooks, "caches", None))

    def use_hooks(self, hooks):
        """Ask the plugins of ``hooks`` from now on (a SIGHUP rebuilt them);
        questions already asked finish with the plugins they went to."""
        self._validators = list(hooks["recipients"])
        self._expanders = list(hooks["expanders"])
        self._connect = list(hooks["connect"])
        self._helo = list(hooks["helo"])
        self._senders = list(hooks["senders"])
        self._filters = list(hooks["filters"])
        self._routers = list(hooks.get("routers", ()))
        self._caches = dict(getattr(hooks, "caches", None) or {})

    @property
    def asks_at_connect(self):
        """Whether any plugin is asked as a client connects."""
        return bool(self._connect)

    @property
    def asks_at_helo(self):
        return bool(self._helo)

    @property
    def asks_at_mail(self):
        return bool(self._senders)

    # -- connect, HELO, MAIL ----------------------------------------------

    def check_connection(self, context):
        """Decide about a client as it connects.

        :return: a Deferred firing with ``(decision, plugin name or None)``;
            it never fails.
        """
        return self._named(self._first_decision(self._connect, "check_connection", (context,)))

    def check_helo(self, helo, context):
        """Decide about a HELO or EHLO name: a Deferred of ``(decision,
        plugin name or None)``; it never fails."""
        return self._named(self._first_decision(self._helo, "check_helo", (helo, context)))

    def check_sender(self, sender, parameters, context):
        """Decide about the envelope sender: a Deferred of ``(decision,
        plugin name or None)``; it never fails.

        :param sender: a Mailbox, or None for ``<>``.
        :param parameters: the MAIL parameters, upper-case keyword to value.
        """
        return self._named(self._first_decision(
            self._senders, "check_sender", (sender, dict(parameters), context)))

    # -- RCPT and VRFY ----------------------------------------------------

    def check_recipient(self, recipient, context):
        """Decide about one RCPT TO address.

        :param recipient: a ``relaymail.address.Mailbox``.
        :param context: an ISessionContext.
        :return: a Deferred firing with a Decision; it never fails.
        """
        return self.decide_recipient(recipient, context).addCallback(lambda pair: pair[0])

    def decide_recipient(self, recipient, context):
        """:meth:`check_recipient`, and who decided: a Deferred firing with
        ``(decision, name)``, the name a plugin's or :data:`RELAY_RULE`."""
        may_relay = bool(context.trusted or context.authenticated_user)
        if not may_relay and _ROUTING_CHARACTERS.intersection(recipient.local_text):
            # Before any plugin: a plugin accepting the domain must not
            # make the relay forward user%elsewhere@ourdomain.
            return succeed((RELAY_DENIED, RELAY_RULE))
        d = self._first_decision(self._validators, "check_recipient", (recipient, context))

        def relay_rule(answer):
            decision, plugin = answer
            if decision.is_final:
                return decision, plugin_label(plugin)
            return (Decision.accept() if may_relay else RELAY_DENIED), RELAY_RULE
        return d.addCallback(relay_rule)

    def verify(self, address, context):
        """Answer VRFY.

        :param address: the client's argument, a bare name or an address.
        :return: a Deferred firing with the first Decision that is not
            NO_OPINION, else ``Decision.NO_OPINION`` (the server says 252);
            it never fails.
        """
        d = self._first_decision(self._validators, "verify", (address, context))
        return d.addCallback(lambda pair: pair[0])

    # -- asking plugins in order ------------------------------------------

    @staticmethod
    def _named(d):
        return d.addCallback(lambda pair: (pair[0], None if pair[1] is None else plugin_label(pair[1])))

    def _first_decision(self, plugins, method, args, start=0):
        """Ask ``plugins`` from ``start`` on: a Deferred of ``(decision,
        plugin)``, the plugin None when none had an opinion.

        Plugins that answer at once (the built-ins do) are asked in a plain
        loop, with no Deferred or timer each: this runs for every RCPT.
        """
        for index in range(start, len(plugins)):
            plugin = plugins[index]
            started = time.monotonic()
            try:
                answer = self._invoke(plugin, method, args)
            except Exception as exc:
                self._log_failure(exc, plugin, method, _subject(args))
                return succeed((_FAILURE_ANSWERS[method], plugin))
            if not isinstance(answer, Deferred):
                self._warn_if_it_blocked(plugin, method, started)
            instruments.plugin_answer(plugin_label(plugin), method, started, answer)
            if isinstance(answer, Deferred):
                return self._later_decision(answer, plugins, index, method, args)
            decision = self._checked_decision(answer, plugin, method, _subject(args))
            if decision.is_final:
                return succeed((decision, plugin))
        return succeed((Decision.NO_OPINION, None))

    def _later_decision(self, answer, plugins, index, method, args):
        plugin = plugins[index]
        if self._timeout is not None:
            answer.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._timed_out)

        def answered(result):
            decision = self._checked_decision(result, plugin, method, _subject(args))
            if decision.is_final:
                return decision, plugin
            return self._first_decision(plugins, method, args, index + 1)

        def failed(failure):
            self._log_failure(failure.value, plugin, method, _subject(args), failure)
            return _FAILURE_ANSWERS[method], plugin
        return answer.addCallbacks(answered, failed)

    @staticmethod
    def _warn_if_it_blocked(plugin, method, started):
        # A call on the reactor thread cannot be cut short: the most we can
        # do is name the plugin that held every session of the process.
        held = time.monotonic() - started
        if held >= _BLOCKED_TOO_LONG and getattr(plugin, "blocking", False) is not True:
            log.warn("plugin {plugin} {method} held the reactor for {held:.2f} s: every "
                     "session of this process waited; a plugin that blocks must say "
                     "blocking = True", plugin=plugin_label(plugin), method=method, held=held)

    def _invoke(self, plugin, method, args):
        """Call ``plugin.method(*args)``: in the plugin thread pool when the
        plugin says it blocks (a Deferred then), else here; or answer from
        the plugin's cache when it has one and remembers the question."""
        cache = self._caches.get(id(plugin)) if method in CACHEABLE else None
        if cache is not None:
            remembered = cache.get(method, args[0], self._clock.seconds())
            if remembered is not MISS:
                return remembered
        function = getattr(plugin, method)
        if getattr(plugin, "blocking", False) is True:
            answer = self._threads.run(function, *args)
        else:
            answer = function(*args)
        if cache is not None:
            self._remember(cache, method, args[0], answer)
        return answer

    def _remember(self, cache, method, subject, answer):
        if not isinstance(answer, Deferred):
            if answer_fits(method, answer):
                cache.put(method, subject, answer, self._clock.seconds())
            return

        def answered(result):
            # Only a timely answer: a timeout fails this Deferred first.
            if answer_fits(method, result):
                cache.put(method, subject, result, self._clock.seconds())
            return result
        answer.addCallback(answered)

    def _checked_decision(self, answer, plugin, method, address):
        if _is_policy_decision(answer):
            return answer
        self._log_failure(_BadAnswer(f"returned {answer!r}, not a Decision this hook takes"),
                          plugin, method, address)
        return _FAILURE_ANSWERS[method]

    # -- EXPN and queue-time expansion ------------------------------------

    def expand(self, address, context):
        """Answer EXPN.

        :param address: the client's argument, a bare name or an address.
        :return: a Deferred firing with the members of the first expander
            that knows ``address`` as a list (bare-name members qualified
            with the domain of ``address`` when it has one), None when no
            expander knows it, or :attr:`FAILED` when an expander failed or
            timed out.  It never fails.
        """
        d = self._first_list(address, context)

        def qualified(members):
            if members is None:
                return None
            return [_qualify(member, address) for member in members]
        def failed(failure):
            failure.trap(ExpansionError)  # already logged by _first_list
            return self.FAILED
        return d.addCallbacks(qualified, failed)

    def expand_recipients(self, recipients, context):
        """Replace every recipient that is a list by its members, for the queue.

        Lists inside lists are expanded in turn.  The result keeps the order
        in which addresses are first met and holds each address once
        (domains compared without regard to case, local parts exactly, as
        RFC 5321 2.4 says).  A list met again inside its own expansion is a
        loop: it is kept as an address and not expanded again (as a Postfix
        alias naming itself delivers to that mailbox).  Deeper than
        :data:`MAX_EXPANSION_DEPTH` lists, members are kept as written.  The
        result may be empty when lists expand to no one.

        :param recipients: addresses as strings (``str(mailbox)``).
        :param context: an ISessionContext.
        :return: a Deferred firing with the list of addresses.  This is the
            one method whose Deferred may fail (with :class:`ExpansionError`):
            delivering to a list address instead of its members would be
            wrong, so the whole message is deferred (451) instead.
        """
        if not self._expanders:
            # No list anywhere (most sites): each address once, without
            # the three generators a recipient the walk below costs.
            return succeed(_each_once(recipients))
        return self._expanded(recipients, context)

    @inlineCallbacks
    def _expanded(self, recipients, context):
        met = []            # every address kept, in order; once each at the end
        expanded = set()
        keep = met.append

        @inlineCallbacks
        def walk(address, ancestors):
            key = _address_key(address)
            if key in ancestors:
                log.warn("list {address!r} contains itself; delivering to it as an address",
                         address=address)
                keep(address)
                return
            if key in expanded:
                return  # Reached before by another path; its members are in.
            if len(ancestors) >= MAX_EXPANSION_DEPTH:
                log.warn("{address!r} is nested more than {depth} lists deep; "
                         "delivering to it unexpanded", address=address,
                         depth=MAX_EXPANSION_DEPTH)
                keep(address)
                return
            members = yield self._first_list(address, context)
            if members is None:
                keep(address)
                return
            expanded.add(key)
            for member in members:
                yield walk(_qualify(member, address), ancestors + (key,))

        for recipient in recipients:
            yield walk(recipient, ())
        return _each_once(met)

    @inlineCallbacks
    def _first_list(self, address, context):
        """The members from the first expander that knows ``address``, or
        None; fails with ExpansionError (the cause logged)."""
        for plugin in self._expanders:
            try:
                members = yield self._call(plugin, "expand", address, context)
                if members is not None:
                    members = _checked_members(members)
            except Exception as exc:
                self._log_failure(exc, plugin, "expand", address)
                raise ExpansionError(plugin_label(plugin), address) from exc
            if members is not None:
                return members
        return None

    # -- message filters ----------------------------------------------------

    @property
    def filters_enabled(self):
        """Whether any message filter is configured."""
        return bool(self._filters)

    def check_message(self, message, context):
        """Ask the message filters about a complete message.

        :param message: an IMessage (relaymail.queue.message_view).
        :return: a Deferred firing with a
            :class:`relaymail.policy.filters.FilterResult`; it never fails.
        """
        return message_filters.run_filters(self, self._filters, message, context, plugin_label)

    # -- routers (asked by the delivery process) ------------------------------

    @property
    def routers_enabled(self):
        """Whether any router is configured."""
        return bool(self._routers)

    def route(self, recipient, context):
        """Ask the routers where a queued recipient's mail goes.

        :param recipient: a Mailbox.
        :return: a Deferred firing with ``(Route, router name)``, or
            ``(None, None)`` when no router answered; it fails with
            :class:`relaymail.policy.routers.RouterFailed` (logged).
        """
        return message_routers.run_routers(self, self._routers, recipient, context, plugin_label)

    # -- calling plugins --------------------------------------------------

    def _call(self, plugin, method, *args):
        """Call ``plugin.method(*args)``: a Deferred that fails when it
        raises and when it takes longer than the timeout."""
        started = time.monotonic()
        d = maybeDeferred(self._invoke, plugin, method, args)
        if self._timeout is not None:
            d.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._timed_out)
        instruments.plugin_answer(plugin_label(plugin), method, started, d)
        return d

    def _timed_out(self, result, timeout):
        raise _PluginTimedOut(f"no answer within {timeout} seconds")

    def _log_failure(self, exc, plugin, method, address, failure=None):
        """Log a plugin's failure: ``exc``, with ``failure`` (a Failure)
        when it came through a Deferred, else the exception being handled."""
        if isinstance(exc, (_PluginTimedOut, _BadAnswer, message_filters.BadFilterAnswer,
                            message_routers.BadRoute,
                            header_section.BadField)):
            # No traceback worth reading: say what went wrong.
            log.error("plugin {plugin} {method}({address!r}): {problem}",
                      plugin=plugin_label(plugin), method=method, address=str(address),
                      problem=str(exc))
        else:
            log.failure("plugin {plugin} {method}({address!r}) failed", failure,
                        plugin=plugin_label(plugin), method=method, address=str(address))


def answer_fits(method, answer):
    """Whether ``answer`` is one the contract allows from ``method``: a
    list of address strings or None from ``expand``, else a Decision a hook
    before the message takes.  Anything else is a plugin failure (451):
    not remembered by a cache, and shown as such by relaymail-check."""
    if method == "expand":
        return answer is None or (isinstance(answer, (list, tuple))
                                  and all(isinstance(member, str) for member in answer))
    return _is_policy_decision(answer)


def _is_policy_decision(answer):
    """A Decision the hooks before the message may give: hold, discard,
    redirect, header changes and a new message mean something only for a complete
    message (relaymail.interfaces.IMessageFilter)."""
    return (isinstance(answer, Decision) and answer.kind not in Decision.FILTER_KINDS
            and not answer.add_headers and not answer.remove_headers
            and answer.message is None)


def _subject(args):
    """What a plugin was asked about, for its log lines: the address, the
    HELO name, or at connect the client (``unknown[192.0.2.1]:40000``)."""
    first = args[0]
    return getattr(first, "client", first)


def plugin_label(plugin):
    """How logs and relaymail-check name a plugin: its ``name``, else its class."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str):
        return name
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _checked_members(members):
    if not isinstance(members, (list, tuple)) or not all(isinstance(m, str) for m in members):
        raise _BadAnswer(f"returned {members!r}, not a list of addresses")
    # A member goes into the EXPN reply, the queue record and RCPT TO: CR
    # or LF would forge a reply or a command, NEL or U+2028 a log line.
    # SMTP refuses the same characters from clients (relaymail.sanitize).
    for member in members:
        if "\t" in member or sanitize.has_unsafe(member):
            raise _BadAnswer(f"returned {member!r}, which holds a control character")
    return list(members)


def _each_once(addresses):
    """``addresses`` in order, each the first time it is met (compared as
    :func:`_address_key` says)."""
    seen, result = set(), []
    for address in addresses:
        key = _address_key(address)
        if key not in seen:
            seen.add(key)
            result.append(address)
    return result


def _address_key(address):
    """What makes two addresses the same: the local part exactly (RFC 5321
    2.4 leaves its case to the receiving host) and the domain without case."""
    local, at, domain = address.rpartition("@")
    if not at:
        return (address, "")
    return (local, domain.lower())


def _qualify(member, list_address):
    """A bare name in a list means that name in the list's own domain."""
    if "@" in member:
        return member
    domain = list_address.rpartition("@")[2] if "@" in list_address else ""
    return f"{member}@{domain}" if domain else member
