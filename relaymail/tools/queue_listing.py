"""What ``relaymail-queue list`` prints: the queue read from its files, for
people (``mailq``) or for programs (``postqueue -j``).

For people, a header and then each message, oldest first::

    QUEUE ID          STATE         SIZE  ARRIVED (UTC)         AGE  SENDER
    0CZ4Q8V1M2N3P4R5  deferred      4711  2026-01-01 00:00:00    2d  alice@example.org
                      (451 4.4.1 Connection timed out (from mx.example.com))
                      bob@example.com
    0CZ4Q8V1M2N3P4R6  hold           812  2026-01-02 10:00:00    3h  <>
                      dave@example.net
    -- 6 Kbytes in 2 messages, 1 held.

The first line of a message starts at the first column, so ``grep
'^[0-9A-Z]'`` finds them; the lines indented under it are its recipients
still to deliver to, each group after its last error in parentheses,
whole, as postqueue prints them.  STATE is a word where Postfix has a
mark after the id (``!`` held, ``*`` active): ``hold`` (not delivered
until released), ``deferred`` (tried, and tried again later) or
``active`` (not tried yet).  The last line counts what was listed,
``-- N Kbytes in M Requests.`` as Postfix has it, in our words.

For programs (``--json``), one JSON object a line per message, with the
fields of ``postqueue -j``: ``queue_name`` (the STATE above),
``queue_id``, ``arrival_time`` (seconds since the epoch),
``message_size`` (bytes), ``sender`` (``""`` for the null sender) and
``recipients``, a list of ``{"address": ..., "delay_reason": ...}`` (no
``delay_reason`` before a failure); and ``attempts`` and
``next_attempt_time`` (seconds since the epoch; null when held).  The
JSON is ASCII (``\\u`` escapes), so it cannot drive a terminal either.
"""

import collections
import datetime
import json
import math
import re

from relaymail import sanitize
from relaymail.queue import record as records
from relaymail.queue.control import plural
from relaymail.queue.selection import pending
from relaymail.queue.spool import ACTIVE, HOLD

#: STATE and queue_name.
HELD, DEFERRED, ACTIVE_STATE = "hold", "deferred", "active"

#: Continuation lines (recipients, errors) start under STATE.
_INDENT = " " * 18

#: Multi-line replies put on one line.
_BLANKS = re.compile(r"[\t\n\r ]+")


class SpoolUnreadable(Exception):
    """The spool's directories cannot be read; the text says why."""


#: One message as ``list`` shows it: only the fields it needs, so that a
#: listing of 100,000 messages does not keep 100,000 parsed records (and
#: the garbage collector does not walk them over and over, which cost
#: more than a second at that size).  ``recipients`` holds ``(address,
#: last error)`` pairs of the recipients still to do, as they are stored.
Summary = collections.namedtuple(
    "Summary", "queue_id state created_at size sender recipients attempts next_attempt_at")


def summarise(queue_id, held, record):
    """Return the :class:`Summary` of a checked record."""
    to_do = [(str(entry["address"]), str(entry.get("last_error") or ""))
             for entry in pending(record)]
    message_error = str(record.get("last_error") or "")
    if message_error and not any(error for _, error in to_do):
        # An error of the message's own (its record, not a recipient's).
        to_do = [(address, message_error) for address, _ in to_do]
    attempts = _number(record.get("attempts"))
    state = HELD if held else DEFERRED if attempts else ACTIVE_STATE
    return Summary(queue_id, state, _number(record["created_at"]), _number(record["size"]),
                   str(record["envelope"].get("sender") or ""), tuple(to_do), attempts,
                   _number(record.get("next_attempt_at")))


def read_queue(spool, selection=None, where=(ACTIVE, HOLD)):
    """Read every record in ``active/`` and ``hold/`` (or those ``where``
    names) that ``selection`` (a
    :class:`relaymail.queue.selection.Selection`) matches.

    Straight from the files and without the lock: messages delivered
    while we read are left out, and a message complete in both
    directories (an interrupted move) is shown once, as active, the way
    recover() will settle it.

    :return: ``(summaries, problems)``: a :class:`Summary` per message,
        oldest first, and a line for each record that could not be read.
    :raise SpoolUnreadable: when the spool cannot be read at all.
    """
    summaries, problems, seen = [], [], set()
    for directory, ids in ((ACTIVE, spool.ids), (HOLD, spool.held_ids)):
        if directory not in where:
            continue
        try:
            queue_ids = list(ids())
        except FileNotFoundError:
            continue        # a spool the daemon has not laid out yet
        except OSError as error:
            raise SpoolUnreadable(f"cannot read the spool {spool.path}: {error.strerror}")
        wanted = [queue_id for queue_id in queue_ids if queue_id not in seen]
        for queue_id, record, error in spool.read_records(wanted, directory):
            if isinstance(error, FileNotFoundError):
                continue    # delivered, deleted or moved since the scan
            if isinstance(error, records.CorruptRecord):
                problems.append(f"{queue_id}: bad record: {error}")
            elif error is not None:
                problems.append(f"{queue_id}: cannot read its record: {error.strerror}")
            elif not selection or selection.matches(record):
                seen.add(queue_id)
                summaries.append(summarise(queue_id, directory == HOLD, record))
    summaries.sort(key=lambda summary: (summary.created_at, summary.queue_id))
    return summaries, problems


# -- for people ---------------------------------------------------------------

HEADER = (f"{'QUEUE ID':<16}  {'STATE':<8}  {'SIZE':>9}  {'ARRIVED (UTC)':<19}  "
          f"{'AGE':>4}  SENDER")


def format_listing(summaries, now, unreadable=0):
    """Return the text of ``list``: a header, each message, and the totals."""
    lines = [HEADER] if summaries else []
    for summary in summaries:
        lines.extend(format_summary(summary, now))
    lines.append(format_totals(summaries, unreadable))
    return "\n".join(lines) + "\n"


def format_summary(summary, now):
    """A message's lines: id, state, size, arrival, age and sender (``<>``
    for the null sender); then the recipients still to do, grouped under
    their last error."""
    lines = [f"{summary.queue_id:<16}  {summary.state:<8}  {summary.size:>9}  "
             f"{_utc(summary.created_at)}  {format_age(now - summary.created_at):>4}  "
             f"{printable(summary.sender) or '<>'}"]
    groups = {}
    for address, error in summary.recipients:
        groups.setdefault(error, []).append(address)
    # Those never tried first: under an error they would seem to share it.
    for error in sorted(groups, key=bool):
        if error:
            lines.append(f"{_INDENT}({printable(error)})")
        lines.extend(f"{_INDENT}{printable(address)}" for address in groups[error])
    return lines


def format_totals(summaries, unreadable=0):
    """``-- 6 Kbytes in 2 messages, 1 held.``"""
    size = sum(summary.size for summary in summaries)
    held = sum(1 for summary in summaries if summary.state == HELD)
    # Rounded up, as Postfix's showq does.
    kbytes = (int(size) + 1023) // 1024
    text = f"-- {kbytes} Kbytes in {plural(len(summaries), 'message')}, {held} held"
    if unreadable:
        text += f", {unreadable} unreadable"
    return text + "."


def format_age(seconds):
    """``45s``, ``3m``, ``2h``, ``1d``: the largest unit, rounded down."""
    seconds = max(0, int(seconds))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def format_utc(when):
    """``2026-01-01 00:00:00 UTC``."""
    return f"{_utc(when)} UTC"


def _utc(when):
    # A day's date is worked out once: a big queue's messages share a few
    # days, and datetime's work was a fifteenth of a 100,000-line listing.
    try:
        day, second = divmod(_whole_seconds(when), 86400)
        date = _dates.get(day)
        if date is None:
            date = _dates[day] = datetime.datetime.fromtimestamp(
                day * 86400, datetime.timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        return f"{'?':<19}"
    hour, second = divmod(second, 3600)
    return f"{date} {hour:02d}:{second // 60:02d}:{second % 60:02d}"


#: Dates by day since the epoch, for _utc.
_dates = {}


def _whole_seconds(when):
    """``when`` to the second as datetime shows it: rounded to the
    microsecond first, half to even, so that .9999995 is the next second
    (a record's ``time.time()`` is one in about two million)."""
    if isinstance(when, int):
        return when
    fraction, whole = math.modf(when)
    micro = round(fraction * 1e6)
    return int(whole) + (micro >= 1_000_000) - (micro < 0)


def printable(text):
    """``text`` on one line with nothing that drives a terminal: errors
    come from remote servers, and multi-line SMTP replies are common.
    Blanks (CR, LF, TAB) become one space; other characters that are not
    printable are shown as ``\\x{HEX}``."""
    if text.isprintable():
        return text         # nearly always, and a listing has 100,000 lines
    return sanitize.escape_for_terminal(_BLANKS.sub(" ", text).strip(" "))


def _number(value):
    # check() does not type every field; a listing must not stop at one.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


# -- for programs ---------------------------------------------------------------

def format_json(summary):
    """One message as a line of JSON, the fields of ``postqueue -j``."""
    recipients = []
    for address, error in summary.recipients:
        entry = {"address": address}
        if error:
            entry["delay_reason"] = error
        recipients.append(entry)
    return json.dumps({
        "queue_name": summary.state,
        "queue_id": summary.queue_id,
        "arrival_time": int(summary.created_at),
        "message_size": summary.size,
        "sender": summary.sender,
        "recipients": recipients,
        "attempts": summary.attempts,
        "next_attempt_time": None if summary.state == HELD else int(summary.next_attempt_at),
    }, ensure_ascii=True)
