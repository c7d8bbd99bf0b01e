"""The one-file queue entry (relaymail.queue.queue_file): a reader gets the
message and never the record, whatever the message itself contains."""

import io
import json
import mmap
import os
import shutil
import zlib

import pytest

from relaymail.envelope import Envelope
from relaymail.queue import queue_file
from relaymail.queue import record as records
from relaymail.queue.message_view import MessageView
from tests import queue_files

BODY = b"Subject: one file\r\n\r\nline one\r\nline two\r\n"


def envelope():
    return Envelope(sender="alice@example.org", recipients=["bob@example.com"],
                    client_ip="192.0.2.7", helo="client.example.org", received_at=1767225600.0)


def fake_trailer(queue_id, size):
    """What a sender would append to a message to pass part of it off as
    the record: a well-formed record line and a trailer whose checksum is
    right."""
    record = records.new_record(queue_id, envelope(), size, 1767225600.0)
    return queue_file.record_and_trailer(records.encode(record), size)


def commit(spool, body):
    writer = spool.new_message()
    writer.write(body)
    return writer.commit_sync(envelope())


def test_a_queue_file_opens_as_its_message_alone(spool):
    queue_id = commit(spool, BODY)
    with queue_file.open_message(spool.message_path(queue_id)) as file:
        assert file.size == len(BODY)
        assert file.readline() == b"Subject: one file\r\n"
        assert file.read() == BODY[len(b"Subject: one file\r\n"):]
        assert file.read() == b""
        file.seek(2)
        assert (file.tell(), file.read(5)) == (2, b"bject")
        file.seek(-4, io.SEEK_END)
        assert file.read() == b"two\r\n"[1:]
        with mmap.mmap(file.fileno(), file.size, access=mmap.ACCESS_READ) as mapped:
            assert mapped[:] == BODY
    assert os.path.getsize(spool.message_path(queue_id)) > len(BODY) + queue_file.TRAILER_LENGTH


def test_a_message_ending_like_a_queue_file_is_never_cut(spool):
    # The sender ends its message with a record and trailer of its own,
    # for the very queue id the message will get (the worst case: ids
    # are not secret), and right in every check.
    writer = spool.new_message()
    body = BODY + fake_trailer(writer.queue_id, len(BODY))
    writer.write(body)
    writer._file.flush()
    tmp = os.path.join(spool.path, "tmp", writer.queue_id + ".msg")
    # Before commit the file has no record of ours yet, so its end would
    # pass for one: that is why the filters' view is read with the length
    # written (SpoolWriter.view).
    with queue_file.open_message(tmp) as file:
        assert file.size == len(BODY)
    assert MessageView.read(writer.queue_id, envelope(), tmp, len(body)).size == len(body)
    queue_id = writer.commit_sync(envelope())
    # Committed, the real trailer comes after it all.
    with queue_file.open_message(spool.message_path(queue_id)) as file:
        assert (file.size, file.read()) == (len(body), body)
    assert spool.load(queue_id)["size"] == len(body)


def test_a_copy_outside_the_spool_is_read_whole(spool, tmp_path):
    queue_id = commit(spool, BODY)
    copy = str(tmp_path / "relaymail-smtp-copy")
    shutil.copyfile(spool.message_path(queue_id), copy)
    # Named for no queue id: its end is taken as message, never as record.
    with queue_file.open_message(copy) as file:
        assert file.size == os.path.getsize(copy)


def test_a_file_without_a_trailer_or_with_a_wrong_checksum_is_all_message(spool):
    queue_id = commit(spool, BODY)
    path = spool.message_path(queue_id)
    message, line, trailer = queue_files.parts(path)
    for broken in (message, message + line + trailer.replace(b" ", b"  ", 1)[:44],
                   message + line[:-2] + b"x\n" + trailer):
        with open(path, "wb") as file:
            file.write(broken)
        with queue_file.open_message(path) as opened:
            assert opened.read() == broken


def test_a_record_for_another_id_or_size_does_not_count(spool, tmp_path):
    queue_id = commit(spool, BODY)
    path = spool.message_path(queue_id)
    other = commit(spool, BODY)
    for body in (BODY + fake_trailer(other, len(BODY)), BODY + fake_trailer(queue_id, 3)):
        with open(path, "wb") as file:
            file.write(body)
        with queue_file.open_message(path) as opened:
            assert opened.size == len(body)
        with pytest.raises(records.CorruptRecord):
            spool.load(queue_id)


def test_the_trailer_names_the_record_and_its_checksum(spool):
    queue_id = commit(spool, BODY)
    with open(spool.message_path(queue_id), "rb") as file:
        data = file.read()
    trailer = data[-queue_file.TRAILER_LENGTH:]
    offset, crc = trailer.split()[1:]
    line = data[int(offset, 16):-queue_file.TRAILER_LENGTH]
    assert int(offset, 16) == len(BODY)
    assert int(crc, 16) == zlib.crc32(line)
    assert json.loads(line)["id"] == queue_id


def test_a_record_is_one_compact_line_of_ascii_that_reads_back_the_same():
    record = records.new_record(
        "3645Q7VGEH4000T1",
        Envelope(sender="jürgen@example.org", recipients=["bob@example.com"],
                 client_ip="192.0.2.7", helo="client.example.org", received_at=1767225600.0),
        len(BODY), 1767225600.0)
    line = records.encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.startswith(b'{"version":1,') and b'"sender":"j\\u00fcrgen@example.org"' in line
    assert b": " not in line and b", " not in line
    assert records.decode(line, "3645Q7VGEH4000T1") == record
