"""relaymail-queue: choosing messages (--sender, --recipient, --domain),
list --json, flush --domain, the log of who changed the queue, and
changes that go on when nobody reads the report.  Real files, real
sockets, and the real relay where the log is the point."""

import io
import json
import os
import pwd
import socket
import subprocess
import sys

import pytest
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relaymail.queue import audit
from relaymail.queue.control import listen_control
from relaymail.queue.spool import Spool
from relaymail.tools.queue_tool import OfflineManager, main
from tests.relay_process import REPO, RelayProcess, free_port
from tests.test_delivery import send, wait_until
from tests import test_queue_tool
from tests.test_queue_tool import (
    HELD, NEW, NOW, OLD, make_spool, names, put, read, run, socket_spool)

#: A deferred message to another domain, beside the three of ``three``.
OTHER = "0000000000000004"

USER = pwd.getpwuid(os.getuid()).pw_name


def deferred_zed(record):
    record["recipients"][0].update(status="deferred", attempts=1,
                                   last_error="421 4.4.2 Lost connection")
    record.update(attempts=1, next_attempt_at=NOW + 600)


#: The fixtures of tests/test_queue_tool.py: a laid-out spool, and the
#: same three messages in it.
spool_path = test_queue_tool.spool_path
three = test_queue_tool.three


@pytest.fixture
def four(three):
    put(three, OTHER, NOW - 10, recipients=("zed@example.net",), change=deferred_zed)
    return three


def files(*queue_ids, beside=()):
    """The names a directory of the spool has for these messages: each
    one's queue file, and a record beside it for those ``beside`` (a
    release writes one)."""
    return sorted([f"{queue_id}.msg" for queue_id in queue_ids]
                  + [f"{queue_id}.json" for queue_id in queue_ids if queue_id in beside])


def listed_ids(spool_path, *options):
    status, out, err = run(spool_path, "list", "--json", *options)
    assert (status, err) == (0, "")
    return [json.loads(line)["queue_id"] for line in out.splitlines()]


# -- choosing messages -------------------------------------------------------------

@pytest.mark.parametrize("options, chosen", [
    ((), [OLD, HELD, NEW, OTHER]),
    (("--sender", "Alice@EXAMPLE.org"), [OLD, HELD, OTHER]),
    (("--sender", "<>"), []),
    (("--sender", "bob@example.com"), [NEW]),
    # Bob is still to do; Carol was delivered: no longer her mail.
    (("--recipient", "BOB@example.com"), [OLD]),
    (("--recipient", "carol@example.com"), []),
    (("--domain", "example.NET"), [HELD, OTHER]),
    (("--domain", "example.com"), [OLD, NEW]),
    (("--domain", "example.com", "--sender", "bob@example.com"), [NEW]),
    (("--domain", "example.org"), []),
])
def test_list_chooses_by_sender_recipient_and_domain(four, options, chosen):
    put(four, HELD, NOW - 3 * 3600, where="hold", recipients=("dave@example.net",))
    assert listed_ids(four, *options) == chosen


def test_the_null_sender_is_chosen_by_empty_brackets(three):
    assert listed_ids(three, "--sender", "<>") == [HELD]
    assert listed_ids(three, "--sender", "") == [HELD]


@pytest.mark.parametrize("stored, asked", [
    ("user@bücher.example", "BÜCHER.example"),
    ("user@bücher.example", "xn--bcher-kva.example"),
    ("user@XN--BCHER-KVA.example", "bücher.example"),
])
def test_a_domain_matches_in_u_labels_and_a_labels_alike(spool_path, stored, asked):
    put(spool_path, NEW, NOW - 5, recipients=(stored,))
    put(spool_path, OLD, NOW - 4, recipients=("user@buecher.example",))
    assert listed_ids(spool_path, "--domain", asked) == [NEW]
    assert listed_ids(spool_path, "--recipient", f"USER@{asked}") == [NEW]


def test_a_filtered_listing_counts_what_it_shows(four):
    assert run(four, "list", "--domain", "example.net")[1].splitlines()[-1] == (
        "-- 1 Kbytes in 2 messages, 1 held.")


@pytest.fixture
def four_held(four):
    run(four, "hold", "ALL")
    return four


@pytest.mark.parametrize("spool, argv, done, active, held", [
    # Only the domain's messages; ALL of hold is those not yet held.
    ("four", ("hold", "ALL", "--domain", "example.com"), [f"{NEW} on hold", f"{OLD} on hold"],
     [OTHER], [NEW, OLD, HELD]),
    # delete ALL deletes held messages too, with a filter as without.
    ("four", ("delete", "ALL", "--domain", "example.net"), [f"{HELD} deleted", f"{OTHER} deleted"],
     [NEW, OLD], []),
    ("four_held", ("release", "ALL", "--sender", "bob@example.com"), [f"{NEW} released"],
     [NEW], [OLD, HELD, OTHER]),
])
def test_all_with_a_filter_changes_only_the_messages_it_chooses(request, spool, argv, done,
                                                                 active, held):
    spool_path = request.getfixturevalue(spool)
    assert run(spool_path, *argv) == (0, "".join(line + "\n" for line in done), "")
    released = active if argv[0] == "release" else ()
    assert (names(spool_path, "active"), names(spool_path, "hold")) == (
        files(*active, beside=released), files(*held))


def test_retry_all_with_a_recipient(four):
    assert run(four, "retry", "ALL", "--recipient", "zed@example.net") == (
        0, f"{OTHER} due now\n", "")
    assert read(four, OTHER)["next_attempt_at"] == NOW
    assert read(four, OLD)["next_attempt_at"] == NOW + 600


def test_all_with_a_filter_that_matches_nothing_says_so(four):
    assert run(four, "hold", "ALL", "--sender", "nobody@example.org") == (
        0, "no message to hold matching --sender nobody@example.org\n", "")


@pytest.mark.parametrize("argv", [
    ("hold", OLD, "--domain", "example.com"),
    ("delete", "ALL", OLD, "--sender", "<>"),
    ("release", "-", "--recipient", "bob@example.com"),
])
def test_a_filter_with_ids_named_is_one_usage_error(four, argv):
    before = {where: names(four, where) for where in ("active", "hold")}
    status, out, err = run(four, *argv)
    named = " ".join(argv[1:-2])
    assert (status, out) == (2, "")
    assert err == (f"relaymail-queue: {argv[-2]} {argv[-1]} chooses among ALL: "
                   f"give ALL alone, not {named}\n")
    assert {where: names(four, where) for where in ("active", "hold")} == before


@pytest.mark.parametrize("argv, problem", [
    (("list", "--domain", "a..b"), "argument --domain: not a domain: 'a..b' (empty label in domain)"),
    (("hold", "ALL", "--sender", "nobody"), "argument --sender: not an address: 'nobody'"),
    (("flush", "--sender", "a@example.org"), "unrecognized arguments: --sender"),
    (("show", OLD, "--domain", "example.com"), "unrecognized arguments: --domain"),
])
def test_bad_filter_values_and_options_are_usage_errors(four, argv, problem, capsys):
    assert run(four, *argv)[0] == 2
    assert problem in capsys.readouterr().err


# -- list --json -------------------------------------------------------------------

def test_list_json_has_the_fields_of_postqueue_j(three):
    status, out, err = run(three, "list", "--json")
    assert (status, err) == (0, "")
    assert out.isascii()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"queue_name": "deferred", "queue_id": OLD, "arrival_time": int(NOW) - 2 * 86400 - 100,
         "message_size": 61, "sender": "alice@example.org",
         "recipients": [{"address": "bob@example.com",
                         "delay_reason": "451 4.4.1 Connection timed out"}],
         "attempts": 3, "next_attempt_time": int(NOW) + 600},
        {"queue_name": "hold", "queue_id": HELD, "arrival_time": int(NOW) - 3 * 3600,
         "message_size": 61, "sender": "",
         "recipients": [{"address": "dave@example.net",
                         "delay_reason": "452 4.2.2 Mailbox full:\r\n" + "y" * 100}],
         "attempts": 0, "next_attempt_time": None},
        {"queue_name": "active", "queue_id": NEW, "arrival_time": int(NOW) - 45,
         "message_size": 61, "sender": "bob@example.com",
         "recipients": [{"address": "erin@example.com"}, {"address": "frank@example.com"}],
         "attempts": 0, "next_attempt_time": int(NOW) - 45},
    ]


def test_list_json_escapes_what_would_drive_a_terminal(spool_path):
    put(spool_path, NEW, NOW - 5, sender="a\u202eb@example.org",
        recipients=("bob@example.com",))
    out = run(spool_path, "list", "--json")[1]
    assert "\\u202e" in out and out.isascii()
    assert json.loads(out)["sender"] == "a\u202eb@example.org"


# -- flush --domain ------------------------------------------------------------------

def test_flush_with_a_domain_makes_only_that_domains_messages_due(four):
    assert run(four, "flush", "--domain", "EXAMPLE.net") == (
        0, "1 message due now; relaymail is not running: nothing is delivered until it "
           "starts\n", "")
    assert read(four, OTHER)["next_attempt_at"] == NOW
    assert read(four, OLD)["next_attempt_at"] == NOW + 600


def test_the_offline_manager_flushes_by_domain(four):
    manager = OfflineManager(Spool(four), NOW)
    assert manager.flush("example.com") == 2
    assert read(four, OLD)["next_attempt_at"] == NOW
    assert read(four, OTHER)["next_attempt_at"] == NOW + 600


# -- changes whose report nobody reads ------------------------------------------------

class ClosedAfterOneLine(io.StringIO):
    """A reader that reads one line, then closes the pipe."""

    def write(self, text):
        if self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_pipe_closed_half_way_does_not_stop_the_changes(three, tmp_path, monkeypatch):
    # The process's own stdout is a file here: the tool must not point it
    # at /dev/null for a closed pipe that was another stream.
    own = open(tmp_path / "stdout", "w")
    monkeypatch.setattr(sys, "stdout", own)
    before = os.fstat(own.fileno()).st_ino
    out, err = ClosedAfterOneLine(), io.StringIO()
    status = main(["--spool", three, "hold", NEW, OLD], out=out, err=err, now=NOW)
    assert (status, out.getvalue(), err.getvalue()) == (0, f"{NEW} on hold\n", "")
    assert names(three, "active") == []
    assert os.fstat(own.fileno()).st_ino == before
    own.close()


def test_a_failure_after_the_pipe_closed_still_sets_the_status(three):
    out, err = ClosedAfterOneLine(), io.StringIO()
    status = main(["--spool", three, "hold", NEW, "0000000000000009", OLD],
                  out=out, err=err, now=NOW)
    assert status == 1
    assert err.getvalue() == "relaymail-queue: no such message 0000000000000009\n"
    assert names(three, "active") == []


def test_hold_all_into_a_closed_pipe_holds_every_message(spool_path):
    # Enough ids that the report fills Python's 8 KiB buffer long before
    # the end: the first flush meets EPIPE with most ids still to do.
    from relaymail.queue.queue_id import new_queue_id
    queue_ids = [new_queue_id() for _ in range(600)]
    for number, queue_id in enumerate(queue_ids):
        put(spool_path, queue_id, NOW - number)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relaymail.tools.queue_tool", "--spool", spool_path,
             "hold", "ALL"], stdout=writer, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, "")
    assert names(spool_path, "active") == []
    assert len(names(spool_path, "hold")) == len(queue_ids)


# -- who did it: the log ----------------------------------------------------------------

class Events:
    """Log events published while a test runs."""

    def __init__(self, test):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, start="queue tool"):
        from twisted.logger import formatEvent
        return [formatEvent(event) for event in self.events
                if formatEvent(event).startswith(start)]


class ControlLogTests(unittest.TestCase):
    """The control socket names who asked, from the kernel's word."""

    def setUp(self):
        self.spool_path = socket_spool(self)

    @defer.inlineCallbacks
    def test_a_request_on_the_socket_is_logged_with_the_peers_user_uid_and_pid(self):
        events = Events(self)
        port = listen_control(reactor, self.spool_path, OfflineManager(Spool(self.spool_path), NOW))
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setblocking(False)
        try:
            client.connect(os.path.join(self.spool_path, "control"))
        except BlockingIOError:
            pass
        client.sendall(f"hold {OLD}\nbogus\n".encode())
        replies = b""
        while replies.count(b"\n") < 2:
            yield deferLater(0.01)
            try:
                replies += client.recv(4096)
            except BlockingIOError:
                pass
        self.assertEqual(replies, f"ok {OLD} on hold\nerror unknown request 'bogus'\n".encode())
        self.assertEqual(events.texts(), [
            f"queue tool: hold {OLD} by {USER} (uid {os.getuid()}, pid {os.getpid()}): "
            f"ok {OLD} on hold",
            f"queue tool: bogus by {USER} (uid {os.getuid()}, pid {os.getpid()}): "
            "error unknown request 'bogus'"])

    def test_offline_actions_are_logged_at_the_next_listen_and_the_journal_removed(self):
        status = main(["--spool", self.spool_path, "hold", OLD], out=io.StringIO(),
                      err=io.StringIO(), now=NOW)
        self.assertEqual(status, 0)
        journal = os.path.join(self.spool_path, "offline-actions")
        with open(journal, "a") as file:
            file.write("not json\n")
        events = Events(self)
        port = listen_control(reactor, self.spool_path, OfflineManager(Spool(self.spool_path), NOW))
        self.addCleanup(port.stopListening)
        self.assertEqual(events.texts(), [
            f"queue tool, offline at 2026-01-01 00:00:00 UTC: hold {OLD} by {USER} "
            f"(uid {os.getuid()}, pid {os.getpid()}): ok {OLD} on hold",
            "queue tool, offline: unreadable entry: not json"])
        self.assertFalse(os.path.exists(journal))

    def test_an_action_that_cannot_be_recorded_is_done_and_said_so(self):
        journal = os.path.join(self.spool_path, "offline-actions")
        os.mkdir(journal)
        out, err = io.StringIO(), io.StringIO()
        status = main(["--spool", self.spool_path, "hold", OLD], out=out, err=err, now=NOW)
        self.assertEqual((status, out.getvalue()), (0, f"{OLD} on hold\n"))
        self.assertEqual(err.getvalue(), f"relaymail-queue: hold {OLD}: not recorded in "
                                         f"{journal}: Is a directory\n")


def deferLater(seconds):
    from twisted.internet.task import deferLater as later
    return later(reactor, seconds, lambda: None)


def queue_tool(relay, *argv):
    """Run the tool against a running relay; return (process, stdout, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "relaymail.tools.queue_tool", "--spool", relay.spool, *argv],
        env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    out, err = process.communicate(timeout=30)
    return process, out, err


def logged(relay, text):
    """The relay's log lines that end in ``text``, once one does."""
    wait_until(lambda: any(line.endswith(text) for line in relay.log().splitlines()),
               what=f"a log line ending {text!r}")
    return [line for line in relay.log().splitlines() if line.endswith(text)]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_changes_through_a_running_relay_are_logged_once_with_who_made_them(tmp_path, workers):
    # Nobody listens at the smarthost: the mail stays queued.
    relay = RelayProcess(tmp_path, {
        "server": {"workers": workers}, "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{free_port()}", "workers": "2",
                     "connect_timeout": "2"},
        "queue": {"min_backoff": "3600", "max_backoff": "3600"}}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        other = send(relay, "alice@example.org", ["carol@example.org"])
        who = f"by {USER} (uid {os.getuid()}, pid"
        for argv, reply in ((("hold", queue_id), f"{queue_id} on hold"),
                            (("release", queue_id), f"{queue_id} released"),
                            (("retry", other), f"{other} due now"),
                            (("flush", "--domain", "example.NET"), "1 message due now"),
                            (("delete", other), f"{other} deleted")):
            process, out, err = queue_tool(relay, *argv)
            assert (process.returncode, out, err) == (0, reply + "\n", "")
            request = " ".join(argv) if argv[0] != "flush" else "flush example.net"
            text = f"queue tool: {request} {who} {process.pid}): ok {reply}"
            [line] = logged(relay, text)
            # The process the tool talked to logs it: the master (or the
            # only process), not the delivery worker it passed it on to.
            assert "delivery." not in line.split("]")[0]
    finally:
        relay.stop()


def test_offline_changes_are_logged_when_the_relay_next_starts(tmp_path):
    relay = RelayProcess(tmp_path, {"server": {"workers": "0"}})
    make_spool(relay.spool)
    put(relay.spool, NEW, NOW - 45, recipients=("erin@example.com",))
    assert run(relay.spool, "hold", NEW)[0] == 0
    journal = os.path.join(relay.spool, "offline-actions")
    assert os.path.exists(journal)
    relay.start()
    try:
        logged(relay, f"queue tool, offline at 2026-01-01 00:00:00 UTC: hold {NEW} by {USER} "
                      f"(uid {os.getuid()}, pid {os.getpid()}): ok {NEW} on hold")
        assert not os.path.exists(journal)
    finally:
        relay.stop()
    assert audit.log_offline_actions(relay.spool) == 0
