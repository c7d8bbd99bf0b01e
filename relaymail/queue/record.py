"""The queue record: one JSON document per message, its envelope and state.

Every committed message is one file in the spool's ``active/`` directory,
``ID.msg``: the message exactly as received (CRLF line ends, already
dot-unstuffed, our ``Received:`` header first), then this record as one
line, then a trailer saying where the record begins
(:mod:`relaymail.queue.queue_file`).  A record written after commit (a
delivery attempt's outcome, a release) goes beside the file as ``ID.json``
and supersedes the one inside.  It is meant to be read by people
(``jq . ID.json``, ``tail -n 2 ID.msg | head -n 1 | jq .``) and by other
programs, so its format is a contract, versioned by ``version``.  It is
written as one line; shown indented here, with ``#`` annotations that are
not part of the file::

    {
      "version": 1,
      "id": "0CZ4Q8V1M2N3P4R5",
      "envelope": {                  # relaymail.envelope.Envelope.to_dict()
        "sender": "alice@example.org",     # "" for the null sender <>
        "recipients": ["bob@example.com"],
        "body": "7BIT",                    # or "8BITMIME", "BINARYMIME" (BDAT only)
        "smtputf8": false,
        "client_ip": "192.0.2.7",
        "helo": "mail.example.org",
        "authenticated_user": null,
        "received_at": 1767225600.0,
        "double_bounce": false             # true: a failure of it is discarded
      },
      "size": 4711,                  # bytes of the message: where ID.msg's record begins
      "recipients": [                # one entry per envelope recipient
        {"address": "bob@example.com",
         "status": "pending",        # pending | sent | bounced | deferred
         "attempts": 0,              # delivery attempts for this recipient
         "last_error": null,         # the last failure, as text
         "updated_at": null}         # epoch seconds of the last change
      ],
      "created_at": 1767225600.125,  # epoch seconds the message was queued
      "next_attempt_at": 1767225600.125,
      "attempts": 0,                 # delivery attempts for the message
      "last_error": null
    }

Per-recipient state is there so that delivery can record which recipients
are done and, after a crash, try only the rest: better to deliver twice
than to lose mail.  Readers must ignore keys they do not know; a change
that old readers would misread gets a new ``version``.

The file is ASCII: non-ASCII text (SMTPUTF8 addresses) is written as JSON
``\\u`` escapes, which keeps even undecodable input representable.
"""

import json

VERSION = 1

#: Recipient states.  ``deferred`` failed for now and will be retried;
#: ``sent`` and ``bounced`` are final.
PENDING = "pending"
SENT = "sent"
BOUNCED = "bounced"
DEFERRED = "deferred"
STATUSES = (PENDING, SENT, BOUNCED, DEFERRED)

REQUIRED_KEYS = ("version", "id", "envelope", "size", "recipients",
                 "created_at", "next_attempt_at", "attempts", "last_error")


class CorruptRecord(ValueError):
    """A queue record that cannot be trusted; the message says why."""


def new_record(queue_id, envelope, size, now):
    """Return the record of a message just accepted.

    :param envelope: a :class:`relaymail.envelope.Envelope`.
    :param size: the number of bytes in the message file.
    :param now: the time, in seconds since the epoch.
    """
    return {
        "version": VERSION,
        "id": queue_id,
        "envelope": envelope.to_dict(),
        "size": size,
        "recipients": [_new_recipient(address) for address in envelope.recipients],
        "created_at": now,
        # Due at once: the first delivery attempt is not a retry.
        "next_attempt_at": now,
        "attempts": 0,
        "last_error": None,
    }


def _new_recipient(address):
    return {"address": address, "status": PENDING, "attempts": 0,
            "last_error": None, "updated_at": None}


# One line: the json module's C encoder is used only without indent, and
# this runs for every message and every delivery attempt (``jq . ID.json``
# shows it indented).  ASCII so that nothing in an envelope can make the
# encoding fail half way.  Made once: json.dumps with options builds an
# encoder per call, a third of the time of encoding a typical record.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def encode(record):
    """Return ``record`` as one line of bytes: ``ID.json``'s content, and
    what a queue file carries after its message."""
    return (_ENCODER.encode(record) + "\n").encode("ascii")


def decode(data, queue_id):
    """Parse and check the bytes of a record.

    :return: the record, a dict.
    :raise CorruptRecord: when the bytes are not a version 1 record of
        ``queue_id``.
    """
    try:
        record = json.loads(data)
    except (ValueError, RecursionError) as error:
        # ValueError covers both bad UTF-8 and bad JSON.
        raise CorruptRecord(f"not valid JSON: {error}") from None
    check(record, queue_id)
    return record


def check(record, queue_id):
    """Raise :class:`CorruptRecord` unless ``record`` is a well-formed
    version 1 record of ``queue_id``.  Unknown keys and recipient statuses
    are let through so that a newer delivery engine does not get its mail
    quarantined by an older reader."""
    if not isinstance(record, dict):
        raise CorruptRecord("not a JSON object")
    if record.get("version") != VERSION:
        raise CorruptRecord(f"unsupported version {record.get('version')!r}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise CorruptRecord(f"missing keys: {', '.join(missing)}")
    if record["id"] != queue_id:
        raise CorruptRecord(f"records id {record['id']!r}")
    _check_types(record)


def _check_types(record):
    """The few types delivery relies on without checking again."""
    size = record["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CorruptRecord(f"bad size {size!r}")
    if not isinstance(record["envelope"], dict):
        raise CorruptRecord("envelope is not a JSON object")
    recipients = record["recipients"]
    if not isinstance(recipients, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("address"), str)
            for entry in recipients):
        raise CorruptRecord("recipients is not a list of objects with an address")
