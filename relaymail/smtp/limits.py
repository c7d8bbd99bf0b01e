"""Connection limits: how many clients at once, from one address, per minute.

:class:`ConnectionGate` is asked once per new connection, before the
greeting, and told when each admitted connection ends.  It keeps three
counts, as Postfix does with its process limit and its anvil(8) server:

* connections open at once from everyone (``[limits] connections``);
* connections open at once from one client
  (``connections_per_ip``, Postfix smtpd_client_connection_count_limit);
* connections one client opened in the current minute
  (``connection_rate_per_ip``, Postfix smtpd_client_connection_rate_limit).

"One client" is one network of ``ipv4_prefix`` / ``ipv6_prefix`` bits
(by default a single IPv4 address and an IPv6 /64, what one site is
given), so a client cannot multiply its share by walking through its
addresses.

Two more rules keep a crowd from locking everyone out:

* ``trusted_reserve`` connections are for ``trusted_networks`` only:
  outsiders are refused once the rest is taken, however many addresses
  they come from;
* from ``stress_threshold`` open connections on, the gate is *stressed*
  (Postfix's ``stress`` flag, set when every smtpd process is busy): the
  sessions of outsiders get the short ``stress_*`` timeout and error
  limits until enough connections have closed, so idle or misbehaving
  clients make room in seconds instead of minutes.  The gate tells the
  sessions that watch it when this changes.

A refusal is the text of a ``421 4.7.0`` reply, worded as Postfix words it
so that operators' log searches carry over.  The gate does no I/O and reads
time only from the clock it is given, so tests drive it with a fake clock.
"""

import collections

from twisted.logger import Logger

from relaymail.client_address import client_key

log = Logger(namespace="relaymail.smtp")

# anvil_rate_time_unit: Postfix counts connection rates over 60 seconds.
RATE_WINDOW = 60.0

# Most addresses whose rate is remembered at once.  A flood from many
# addresses (easy with IPv6) must not grow the table without bound; when it
# is full, the address whose minute started longest ago is forgotten first.
# Each entry is a couple of hundred bytes, so this is some tens of MB.
MAX_TRACKED = 100_000

#: Seconds between looks at the counts every inbound worker shares, for a
#: stress another worker's connections began or ended.
FOLLOW_INTERVAL = 0.5

TOO_MANY = "Error: too many connections"


class _Window:
    """One address's connection attempts since ``start``."""

    __slots__ = ("start", "count")

    def __init__(self, start):
        self.start = start
        self.count = 0


class ConnectionGate:
    """Counts connections overall and per client, and connection rate per client.

    :param settings: relaymail settings; ``settings.limits`` gives
        ``connections``, ``connections_per_ip`` and
        ``connection_rate_per_ip`` (0 turns either per-IP limit off),
        ``ipv4_prefix``, ``ipv6_prefix``, ``trusted_reserve`` and
        ``stress_threshold``.
    :param clock: an ``IReactorTime``-like object with ``seconds()``; the
        reactor when None.
    :param max_tracked: most addresses whose rate is remembered (see
        :data:`MAX_TRACKED`); for tests.
    :param shared: an inbound worker's
        :class:`relaymail.process.shared_counts.SharedCounts`: the overall
        and per-client counts are then those of every worker together.
    :param rates: likewise, a SharedWindows for the connection rates.
    """

    def __init__(self, settings, clock=None, *, max_tracked=MAX_TRACKED, shared=None,
                 rates=None):
        if clock is None:
            # Imported here so that importing this module does not install
            # the default reactor before twistd has chosen one.
            from twisted.internet import reactor as clock
        limits = settings.limits
        self._clock = clock
        self._max_total = limits.connections
        # Outsiders stop here; the rest is the trusted clients' reserve.
        self._max_outsiders = limits.connections - limits.trusted_reserve.of(limits.connections)
        self._max_per_ip = limits.connections_per_ip
        self._max_rate = limits.connection_rate_per_ip
        self._prefixes = (limits.ipv4_prefix, limits.ipv6_prefix)
        self._stress_on = max(1, limits.stress_threshold.of(limits.connections))
        # Stress ends only once a tenth of the threshold has closed again,
        # so a table hovering at the threshold does not flip (and retime
        # every session) on each connection.
        self._stress_off = self._stress_on - max(1, self._stress_on // 10)
        self._stressed = False
        self._watchers = set()
        self._following = None      # a LoopingCall while sessions watch shared counts
        self._total = 0
        self._open = {}      # client key -> connections open now (never 0)
        self._rates = rates if rates is not None else AttemptWindows(clock, max_tracked)
        self._shared = shared

    def key(self, ip):
        """The name ``ip`` is counted under (see :func:`client_key`)."""
        return client_key(ip, *self._prefixes)

    @property
    def stressed(self):
        """True while the table is nearly full (see the module docstring)."""
        return self._stressed

    def watch(self, callback):
        """Call ``callback(stressed)`` each time :attr:`stressed` changes."""
        self._watchers.add(callback)
        if self._shared is not None and self._following is None:
            # Another worker's admit or release can cross a threshold that
            # this one would otherwise notice only at its own next one:
            # its idle outsiders kept the normal timeout through a stress.
            from twisted.internet import task
            self._following = task.LoopingCall(self._follow_shared_counts)
            self._following.clock = self._clock
            self._following.start(FOLLOW_INTERVAL, now=False)

    def unwatch(self, callback):
        """Stop calling ``callback``; nothing if it was not watching."""
        self._watchers.discard(callback)
        if not self._watchers and self._following is not None:
            self._following.stop()
            self._following = None

    def _follow_shared_counts(self):
        self._update_stress(self.connections)

    def _update_stress(self, total):
        """Start or end the stress for ``total`` connections open: on each
        admit and release, and each look at the counts every worker shares
        (whose total another worker's connections change too)."""
        if not self._stressed and total >= self._stress_on:
            self._set_stress(True)
        elif self._stressed and total <= self._stress_off:
            self._set_stress(False)

    @property
    def connections(self):
        """Connections admitted and not yet released (by every worker)."""
        return self._shared.total() if self._shared is not None else self._total

    def connections_from(self, ip):
        """Connections from ``ip``'s network admitted and not yet released
        (by every worker)."""
        return self._open_from(self.key(ip))

    def _open_from(self, key):
        if self._shared is not None:
            return self._shared.open(key)
        return self._open.get(key, 0)

    def tracked(self):
        """How many clients' connection rates are remembered now."""
        return self._rates.tracked()

    def admit(self, ip, exempt):
        """Decide whether a new connection from ``ip`` may proceed.

        The overall limit applies to everyone; the trusted reserve, the
        per-IP count and the rate limits do not apply when ``exempt`` is
        True (the caller passes True for clients in ``trusted_networks``,
        as Postfix exempts mynetworks through
        smtpd_client_event_limit_exceptions).

        Every attempt from a client that is not exempt counts towards its
        rate, refused or not, as anvil counts them: a client hammering the
        port stays refused until it slows down.  An admitted connection is
        counted as open until :meth:`release`; a refused one is not.

        :return: None when the connection may proceed, else the reason for
            a ``421 4.7.0 <hostname> <reason>`` reply.
        """
        key = self.key(ip)
        attempts = 0 if exempt else self._count_attempt(key)
        total = self.connections
        if total >= (self._max_total if exempt else self._max_outsiders):
            return TOO_MANY
        if not exempt:
            if self._max_per_ip and self._open_from(key) >= self._max_per_ip:
                return f"{TOO_MANY} from {key}"
            if self._max_rate and attempts > self._max_rate:
                return f"{TOO_MANY} per minute from {key}"
        self._total += 1
        self._open[key] = self._open.get(key, 0) + 1
        if self._shared is not None:
            self._shared.add(key, 1)
        self._update_stress(total + 1)
        return None

    def release(self, ip):
        """A connection admitted from ``ip`` has ended."""
        key = self.key(ip)
        count = self._open.get(key, 0)
        if count == 0:
            # Released twice, or never admitted: a caller's bug, but not
            # one that may push the counts below what is really open.
            return
        self._total -= 1
        if count == 1:
            del self._open[key]
        else:
            self._open[key] = count - 1
        if self._shared is not None:
            self._shared.add(key, -1)
        self._update_stress(self.connections)

    def _set_stress(self, stressed):
        self._stressed = stressed
        if stressed:
            log.info("stress: {open} of {limit} connections open; outsiders get the "
                     "stress timeout and error limits", open=self.connections,
                     limit=self._max_total)
        else:
            log.info("stress over: {open} of {limit} connections open",
                     open=self.connections, limit=self._max_total)
        # A copy: a watcher may stop watching (its session closing) meanwhile.
        for callback in list(self._watchers):
            callback(stressed)

    def _count_attempt(self, key):
        """Count one attempt from ``key``; the attempts in its window now."""
        return self._rates.count(key) if self._max_rate else 0


class AttemptWindows:
    """Attempts per client per minute: the connection rate of
    :class:`ConnectionGate` and ``[auth] attempts_per_minute``.

    Fixed one-minute windows, as anvil(8) counts (``anvil_rate_time_unit``),
    in a table of at most ``max_tracked`` clients: when it is full, the
    client whose minute started longest ago is forgotten first, so a flood
    from many addresses cannot grow it without bound.

    :param clock: an ``IReactorTime``-like object with ``seconds()``.
    """

    def __init__(self, clock, max_tracked=MAX_TRACKED):
        self._clock = clock
        self._max_tracked = max_tracked
        # client key -> _Window, in the order the windows started, so that
        # the expired ones are always at the front and pruning stops at the
        # first live one.  An OrderedDict because taking from the front of
        # a plain dict again and again rescans the deleted slots.
        self._windows = collections.OrderedDict()

    def count(self, key):
        """Count one attempt from the client ``key`` (see :func:`client_key`);
        return the attempts counted in its current minute, this one included."""
        now = self._clock.seconds()
        self._prune(now)
        window = self._windows.get(key)
        if window is not None and not _live(window, now):
            # Only reachable when the clock went backwards (the reactor's
            # is wall-clock time); start afresh rather than trust it.
            del self._windows[key]
            window = None
        if window is None:
            if len(self._windows) >= self._max_tracked:
                self._windows.popitem(last=False)
            window = self._windows[key] = _Window(now)
        window.count += 1
        return window.count

    def tracked(self):
        """How many clients' windows are remembered now."""
        self._prune(self._clock.seconds())
        return len(self._windows)

    def _prune(self, now):
        """Forget the windows that ended; they sit at the front."""
        windows = self._windows
        while windows and not _live(next(iter(windows.values())), now):
            windows.popitem(last=False)


def _live(window, now):
    """True while ``window``'s minute has not run out."""
    return window.start <= now < window.start + RATE_WINDOW
