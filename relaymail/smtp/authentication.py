"""SMTP AUTH as the dialogue sees it: SASL exchanges and the password check.

The dialogue drives :mod:`relaymail.auth.sasl` exchanges; the credentials
they yield are checked through a twisted.cred portal.  A failed check is
answered only after ``[auth] failure_delay`` seconds, so guessing
passwords costs the guesser time (the errors also count towards
``[limits] errors``).

What a guess costs us
=====================

Each check is one scrypt run: 32 MiB and a fifth of a second of a core
(:mod:`relaymail.auth.passwords`), for unknown users too, so that the time
taken does not say which names exist.  Left alone, every session could
have one running, and a few hundred sessions guessing at once would take
every core and gigabytes of memory, and keep a real user's login waiting
behind them.  So two limits, both answered at once with RFC 4954 6's
``454 4.7.0`` (try again later), nothing queued:

* **Hashes in progress** (``[auth] max_concurrent_hashes``), over all
  sessions and listeners: the checker's own thread pool has exactly that
  many threads, so memory stays below that many times 32 MiB however many
  sessions guess.  One client address may hold at most half of them
  (at least one), so that a flood from one client cannot take every slot
  and a real user elsewhere still gets a hash at once.  The slot is held
  for the scrypt run only, not for ``failure_delay``.  One more slot
  (:data:`RESERVED_HASHES`) is kept for clients the relay has reason to
  believe: those in ``trusted_networks`` and those that logged in
  successfully in the last :data:`KNOWN_FOR` seconds, so that a guessing
  flood from many addresses, which can keep every shared slot busy, still
  leaves the office and the usual road warriors a hash at once.
* **AUTH commands per client per minute**
  (``[auth] attempts_per_minute``), counted as Postfix's anvil counts
  them for smtpd_client_auth_rate_limit: every AUTH command, refused or
  not, so a client that keeps hammering stays refused until it slows
  down.  Clients in ``trusted_networks`` are exempt, as Postfix exempts
  mynetworks (smtpd_client_event_limit_exceptions); the limit on hashes in
  progress applies to them as to everyone, since it is what bounds memory.

A "client" is counted as the connection limits count it
(:func:`relaymail.client_address.client_key`): an IPv4 address, or the IPv6
network of ``[limits] ipv6_prefix`` bits, so that walking through the
addresses of one /64 buys no more guesses.

Both refusals are 4xx replies and count towards ``[limits] errors``, so a
session that keeps trying is closed with ``421`` in the end.
"""

import collections

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task

from relaymail.auth import sasl
from relaymail.auth.checker import IRelayUser
from relaymail.smtp import replies
from relaymail.client_address import client_key
from relaymail.smtp.limits import AttemptWindows


class Unavailable(Exception):
    """The check cannot start now; ``reply`` is the 454 to send."""

    def __init__(self, reply, reason):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


#: Hash slots beside ``[auth] max_concurrent_hashes`` for believed clients
#: (see the module docstring); the checker's pool has this many threads more.
RESERVED_HASHES = 1

#: How long a client that logged in stays believed: a week covers the
#: office that logs in every working day and the laptop back on Monday.
KNOWN_FOR = 7 * 24 * 3600.0

#: Most believed clients remembered, oldest success forgotten first.
MAX_KNOWN = 10_000
#: ... of which one account may hold this many (its most recent), so that
#: one account cannot flush the table: home, office, phone and some travel.
MAX_KNOWN_PER_USER = 16


class HashSlots:
    """Counts the password hashes in progress, overall and per address,
    and the reserved slots of believed clients.

    :param limit: most at once over all clients (at least 1).
    :param key: names the client an address is counted under.
    :param reserved: more slots that only believed clients may take.
    """

    SHARED, RESERVED = "shared", "reserved"

    def __init__(self, limit, key=client_key, reserved=0):
        self.limit = limit
        self.reserved = reserved
        self._key = key
        # Half each, so that one address always leaves room for others
        # when there are at least two slots.
        self.per_address = max(1, limit // 2)
        self.in_progress = 0
        self.reserved_in_progress = 0
        self._by_address = {}      # key -> shared hashes in progress (never 0)

    def acquire(self, ip, believed=False):
        """Take a slot for ``ip``: :attr:`SHARED` or (only when ``believed``
        and no shared slot is free for it) :attr:`RESERVED`; None when none
        is free.  Give it back with :meth:`release`."""
        key = self._key(ip)
        held = self._by_address.get(key, 0)
        if self.in_progress < self.limit and held < self.per_address:
            self.in_progress += 1
            self._by_address[key] = held + 1
            return self.SHARED
        if believed and self.reserved_in_progress < self.reserved:
            self.reserved_in_progress += 1
            return self.RESERVED
        return None

    def release(self, ip, slot=SHARED):
        if slot == self.RESERVED:
            self.reserved_in_progress = max(0, self.reserved_in_progress - 1)
            return
        key = self._key(ip)
        held = self._by_address.get(key, 0)
        if held == 0:
            return
        self.in_progress -= 1
        if held == 1:
            del self._by_address[key]
        else:
            self._by_address[key] = held - 1


class Authenticator:
    """Starts SASL exchanges and checks their credentials, within the
    limits the module documentation describes.

    :param portal: logs ``IUsernamePassword`` in to ``IRelayUser``; its
        checker should hash in a pool of ``max_hashes`` threads.
    :param failure_delay: seconds before a failed login is answered.
    :param reactor: for the delay and the per-minute windows' clock.
    :param max_hashes: most checks in progress at once, beside the
        :data:`RESERVED_HASHES` of believed clients.
    :param attempts_per_minute: most AUTH commands per client per
        minute; 0 for no limit.
    :param key: names the client an address is counted under (the
        connection gate's :meth:`~relaymail.smtp.limits.ConnectionGate.key`,
        so both count by the same prefixes).
    """

    SASLError = sasl.SASLError
    Unavailable = Unavailable

    def __init__(self, portal, failure_delay, reactor, max_hashes=1, attempts_per_minute=0,
                 key=client_key, windows=None):
        self._portal = portal
        self._delay = failure_delay
        self._reactor = reactor
        self._key = key
        self.slots = HashSlots(max_hashes, key, RESERVED_HASHES)
        self._attempts_per_minute = attempts_per_minute
        # Several inbound workers count together (relaymail.process).
        self._windows = windows if windows is not None else AttemptWindows(reactor)
        # client key -> (time of its last successful login, user), oldest
        # first; and each user's keys, oldest first.
        self._known = collections.OrderedDict()
        self._keys_by_user = {}

    def admit(self, client_ip, trusted):
        """Count an AUTH command from ``client_ip``: None if it may go on,
        else the ``454 4.7.0`` reply for one over ``attempts_per_minute``."""
        if trusted or not self._attempts_per_minute:
            return None
        key = self._key(client_ip)
        if self._windows.count(key) > self._attempts_per_minute:
            return replies.too_many_auth_attempts(key)
        return None

    def start(self, mechanism, initial_response):
        return sasl.start(mechanism, initial_response)

    def check(self, credentials, client_ip, trusted=False):
        """A Deferred firing with the user name, or None (after the delay)
        when the credentials are wrong.

        :param trusted: the client is in ``trusted_networks``.
        :raise Unavailable: at once, when no hash slot is free for
            ``client_ip``.
        """
        key = self._key(client_ip)
        slot = self.slots.acquire(client_ip, believed=trusted or self._is_known(key))
        if slot is None:
            raise Unavailable(replies.AUTH_TEMPORARY_FAILURE,
                              f"{self.slots.in_progress} password checks in progress")
        d = self._portal.login(credentials, None, IRelayUser)

        def release(result):
            # Before the failure delay: the slot is for the hash alone.
            self.slots.release(client_ip, slot)
            return result

        d.addBoth(release)
        d.addCallback(self._logged_in, key)
        d.addErrback(self._refused)
        return d

    def _logged_in(self, login, key):
        user = login[1]
        self._forget(key)
        # One account (phished, say) logging in from many networks could
        # otherwise push every real user out of the table.
        keys = self._keys_by_user.setdefault(user, collections.OrderedDict())
        if len(keys) >= MAX_KNOWN_PER_USER:
            self._forget(next(iter(keys)))
        if len(self._known) >= MAX_KNOWN:
            self._forget(next(iter(self._known)))
        self._known[key] = (self._reactor.seconds(), user)
        self._keys_by_user.setdefault(user, collections.OrderedDict())[key] = None
        return user

    def _forget(self, key):
        entry = self._known.pop(key, None)
        if entry is not None:
            keys = self._keys_by_user[entry[1]]
            del keys[key]
            if not keys:
                del self._keys_by_user[entry[1]]

    def _is_known(self, key):
        """``key`` logged in successfully in the last :data:`KNOWN_FOR`."""
        entry = self._known.get(key)
        return entry is not None and 0 <= self._reactor.seconds() - entry[0] < KNOWN_FOR

    def _refused(self, failure):
        failure.trap(UnauthorizedLogin)
        return task.deferLater(self._reactor, self._delay, lambda: None)
