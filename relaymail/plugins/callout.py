"""The ``callout`` plugin: ask the next hop whether it knows a recipient.

A relay in front of an internal server accepts every local part of its
domains and bounces later what the server refuses -- often to a forged
sender.  With ``[plugins] recipients = callout`` the relay asks first, as
Postfix's ``reject_unverified_recipient`` and Exim's ``verify =
recipient/callout`` do: ``MAIL FROM:<>`` and ``RCPT TO:<address>`` at the
next hop, no message.  A 2xx accepts the recipient, a 5xx refuses it with
``550 5.1.1``, and the transaction is reset (RSET before the next question,
QUIT when the session is closed).

Only recipients in ``[relay] domains`` are asked about; for any other the
plugin has no opinion and the relay rule decides.  Were it to ask, a
smarthost that takes anything would make its accept an open relay.

``[plugin:callout]`` takes:

``next_hop``
    Where to ask, ``[host]:port`` or ``host:port`` as a ``[routes]`` value
    (opportunistic STARTTLS).  Default: the recipient domain's ``[routes]``
    entry (with its ``[route_tls]`` policy), else the ``[delivery]``
    smarthost (its TLS policy and credentials), as delivery would go.  A
    name is resolved to its addresses, never looked up as MX; a domain
    that would be delivered by MX gets no opinion.
``timeout``
    Seconds for the whole question, connecting included (default 6); it
    must be shorter than ``[plugins] timeout``, so that the plugin's own
    answer comes first.  6 s is about what Postfix's smtpd waits for its
    verify service (address_verify_poll_count 3 x poll_delay 3 s) before
    it answers 450.
``on_temporary_failure``
    ``defer`` (default) or ``accept``: what to answer when the next hop
    could not be asked -- it answered 4xx (``450 4.4.3``), or not at all:
    refused the connection, timed out, hung up (``451 4.4.1``).  A refused
    ``MAIL FROM:<>`` counts here too: it says nothing about the recipient
    (and breaks RFC 5321 4.5.5).  Never remembered.
``positive_ttl``, ``negative_ttl``
    How long a "known" and an "unknown" answer are remembered: 24 hours and
    2 hours by default, Exim's callout cache times.  Postfix keeps 31 days
    and 3 days in its verify database, refreshed in the background; a
    cache in memory without a refresh should forget sooner, and an
    unknown address sooner still, as a mailbox created today should get
    mail within hours.  0 turns one off.
``cache_entries``
    The most answers of each kind kept (default 10000, the relay's answer
    cache size; at most 1000000): in an inbound worker, about that many
    by each worker in the shared table, which remembers no new answer
    while it is full of young ones; elsewhere the least recently used are
    forgotten first.  The two kinds
    are bounded apart, so a flood of made-up addresses cannot push the
    known ones out.
``max_sessions``
    Sessions open at once per next hop (default 10: half of Postfix's
    default_destination_concurrency_limit, 20, leaving the rest to
    deliveries to the same host).
``idle_time``
    Seconds an unused session stays open for the next question (default
    2, Postfix's smtp_connection_cache_time_limit).

Answers are remembered by address, the local part as written and the
domain without case.  An address asked about while a question about it is
under way waits for that question's answer (a mail to a list reaches many
sessions at once; the hop is asked once).  The answers are remembered for
all inbound workers together (:mod:`relaymail.plugins.callout_cache`),
the sessions by each worker.  An address that needs
SMTPUTF8 at a hop that does not offer it cannot be asked about (a
temporary failure).  ``cache_ttl`` (the relay's own answer cache) is
refused: it would remember a deferral as long as an answer.

VRFY gets no opinion (the client sees ``252``): VRFY is the address
harvester's command, and answering it by callout would let any client
make the relay question the internal server, outside any transaction, as
fast as it likes.  The answer that matters is given at RCPT.
"""

import dataclasses

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from relaymail.config import duration, integer, next_hop
from relaymail.delivery.destinations import client_configs
from relaymail.delivery.outcomes import DeliveryError
from relaymail.delivery.routing import Destination, route_key
from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator
from relaymail.plugins.callout_cache import MAX_CACHE_ENTRIES, answer_caches
from relaymail.plugins.callout_client import CalloutHop, SessionPool
from relaymail.plugins.options import reject_unknown
from relaymail.policy.answer_cache import DEFAULT_SIZE

log = Logger()

_OPTIONS = ("next_hop", "timeout", "on_temporary_failure", "positive_ttl", "negative_ttl",
            "cache_entries", "max_sessions", "idle_time")


@dataclasses.dataclass(frozen=True)
class CalloutSettings:
    """The options, read (see the module docstring for each)."""

    timeout: float = 6
    defer_on_failure: bool = True
    positive_ttl: float = 24 * 3600
    negative_ttl: float = 2 * 3600
    cache_entries: int = DEFAULT_SIZE
    max_sessions: int = 10
    idle_time: float = 2


@implementer(IRecipientValidator)
class Callout:
    """Asks the next hop about each recipient in the relay's domains.

    :param domains: the domain keys asked about ([relay] domains).
    :param hop_for: ``domain key -> CalloutHop or None``.
    :param options: a :class:`CalloutSettings`.
    :param reactor: for connections, timers and the cache's clock; the
        global one (at first use) when None.
    """

    name = "callout"
    description = "asks the next hop whether it knows each recipient (MAIL FROM:<>, RCPT TO)"

    def __init__(self, domains, hop_for, options, reactor=None):
        self._domains = frozenset(domain.lower() for domain in domains)
        self._hop_for = hop_for
        self._options = options
        self._reactor = reactor
        self._pool = None
        self._known, self._unknown = answer_caches(options)
        # (hop label, address) -> the Deferreds waiting for the question
        # being asked now: a second RCPT for the same address (a list mail
        # to many sessions at once) waits for that answer, not a session.
        self._asking = {}

    def check_recipient(self, recipient, context):
        """Accept what the next hop takes, refuse what it refuses (550
        5.1.1), defer or accept what it could not be asked about."""
        if recipient.domain_key not in self._domains:
            return Decision.NO_OPINION
        hop = self._hop_for(recipient.domain_key)
        if hop is None:
            return Decision.NO_OPINION
        reactor = self._the_reactor()
        now = reactor.seconds()
        for cache in (self._known, self._unknown):
            remembered = cache.get(recipient, now)
            if remembered is not None:
                return _answer(*remembered)
        # Each asker its own Deferred: the relay may cancel one (its
        # [plugins] timeout) without cutting the question short for others.
        mine = defer.Deferred()
        key = (hop.label, str(recipient))
        if key in self._asking:
            self._asking[key].append(mine)
            return mine
        self._asking[key] = [mine]
        d = self._sessions().ask(hop, str(recipient))
        d.addTimeout(self._options.timeout, reactor)
        # The log lines start with the session's id, as the relay's own do.
        session = getattr(context, "session_id", None) or "-"
        about = (recipient, hop, session)
        d.addCallbacks(self._answered, self._not_asked, callbackArgs=about, errbackArgs=about)
        d.addBoth(self._tell, key)
        return mine

    def verify(self, address, context):
        """No opinion (see the module docstring): the client gets 252."""
        return Decision.NO_OPINION

    def close(self):
        """Let go of the open sessions."""
        if self._pool is not None:
            self._pool.close()

    # -- inside ---------------------------------------------------------------

    def _the_reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def _sessions(self):
        if self._pool is None:
            self._pool = SessionPool(self._the_reactor(), self._options.max_sessions,
                                     self._options.idle_time)
        return self._pool

    def _tell(self, result, key):
        told = False
        for waiter in self._asking.pop(key, ()):
            if not waiter.called:           # not cancelled meanwhile
                told = True
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
        if isinstance(result, Failure) and not told:
            log.failure("callout question about {key} failed", result, key=key[1])

    def _answered(self, result, recipient, hop, session):
        said = _codes(result.code, result.enhanced)
        now = self._the_reactor().seconds()
        if 200 <= result.code < 300:
            if self._options.positive_ttl:
                self._known.put(recipient, result.code, result.enhanced, now)
            return _answer(result.code, result.enhanced)
        log.info("{session} callout: {hop} said {reply} to RCPT TO:<{address}>",
                 session=session, hop=hop.label, reply=f"{result.code} {result.enhanced} {result.text}",
                 address=str(recipient))
        if result.code >= 500:
            if self._options.negative_ttl:
                self._unknown.put(recipient, result.code, result.enhanced, now)
            return _answer(result.code, result.enhanced)
        return self._temporary(Decision.defer(
            f"Recipient address not verified: the next hop could not be asked "
            f"(it said {said}), try again later", code=450, enhanced="4.4.3"))

    def _not_asked(self, failure, recipient, hop, session):
        error = failure.value
        if isinstance(error, DeliveryError):
            problem = error.text
            if error.code is not None and 400 <= error.code < 600:
                # A refused greeting, EHLO or MAIL FROM:<>: the hop answered.
                log.info("{session} callout: {hop} could not be asked about <{address}>: {problem}",
                         session=session, hop=hop.label, address=str(recipient), problem=problem)
                return self._temporary(Decision.defer(
                    "Recipient address not verified: the next hop could not be asked "
                    f"(it said {_codes(error.code, error.enhanced)}), try again later",
                    code=450, enhanced="4.4.3"))
        elif failure.check(defer.TimeoutError, defer.CancelledError):
            problem = f"no answer within {self._options.timeout:g} s"
        else:
            # A bug of ours: the relay logs it with its traceback and says 451.
            return failure
        log.info("{session} callout: {hop} could not be asked about <{address}>: {problem}",
                 session=session, hop=hop.label, address=str(recipient), problem=problem)
        return self._temporary(Decision.defer(
            "Recipient address not verified: the next hop could not be asked, "
            "try again later", code=451, enhanced="4.4.1"))

    def _temporary(self, deferral):
        return deferral if self._options.defer_on_failure else Decision.accept()


def _answer(code, enhanced):
    """The answer to a 2xx or 5xx reply of the hop, asked now or
    remembered (relaymail.plugins.callout_cache keeps only the codes)."""
    if 200 <= code < 300:
        return Decision.accept()
    # The hop's own text stays in the log: it may name internal hosts and
    # is a stranger's bytes; its codes are checked digits.
    return Decision.reject(550, "5.1.1", "Recipient address rejected: unknown at the next "
                                         f"hop ({_codes(code, enhanced)})")


def _codes(code, enhanced):
    """``550 5.1.1``: a reply's code and enhanced code (X.0.0 when the hop
    gave none, RFC 3463 3.1), both checked digits: the reader takes an
    enhanced code only in RFC 3463 form."""
    return f"{int(code)} {enhanced}" if enhanced else str(int(code))


@implementer(IPlugin, IPluginFactory)
class CalloutFactory:
    """Builds :class:`Callout` from ``[plugin:callout]``."""

    name = "callout"

    def build(self, context):
        """Read the options; every problem is a ConfigError naming the key."""
        reject_unknown(context, _OPTIONS)
        settings = context.settings
        if "cache_ttl" in settings.plugin_options.get(context.name, {}):
            raise context.config_error(
                "cache_ttl", "the callout keeps its own caches (positive_ttl, negative_ttl): "
                             "the relay's would remember a deferral as long as an answer")
        options = _read_options(context)
        configs = client_configs(settings)
        timeouts = _timeouts(options.timeout)
        fixed = context.options.get("next_hop", "").strip()
        if fixed:
            try:
                hop = next_hop(fixed)
            except ValueError as exc:
                raise context.config_error("next_hop", str(exc)) from None
            config = configs(Destination("route", hop.host, hop.port, hop.mx_lookup))
            fixed_hop = CalloutHop(hop.host, hop.port, dataclasses.replace(config, **timeouts))
            return Callout(settings.relay.domains, lambda domain: fixed_hop, options)
        return Callout(settings.relay.domains, _hop_finder(settings, configs, timeouts), options)


def _read_options(context):
    options = context.options
    defaults = CalloutSettings()

    def parse(key, parser, default):
        raw = options.get(key, "").strip() or str(default)
        try:
            return parser(raw)
        except ValueError as exc:
            raise context.config_error(key, str(exc)) from None

    timeout = parse("timeout", duration(positive=True), defaults.timeout)
    limit = context.settings.plugins.timeout
    if limit is not None and timeout >= limit:
        given = "" if options.get("timeout", "").strip() else f" (the default, {timeout:g} s)"
        raise context.config_error(
            "timeout", f"must be shorter than [plugins] timeout ({limit:g} s){given}: the "
                       "plugin must answer before the relay gives up on it")
    return CalloutSettings(
        timeout=timeout,
        defer_on_failure=parse("on_temporary_failure", _failure_rule, "defer"),
        positive_ttl=parse("positive_ttl", duration(), defaults.positive_ttl),
        negative_ttl=parse("negative_ttl", duration(), defaults.negative_ttl),
        cache_entries=parse("cache_entries", integer(minimum=1, maximum=MAX_CACHE_ENTRIES),
                            defaults.cache_entries),
        max_sessions=parse("max_sessions", integer(minimum=1), defaults.max_sessions),
        idle_time=parse("idle_time", duration(), defaults.idle_time),
    )


def _failure_rule(raw):
    """``on_temporary_failure``: True for defer, False for accept."""
    rule = raw.strip().lower()
    if rule not in ("accept", "defer"):
        raise ValueError(f"expected defer or accept, got {raw!r}")
    return rule == "defer"


def _timeouts(timeout):
    """The client's timers, none longer than the whole question may take."""
    return {"connect_timeout": timeout, "command_timeout": timeout,
            "quit_timeout": min(timeout, 10)}


def _hop_finder(settings, configs, timeouts):
    """``domain key -> CalloutHop or None``: the [routes] entry for the
    domain, else the smarthost, as delivery picks them
    (relaymail.delivery.routing); None for a domain delivered by MX."""
    routes = settings.routes
    smarthost = settings.delivery.smarthost
    found = {}

    def hop_for(domain):
        key = route_key(routes, domain)
        if key is not None:
            route = routes[key]
            destination = Destination("route", route.host, route.port, route.mx_lookup,
                                      settings.route_tls.get(key))
        elif smarthost is not None:
            destination = Destination("smarthost", smarthost.host, smarthost.port,
                                      smarthost.mx_lookup)
        else:
            return None
        if destination not in found:
            config = dataclasses.replace(configs(destination), **timeouts)
            found[destination] = CalloutHop(destination.host, destination.port, config)
        return found[destination]
    return hop_for


callout = CalloutFactory()
