"""Tests for relaymail-queue, the spool lock and the control channel: real
files in temporary directories, real UNIX sockets, and the tool run as a
separate process where a daemon must be running at the same time."""

import datetime
import json
import io
import os
import socket
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from relaymail.envelope import Envelope
from relaymail.queue import queue_file
from relaymail.queue import record as records
from relaymail.queue.control import (
    ControlError, ControlFactory, IQueueControl, answer, listen_control)
from relaymail.queue.lock import SpoolBusy, SpoolLock
from relaymail.queue.spool import Spool
from relaymail.tools import queue_listing
from relaymail.tools.queue_listing import HEADER, format_age
from relaymail.tools.queue_tool import OfflineManager, main
from tests import queue_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: 2026-01-01 00:00:00 UTC: every age and due time below is counted from it.
NOW = 1_767_225_600.0

BODY = b"Subject: hello\r\nFrom: alice@example.org\r\n\r\nHi Bob.\r\n.\r\nBye.\r\n"

OLD, HELD, NEW = "0000000000000002", "0000000000000003", "0000000000000001"


def make_spool(path):
    for name in ("tmp", "active", "hold", "corrupt"):
        os.makedirs(os.path.join(path, name), exist_ok=True)
    return path


def put(spool_path, queue_id, created, where="active", sender="alice@example.org",
        recipients=("bob@example.com",), change=None, body=BODY):
    """Write a message's queue file as the spool would, with a record made
    from the arguments and then changed by ``change(record)``.  A record
    whose size is not the body's goes beside the queue file, as a
    delivery attempt's update would put it."""
    envelope = Envelope(sender=sender, recipients=list(recipients),
                        client_ip="192.0.2.7", helo="client.example.org",
                        received_at=created)
    record = records.new_record(queue_id, envelope, len(body), created)
    if change is not None:
        change(record)
    inside = record if record["size"] == len(body) else dict(record, size=len(body))
    directory = os.path.join(spool_path, where)
    with open(os.path.join(directory, queue_id + ".msg"), "wb") as file:
        file.write(body + queue_file.record_and_trailer(records.encode(inside), len(body)))
    if inside is not record:
        queue_files.write_record_beside(directory, queue_id, records.encode(record))
    return record


def read(spool_path, queue_id, where="active"):
    return records.decode(json.dumps(queue_files.record_of(os.path.join(spool_path, where),
                                                           queue_id)), queue_id)


def names(spool_path, where):
    return sorted(os.listdir(os.path.join(spool_path, where)))


def run(spool_path, *argv):
    """Run the tool in this process; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(["--spool", spool_path, *argv], out=out, err=err, now=NOW)
    return status, out.getvalue(), err.getvalue()


def deferred_bob(record):
    """Bob deferred three times, Carol delivered, next try in ten minutes."""
    bob, carol = record["recipients"]
    bob.update(status=records.DEFERRED, attempts=3,
               last_error="451 4.4.1 Connection timed out")
    carol.update(status=records.SENT, attempts=1)
    record.update(attempts=3, next_attempt_at=NOW + 600)


def full_mailbox(record):
    record["last_error"] = "452 4.2.2 Mailbox full:\r\n" + "y" * 100


@pytest.fixture
def spool_path(tmp_path):
    return make_spool(str(tmp_path / "spool"))


@pytest.fixture
def three(spool_path):
    """The same three messages for every listing test."""
    return put_three(spool_path)


def put_three(spool_path):
    put(spool_path, OLD, NOW - 2 * 86400 - 100,
        recipients=("bob@example.com", "carol@example.com"), change=deferred_bob)
    put(spool_path, HELD, NOW - 3 * 3600, where="hold", sender="",
        recipients=("dave@example.net",), change=full_mailbox)
    # The lowest id but the newest message: order is by age, not id.
    put(spool_path, NEW, NOW - 45, sender="bob@example.com",
        recipients=("erin@example.com", "frank@example.com"))
    return spool_path


# -- list ---------------------------------------------------------------------------

LISTED_THREE = [
    "QUEUE ID          STATE          SIZE  ARRIVED (UTC)         AGE  SENDER",
    "0000000000000002  deferred         61  2025-12-29 23:58:20    2d  alice@example.org",
    "                  (451 4.4.1 Connection timed out)",
    "                  bob@example.com",
    "0000000000000003  hold             61  2025-12-31 21:00:00    3h  <>",
    "                  (452 4.2.2 Mailbox full: " + "y" * 100 + ")",
    "                  dave@example.net",
    "0000000000000001  active           61  2025-12-31 23:59:15   45s  bob@example.com",
    "                  erin@example.com",
    "                  frank@example.com",
    "-- 1 Kbytes in 3 messages, 1 held.",
]


def test_list_shows_each_message_oldest_first_with_its_state_and_whole_error(three):
    status, out, err = run(three, "list")
    assert (status, err) == (0, "")
    assert out.splitlines() == LISTED_THREE


def test_list_groups_recipients_under_their_last_error(spool_path):
    def mixed(record):
        first, second, third = record["recipients"]
        first.update(status=records.DEFERRED, last_error="451 4.4.1 timed out")
        third.update(status=records.DEFERRED, last_error="451 4.4.1 timed out")
        record["attempts"] = 1
    put(spool_path, NEW, NOW - 5, change=mixed,
        recipients=("a@example.com", "b@example.net", "c@example.com"))
    assert run(spool_path, "list")[1].splitlines()[1:] == [
        "0000000000000001  deferred         61  2025-12-31 23:59:55    5s  alice@example.org",
        "                  b@example.net",
        "                  (451 4.4.1 timed out)",
        "                  a@example.com",
        "                  c@example.com",
        "-- 1 Kbytes in 1 message, 0 held."]


def test_list_totals_kbytes_rounded_up(spool_path):
    for number, queue_id in enumerate((NEW, OLD)):
        put(spool_path, queue_id, NOW - number, change=lambda record: record.update(size=1500))
    assert run(spool_path, "list")[1].splitlines()[-1] == "-- 3 Kbytes in 2 messages, 0 held."


def test_list_of_an_empty_queue(spool_path):
    assert run(spool_path, "list") == (0, "-- 0 Kbytes in 0 messages, 0 held.\n", "")


def test_list_of_a_spool_never_laid_out_is_empty(tmp_path):
    assert run(str(tmp_path), "list") == (0, "-- 0 Kbytes in 0 messages, 0 held.\n", "")


def test_list_without_a_spool_says_so_in_one_line(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert run(missing, "list") == (1, "", f"relaymail-queue: no spool at {missing}\n")


def test_list_reports_unreadable_records_and_goes_on(three):
    with open(os.path.join(three, "active", OLD + ".json"), "wb") as file:
        file.write(b'{"version": 1')
    status, out, err = run(three, "list")
    assert status == 0
    assert err.startswith(f"relaymail-queue: {OLD}: bad record: not valid JSON")
    assert out.splitlines()[-1] == "-- 1 Kbytes in 2 messages, 1 held, 1 unreadable."


def test_list_and_show_report_a_fifo_or_directory_named_as_a_queue_file(three):
    # Opened without waiting: a FIFO put there by hand would hold the tool
    # until a writer came.
    fifo, directory = "00000000000000F1", "00000000000000D1"
    os.mkfifo(os.path.join(three, "active", fifo + ".msg"))
    os.mkdir(os.path.join(three, "active", directory + ".msg"))
    status, out, err = run(three, "list")
    assert status == 0
    assert sorted(err.splitlines()) == [
        f"relaymail-queue: {directory}: cannot read its record: a directory, "
        "not a regular file",
        f"relaymail-queue: {fifo}: cannot read its record: a FIFO, not a regular file"]
    assert out.splitlines()[-1] == "-- 1 Kbytes in 3 messages, 1 held, 2 unreadable."
    status, out, err = run(three, "show", fifo)
    assert (status, out) == (1, "")
    assert err == f"relaymail-queue: {fifo}: cannot read its record: a FIFO, not a regular file\n"


def test_list_shows_a_message_left_in_both_directories_once_as_active(three):
    os.link(os.path.join(three, "active", NEW + ".msg"), os.path.join(three, "hold", NEW + ".msg"))
    assert run(three, "list")[1].splitlines() == LISTED_THREE


def test_list_keeps_each_line_on_one_line(spool_path):
    def nasty(record):
        record["recipients"][0]["last_error"] = "550 no\r\n550 \x1b[31mred\x07"
    put(spool_path, NEW, NOW - 5, change=nasty)
    line = run(spool_path, "list")[1].splitlines()[2]
    assert line == "                  (550 no 550 \\x{1B}[31mred\\x{7})"


def test_list_escapes_what_would_drive_the_terminal(spool_path):
    def hostile(record):
        record["recipients"][0]["last_error"] = (
            "550 \x1b]52;c;aGk=\x07 no\u2028ID \x9b2J\x85")
    put(spool_path, NEW, NOW - 5, sender="a\u202eb@example.org", change=hostile)
    out = run(spool_path, "list")[1]
    assert out.splitlines()[1:] == [
        f"{NEW}  active           61  2025-12-31 23:59:55    5s  a\\x{{202E}}b@example.org",
        "                  (550 \\x{1B}]52;c;aGk=\\x{7} no\\x{2028}ID \\x{9B}2J\\x{85})",
        "                  bob@example.com",
        "-- 1 Kbytes in 1 message, 0 held."]
    assert out.isascii()


def test_list_of_two_thousand_messages(spool_path):
    from relaymail.queue.queue_id import new_queue_id
    queued = {}
    for number in range(2000):
        queue_id = new_queue_id()
        # Created in the reverse order of the ids, a tenth of them held.
        created = NOW - number
        where = "hold" if number % 10 == 0 else "active"
        put(spool_path, queue_id, created, where=where,
            recipients=(f"user{number}@example.com",))
        queued[queue_id] = (created, where)

    status, out, err = run(spool_path, "list")

    lines = out.splitlines()
    assert (status, err, len(lines)) == (0, "", 4002)
    assert lines[0] == HEADER
    assert lines[-1] == "-- 120 Kbytes in 2000 messages, 200 held."
    firsts, recipients = lines[1:-1:2], lines[2:-1:2]
    shown = [line[:16] for line in firsts]
    assert sorted(shown) == sorted(queued)
    assert shown == sorted(queued, key=lambda queue_id: queued[queue_id][0])
    for first, recipient in zip(firsts, recipients):
        queue_id = first[:16]
        state = "hold    " if queued[queue_id][1] == "hold" else "active  "
        assert first[16:28] == f"  {state}  "
        assert first.endswith("  alice@example.org")
        number = int(NOW - queued[queue_id][0])
        assert recipient == f"                  user{number}@example.com"


@pytest.mark.parametrize("seconds, text", [
    (-5, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"),
    (3600, "1h"), (86399, "23h"), (86400, "1d"), (40 * 86400, "40d")])
def test_ages_are_told_in_their_largest_unit(seconds, text):
    assert format_age(seconds) == text


# -- show --------------------------------------------------------------------------

SHOWN_OLD = """\
Queue ID:      0000000000000002
Queued:        2025-12-29 23:58:20 UTC (2d ago)
Size:          61 bytes
Sender:        <alice@example.org>
Client:        client.example.org [192.0.2.7]
Authenticated: -
Body:          7BIT
Attempts:      3
Next attempt:  2026-01-01 00:10:00 UTC (in 10m)
Last error:    -
Recipients:
  bob@example.com: deferred, 3 attempts
    last error: 451 4.4.1 Connection timed out
  carol@example.com: sent, 1 attempt

Subject: hello
From: alice@example.org
"""


def test_show_prints_the_record_then_the_headers(three):
    assert run(three, "show", OLD) == (0, SHOWN_OLD, "")


def test_show_with_body_prints_the_whole_message(three):
    status, out, _ = run(three, "show", "--body", OLD)
    assert status == 0
    assert out == SHOWN_OLD + "\nHi Bob.\n.\nBye.\n"


def test_show_of_a_held_message(three):
    status, out, _ = run(three, "show", HELD.lower())
    lines = out.splitlines()
    assert status == 0
    assert lines[0] == f"Queue ID:      {HELD} (on hold)"
    assert "Sender:        <>" in lines
    assert "Next attempt:  none: on hold" in lines
    assert lines[9] == "Last error:    452 4.2.2 Mailbox full: " + "y" * 100


def test_show_of_a_due_message_says_so(three):
    lines = run(three, "show", NEW)[1].splitlines()
    assert "Next attempt:  2025-12-31 23:59:15 UTC (due now)" in lines


HOSTILE = (b"Subject: \x1b]52;c;aGk=\x07clipboard\r\n"
           b"X-Clear: \x1b[2J\x1b[H \xc2\x9b2J\r\n"
           b"X-Lines: a\xe2\x80\xa8b\xc2\x85c\rd\r\n"
           b"X-Folded: one\r\n\ttwo\r\n"
           b"\r\n"
           b"\x1b[31mbody\r\n")


def hostile_message(spool_path):
    def helo(record):
        record["envelope"]["helo"] = "evil\x1b[2J"
    put(spool_path, NEW, NOW - 45, change=helo, body=HOSTILE)


def test_show_escapes_what_would_drive_the_terminal(spool_path):
    hostile_message(spool_path)
    status, out, err = run(spool_path, "show", "--body", NEW)
    assert (status, err) == (0, "")
    record, message = out.split("\n\n", 1)
    assert "Client:        evil\\x{1B}[2J [192.0.2.7]" in record.splitlines()
    assert message == (
        "Subject: \\x{1B}]52;c;aGk=\\x{7}clipboard\n"
        "X-Clear: \\x{1B}[2J\\x{1B}[H \\x{9B}2J\n"
        "X-Lines: a\\x{2028}b\\x{85}c\\x{D}d\n"
        "X-Folded: one\n"
        "\ttwo\n"
        "\n"
        "\\x{1B}[31mbody\n")
    assert all(line.splitlines() == [line] for line in out.split("\n") if line)
    assert not any(char < " " and char not in "\t\n" for char in out)


def test_show_raw_prints_the_message_bytes_exactly(spool_path):
    hostile_message(spool_path)
    for argv, expected in ((["--raw"], HOSTILE.split(b"\r\n\r\n")[0] + b"\r\n"),
                           (["--raw", "--body"], HOSTILE)):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        assert main(["--spool", spool_path, "show", *argv, NEW], out=out, err=io.StringIO(),
                    now=NOW) == 0
        out.flush()
        shown = out.buffer.getvalue()
        record, message = shown.split(b"\n\n", 1)
        assert b"Client:        evil\\x{1B}[2J [192.0.2.7]" in record
        assert message == expected


def test_show_help_tells_the_escaping(capsys):
    assert main(["show", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "shown as \\x{HEX}, their code point in hexadecimal: ESC as \\x{1B}" in text
    assert "--raw the message's bytes exactly as queued" in text


def test_show_of_no_such_message_is_status_1(three):
    missing = "0000000000000009"
    assert run(three, "show", missing) == (
        1, "", f"relaymail-queue: no such message {missing}\n")


def test_show_of_what_is_not_a_queue_id_is_a_usage_error(three, capsys):
    assert run(three, "show", "../../etc/passwd")[0] == 2
    assert "not a queue id" in capsys.readouterr().err


# -- changes without a daemon: straight on the files ------------------------------------

def test_hold_and_release_offline(three):
    assert run(three, "hold", OLD) == (0, f"{OLD} on hold\n", "")
    assert names(three, "hold") == sorted([OLD + ".msg", HELD + ".msg"])
    assert run(three, "hold", OLD) == (0, f"{OLD} on hold\n", "")

    assert run(three, "release", HELD) == (0, f"{HELD} released\n", "")
    assert read(three, HELD)["next_attempt_at"] == NOW
    assert names(three, "hold") == [OLD + ".msg"]
    # The record due now beside the queue file, which is as it was.
    assert HELD + ".json" in names(three, "active")
    assert queue_files.embedded_record_of(os.path.join(three, "active"), HELD)[
        "next_attempt_at"] != NOW
    assert names(three, "tmp") == []


def test_hold_takes_several_ids_and_release_all_lets_every_held_one_go(three):
    assert run(three, "hold", OLD, NEW.lower()) == (0, f"{OLD} on hold\n{NEW} on hold\n", "")
    assert names(three, "active") == []
    assert run(three, "release", "ALL") == (
        0, f"{NEW} released\n{OLD} released\n{HELD} released\n", "")
    assert names(three, "hold") == []
    assert read(three, HELD)["next_attempt_at"] == NOW


def test_hold_all_holds_every_queued_message_and_leaves_the_held_one(three):
    assert run(three, "hold", "ALL") == (0, f"{NEW} on hold\n{OLD} on hold\n", "")
    assert names(three, "active") == []
    assert run(three, "hold", "ALL") == (0, "no message to hold\n", "")


def test_dash_reads_ids_from_standard_input(three, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{OLD}\n  {NEW}\n"))
    assert run(three, "delete", "-") == (0, f"{OLD} deleted\n{NEW} deleted\n", "")
    assert names(three, "active") == []
    monkeypatch.setattr("sys.stdin", io.StringIO("not-an-id\n"))
    assert run(three, "delete", "-") == (
        1, "", "relaymail-queue: standard input: not a queue id: 'not-an-id'\n")


def test_one_bad_id_among_several_is_reported_and_the_others_done(three):
    missing = "00000000000000ZZ"
    status, out, err = run(three, "hold", OLD, missing, NEW)
    assert (status, out, err) == (1, f"{OLD} on hold\n{NEW} on hold\n",
                                  f"relaymail-queue: no such message {missing}\n")


def test_release_of_a_message_that_is_not_held_is_an_error_and_changes_nothing(three):
    before = read(three, OLD)
    assert run(three, "release", OLD) == (1, "", f"relaymail-queue: {OLD} is not on hold\n")
    assert read(three, OLD) == before


def test_show_into_a_pipe_closed_early_ends_quietly(three):
    import subprocess
    # The reading end is closed before the tool writes (it takes a good
    # tenth of a second to start): its first write meets EPIPE, as
    # "show ID | head" does on a long message.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relaymail.tools.queue_tool", "--spool", three, "show",
             "--body", OLD], stdout=writer, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=ROOT), timeout=30)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, "")


def test_retry_makes_one_message_due_now(three):
    assert run(three, "retry", OLD) == (0, f"{OLD} due now\n", "")
    assert read(three, OLD)["next_attempt_at"] == NOW


def test_retry_of_a_held_message_says_to_release_it(three):
    assert run(three, "retry", HELD) == (
        1, "", f"relaymail-queue: {HELD} is on hold; release it to deliver it\n")
    assert read(three, HELD, "hold")["next_attempt_at"] == NOW - 3 * 3600


def test_flush_makes_every_active_message_due(three):
    assert run(three, "flush") == (
        0, "2 messages due now; relaymail is not running: nothing is delivered until it "
           "starts\n", "")
    assert read(three, OLD)["next_attempt_at"] == NOW
    assert read(three, NEW)["next_attempt_at"] == NOW - 45
    assert read(three, HELD, "hold")["next_attempt_at"] == NOW - 3 * 3600


def test_flush_passes_over_a_fifo_or_directory_named_as_a_queue_file(three):
    os.mkfifo(os.path.join(three, "active", "00000000000000F1.msg"))
    os.mkdir(os.path.join(three, "active", "00000000000000D1.msg"))
    assert run(three, "flush") == (
        0, "2 messages due now; relaymail is not running: nothing is delivered until it "
           "starts\n", "")
    assert read(three, OLD)["next_attempt_at"] == NOW


def test_delete_one_then_all(three):
    assert run(three, "delete", HELD) == (0, f"{HELD} deleted\n", "")
    assert names(three, "hold") == []
    assert run(three, "delete", "ALL") == (0, "2 messages deleted\n", "")
    assert names(three, "active") == []
    assert run(three, "delete", "all") == (0, "0 messages deleted\n", "")


@pytest.mark.parametrize("command", ["retry", "delete", "hold", "release"])
def test_no_such_message_is_status_1(spool_path, command):
    missing = "0000000000000009"
    assert run(spool_path, command, missing) == (
        1, "", f"relaymail-queue: no such message {missing}\n")


def test_offline_changes_leave_the_lock_free(three):
    run(three, "hold", OLD)
    lock = SpoolLock(three)
    assert lock.acquire() is True
    lock.release()


def test_changes_refuse_a_directory_that_is_not_a_spool(tmp_path):
    status, out, err = run(str(tmp_path), "flush")
    assert (status, out) == (1, "")
    assert err == (f"relaymail-queue: {tmp_path} is not a relaymail spool "
                   "(it has no active/); has relaymail run on it?\n")
    assert not os.path.exists(tmp_path / "lock")


def test_a_bad_record_is_an_error_reply_not_a_traceback(three):
    with open(os.path.join(three, "active", OLD + ".json"), "wb") as file:
        file.write(b"[]")
    # A process of its own: Twisted would print a logged traceback to the
    # real stderr at exit, which an in-process run would not show.
    completed = subprocess.run(
        [sys.executable, "-m", "relaymail.tools.queue_tool", "--spool", three,
         "retry", OLD],
        capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    assert completed.returncode == 1
    assert completed.stderr == b"relaymail-queue: retry failed: not a JSON object\n"


# -- changes with a daemon holding the lock, when it does not answer ---------------------

@pytest.fixture
def locked(three):
    lock = SpoolLock(three)
    assert lock.acquire()
    yield three
    lock.release()


def test_daemon_without_a_control_socket(locked):
    status, out, err = run(locked, "hold", OLD)
    assert (status, out) == (1, "")
    assert err == (f"relaymail-queue: relaymail (process {os.getpid()}) holds the spool "
                   f"but has no control socket {locked}/control; is it still starting?\n")
    assert names(locked, "hold") == [HELD + ".msg"]


def short_socket_dir():
    # AF_UNIX paths are limited to about 100 bytes; pytest's can be longer.
    return tempfile.mkdtemp(prefix="rq")


def socket_spool(test):
    """A spool where its control socket's path is short enough, removed
    after ``test``, holding the message OLD."""
    directory = short_socket_dir()
    test.addCleanup(shutil.rmtree, directory)
    spool_path = make_spool(os.path.join(directory, "spool"))
    put(spool_path, OLD, NOW - 100, change=deferred_bob,
        recipients=("bob@example.com", "carol@example.com"))
    return spool_path


def test_daemon_not_listening_on_its_socket(locked):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(os.path.join(locked, "control"))
    except OSError:
        pytest.skip("spool path too long for a UNIX socket")
    stale.close()
    status, _, err = run(locked, "flush")
    assert status == 1
    assert err.endswith("but nothing answers on "
                        f"{locked}/control (connection refused)\n")


def test_daemon_not_answering_in_time(locked):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.bind(os.path.join(locked, "control"))
    except OSError:
        pytest.skip("spool path too long for a UNIX socket")
    silent.listen(1)
    try:
        out, err = io.StringIO(), io.StringIO()
        status = main(["--spool", locked, "--timeout", "0.2", "delete", "ALL"],
                      out=out, err=err, now=NOW)
    finally:
        silent.close()
    assert status == 1
    assert err.getvalue().endswith(f"did not answer on {locked}/control within 0.2 seconds\n")
    assert names(locked, "active") != []


# -- configuration ------------------------------------------------------------------

def test_the_spool_comes_from_the_config_file(three, tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text(f"[queue]\npath = {three}\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(config), "list"], out=out, err=err, now=NOW) == 0
    assert out.getvalue().endswith("-- 1 Kbytes in 3 messages, 1 held.\n")


def test_a_config_error_is_one_line_and_status_2(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text("[queue]\nmin_backoff = soon\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["--config", str(config), "list"], out=out, err=err) == 2
    assert err.getvalue().count("\n") == 1
    assert err.getvalue().startswith(f"relaymail-queue: {config}: [queue] min_backoff:")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["hold"], ["delete", "most"],
                                  ["flush", "now"], ["--timeout", "0", "list"]])
def test_usage_errors_are_status_2(spool_path, argv, capsys):
    assert main(["--spool", spool_path, *argv]) == 2
    assert "usage:" in capsys.readouterr().err


# -- the spool lock -----------------------------------------------------------------

def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    path = str(tmp_path / "new-spool")
    first, second = SpoolLock(path), SpoolLock(path)
    assert first.acquire() is True
    assert stat.S_IMODE(os.stat(os.path.join(path, "lock")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert second.acquire() is False
    assert second.describe_holder() == (
        f"the spool {path} is locked by process {os.getpid()} "
        "(is another relaymail running on it?)")
    first.release()
    assert second.holder_pid() is None
    assert second.acquire() is True
    second.release()


def test_after_a_fork_the_child_names_itself_as_the_holder(tmp_path):
    lock = SpoolLock(str(tmp_path))
    assert lock.acquire()
    child = os.fork()
    if child == 0:
        # As twistd's daemonized child: the parent leaves, the lock stays.
        lock.write_pid()
        os._exit(0)
    os.waitpid(child, 0)
    assert lock.holder_pid() == child
    lock.release()
    with pytest.raises(RuntimeError):
        lock.write_pid()


def test_the_lock_as_a_context_manager(tmp_path):
    with SpoolLock(str(tmp_path)) as lock:
        assert lock.held
        with pytest.raises(SpoolBusy, match="locked by process"):
            with SpoolLock(str(tmp_path)):
                pass
    assert not lock.held
    with SpoolLock(str(tmp_path)):
        pass


# -- the control protocol -------------------------------------------------------------

class Manager:
    """Answers from a table; a Deferred when ``later`` is set."""

    def __init__(self, later=False):
        self.later = later
        self.calls = []
        self.pending = []

    def _result(self, name, value, *args):
        self.calls.append((name, *args))
        if not self.later:
            return value
        result = defer.Deferred()
        self.pending.append((result, value))
        return result

    def flush(self, domain=None):
        return self._result("flush", 1, *([domain] if domain else []))

    def retry(self, queue_id):
        return self._result("retry", queue_id == OLD, queue_id)

    def delete(self, queue_id):
        return self._result("delete", True, queue_id)

    def delete_all(self):
        return self._result("delete_all", 7)

    def hold(self, queue_id):
        raise ControlError("not now")

    def release(self, queue_id):
        return 1 / 0


def answered(manager, line):
    replies = []
    answer(manager, line).addCallback(replies.append)
    assert len(replies) == 1
    return replies[0]


def test_the_manager_contract_is_an_interface():
    assert verifyObject(IQueueControl, OfflineManager(Spool("unused"), NOW))


@pytest.mark.parametrize("line, reply, call", [
    (b"flush\n", "ok 1 message due now", ("flush",)),
    (b"retry " + OLD.encode() + b"\r\n", f"ok {OLD} due now", ("retry", OLD)),
    ("retry " + NEW, f"error no such message {NEW}", ("retry", NEW)),
    ("delete " + NEW, f"ok {NEW} deleted", ("delete", NEW)),
    ("delete ALL", "ok 7 messages deleted", ("delete_all",)),
    ("hold " + NEW, "error not now", None),
    ("", "error empty request", None),
    ("FLUSH", "ok 1 message due now", ("flush",)),
    ("flush example.com", "ok 1 message due now", ("flush", "example.com")),
    ("flush xn--bcher-kva.example", "ok 1 message due now",
     ("flush", "xn--bcher-kva.example")),
    ("flush Example.COM", "error not a domain in lower case A-labels: 'Example.COM'", None),
    ("flush a..b", "error not a domain: 'a..b' (empty label in domain)", None),
    ("flush a b", "error wrong arguments for flush: 'flush a b'", None),
    ("retry", "error wrong arguments for retry: 'retry'", None),
    ("retry ../x", "error not a queue id: '../x'", None),
    ("delete all", "error not a queue id: 'all'", None),
    ("reboot", "error unknown request 'reboot'", None),
    (b"retry \xff", "error the request is not ASCII", None),
])
def test_requests_and_their_replies(line, reply, call):
    manager = Manager()
    assert answered(manager, line) == reply
    assert manager.calls == ([call] if call else [])


class ControlProtocolTests(unittest.TestCase):
    """The protocol over a fake transport, then a real socket."""

    def connect(self, manager):
        protocol = ControlFactory(manager).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_an_unexpected_failure_is_logged_and_answered(self):
        protocol, transport = self.connect(Manager())
        protocol.dataReceived(f"release {OLD}\n".encode())
        self.assertEqual(transport.value(),
                         b"error release failed: division by zero\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_replies_keep_the_order_of_the_requests(self):
        manager = Manager(later=True)
        protocol, transport = self.connect(manager)
        protocol.dataReceived(f"retry {OLD}\nflush\n".encode())
        # The second request is not even asked before the first is answered.
        self.assertEqual(len(manager.pending), 1)
        first, value = manager.pending.pop()
        first.callback(value)
        second, value = manager.pending.pop()
        second.callback(value)
        self.assertEqual(transport.value(),
                         f"ok {OLD} due now\nok 1 message due now\n".encode())

    def test_an_overlong_request_is_refused_and_the_connection_closed(self):
        protocol, transport = self.connect(Manager())
        protocol.dataReceived(b"retry " + b"0" * 600 + b"\n")
        self.assertEqual(transport.value(), b"error request longer than 512 bytes\n")
        self.assertTrue(transport.disconnecting)

    def test_listen_control_replaces_a_stale_socket_and_is_private(self):
        directory = short_socket_dir()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "control")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        port = listen_control(reactor, directory, Manager())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        stopped = port.stopListening()
        stopped.addCallback(lambda _: self.assertFalse(os.path.exists(path)))
        return stopped

    def test_listen_control_leaves_a_file_that_is_not_a_socket(self):
        directory = short_socket_dir()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "control")
        with open(path, "w") as file:
            file.write("keep me")
        with self.assertRaises(OSError):
            listen_control(reactor, directory, Manager())
        with open(path) as file:
            self.assertEqual(file.read(), "keep me")


# -- with a daemon: the tool as a separate process, the reactor running here -------------

class OnlineTests(unittest.TestCase):
    """This process plays the daemon: it holds the spool lock and answers
    on QUEUE/control with the offline manager; the tool runs as a child
    process, as an administrator would run it."""

    def setUp(self):
        self.spool_path = socket_spool(self)
        put(self.spool_path, HELD, NOW - 50, where="hold")
        lock = SpoolLock(self.spool_path)
        self.assertTrue(lock.acquire())
        self.addCleanup(lock.release)
        self.manager = OfflineManager(Spool(self.spool_path), NOW)
        port = listen_control(reactor, self.spool_path, self.manager)
        self.addCleanup(port.stopListening)

    def tool(self, *argv):
        environment = dict(os.environ, PYTHONPATH=ROOT)
        return getProcessOutputAndValue(
            sys.executable, ["-m", "relaymail.tools.queue_tool",
                             "--spool", self.spool_path, *argv],
            env=environment)

    @defer.inlineCallbacks
    def test_hold_is_done_by_the_daemon(self):
        out, err, status = yield self.tool("hold", OLD)
        self.assertEqual((out, err, status), (f"{OLD} on hold\n".encode(), b"", 0))
        self.assertEqual(names(self.spool_path, "active"), [])

    @defer.inlineCallbacks
    def test_release_and_retry_are_done_by_the_daemon(self):
        out, _, status = yield self.tool("release", HELD)
        self.assertEqual((out, status), (f"{HELD} released\n".encode(), 0))
        self.assertEqual(read(self.spool_path, HELD)["next_attempt_at"], NOW)
        out, _, status = yield self.tool("retry", OLD)
        self.assertEqual((out, status), (f"{OLD} due now\n".encode(), 0))
        self.assertEqual(read(self.spool_path, OLD)["next_attempt_at"], NOW)

    @defer.inlineCallbacks
    def test_an_error_reply_is_status_1(self):
        missing = "0000000000000009"
        out, err, status = yield self.tool("delete", missing)
        self.assertEqual((out, err, status),
                         (b"", f"relaymail-queue: no such message {missing}\n".encode(), 1))

    @defer.inlineCallbacks
    def test_flush_and_delete_all_through_the_daemon(self):
        out, _, status = yield self.tool("flush")
        self.assertEqual((out, status), (b"1 message due now\n", 0))
        out, _, status = yield self.tool("delete", "ALL")
        self.assertEqual((out, status), (b"2 messages deleted\n", 0))
        self.assertEqual(names(self.spool_path, "active"), [])
        self.assertEqual(names(self.spool_path, "hold"), [])

    @defer.inlineCallbacks
    def test_list_reads_the_files_while_the_daemon_runs(self):
        out, err, status = yield self.tool("list")
        self.assertEqual((err, status), (b"", 0))
        self.assertEqual(out.splitlines()[-1], b"-- 1 Kbytes in 2 messages, 1 held.")


def test_an_absurd_timeout_is_a_usage_error(tmp_path, capsys):
    from relaymail.tools.queue_tool import main
    for value in ("1e10", "inf", "0", "-1", "soon"):
        assert main(["--spool", str(tmp_path / "spool"), "--timeout", value, "flush"]) == 2
    assert "up to 86400" in capsys.readouterr().err


@pytest.mark.parametrize("when, shown", [
    (0, "1970-01-01 00:00:00 UTC"),
    (1767225599.999, "2025-12-31 23:59:59 UTC"),
    (1767225600, "2026-01-01 00:00:00 UTC"),
    (-0.5, "1969-12-31 23:59:59 UTC"),          # before the epoch: rounded down
    (-86401, "1969-12-30 23:59:59 UTC"),
    (1767225599.9999995, "2026-01-01 00:00:00 UTC"),   # rounded to the microsecond first
    (86399.9999999, "1970-01-02 00:00:00 UTC"),
    (-1e-07, "1970-01-01 00:00:00 UTC"),
    (253402300799, "9999-12-31 23:59:59 UTC"),
    (253402300800, "? UTC"),                    # past what a date can say
    (float("nan"), "? UTC"),
    (float("inf"), "? UTC"),
    (10 ** 30, "? UTC"),
])
def test_arrival_times_as_listed(when, shown):
    # Dates are worked out once a day (queue_listing._utc); each line must
    # still say what datetime says, the bad values a record may hold too.
    assert " ".join(queue_listing.format_utc(when).split()) == shown


def test_arrival_times_as_datetime_shows_them_near_every_edge():
    def by_datetime(when):
        try:
            stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return "?"
        return stamp.strftime("%Y-%m-%d %H:%M:%S")
    edges = [day * 86400 + offset for day in (-2, -1, 0, 1, 20454, 2932896)
             for offset in (-1, 0, 1, 86399)]
    nudges = [0, 1e-7, -1e-7, 4.9e-7, 5e-7, 5.1e-7, -5e-7, 0.4999995, 0.5, 0.9999994,
              0.9999995, 0.9999996, -0.9999995]
    values = [edge + nudge for edge in edges for nudge in nudges] + edges
    for when in values:
        assert queue_listing.format_utc(when).rsplit(" UTC", 1)[0].strip() == by_datetime(when), when
