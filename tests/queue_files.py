"""Queue files as an administrator sees them on disk (relaymail.queue.queue_file).

A committed message is ``ID.msg``: the message, its record as one JSON
line, and a 44-byte trailer; a record written later sits beside it as
``ID.json``.  These helpers read and change them the way a person with a
shell would, without going through the Spool under test.
"""

import json
import os
import re
import zlib

TRAILER = re.compile(rb"#relaymail-record ([0-9a-f]{16}) ([0-9a-f]{8})\n\Z")


def parts(path):
    """``(message, record_line, trailer)`` of the queue file at ``path``;
    fails the test unless the trailer is there and right."""
    with open(path, "rb") as file:
        data = file.read()
    match = TRAILER.search(data)
    assert match is not None, f"{path} has no trailer: {data[-60:]!r}"
    offset = int(match.group(1), 16)
    line = data[offset:match.start()]
    assert zlib.crc32(line) == int(match.group(2), 16), f"{path}: the trailer's checksum is wrong"
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    return data[:offset], line, match.group(0)


def message_of(directory, queue_id):
    """The message bytes of ``directory/ID.msg`` (all of an old-format file)."""
    path = os.path.join(directory, queue_id + ".msg")
    with open(path, "rb") as file:
        data = file.read()
    return parts(path)[0] if TRAILER.search(data) else data


def record_of(directory, queue_id):
    """The record in force: ``ID.json`` when there is one, else the one
    inside ``ID.msg``."""
    beside = os.path.join(directory, queue_id + ".json")
    if os.path.exists(beside):
        with open(beside, "rb") as file:
            return json.loads(file.read())
    return json.loads(parts(os.path.join(directory, queue_id + ".msg"))[1])


def embedded_record_of(directory, queue_id):
    return json.loads(parts(os.path.join(directory, queue_id + ".msg"))[1])


def write_record_beside(directory, queue_id, record):
    """Put ``record`` (a dict, or bytes as they are) beside the queue file
    as ``ID.json``, where it supersedes the one inside."""
    data = record if isinstance(record, bytes) else json.dumps(record).encode("ascii")
    with open(os.path.join(directory, queue_id + ".json"), "wb") as file:
        file.write(data)


def change_record(directory, queue_id, change):
    """Apply ``change`` to the record in force and write it beside."""
    record = record_of(directory, queue_id)
    change(record)
    write_record_beside(directory, queue_id, record)


def to_old_format(directory, queue_id):
    """Make a queue file what the version before the queue file wrote:
    ``ID.msg`` the message alone, ``ID.json`` its record."""
    path = os.path.join(directory, queue_id + ".msg")
    if not os.path.exists(os.path.join(directory, queue_id + ".json")):
        write_record_beside(directory, queue_id, parts(path)[1])
    message = message_of(directory, queue_id)
    with open(path, "wb") as file:
        file.write(message)


def names_of(*queue_ids):
    """The directory listing of messages committed in the one-file form."""
    return sorted(queue_id + ".msg" for queue_id in queue_ids)
