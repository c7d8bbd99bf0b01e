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
