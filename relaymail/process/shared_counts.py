"""Connection and AUTH limits counted across every inbound worker.

The master makes one shared memory region (a memfd, passed to the inbound
workers like the listeners) holding these tables, each with a row per
inbound worker in each of two banks (:class:`LimitsRegion`: a reload's new
workers write one bank while the old ones finish in the other, and every
row is read, so the limits hold across a reload):

- connections open per client, and the worker's total
  (``[limits] connections`` and ``connections_per_ip``);
- connection attempts per client per minute (``connection_rate_per_ip``);
- AUTH attempts per client per minute (``[auth] attempts_per_minute``);
- the ``ratelimit`` plugin's memory counters, two buckets a name
  (:class:`relaymail.plugins.ratelimit_counters.SharedCounters`);
- the ``callout`` plugin's remembered answers, known and unknown
  recipients (:mod:`relaymail.plugins.callout_cache`).

A row has one writer, its worker, and readers that only add up: no lock
is needed.  A row is a hash table of fixed-size entries of 64-bit words,
the client hash first, with linear probing.  An entry that no longer
counts (no connection open, a minute that ran out) keeps its hash, so
that probe chains stay whole; when three quarters of a row are taken its
writer packs it again (a reader at that moment may count a client short,
once).  The master zeroes a dead worker's open connections before its
successor starts; its attempts stay counted: they are history.

The client hash is the first 8 bytes of BLAKE2b of the client key
(:func:`relaymail.client_address.client_key`): Python's ``hash()`` differs
from process to process.
"""

import functools
import hashlib
import mmap
import os
import time

_WORD = 8
#: Seconds between packs of a row that stays full of entries that count.
_PACK_PAUSE = 1.0


@functools.lru_cache(maxsize=65536)
def client_hash(key):
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return value or 1       # 0 marks an empty entry


class _Table:
    """``rows`` rows of ``slots`` entries of ``width`` words, after
    ``header`` words of each row's own, at byte ``offset`` of the region;
    this worker writes row ``row``."""

    header = 0
    width = 1

    def __init__(self, fd, offset, rows, slots, row):
        size = offset + self.size(rows, slots)
        self._map = mmap.mmap(fd, size)
        self._words = memoryview(self._map).cast("Q")
        self._base = offset // _WORD
        self._rows = rows
        self._slots = slots
        self._row = row
        # Entries of this row with a hash in them, counted when first
        # needed: a worker's successor takes over its row as it was, and
        # a table nobody writes (no ratelimit plugin) is never read, its
        # pages never made resident.
        self._used = None
        self._next_pack = 0.0   # _claim()

    @classmethod
    def size(cls, rows, slots):
        """Bytes the table takes in the region."""
        return rows * (cls.header + cls.width * slots) * _WORD

    def _row_start(self, row):
        return self._base + row * (self.header + self.width * self._slots)

    def _find(self, row, wanted):
        """The word index of ``wanted``'s entry in ``row``, or None."""
        words, slots, width = self._words, self._slots, self.width
        start = self._row_start(row) + self.header
        for probe in range(slots):
            index = start + width * ((wanted + probe) % slots)
            key = words[index]
            if key == wanted:
                return index
            if key == 0:
                return None
        return None

    def _free(self, wanted):
        """The index of the entry ``wanted`` would take in this row, or
        None when the row is full."""
        words, slots, width = self._words, self._slots, self.width
        start = self._row_start(self._row) + self.header
        for probe in range(slots):
            index = start + width * ((wanted + probe) % slots)
            if words[index] == 0:
                return index
        return None

    def _claim(self, wanted, *values):
        """A new entry for ``wanted`` in this row, holding ``values``; its
        index, or None when the row is full of entries that still count."""
        if self._used is None:
            start = self._row_start(self._row) + self.header
            hashes = self._words[start:start + self.width * self._slots:self.width]
            self._used = self._slots - hashes.tolist().count(0)
        if self._used >= 3 * self._slots // 4:
            # Probes stay short only while a quarter is empty, so the row
            # is full there.  Packing walks every entry (tens of ms for a
            # big row): while a flood of new names keeps the row full of
            # live ones, once a second, not once a name.
            now = time.monotonic()
            if now < self._next_pack:
                return None
            self._pack()
            self._next_pack = now + _PACK_PAUSE
            if self._used >= 3 * self._slots // 4:
                return None
        index = self._free(wanted)
        if index is None:
            return None
        words = self._words
        # The values before the hash: a reader that finds it finds them.
        for offset, value in enumerate(values, start=1):
            words[index + offset] = value
        words[index] = wanted
        self._used += 1
        return index

    def _pack(self):
        """Keep only the entries of this row that still count."""
        words, slots, width = self._words, self._slots, self.width
        start = self._row_start(self._row) + self.header
        entries = [tuple(words[start + width * i:start + width * (i + 1)]) for i in range(slots)]
        for i in range(width * slots):
            words[start + i] = 0
        self._used = 0
        for entry in entries:
            if entry[0] and self._counts(entry):
                index = self._free(entry[0])
                for offset, value in enumerate(entry[1:], start=1):
                    words[index + offset] = value
                words[index] = entry[0]
                self._used += 1

    def _counts(self, entry):
        """True while the entry ``(hash, ...)`` means something."""
        raise NotImplementedError

    def close(self):
        self._words.release()
        self._map.close()


class SharedCounts(_Table):
    """Connections open: per row the worker's total, then
    ``(client hash, connections open)`` entries.

    The total counts every connection, so that ``[limits] connections``
    holds whatever the entries could record.  A client's entry counts
    those it found room for: in a row full of entries (a flood from more
    clients than it holds, between two packs) a new client's connection
    is in the total only, and remembered in the worker, so that its end
    takes nothing off an entry that never counted it, and the client's
    next connection that finds room brings it into the entry.
    """

    header = 1
    width = 2

    def __init__(self, fd, offset, rows, slots, row):
        super().__init__(fd, offset, rows, slots, row)
        # client hash -> this worker's connections open from that client
        # that its entry does not count.  At most the connections open.
        self._uncounted = {}

    def total(self):
        """Connections open in all workers."""
        words = self._words
        return sum(words[self._row_start(row)] for row in range(self._rows))

    def open(self, key):
        """Connections open from client ``key`` in all workers."""
        wanted = client_hash(key)
        words = self._words
        total = 0
        for row in range(self._rows):
            index = self._find(row, wanted)
            if index is not None:
                total += words[index + 1]
        return total

    def add(self, key, delta):
        """Count ``delta`` (+1 or -1) more connections from ``key`` here."""
        wanted = client_hash(key)
        words = self._words
        uncounted = self._uncounted.get(wanted, 0)
        if delta < 0 and uncounted:
            # One its entry never counted: the entry keeps those it did.
            if uncounted == 1:
                del self._uncounted[wanted]
            else:
                self._uncounted[wanted] = uncounted - 1
        else:
            index = self._find(self._row, wanted)
            if index is not None:
                words[index + 1] = max(0, words[index + 1] + delta)
            elif delta > 0:
                # With those it could not count before, once there is room.
                if self._claim(wanted, delta + uncounted) is None:
                    self._uncounted[wanted] = uncounted + 1     # no room in the row
                elif uncounted:
                    del self._uncounted[wanted]
        total = self._row_start(self._row)
        words[total] = max(0, words[total] + delta)

    def clear(self, row):
        """Zero the row of a worker that has died."""
        start = self._row_start(row)
        for i in range(self.header + self.width * self._slots):
            self._words[start + i] = 0

    def _counts(self, entry):
        return entry[1] > 0


class SharedWindows(_Table):
    """Attempts per client per one-minute window, counted by every inbound
    worker together: :class:`relaymail.smtp.limits.AttemptWindows` for
    ``[limits] connection_rate_per_ip`` and ``[auth] attempts_per_minute``.

    Each worker keeps its own windows, as anvil(8) does (a window starts at
    a client's first attempt), in entries of ``(client hash, window start
    in microseconds, attempts)``; :meth:`count` adds the attempts of the
    other workers' live windows for that client to its own.  A row full of
    live windows (a flood from more clients than it holds) stops counting
    new clients, as AttemptWindows forgets the oldest.
    """

    width = 3

    def __init__(self, fd, offset, rows, slots, row, clock, window):
        super().__init__(fd, offset, rows, slots, row)
        self._clock = clock
        self._window = int(window * 1e6)

    def count(self, key):
        """Count one attempt from ``key``; return the attempts in the
        current windows of all workers, this one included."""
        wanted = client_hash(key)
        now = self._now()
        words = self._words
        index = self._find(self._row, wanted)
        if index is None:
            index = self._claim(wanted, now, 0)
            if index is None:
                return 0        # full of live windows: not counted
        if not self._live(words[index + 1], now):
            words[index + 2] = 0
            words[index + 1] = now
        words[index + 2] += 1
        total = words[index + 2]
        for row in range(self._rows):
            if row != self._row:
                other = self._find(row, wanted)
                if other is not None and self._live(words[other + 1], now):
                    total += words[other + 2]
        return total

    def tracked(self):
        """Clients with a live window in this worker's row."""
        now = self._now()
        words, width = self._words, self.width
        start = self._row_start(self._row)
        return sum(1 for i in range(self._slots)
                   if words[start + width * i] and self._live(words[start + width * i + 1], now))

    def _now(self):
        return int(self._clock.seconds() * 1e6)

    def _live(self, started, now):
        return started <= now < started + self._window

    def _counts(self, entry):
        return self._live(entry[1], self._now())


class SharedBuckets(_Table):
    """Events per name in fixed time buckets, counted by every inbound
    worker together: entries of ``(name hash, bucket, events in it, events
    in the bucket before)``.  What a bucket is, and how the two numbers
    make a sliding window, is the ratelimit plugin's
    (relaymail.plugins.ratelimit_counters); this table only keeps them.
    """

    width = 4

    def __init__(self, fd, offset, rows, slots, row):
        super().__init__(fd, offset, rows, slots, row)
        self._bucket = 0        # the latest bucket numbers() or add() saw

    def numbers(self, key, bucket):
        """``(previous, current)``: the events of ``key`` in the bucket
        before ``bucket`` and in ``bucket``, in all workers."""
        self._bucket = max(self._bucket, bucket)
        wanted = client_hash(key)
        previous = current = 0
        for row in range(self._rows):
            index = self._find(row, wanted)
            if index is not None:
                before, now = self._at(index, bucket)
                previous += before
                current += now
        return previous, current

    def add(self, key, bucket):
        """Count one event of ``key`` in ``bucket`` in this worker's row.

        :return: False when the row is full of names still counting (the
            event is not counted), else True.
        """
        self._bucket = max(self._bucket, bucket)
        wanted = client_hash(key)
        index = self._find(self._row, wanted)
        if index is None:
            return self._claim(wanted, bucket, 1, 0) is not None
        previous, current = self._at(index, bucket)
        words = self._words
        # In this order a reader between the writes counts too many at
        # worst (the new bucket with the old count), which refuses rather
        # than lets through: never the new count read as the old bucket's.
        words[index + 3] = previous
        words[index + 1] = bucket
        words[index + 2] = current + 1
        return True

    def tracked(self):
        """Names of this worker's row that still count."""
        words, width = self._words, self.width
        start = self._row_start(self._row)
        return sum(1 for i in range(self._slots)
                   if self._counts(tuple(words[start + width * i:start + width * (i + 1)])))

    def _at(self, index, bucket):
        words = self._words
        stored = words[index + 1]
        if stored == bucket:
            return words[index + 3], words[index + 2]
        if stored == bucket - 1:
            return words[index + 2], 0
        return 0, 0

    def _counts(self, entry):
        # Events of this bucket or the one before still count.
        return entry[0] != 0 and entry[1] >= self._bucket - 1


class SharedVerdicts(_Table):
    """Answers remembered by name for every inbound worker together:
    entries of ``(name hash, when written in ms of the callers' clock (the
    reactor's, relaymail.clock, shared by every worker), reply code,
    enhanced code packed by pack_enhanced)``.  Each worker writes its
    own row; a lookup takes the newest entry of any row younger than the
    ``ttl`` asked with.  The callout plugin's
    (relaymail.plugins.callout_cache), one table per kind of answer.
    """

    # Each row starts with a pack count, odd while its writer packs it: a
    # pack moves every entry, and a reader that ran into one would read
    # moved or zeroed words (a known recipient read as code 0, a 550).
    header = 1
    width = 4

    def __init__(self, fd, offset, rows, slots, row):
        super().__init__(fd, offset, rows, slots, row)
        self._ttl_ms = 0        # the last ttl get() or put() was given
        self._now_ms = 0        # and the last time: a pack ages entries by it
        # A worker killed while it packed left its row's count odd: its
        # successor, the row's one writer now, ends that pack (the entries
        # left are whole: each was written before its hash).
        packs = self._row_start(row)
        if self._words[packs] % 2:
            self._words[packs] += 1

    def get(self, key, now, ttl):
        """``(code, packed enhanced code)`` of the newest answer for
        ``key`` written less than ``ttl`` seconds before ``now`` (seconds,
        by the clock put() is given) in any worker, or None."""
        self._ttl_ms = int(ttl * 1000)
        self._now_ms = now_ms = int(now * 1000)
        wanted = client_hash(key)
        words = self._words
        best = None
        for row in range(self._rows):
            start = self._row_start(row)
            packs = words[start]
            if packs % 2:
                continue            # being packed: as if not remembered
            index = self._find(row, wanted)
            if index is None:
                continue
            written = words[index + 1]
            code, enhanced = words[index + 2], words[index + 3]
            # put() zeroes the time while it changes an entry: an entry
            # whose time moved while it was read is skipped, never mixed;
            # so is one read while its row was packed.
            if (written == 0 or words[index + 1] != written or words[index] != wanted
                    or words[start] != packs or code < 200):
                continue
            if now_ms - written < self._ttl_ms and (best is None or written > best[0]):
                best = (written, code, enhanced)
        return None if best is None else best[1:]

    def put(self, key, code, enhanced, now, ttl):
        """Remember ``code`` and ``enhanced`` for ``key`` in this worker's
        row; False when the row is full of answers still young."""
        self._ttl_ms = int(ttl * 1000)
        self._now_ms = int(now * 1000)
        wanted = client_hash(key)
        written = max(1, self._now_ms)
        index = self._find(self._row, wanted)
        if index is None:
            return self._claim(wanted, written, code, enhanced) is not None
        words = self._words
        # Never the time it had: a reader that saw the old time before the
        # change and sees it again after would take the entry as unchanged.
        written = max(written, words[index + 1] + 1)
        words[index + 1] = 0
        words[index + 2] = code
        words[index + 3] = enhanced
        words[index + 1] = written
        return True

    def _pack(self):
        packs = self._row_start(self._row)
        self._words[packs] += 1
        try:
            super()._pack()
        finally:
            self._words[packs] += 1

    def _counts(self, entry):
        # By the writers' clock, not the wall clock, which a step moves.
        return entry[1] != 0 and self._now_ms - entry[1] < self._ttl_ms


def pack_enhanced(enhanced):
    """An RFC 3463 code (``"5.1.1"``) as one number, None as 0."""
    if not enhanced:
        return 0
    klass, subject, detail = (int(part) for part in enhanced.split("."))
    return klass * 1_000_000 + subject * 1000 + detail


def unpack_enhanced(packed):
    if not packed:
        return None
    return f"{packed // 1_000_000}.{packed // 1000 % 1000}.{packed % 1000}"


class SharedLimits:
    """An inbound worker's views of the master's region: open connections,
    connection rates and AUTH attempts, all workers' together.

    :param fd: the region (:class:`LimitsRegion`, :func:`make_limits_region`).
    :param rows: the rows it has (:attr:`LimitsRegion.rows`).
    :param row: this worker's row (0 to ``rows`` - 1).
    """

    def __init__(self, fd, rows, row, settings, clock, window):
        layout = _Layout(rows, settings)
        self.connections = SharedCounts(fd, 0, rows, layout.count_slots, row)
        self.connection_rates = SharedWindows(fd, layout.rates_at, rows, layout.rate_slots,
                                              row, clock, window)
        self.auth_attempts = SharedWindows(fd, layout.auth_at, rows, layout.rate_slots,
                                           row, clock, window)
        self.rate_limits = SharedBuckets(fd, layout.buckets_at, rows, layout.bucket_slots, row)
        self.known_recipients = SharedVerdicts(fd, layout.known_at, rows, layout.verdict_slots,
                                               row)
        self.unknown_recipients = SharedVerdicts(fd, layout.unknown_at, rows,
                                                 layout.verdict_slots, row)


class _Layout:
    """Where each table of :class:`SharedLimits` is in the region."""

    def __init__(self, rows, settings):
        # Room for twice the clients one worker may hold connections from.
        self.count_slots = 1024
        while self.count_slots < 2 * settings.limits.connections:
            self.count_slots *= 2
        # The clients whose rate one worker remembers: three quarters of
        # the row, 196,608, past the 100,000 AttemptWindows keeps (a row
        # stops taking new clients there, to keep probes short): 6 MiB a
        # row, made resident only as it fills.
        self.rate_slots = 1 << 18
        self.rates_at = SharedCounts.size(rows, self.count_slots)
        self.auth_at = self.rates_at + SharedWindows.size(rows, self.rate_slots)
        # The ratelimit plugin's names, max_keys a row with a quarter
        # free: 4 MiB a row by default.  Reserved whether or not the
        # plugin is used: a memfd's pages cost nothing until written.
        self.bucket_slots = 1024
        while self.bucket_slots * 3 // 4 < _ratelimit_max_keys(settings):
            self.bucket_slots *= 2
        self.buckets_at = self.auth_at + SharedWindows.size(rows, self.rate_slots)
        # The callout plugin's known and unknown recipients, cache_entries
        # a row each with a quarter free: 512 KiB a row and kind by
        # default, reserved as the ratelimit plugin's are.
        self.verdict_slots = 1024
        while self.verdict_slots * 3 // 4 < _callout_entries(settings):
            self.verdict_slots *= 2
        self.known_at = self.buckets_at + SharedBuckets.size(rows, self.bucket_slots)
        self.unknown_at = self.known_at + SharedVerdicts.size(rows, self.verdict_slots)
        self.size = self.unknown_at + SharedVerdicts.size(rows, self.verdict_slots)

    def slots(self):
        """What the settings decide of the layout: two settings with the
        same slots lay out a region of the same rows the same way."""
        return (self.count_slots, self.bucket_slots, self.verdict_slots)


def _ratelimit_max_keys(settings):
    """``[plugin:ratelimit] max_keys``, as the table is sized for it."""
    from relaymail.plugins.ratelimit_counters import DEFAULT_MAX_KEYS, MAX_MAX_KEYS
    return _plugin_count(settings, "ratelimit", "max_keys", DEFAULT_MAX_KEYS, MAX_MAX_KEYS)


def _callout_entries(settings):
    """``[plugin:callout] cache_entries``, as the tables are sized for it."""
    from relaymail.plugins.callout_cache import MAX_CACHE_ENTRIES
    from relaymail.policy.answer_cache import DEFAULT_SIZE
    return _plugin_count(settings, "callout", "cache_entries", DEFAULT_SIZE, MAX_CACHE_ENTRIES)


def _plugin_count(settings, plugin, key, default, most):
    """A plugin's count option that sizes a table here: its value between 1
    and ``most``, or ``default`` when unset or not a number (the plugin's
    own build says what is wrong with it)."""
    raw = settings.plugin_options.get(plugin, {}).get(key, "").strip()
    try:
        return min(most, max(1, int(raw))) if raw else default
    except ValueError:
        return default


def make_limits_region(rows, settings):
    """A region for :class:`SharedLimits` with ``rows`` rows: a memfd of zeros."""
    fd = os.memfd_create("relaymail-limits", os.MFD_CLOEXEC)
    os.ftruncate(fd, _Layout(rows, settings).size)
    return fd


class LimitsRegion:
    """The master's region: one bank of rows for the inbound workers of
    this generation and one for those of the last, so that every limit is
    counted across a reload.  The new workers take the bank the last
    generation but one used (its workers have all ended); its attempts and
    rates are history they take over, as a dead worker's successor does,
    and its open connections are zeroed first."""

    def __init__(self, workers, settings):
        self.workers = workers
        # A bank of rows for each of the two generations that may run at
        # once: after a reload, the new one and the old one finishing.
        self.rows = 2 * workers
        self._slots = _Layout(self.rows, settings).slots()
        self.fd = make_limits_region(self.rows, settings)
        self.bank = 0

    def fits(self, settings):
        """True when ``settings`` size the tables as this region has them,
        so a reload with them can keep it."""
        return _Layout(self.rows, settings).slots() == self._slots

    def row(self, number):
        """The row of the ``number``-th (from 0) inbound worker of the
        generation using the region now."""
        return self.bank * self.workers + number

    def next_bank(self):
        """Give the region to a new generation: the other bank, its open
        connections zeroed."""
        self.bank = 1 - self.bank
        for number in range(self.workers):
            self.clear_connections(self.row(number))

    def clear_connections(self, row):
        """Zero the open connections of ``row``'s worker, which has ended."""
        counts = SharedCounts(self.fd, 0, self.rows, self._slots[0], row)
        counts.clear(row)
        counts.close()

    def close(self):
        os.close(self.fd)
