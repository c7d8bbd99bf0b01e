"""Connections open per client, counted across every inbound worker.

Each inbound worker counts its own connections in a row of a shared
memory region the master made (a memfd passed like the listeners), and
reads every row when it decides: so ``[limits] connections`` and
``connections_per_ip`` hold for the relay as a whole, not per worker.

A row has one writer, its worker, and readers that only add up: no lock
is needed.  A row is the worker's total and a hash table of
``(client hash, connections open)`` pairs, 64-bit each, with linear
probing.  A pair whose count has gone back to 0 keeps its hash, so that
probe chains stay whole; when three quarters of the table are taken the
writer packs it again (a reader at that moment may count a client short,
once).  The
master zeroes a dead worker's row before its successor starts.

The client hash is the first 8 bytes of BLAKE2b of the client key
(:func:`relaymail.smtp.limits.client_key`): Python's ``hash()`` differs
from process to process.
"""

import functools
import hashlib
import mmap
import os

_WORD = 8


def slots_for(connections):
    """Buckets per row: room for twice the clients one worker may hold."""
    slots = 1024
    while slots < 2 * connections:
        slots *= 2
    return slots


def region_size(rows, slots):
    return rows * (1 + 2 * slots) * _WORD


def make_region(rows, slots):
    """The master's shared region: a memfd of zeros; return its fd."""
    fd = os.memfd_create("relaymail-connections", os.MFD_CLOEXEC)
    os.ftruncate(fd, region_size(rows, slots))
    return fd


@functools.lru_cache(maxsize=65536)
def client_hash(key):
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return value or 1       # 0 marks an empty bucket


class SharedCounts:
    """One worker's view of the region in ``fd``: it writes row ``row``
    and reads them all."""

    def __init__(self, fd, rows, slots, row):
        self._map = mmap.mmap(fd, region_size(rows, slots))
        self._words = memoryview(self._map).cast("Q")
        self._rows = rows
        self._slots = slots
        self._row = row
        self._stride = 1 + 2 * slots
        self._used = 0          # buckets of this row with a hash in them

    def total(self):
        """Connections open in all workers."""
        words, stride = self._words, self._stride
        return sum(words[row * stride] for row in range(self._rows))

    def open(self, key):
        """Connections open from client ``key`` in all workers."""
        wanted = client_hash(key)
        return sum(self._find(row, wanted)[1] for row in range(self._rows))

    def add(self, key, delta):
        """Count ``delta`` (+1 or -1) more connections from ``key`` here."""
        wanted = client_hash(key)
        words = self._words
        base = self._row * self._stride
        index, count = self._find(self._row, wanted)
        if index is None:
            if self._used >= 3 * self._slots // 4:
                # Probes stay short only while a quarter is empty.
                self._pack()
            index = self._free_bucket(wanted)
            if index is None:
                return          # more clients than buckets: not counted
            words[index + 1] = max(0, delta)
            words[index] = wanted
            self._used += 1
        else:
            words[index + 1] = max(0, count + delta)
        words[base] = max(0, words[base] + delta)

    def _find(self, row, wanted):
        """``(word index, count)`` of ``wanted``'s bucket in ``row``, or
        ``(None, 0)``."""
        words, slots = self._words, self._slots
        base = row * self._stride + 1
        for probe in range(slots):
            index = base + 2 * ((wanted + probe) % slots)
            key = words[index]
            if key == wanted:
                return index, words[index + 1]
            if key == 0:
                break
        return None, 0

    def _free_bucket(self, wanted):
        words, slots = self._words, self._slots
        base = self._row * self._stride + 1
        for probe in range(slots):
            index = base + 2 * ((wanted + probe) % slots)
            if words[index] == 0:
                return index
        return None

    def _pack(self):
        """Drop the clients with no connection open from this row."""
        words, slots = self._words, self._slots
        base = self._row * self._stride + 1
        live = [(words[base + 2 * i], words[base + 2 * i + 1]) for i in range(slots)
                if words[base + 2 * i] and words[base + 2 * i + 1]]
        for i in range(2 * slots):
            words[base + i] = 0
        for wanted, count in live:
            index = self._free_bucket(wanted)
            words[index + 1] = count
            words[index] = wanted
        self._used = len(live)

    def close(self):
        self._words.release()
        self._map.close()


def clear_row(fd, rows, slots, row):
    """Zero the row of a worker that has died (the master does it before
    its successor starts)."""
    stride = (1 + 2 * slots) * _WORD
    os.pwrite(fd, bytes(stride), row * stride)


class SharedWindows:
    """Attempts per client per one-minute window, counted by every inbound
    worker together: :class:`relaymail.smtp.limits.AttemptWindows` for
    ``[limits] connection_rate_per_ip`` and ``[auth] attempts_per_minute``.

    Each worker keeps its own windows, as anvil(8) does (a window starts at
    a client's first attempt), in its row of ``(client hash, window start
    in microseconds, attempts)`` triples; :meth:`count` adds the attempts of
    the other workers' live windows for that client to its own.  When
    three quarters of a row are taken it is packed, dropping the windows
    that have ended; a row full of live windows (a flood from more clients
    than it holds) stops counting new clients, as AttemptWindows forgets
    the oldest.
    """

    def __init__(self, fd, offset, rows, slots, row, clock, window):
        self._map = mmap.mmap(fd, offset + rows * 3 * slots * _WORD)
        self._words = memoryview(self._map).cast("Q")
        self._base = offset // _WORD
        self._rows = rows
        self._slots = slots
        self._row = row
        self._clock = clock
        self._window = int(window * 1e6)
        self._used = 0

    def count(self, key):
        """Count one attempt from ``key``; return the attempts in the
        current windows of all workers, this one included."""
        wanted = client_hash(key)
        now = int(self._clock.seconds() * 1e6)
        words = self._words
        index = self._find(self._row, wanted)
        if index is None:
            if self._used >= 3 * self._slots // 4:
                self._pack(now)
            index = self._free(wanted)
            if index is None:
                return 0        # full of live windows: not counted
            words[index + 2] = 0
            words[index + 1] = now
            words[index] = wanted
            self._used += 1
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
        now = int(self._clock.seconds() * 1e6)
        words, start = self._words, self._row_start(self._row)
        return sum(1 for i in range(self._slots)
                   if words[start + 3 * i] and self._live(words[start + 3 * i + 1], now))

    def _live(self, started, now):
        return started <= now < started + self._window

    def _row_start(self, row):
        return self._base + row * 3 * self._slots

    def _find(self, row, wanted):
        words, slots, start = self._words, self._slots, self._row_start(row)
        for probe in range(slots):
            index = start + 3 * ((wanted + probe) % slots)
            key = words[index]
            if key == wanted:
                return index
            if key == 0:
                return None
        return None

    def _free(self, wanted):
        words, slots, start = self._words, self._slots, self._row_start(self._row)
        for probe in range(slots):
            index = start + 3 * ((wanted + probe) % slots)
            if words[index] == 0:
                return index
        return None

    def _pack(self, now):
        words, slots, start = self._words, self._slots, self._row_start(self._row)
        live = [tuple(words[start + 3 * i:start + 3 * i + 3]) for i in range(slots)
                if words[start + 3 * i] and self._live(words[start + 3 * i + 1], now)]
        for i in range(3 * slots):
            words[start + i] = 0
        for wanted, started, attempts in live:
            index = self._free(wanted)
            words[index + 2] = attempts
            words[index + 1] = started
            words[index] = wanted
        self._used = len(live)


class SharedLimits:
    """An inbound worker's views of the master's region: open connections,
    connection rates and AUTH attempts, all workers' together.

    :param fd: the region (:func:`make_limits_region`).
    :param row: this worker's row (0 to ``rows`` - 1).
    """

    def __init__(self, fd, rows, row, settings, clock, window):
        layout = _Layout(rows, settings)
        self.connections = SharedCounts(fd, rows, layout.count_slots, row)
        self.connection_rates = SharedWindows(fd, layout.rates_at, rows, layout.rate_slots,
                                              row, clock, window)
        self.auth_attempts = SharedWindows(fd, layout.auth_at, rows, layout.rate_slots,
                                           row, clock, window)


class _Layout:
    """Where each table of :class:`SharedLimits` is in the region."""

    def __init__(self, rows, settings):
        self.count_slots = slots_for(settings.limits.connections)
        # The clients whose rate one worker remembers (AttemptWindows keeps
        # 100,000), with room to probe: 3 MiB a row.
        self.rate_slots = 1 << 17
        self.rates_at = region_size(rows, self.count_slots)
        self.auth_at = self.rates_at + rows * 3 * self.rate_slots * _WORD
        self.size = self.auth_at + rows * 3 * self.rate_slots * _WORD


def make_limits_region(rows, settings):
    """The master's region for :class:`SharedLimits`: a memfd of zeros."""
    fd = os.memfd_create("relaymail-limits", os.MFD_CLOEXEC)
    os.ftruncate(fd, _Layout(rows, settings).size)
    return fd


def clear_connections(fd, rows, settings, row):
    """Zero a dead worker's open connections (its rates stay: they are
    the history its clients made)."""
    clear_row(fd, rows, _Layout(rows, settings).count_slots, row)
