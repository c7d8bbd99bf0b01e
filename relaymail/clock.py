"""The reactor's clock: steady seconds that read like the epoch.

Twisted's reactor times every delayed call -- each session's timeout, each
delivery's, every LoopingCall and callLater -- by ``time.time()``, the
wall clock.  When that clock is stepped (NTP at boot, a virtual machine
restored from a snapshot, ``date -s``) every pending call moves with it:
stepped back an hour, no session times out and no timer fires for an
hour, so a slow client holds its connection and a stalled next hop its
delivery; stepped forward, every timeout is due at the reactor's next
turn, dropping every session and every delivery under way.
``CLOCK_MONOTONIC`` is never stepped, so the relay's reactors run on it,
plus the offset that made it read as the epoch when the master started:
times a reactor gives still look like Twisted's (a web log line's date),
and every worker is given the master's offset so that the times the
workers share through memory (relaymail.process.shared_counts) agree
even when the wall clock was stepped between their starts.

What is wall-clock time by nature stays so: a record's arrival and next
attempt, a log line's date, a certificate's validity.  So a deferred
message's retry, due at the time its record names, waits out a step
back of the wall clock, as Postfix's do (its queue file's time); new
mail goes at once.
"""

import os
import time

#: The variable a worker finds the master's offset in.
OFFSET_VARIABLE = "RELAYMAIL_CLOCK_OFFSET"

_offset = None


def run_steadily(reactor):
    """Have ``reactor`` time its calls by the steady clock, anchored at the
    master's offset when this process is its worker (the variable is then
    taken out of the environment, as nothing this process starts needs
    it), else at now.  Calls already pending keep their times: the two
    clocks agree at the moment of the switch."""
    global _offset
    given = os.environ.pop(OFFSET_VARIABLE, None)
    _offset = float(given) if given is not None else time.time() - time.monotonic()
    monotonic, offset = time.monotonic, _offset

    def seconds():
        return monotonic() + offset
    reactor.seconds = seconds


def for_workers(env):
    """``env`` with the offset this process runs on, for a worker it starts."""
    if _offset is None:
        return dict(env)
    return {**env, OFFSET_VARIABLE: repr(_offset)}
