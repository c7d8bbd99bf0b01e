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
  for the scrypt run only, not for ``failure_delay``.
* **AUTH commands per client per minute**
  (``[auth] attempts_per_minute``), counted as Postfix's anvil counts
  them for smtpd_client_auth_rate_limit: every AUTH command, refused or
  not, so a client that keeps hammering stays refused until it slows
  down.  Clients in ``trusted_networks`` are exempt, as Postfix exempts
  mynetworks (smtpd_client_event_limit_exceptions); the limit on hashes in
  progress applies to them as to everyone, since it is what bounds memory.

A "client" is counted as the connection limits count it
(:func:`relaymail.smtp.limits.client_key`): an IPv4 address, or the IPv6
network of ``[limits] ipv6_prefix`` bits, so that walking through the
addresses of one /64 buys no more guesses.

Both refusals are 4xx replies and count towards ``[limits] errors``, so a
session that keeps trying is closed with ``421`` in the end.
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task

from relaymail.auth import sasl
from relaymail.auth.checker import IRelayUser
from relaymail.smtp import replies
from relaymail.smtp.limits import AttemptWindows, client_key


class Unavailable(Exception):
    """The check cannot start now; ``reply`` is the 454 to send."""

    def __init__(self, reply, reason):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


class HashSlots:
    """Counts the password hashes in progress, overall and per address.

    :param limit: most at once over all clients (at least 1).
    :param key: names the client an address is counted under.
    """

    def __init__(self, limit, key=client_key):
        self.limit = limit
        self._key = key
        # Half each, so that one address always leaves room for others
        # when there are at least two slots.
        self.per_address = max(1, limit // 2)
        self.in_progress = 0
        self._by_address = {}      # key -> hashes in progress (never 0)

    def acquire(self, ip):
        """Take a slot for ``ip``; False if none is free for it."""
        key = self._key(ip)
        held = self._by_address.get(key, 0)
        if self.in_progress >= self.limit or held >= self.per_address:
            return False
        self.in_progress += 1
        self._by_address[key] = held + 1
        return True

    def release(self, ip):
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
    :param max_hashes: most checks in progress at once.
    :param attempts_per_minute: most AUTH commands per client per
        minute; 0 for no limit.
    :param key: names the client an address is counted under (the
        connection gate's :meth:`~relaymail.smtp.limits.ConnectionGate.key`,
        so both count by the same prefixes).
    """

    SASLError = sasl.SASLError
    Unavailable = Unavailable

    def __init__(self, portal, failure_delay, reactor, max_hashes=1, attempts_per_minute=0,
                 key=client_key):
        self._portal = portal
        self._delay = failure_delay
        self._reactor = reactor
        self._key = key
        self.slots = HashSlots(max_hashes, key)
        self._attempts_per_minute = attempts_per_minute
        self._windows = AttemptWindows(reactor)

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

    def check(self, credentials, client_ip):
        """A Deferred firing with the user name, or None (after the delay)
        when the credentials are wrong.

        :raise Unavailable: at once, when no hash slot is free for
            ``client_ip``.
        """
        if not self.slots.acquire(client_ip):
            raise Unavailable(replies.AUTH_TEMPORARY_FAILURE,
                              f"{self.slots.in_progress} password checks in progress")
        d = self._portal.login(credentials, None, IRelayUser)

        def release(result):
            # Before the failure delay: the slot is for the hash alone.
            self.slots.release(client_ip)
            return result

        d.addBoth(release)
        d.addCallback(lambda login: login[1])
        d.addErrback(self._refused)
        return d

    def _refused(self, failure):
        failure.trap(UnauthorizedLogin)
        return task.deferLater(self._reactor, self._delay, lambda: None)
