"""The ``ratelimit`` plugin: messages and recipients per sender, per
authenticated user and per client, per time window.

It works at two hooks, and is listed at both, first::

    [plugins]
    senders = ratelimit
    recipients = ratelimit, domains

At MAIL it counts a message for the envelope sender, for the AUTH user and
for the client address; at RCPT a recipient for each of the same.  Past a
limit the command gets ``450 4.7.1`` with a text naming the limit (as
Postfix's anvil-backed smtpd_client_message_rate_limit and
smtpd_client_recipient_rate_limit answer), for example::

    450 4.7.1 Error: too much mail from client 192.0.2.1 (messages_per_client), try again later
    450 4.7.1 Error: too many recipients from sender bulk@example.org (recipients_per_sender), try again later

Otherwise it has no opinion: at MAIL the next sender plugin (or the
default 250) answers, at RCPT the next recipient plugin decides, which is
why it must come before ``domains`` there (a start warns when it does not
come first).  A ``messages_*`` limit without the plugin in ``senders``, or
a ``recipients_*`` one without it in ``recipients``, would never count and
is refused.  VRFY gets no opinion.

What counts, as Postfix counts: every MAIL and every RCPT the plugin is
asked about, whether or not the message is sent in the end or a later
plugin refuses the recipient (a dictionary attack spends the recipient
allowance too); never a command the plugin itself refused, so a client
retrying while over its limit is let in again as soon as its past rate
allows (:mod:`relaymail.plugins.ratelimit_counters`).  The null sender
``<>`` is not counted as a sender -- bounces from the whole Internet share
it -- but its client and user are.  An unauthenticated client has no user
count.

``[plugin:ratelimit]`` takes:

``window``
    The time the limits are counted over, in seconds (or ``5m``, ``1h``).
    Default 60, Postfix's anvil_rate_time_unit.  The window slides: it is
    estimated from two fixed buckets of this length
    (:mod:`~relaymail.plugins.ratelimit_counters` says how and why).
``messages_per_sender``, ``messages_per_user``, ``messages_per_client``
    The most MAIL commands per window from one envelope sender (local part
    without case, domain in A-labels), from one AUTH user, from one client.
``recipients_per_sender``, ``recipients_per_user``, ``recipients_per_client``
    The most RCPT commands per window, likewise.
    Each limit: empty or 0 (the default) for none; at least one must be set.
    A client is one address, or the network of ``[limits] ipv4_prefix`` /
    ``ipv6_prefix`` bits that holds it (by default an IPv6 /64), as for the
    connection limits.
``exempt_trusted``
    ``yes`` (the default): clients in ``[server] trusted_networks`` are
    not counted at all, as Postfix exempts ``$mynetworks`` from its anvil
    limits (smtpd_client_event_limit_exceptions).  ``no`` counts them like
    anyone (a compromised host inside is a spam source too).
``redis``
    Empty (the default): counters in memory, shared by the inbound worker
    processes (``[server] workers``) through the master's shared memory,
    so a client whose connections land on several workers meets one
    limit (two workers deciding at the same instant may each let one
    event through), and a worker's restart forgets nothing, nor does a
    reload (SIGHUP), unless it changes ``max_keys``.  ``redis://host:port/db``
    (``rediss://`` for TLS, ``unix:///path/redis.sock?db=0``): counters in
    that Redis, shared by every worker and every node that names it, so a
    fleet behind HAProxy enforces one limit (needs redis-py:
    ``pip install relaymail[redis]``).  The plugin then blocks on the
    network and says ``blocking = True``: its calls run in the plugin
    thread pool (``[plugins] threads``).
``redis_prefix``
    Put before every Redis key; default ``relaymail:ratelimit:``.
``redis_timeout``
    Seconds to wait for Redis to connect or answer; default 1, well inside
    ``[plugins] timeout`` (10) so that this plugin's own failure rule
    decides, not the plugin timeout's 451.
``on_redis_failure``
    What a command gets when Redis is down, unreachable or too slow:
    ``accept`` (the default) counts nothing and lets the command through,
    with a warning in the log when it starts, once a minute while it lasts,
    and a line when Redis answers again: a rate limiter must not stop all
    mail while its Redis restarts.  ``defer`` answers ``451 4.3.0`` instead
    (the client retries later), for sites where the limit matters more than
    the mail.
``max_keys``
    Memory counters only: the most names (a sender, a user, a client, for
    each limit) remembered at once, per inbound worker; default 100000,
    at most 2000000.
    Past it, with a warning, a process of its own forgets the name counted
    longest ago, and a worker stops counting new names until old ones run
    out (its share of the shared memory is fixed).

``[plugin:ratelimit]`` refuses ``cache_ttl``: a cached answer would stand
for an event never counted.
"""

import threading
import time

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.client_address import client_key
from relaymail.config import boolean, duration, integer
from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator, ISenderPolicy
from relaymail.plugins.options import reject_unknown
from relaymail.plugins.ratelimit_counters import (
    DEFAULT_MAX_KEYS, MAX_MAX_KEYS, Count, SlidingWindow, memory_counters)
from relaymail.plugins.ratelimit_redis import DEFAULT_PREFIX, CountersUnavailable
from relaymail.plugins.static import address_key

log = Logger()

#: Whose events are counted, in the order they are checked and named.
WHO = ("sender", "user", "client")

#: The limit keys, ``messages_per_sender`` and so on.
LIMITS = tuple(f"{kind}_per_{who}" for kind in ("messages", "recipients") for who in WHO)

#: The answer under ``on_redis_failure = defer``: what relaymail answers
#: for any plugin that fails, with a text that says which.
COUNTERS_UNAVAILABLE = Decision.defer(
    code=451, enhanced="4.3.0", text="Temporary failure counting the rate limits, try again later")

#: How often, while Redis stays down, the log says so again (seconds).
_FAILURE_REMINDER = 60.0

_WHAT = {"messages": "too much mail", "recipients": "too many recipients"}

_OPTIONS = ("window",) + LIMITS + (
    "exempt_trusted", "redis", "redis_prefix", "redis_timeout", "on_redis_failure", "max_keys")

_REDIS_ONLY = ("redis_prefix", "redis_timeout", "on_redis_failure")


def refusal(count, kind):
    """The ``450 4.7.1`` for ``count`` (a Count) at ``kind`` (``messages``
    or ``recipients``)."""
    who = count.limit.rpartition("_")[2]
    return Decision.defer(
        code=450, enhanced="4.7.1",
        text=f"Error: {_WHAT[kind]} from {who} {count.key} ({count.limit}), try again later")


@implementer(ISenderPolicy, IRecipientValidator)
class RateLimit:
    """Counts MAIL and RCPT per sender, user and client; refuses past a limit.

    :param limits: a dict from each of :data:`LIMITS` to its most per
        window (0 for none).
    :param counters: a MemoryCounters or RedisCounters.
    :param clock: the time in seconds since the epoch (fleets agree on it).
    :param exempt_trusted: do not count clients in trusted_networks.
    :param defer_on_failure: answer 451 4.3.0 when the counters cannot be
        reached (else let the command through).
    :param client_key: the name a client IP is counted under.
    """

    name = "ratelimit"
    description = "messages and recipients per sender, user and client per window"

    def __init__(self, limits, counters, clock=time.time, exempt_trusted=True,
                 defer_on_failure=False, client_key=str, blocking=False):
        self._limits = dict(limits)
        self._counters = counters
        self._clock = clock
        self._exempt_trusted = exempt_trusted
        self._defer_on_failure = defer_on_failure
        self._client_key = client_key
        #: True for Redis counters: relaymail then calls from its threads.
        self.blocking = blocking
        self._failure_lock = threading.Lock()
        self._failing_since = None
        self._uncounted = 0
        self._reminded = 0.0

    def check_sender(self, sender, parameters, context):
        """Count a message; 450 4.7.1 past a ``messages_per_*`` limit."""
        return self._take("messages", sender, context)

    def check_recipient(self, recipient, context):
        """Count a recipient; 450 4.7.1 past a ``recipients_per_*`` limit,
        else no opinion."""
        return self._take("recipients", context.sender, context)

    def verify(self, address, context):
        """No opinion: VRFY sends nothing and is not counted."""
        return Decision.NO_OPINION

    def _counts(self, kind, sender, context):
        if self._exempt_trusted and context.trusted:
            return []
        keys = {
            "sender": None if sender is None else "@".join(address_key(sender)),
            "user": context.authenticated_user,
            "client": self._client_key(context.client_ip),
        }
        counts = []
        for who in WHO:
            limit = f"{kind}_per_{who}"
            most = self._limits.get(limit, 0)
            if most and keys[who] is not None:
                counts.append(Count(limit, keys[who], most))
        return counts

    def _take(self, kind, sender, context):
        counts = self._counts(kind, sender, context)
        if not counts:
            return Decision.NO_OPINION
        now = self._clock()
        try:
            over = self._counters.take(counts, now,
                                       count_them=not getattr(context, "dry_run", False))
        except CountersUnavailable as exc:
            return self._unavailable(exc, now)
        if self._failing_since is not None:
            self._recovered(now)
        if over is not None:
            return refusal(over, kind)
        return Decision.NO_OPINION

    # -- when Redis is away ------------------------------------------------

    def _unavailable(self, exc, now):
        with self._failure_lock:
            self._uncounted += 1
            first = self._failing_since is None
            if first:
                self._failing_since = now
            remind = first or now - self._reminded >= _FAILURE_REMINDER
            if remind:
                self._reminded = now
                uncounted = self._uncounted
        if remind:
            consequence = ("commands get 451 4.3.0" if self._defer_on_failure
                           else "commands pass uncounted")
            _log(log.warn, "ratelimit: cannot reach the counters ({error}); {consequence} "
                 "(on_redis_failure), {uncounted} so far", error=str(exc),
                 consequence=consequence, uncounted=uncounted)
        return COUNTERS_UNAVAILABLE if self._defer_on_failure else Decision.NO_OPINION

    def _recovered(self, now):
        with self._failure_lock:
            since, self._failing_since = self._failing_since, None
            uncounted, self._uncounted = self._uncounted, 0
        if since is not None:
            _log(log.info, "ratelimit: counting again after {seconds:.0f} s without the "
                 "counters ({uncounted} commands not counted)", seconds=now - since,
                 uncounted=uncounted)


def _log(method, *args, **kwargs):
    # Called from the plugin threads when the counters are in Redis: the
    # log observers are the reactor thread's (the main thread's).
    if threading.current_thread() is threading.main_thread():
        method(*args, **kwargs)
    else:
        from twisted.internet import reactor
        reactor.callFromThread(method, *args, **kwargs)


@implementer(IPlugin, IPluginFactory)
class RateLimitFactory:
    """Builds :class:`RateLimit` from ``[plugin:ratelimit]``."""

    name = "ratelimit"
    description = RateLimit.description
    hooks = ("senders", "recipients")

    def build(self, context):
        """Read the options (see the module's docstring); every problem is
        a ConfigError naming the key."""
        reject_unknown(context, _OPTIONS)
        options = context.options
        if "cache_ttl" in context.settings.plugin_options.get(context.name, {}):
            raise context.config_error(
                "cache_ttl", "a rate limit counts every command; a cached answer would "
                             "let commands through uncounted")

        def parse(key, parser, default):
            raw = options.get(key, "").strip() or default
            try:
                return parser(raw)
            except ValueError as exc:
                raise context.config_error(key, str(exc)) from None

        limits = {key: parse(key, integer(minimum=0), "0") for key in LIMITS}
        if not any(limits.values()):
            raise context.config_error(
                None, f"no limit set: give at least one of {', '.join(LIMITS)}")
        _check_hooks(context, limits)
        window = SlidingWindow(parse("window", duration(positive=True), "60"))
        exempt_trusted = parse("exempt_trusted", boolean, "yes")
        url = options.get("redis", "").strip()
        if url:
            if "max_keys" in options:
                raise context.config_error(
                    "max_keys", "memory counters only; Redis expires its own keys")
            counters = _redis_counters(context, window, url, parse)
            defer_on_failure = parse("on_redis_failure", _failure_rule, "accept")
        else:
            for key in _REDIS_ONLY:
                if key in options:
                    raise context.config_error(key, "set without redis, which it is for")
            counters = memory_counters(
                window, parse("max_keys", integer(minimum=1, maximum=MAX_MAX_KEYS),
                              str(DEFAULT_MAX_KEYS)))
            defer_on_failure = False
        limits_section = context.settings.limits
        return RateLimit(
            limits, counters, exempt_trusted=exempt_trusted, defer_on_failure=defer_on_failure,
            client_key=lambda ip: client_key(ip, limits_section.ipv4_prefix,
                                             limits_section.ipv6_prefix),
            blocking=bool(url))


def _check_hooks(context, limits):
    """Refuse a limit that would never be counted: messages are counted at
    MAIL, recipients at RCPT, only where [plugins] lists the plugin."""
    plugins = context.settings.plugins
    for kind, hook in (("messages", "senders"), ("recipients", "recipients")):
        listed = list(getattr(plugins, hook))
        for limit in LIMITS:
            if limit.startswith(kind) and limits[limit] and context.name not in listed:
                raise context.config_error(
                    limit, f"counted only when [plugins] {hook} lists {context.name}")
        if hook == "recipients" and context.name in listed and listed[0] != context.name:
            # Not an error: a plugin before it may only ever refuse.  But
            # one that accepts ends the question before a recipient is
            # counted.
            log.warn("{source}: [plugins] recipients lists {before} before {name}: "
                     "recipients they accept are not counted", source=context.settings.source,
                     before=", ".join(listed[:listed.index(context.name)]), name=context.name)


def _failure_rule(raw):
    """``on_redis_failure``: True for defer, False for accept."""
    rule = raw.strip().lower()
    if rule not in ("accept", "defer"):
        raise ValueError(f"expected accept or defer, got {raw!r}")
    return rule == "defer"


def _redis_counters(context, window, url, parse):
    from relaymail.plugins.ratelimit_redis import RedisCounters
    prefix = context.options.get("redis_prefix", DEFAULT_PREFIX).strip()
    if not prefix:
        raise context.config_error("redis_prefix", "empty; leave the key out for the default")
    timeout = parse("redis_timeout", duration(positive=True), "1")
    try:
        return RedisCounters(window, url, prefix, timeout)
    except ImportError:
        raise context.config_error(
            "redis", "needs the Python package redis (pip install 'relaymail[redis]')") from None
    except ValueError as exc:
        raise context.config_error("redis", f"not a Redis URL: {exc}") from None


ratelimit = RateLimitFactory()
