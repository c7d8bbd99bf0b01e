"""Queue ids: short, unique, sortable by time, safe as file names.

A queue id is 16 characters of upper-case base32 in Crockford's alphabet
(``0-9`` and ``A-Z`` without ``I``, ``L``, ``O``, ``U``).  That alphabet is
in ASCII order, so comparing two ids as strings compares the 80-bit numbers
they spell, whose high bits are the creation time::

    bits 79..26  microseconds since the Unix epoch (54 bits: good until 2540)
    bits 25..20  a per-process sequence within one microsecond
    bits 19..8   the process's slot: its worker number under the master
                 (relaymail.process), else the low 12 bits of its pid
    bits  7..0   random

Within one process ids strictly increase, even if the clock steps back.
The master gives each live worker a slot of its own, so two workers never
mint the same id.  Two unrelated processes (a tool beside the daemon, or a
restart after the clock stepped back) collide only if they agree on the
microsecond, the sequence, the slot and 8 random bits; the spool also
creates every file with ``O_EXCL``, so even that cannot overwrite a message.
"""

import os
import secrets
import threading
import time

#: Douglas Crockford's base32 alphabet: no I, L, O or U to misread, and in
#: ASCII order, which keeps ids sortable as plain strings.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 16

_SEQUENCE_BITS = 6
_PID_BITS = 12
_RANDOM_BITS = 8
_TIME_BITS = LENGTH * 5 - _SEQUENCE_BITS - _PID_BITS - _RANDOM_BITS
_ALLOWED = frozenset(ALPHABET)


class _Generator:
    """The per-process state: the last microsecond used and the sequence
    within it.  A lock because commits and tools may ask from threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last_time = 0
        self._sequence = 0

    def next_stamp(self):
        """Return ``(microseconds, sequence)``, strictly increasing."""
        now = time.time_ns() // 1000
        with self._lock:
            if now > self._last_time:
                self._last_time, self._sequence = now, 0
            elif self._sequence + 1 < (1 << _SEQUENCE_BITS):
                self._sequence += 1
            else:
                # Out of sequence numbers (or the clock went back): borrow
                # the next microsecond rather than repeat or go backwards.
                self._last_time, self._sequence = self._last_time + 1, 0
            return self._last_time, self._sequence


_generator = _Generator()

#: Bits 19..8 of the ids this process mints; see :func:`use_slot`.
_slot = None

#: Slots a master may hand out: 12 bits.
SLOTS = 1 << _PID_BITS


def use_slot(slot):
    """Mint ids with ``slot`` (0 to :data:`SLOTS` - 1) in place of the pid
    bits: a worker process calls it with the number its master gave it,
    unique among the master's live workers."""
    global _slot
    if not 0 <= slot < SLOTS:
        raise ValueError(f"queue id slot out of range: {slot}")
    _slot = slot


def slot_of(queue_id):
    """The slot (or low pid bits) of the process that minted ``queue_id``."""
    return (_decode(queue_id) >> _RANDOM_BITS) & (SLOTS - 1)


def minted_at(queue_id):
    """When ``queue_id`` was minted, in seconds since the epoch (to the
    microsecond, as the clock said; it may have stepped since)."""
    return (_decode(queue_id) >> (_SEQUENCE_BITS + _PID_BITS + _RANDOM_BITS)) / 1e6


def new_queue_id():
    """Return a fresh queue id (a 16-character str)."""
    microseconds, sequence = _generator.next_stamp()
    number = microseconds & ((1 << _TIME_BITS) - 1)
    number = (number << _SEQUENCE_BITS) | sequence
    slot = _slot if _slot is not None else os.getpid() & (SLOTS - 1)
    number = (number << _PID_BITS) | slot
    number = (number << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
    return _encode(number)


def is_queue_id(text):
    """True when ``text`` has the form of a queue id.  The spool checks
    every id it is handed so that one can never name a path elsewhere."""
    return (isinstance(text, str) and len(text) == LENGTH
            and _ALLOWED.issuperset(text))


def _encode(number):
    """Spell ``number`` as LENGTH base32 digits, most significant first."""
    digits = []
    for _ in range(LENGTH):
        number, digit = divmod(number, 32)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _decode(queue_id):
    number = 0
    for character in queue_id:
        number = number * 32 + ALPHABET.index(character)
    return number
