"""The ``ratelimit`` plugin's counters: a sliding window over two fixed
buckets, kept in this process's memory.

Why this window
---------------
A fixed window (Postfix's anvil starts a client's count at its first event
and clears it ``anvil_rate_time_unit`` later) lets a client send twice its
limit in a moment: all of it at the end of one window, all of it again at
the start of the next.  An exact sliding window has to remember the time of
every event.  Between the two, each counted name keeps two numbers: the
events of the current fixed bucket (``window`` seconds long, aligned on the
epoch so that every node of a fleet agrees where buckets start) and those of
the one before.  The rate is estimated as::

    previous * (1 - elapsed / window) + current

``elapsed`` being the time since the current bucket began: the previous
bucket's events are taken to have been spread evenly over it, and the part
of it still inside the sliding window is counted.  That is two integers a
name, one multiplication a check, and a burst at a bucket's edge is still
counted against the next bucket (the estimate is off only when the
previous bucket's events were bunched; a client that stops gets all of its
allowance back two windows later at the latest, a growing share before).

A refused event is not counted.  A client that keeps retrying while over
its limit gets in again as soon as its past rate allows, rather than
holding itself out for as long as it retries; and when one name is over
its limit (the client) the others checked with it (the sender, the user)
are not charged for a message that never came.  So :meth:`take` checks
every name first and counts them all only when none is over.

Memory counters are bounded: a name not counted for two windows is dead
and swept out (the oldest first, cheaply: names are kept in the order they
were last counted), and past ``max_keys`` names the one counted longest
ago is forgotten even if alive, with a warning: forgetting lets that name
send again, where refusing the new one would let a crowd of new names
stop everyone's mail.

With several inbound worker processes (``[server] workers``) the memory
counters are :class:`SharedCounters`: the same two buckets a name, in the
shared memory the master gives its inbound workers
(:class:`relaymail.process.shared_counts.SharedBuckets`), each worker
writing its own row and adding up all of them, so that a client whose
connections land on different workers meets one limit, and a worker's
restart forgets nothing, nor does a reload (SIGHUP: the new workers
write the region's other bank of rows and read both) unless it changes
``max_keys``, which sizes the table anew.  Two workers checking one name at
the same instant may both let an event through: a limit can be passed by
at most one event per other worker, as two nodes on one Redis can pass
it.  A row full of live names (``max_keys``) counts no new ones until
the next bucket frees some, with a warning.

The Redis counters (:mod:`relaymail.plugins.ratelimit_redis`) keep the
same two buckets a name in Redis, so that a fleet shares one count.
"""

import collections
import math

from twisted.logger import Logger

log = Logger()

#: How many names memory counters remember at most by default.  An entry
#: is a key string and a three-item list, a couple of hundred bytes: this
#: is some tens of MB at worst, the figure relaymail.smtp.limits takes for
#: its connection rates.
DEFAULT_MAX_KEYS = 100_000
#: The most ``max_keys``: each inbound worker's row of the shared region is
#: sized by it (relaymail.process.shared_counts), 128 MiB at this bound,
#: and walked whole when it fills.
MAX_MAX_KEYS = 2_000_000


class Count:
    """One name to count an event against: ``limit`` is the name of the
    limit (``messages_per_client``), ``key`` what is counted (``192.0.2.1``),
    ``most`` the events allowed per window."""

    __slots__ = ("limit", "key", "most")

    def __init__(self, limit, key, most):
        self.limit = limit
        self.key = key
        self.most = most

    @property
    def name(self):
        """What the counter is stored under: the limit and the key."""
        return f"{self.limit}:{self.key}"

    def __eq__(self, other):
        if not isinstance(other, Count):
            return NotImplemented
        return (self.limit, self.key, self.most) == (other.limit, other.key, other.most)

    def __hash__(self):
        return hash((self.limit, self.key, self.most))

    def __repr__(self):
        return f"Count({self.limit!r}, {self.key!r}, {self.most!r})"


class SlidingWindow:
    """Where a moment falls: which bucket, and how much of the previous
    bucket still counts."""

    def __init__(self, window):
        if not window > 0:
            raise ValueError(f"a window must be more than 0 seconds, not {window!r}")
        self.window = float(window)

    def bucket(self, now):
        """The number of the bucket ``now`` (seconds since the epoch) is in."""
        return math.floor(now / self.window)

    def previous_weight(self, now):
        """The share of the previous bucket still inside the sliding window
        that ends at ``now``: 1 as a bucket begins, near 0 as it ends."""
        elapsed = now - self.bucket(now) * self.window
        return max(0.0, 1.0 - elapsed / self.window)

    @staticmethod
    def over(previous, current, weight, most):
        """Whether one more event would take the estimated rate past ``most``."""
        return previous * weight + current + 1 > most


class MemoryCounters:
    """Counters in this process's memory.

    :param window: a :class:`SlidingWindow`.
    :param max_keys: the most names remembered at once.

    Not thread-safe, and needs not be: the plugin that uses them does not
    say ``blocking``, so every call comes from the reactor thread.
    """

    def __init__(self, window, max_keys=DEFAULT_MAX_KEYS):
        self._window = window
        self._max_keys = max_keys
        # name -> [bucket, current, previous], least recently counted first.
        self._entries = collections.OrderedDict()
        self._warned_bucket = None

    def __len__(self):
        return len(self._entries)

    def take(self, counts, now, count_them=True):
        """Count one event against every one of ``counts`` (a list of
        :class:`Count`), unless one of them is over its limit.

        :param now: the time, in seconds since the epoch.
        :param count_them: False only looks (a dry run): nothing is counted.
        :return: the first :class:`Count` whose limit one more event would
            pass (and then nothing is counted), or None (all counted).
        """
        bucket = self._window.bucket(now)
        weight = self._window.previous_weight(now)
        self._sweep(bucket)
        for count in counts:
            previous, current = self._numbers(count.name, bucket)
            if self._window.over(previous, current, weight, count.most):
                return count
        if not count_them:
            return None
        for count in counts:
            self._add(count.name, bucket)
        return None

    def _numbers(self, name, bucket):
        """``(previous, current)`` for ``name`` in ``bucket``."""
        entry = self._entries.get(name)
        if entry is None:
            return 0, 0
        stored, current, previous = entry
        if stored == bucket:
            return previous, current
        if stored == bucket - 1:
            return current, 0
        return 0, 0

    def _add(self, name, bucket):
        previous, current = self._numbers(name, bucket)
        self._entries[name] = [bucket, current + 1, previous]
        self._entries.move_to_end(name)
        if len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)
            if self._warned_bucket != bucket:
                # Once a bucket, not once an event: a flood of new names
                # would otherwise write a line for each.
                self._warned_bucket = bucket
                log.warn("ratelimit: more than {most} names counted at once; forgetting "
                         "the ones counted longest ago (raise [plugin:ratelimit] max_keys "
                         "or use redis)", most=self._max_keys)

    def _sweep(self, bucket):
        # Names are in the order they were last counted, so the dead ones
        # (nothing in this bucket or the one before) are all at the front.
        entries = self._entries
        while entries:
            name, entry = next(iter(entries.items()))
            if entry[0] >= bucket - 1:
                return
            del entries[name]


class SharedCounters(MemoryCounters):
    """Counters in the memory the inbound workers share (see the module's
    docstring): :class:`MemoryCounters`'s :meth:`take`, with its numbers
    read from and added to a
    :class:`relaymail.process.shared_counts.SharedBuckets` table.

    :param window: a :class:`SlidingWindow`.
    :param table: this worker's view of the shared table.
    :param max_keys: what a full row is reported as, in the warning.
    """

    def __init__(self, window, table, max_keys=DEFAULT_MAX_KEYS):
        self._window = window
        self._table = table
        self._max_keys = max_keys
        self._warned_bucket = None

    def __len__(self):
        """Names this worker counts (its row's live entries)."""
        return self._table.tracked()

    def _sweep(self, bucket):
        # The table drops dead names itself when its row fills.
        pass

    def _numbers(self, name, bucket):
        return self._table.numbers(name, bucket)

    def _add(self, name, bucket):
        if not self._table.add(name, bucket) and self._warned_bucket != bucket:
            self._warned_bucket = bucket
            log.warn("ratelimit: more than {most} names counted at once in this worker; "
                     "new names are not counted until old ones run out (raise "
                     "[plugin:ratelimit] max_keys or use redis)", most=self._max_keys)


#: The table of the inbound workers' shared memory this process counts
#: in (share_between_workers), or None: a process of its own.
_shared_table = None


def share_between_workers(table):
    """Make the ratelimit plugins this process builds from now on count in
    ``table`` (a SharedBuckets), together with the other inbound workers:
    called by an inbound worker before it builds its plugins."""
    global _shared_table
    _shared_table = table


def memory_counters(window, max_keys=DEFAULT_MAX_KEYS):
    """The counters for a plugin without Redis: shared with the other
    inbound workers when this process is one, else its own."""
    if _shared_table is not None:
        return SharedCounters(window, _shared_table, max_keys)
    return MemoryCounters(window, max_keys)
