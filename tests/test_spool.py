"""Tests for relaymail.queue.spool: real files, real fsync."""

import collections
import errno
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import zlib

import pytest
from twisted.internet import defer
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from relaymail.envelope import Envelope
from relaymail.interfaces import IMessageQueue, IMessageWriter
from relaymail.queue import queue_file
from relaymail.queue import record as records
from relaymail.queue.durable import GroupSync
from relaymail.queue.queue_id import ALPHABET, is_queue_id, new_queue_id
from relaymail.queue.spool import Spool
from tests import queue_files

BODY = (b"Received: from client.example.org by relay.example.net\r\n"
        b"Subject: hello\r\n\r\nline one\r\n.leading dot kept unstuffed\r\n")


def make_envelope(**changes):
    values = dict(sender="alice@example.org",
                  recipients=["bob@example.com", "carol@example.com"],
                  client_ip="192.0.2.7", helo="client.example.org",
                  received_at=1767225600.5)
    values.update(changes)
    return Envelope(**values)


def listing(spool, directory):
    return sorted(os.listdir(os.path.join(spool.path, directory)))


def queue_sync(spool, body=BODY, envelope=None):
    writer = spool.new_message()
    writer.write(body)
    return writer.commit_sync(envelope or make_envelope())


def capture_log(spool):
    events = []
    spool.log = Logger(observer=events.append)
    return events


def log_text(events):
    return "\n".join(formatEvent(event) for event in events)


# -- layout and interfaces ----------------------------------------------------

def test_start_creates_private_layout(spool):
    for name in ("", "tmp", "active", "hold", "corrupt"):
        mode = os.stat(os.path.join(spool.path, name)).st_mode
        assert stat.S_ISDIR(mode)
        assert stat.S_IMODE(mode) & 0o077 == 0


def test_spool_and_writer_provide_the_interfaces(spool):
    assert verifyObject(IMessageQueue, spool)
    writer = spool.new_message()
    assert verifyObject(IMessageWriter, writer)
    writer.abort()


def test_has_room_keeps_min_free_beyond_the_declared_size(tmp_path):
    # The real figure for the file system tmp_path is on (its exact value
    # moves as others write; the margins here are half of it).
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    spool = Spool(str(tmp_path), min_free=free // 2)
    assert spool.has_room(0)
    assert not spool.has_room(free)
    assert not Spool(str(tmp_path), min_free=2 * free).has_room(0)
    assert Spool(str(tmp_path), min_free=0).has_room(100 * free)
    from relaymail.queue.intake import NotifyingQueue
    assert verifyObject(IMessageQueue, NotifyingQueue(spool, None))
    assert not NotifyingQueue(spool, None).has_room(free)


def test_recover_before_start_creates_the_layout(tmp_path):
    spool = Spool(str(tmp_path / "new" / "spool"))
    assert spool.recover() == []
    assert listing(spool, "") == ["active", "corrupt", "hold", "tmp"]


def test_as_a_service_it_recovers_on_start_and_stops(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    leftover = os.path.join(spool.path, "tmp", new_queue_id() + ".msg")
    open(leftover, "wb").close()
    capture_log(spool)
    spool.startService()
    assert spool.running and not os.path.exists(leftover)
    spool.new_message().abort()
    stopped = []
    spool.stopService().addCallback(stopped.append)
    assert stopped and not spool.running
    with pytest.raises(RuntimeError):
        spool.new_message()


def test_new_message_before_start_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        Spool(str(tmp_path)).new_message()


# -- writing ----------------------------------------------------------------------

def test_queue_id_is_known_and_file_open_before_the_body(spool):
    writer = spool.new_message()
    assert is_queue_id(writer.queue_id)
    assert listing(spool, "tmp") == [writer.queue_id + ".msg"]
    writer.abort()


def test_commit_writes_body_and_record_exactly(spool):
    writer = spool.new_message()
    writer.write(BODY[:10])
    writer.write(BODY[10:])
    before = time.time()
    queue_id = writer.commit_sync(make_envelope())

    assert queue_id == writer.queue_id
    # One file: the message, its record, the trailer saying where it is.
    assert listing(spool, "active") == [queue_id + ".msg"]
    assert listing(spool, "tmp") == []
    with open(spool.message_path(queue_id), "rb") as file:
        data = file.read()
    message, line, trailer = queue_files.parts(spool.message_path(queue_id))
    assert message == BODY
    record = json.loads(line)
    assert line == records.encode(record)
    assert trailer == b"#relaymail-record %016x %08x\n" % (len(BODY), zlib.crc32(line))
    assert len(trailer) == 44
    assert data == BODY + line + trailer
    assert record["version"] == 1
    assert record["id"] == queue_id
    assert record["size"] == len(BODY)
    assert record["attempts"] == 0
    assert record["last_error"] is None
    assert before <= record["created_at"] == record["next_attempt_at"] <= time.time()
    assert record["recipients"] == [
        {"address": address, "status": "pending", "attempts": 0,
         "last_error": None, "updated_at": None}
        for address in ("bob@example.com", "carol@example.com")]


def test_record_round_trips_the_envelope(spool):
    envelope = make_envelope(sender="", recipients=["jos\u00e9@b\u00fccher.example"],
                             body="8BITMIME", smtputf8=True,
                             authenticated_user="alice")
    queue_id = queue_sync(spool, envelope=envelope)
    assert Envelope.from_dict(spool.load(queue_id)["envelope"]) == envelope


def test_record_file_is_ascii_json(spool):
    queue_id = queue_sync(spool, envelope=make_envelope(
        recipients=["jos\u00e9@example.com"]))
    _, data, trailer = queue_files.parts(spool.message_path(queue_id))
    assert data.isascii() and trailer.isascii()
    assert json.loads(data)["recipients"][0]["address"] == "jos\u00e9@example.com"


def test_abort_leaves_nothing(spool):
    writer = spool.new_message()
    writer.write(BODY)
    writer.abort()
    writer.abort()
    for directory in ("tmp", "active", "corrupt"):
        assert listing(spool, directory) == []


def test_write_after_abort_is_refused(spool):
    writer = spool.new_message()
    writer.abort()
    with pytest.raises(RuntimeError):
        writer.write(b"late\r\n")


def test_abort_after_commit_keeps_the_message(spool):
    writer = spool.new_message()
    writer.write(BODY)
    queue_id = writer.commit_sync(make_envelope())
    writer.abort()
    assert list(spool.ids()) == [queue_id]


def test_commit_twice_is_refused(spool):
    writer = spool.new_message()
    writer.commit_sync(make_envelope())
    with pytest.raises(RuntimeError):
        writer.commit_sync(make_envelope())


def test_envelope_json_cannot_hold_fails_and_leaves_nothing(spool):
    writer = spool.new_message()
    writer.write(BODY)
    with pytest.raises(TypeError):
        writer.commit_sync(make_envelope(received_at=object()))
    assert listing(spool, "tmp") == listing(spool, "active") == []


class FaultInjector:
    """Makes the ``n``-th call of ``os.<name>`` fail with EIO."""

    def __init__(self, monkeypatch, name, n):
        self.real = getattr(os, name)
        self.name, self.n, self.calls = name, n, 0
        monkeypatch.setattr(os, name, self)

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, f"injected {self.name} failure")
        return self.real(*args)


# A commit calls fsync on the queue file, renames it, and fsyncs active/.
@pytest.mark.parametrize("name, n", [("fsync", 1), ("fsync", 2), ("rename", 1)])
def test_commit_failure_at_any_step_leaves_nothing(spool, monkeypatch, name, n):
    queue_sync(spool)        # an earlier message must survive
    kept = listing(spool, "active")
    events = capture_log(spool)
    writer = spool.new_message()
    writer.write(BODY)
    FaultInjector(monkeypatch, name, n)
    with pytest.raises(OSError) as raised:
        writer.commit_sync(make_envelope())
    monkeypatch.undo()
    assert raised.value.errno == errno.EIO
    assert listing(spool, "active") == kept
    assert listing(spool, "tmp") == []
    assert writer.queue_id in log_text(events)


# -- recovery ------------------------------------------------------------------------

def active_file(spool, queue_id, suffix):
    return os.path.join(spool.path, "active", queue_id + suffix)


def rewrite_record(spool, queue_id, change):
    """Change the record in force and put it beside the queue file, where
    it supersedes the one inside (as a delivery attempt's update does)."""
    queue_files.change_record(os.path.join(spool.path, "active"), queue_id, change)


def spoil_entries(spool):
    """Queue messages and break all but one; return the good id and, for
    each broken id, the words its log line must contain and the names it
    must have in corrupt/."""
    good = queue_sync(spool)
    broken = {}

    def spoil(words, how):
        queue_id = queue_sync(spool)
        how(queue_id)
        names = sorted(name for name in listing(spool, "active") if name.startswith(queue_id))
        broken[queue_id] = words, names

    def truncate(queue_id):
        # Cut into the message, trailer and all: then it has no record.
        os.truncate(active_file(spool, queue_id, ".msg"), len(BODY) - 1)

    def truncate_below_a_record_beside(queue_id):
        rewrite_record(spool, queue_id, lambda record: None)
        os.truncate(active_file(spool, queue_id, ".msg"), len(BODY) - 1)

    def flip_a_byte_of_the_record_inside(queue_id):
        path = active_file(spool, queue_id, ".msg")
        with open(path, "r+b") as file:
            file.seek(len(BODY) + 20)
            byte = file.read(1)
            file.seek(len(BODY) + 20)
            file.write(bytes([byte[0] ^ 0x01]))

    def garble(queue_id):
        queue_files.write_record_beside(os.path.join(spool.path, "active"), queue_id,
                                        b'{"version": 1, "id": ')

    spoil("no record", truncate)
    spoil("truncated", truncate_below_a_record_beside)
    spoil("no record", flip_a_byte_of_the_record_inside)
    spoil("JSON", garble)
    spoil("version", lambda queue_id: rewrite_record(
        spool, queue_id, lambda record: record.update(version=2)))
    spoil("missing keys: size", lambda queue_id: rewrite_record(
        spool, queue_id, lambda record: record.pop("size")))
    spoil("size", lambda queue_id: rewrite_record(
        spool, queue_id, lambda record: record.update(size="many")))
    return good, broken


def test_recover_quarantines_entries_it_cannot_trust(spool):
    good, broken = spoil_entries(spool)
    restarted = Spool(spool.path)
    events = capture_log(restarted)

    assert restarted.recover() == [good]

    assert list(restarted.ids()) == [good]
    assert listing(spool, "active") == [good + ".msg"]
    expected = []
    for queue_id, (words, names) in broken.items():
        expected += names
        line = [formatEvent(event) for event in events
                if event.get("queue_id") == queue_id]
        assert len(line) == 1 and words in line[0], (words, line)
    assert listing(spool, "corrupt") == sorted(expected)


def counting_syncs(spool, fail=None):
    """Count the directory syncs of ``spool`` by directory name; the sync
    of the directory named ``fail`` raises EIO."""
    counts = collections.Counter()
    for name in ("active", "hold", "corrupt"):
        group = getattr(spool, f"_{name}_sync")

        def sync(name=name, real=group.sync):
            counts[name] += 1
            if name == fail:
                raise OSError(errno.EIO, "injected sync failure")
            return real()
        group.sync = sync
    return counts


def test_recover_sets_aside_many_entries_with_two_syncs_in_all(spool):
    # A sync each used to be two each: seconds at start after a disk that
    # truncated a thousand messages.
    good, broken = spoil_entries(spool)
    restarted = Spool(spool.path)
    capture_log(restarted)
    counts = counting_syncs(restarted)
    assert restarted.recover() == [good]
    assert counts == {"active": 1, "corrupt": 1}
    assert listing(spool, "corrupt") == sorted(sum((names for _, names in broken.values()), []))


def test_a_failed_sync_while_setting_aside_leaves_only_lone_records(spool):
    # The queue files must be gone from active/ on disk before their
    # records move: if that sync fails, the records stay where they are,
    # lone records the next start removes, and the message files are
    # in corrupt/.
    good, broken = spoil_entries(spool)
    beside = {queue_id for queue_id, (_, names) in broken.items() if queue_id + ".json" in names}
    assert beside
    restarted = Spool(spool.path)
    events = capture_log(restarted)
    counting_syncs(restarted, fail="active")
    assert restarted.recover() == [good]
    assert listing(spool, "active") == sorted([good + ".msg"] + [q + ".json" for q in beside])
    assert all(f"Could not move {queue_id}.json to {spool.path}/corrupt" in log_text(events)
               for queue_id in beside)
    again, good_again, _ = restart(spool)
    assert good_again == [good] and listing(spool, "active") == [good + ".msg"]
    assert listing(spool, "corrupt") == sorted(
        name for _, names in broken.values() for name in names if not name.endswith(".json")
        or name[:-5] not in beside)


def test_recover_removes_unfinished_files_and_records_without_a_message(spool):
    good = queue_sync(spool)
    # What a removal a crash cut leaves: the queue file went first.
    orphan = new_queue_id()
    queue_files.write_record_beside(os.path.join(spool.path, "active"), orphan,
                                    spool.load(good) | {"id": orphan})
    for name in (new_queue_id() + ".msg", new_queue_id() + ".json", "junk"):
        with open(os.path.join(spool.path, "tmp", name), "wb") as file:
            file.write(b"partial")
    restarted = Spool(spool.path)
    events = capture_log(restarted)

    assert restarted.recover() == [good]
    assert listing(spool, "tmp") == []
    assert listing(spool, "active") == [good + ".msg"]
    assert listing(spool, "corrupt") == []
    assert (f"Removing {orphan}.json from {spool.path}/active: its message is not there"
            in log_text(events))


def test_a_spool_of_the_two_file_format_is_read_and_a_lone_message_set_aside(spool):
    # The version before the queue file kept ID.msg (the message alone) and
    # ID.json; a crash between its two renames left an ID.msg alone.
    active = os.path.join(spool.path, "active")
    old = queue_sync(spool)
    record = spool.load(old)
    queue_files.to_old_format(active, old)
    assert listing(spool, "active") == [old + ".json", old + ".msg"]
    lone = new_queue_id()
    with open(active_file(spool, lone, ".msg"), "wb") as file:
        file.write(BODY)
    restarted = Spool(spool.path)
    events = capture_log(restarted)

    assert restarted.recover() == [old]
    assert restarted.load(old) == record
    with queue_file.open_message(restarted.message_path(old)) as file:
        assert (file.size, file.read()) == (len(BODY), BODY)
    assert listing(spool, "corrupt") == [lone + ".msg"]
    assert "no record" in log_text(events)


@pytest.mark.parametrize("start", ["recover", "prepare_for_writers"])
def test_start_removes_the_spare_files_an_earlier_version_left(spool, start):
    # That version renamed delivered messages' files into spare/ as PID.N.
    spare = os.path.join(spool.path, "spare")
    os.mkdir(spare)
    for name in ("4242.0", "4242.1"):
        with open(os.path.join(spare, name), "wb") as file:
            file.write(b"Subject: an old message\r\n")
    restarted = Spool(spool.path)
    events = capture_log(restarted)

    getattr(restarted, start)()
    assert not os.path.lexists(spare)
    assert f"Removed {spare} and its 2 files: this version does not use it" in log_text(events)
    assert listing(spool, "active") == [] and listing(spool, "corrupt") == []


def test_recover_leaves_unexpected_names_alone(spool):
    stray = os.path.join(spool.path, "active", "README")
    open(stray, "w").close()
    events = capture_log(spool)
    assert spool.recover() == []
    assert os.path.exists(stray)
    assert "README" in log_text(events)


def test_recover_never_raises_for_an_unreadable_record(spool):
    queue_id = queue_sync(spool)
    os.mkdir(active_file(spool, queue_id, ".json"))     # unreadable even as root
    events = capture_log(spool)
    assert spool.recover() == []
    assert "record unreadable" in log_text(events)
    assert listing(spool, "corrupt") == both_files(queue_id)


def test_recover_refuses_while_a_message_is_being_written(spool):
    writer = spool.new_message()
    with pytest.raises(RuntimeError):
        spool.recover()
    writer.abort()
    assert spool.recover() == []


# -- reading and changing --------------------------------------------------------

def test_ids_lists_only_committed_messages(spool):
    committed = sorted(queue_sync(spool) for _ in range(3))
    unfinished = spool.new_message()
    unfinished.write(BODY)
    # A record whose queue file is gone (a removal a crash cut).
    queue_files.write_record_beside(os.path.join(spool.path, "active"), new_queue_id(), b"{}")
    assert sorted(spool.ids()) == committed
    unfinished.abort()


def test_update_replaces_the_record(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    record["recipients"][0].update(status=records.SENT, attempts=1,
                                   updated_at=1767225700.0)
    record["attempts"] = 1
    spool.update(queue_id, record)
    assert spool.load(queue_id) == record
    assert listing(spool, "tmp") == []


def test_update_refuses_a_record_recover_would_quarantine(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    del record["recipients"]
    with pytest.raises(records.CorruptRecord):
        spool.update(queue_id, record)
    assert "recipients" in spool.load(queue_id)


def test_update_of_a_removed_message_does_not_bring_it_back(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    assert spool.remove(queue_id) is True
    with pytest.raises(FileNotFoundError):
        spool.update(queue_id, record)
    assert listing(spool, "active") == listing(spool, "tmp") == []


def test_update_puts_the_record_beside_the_queue_file_and_leaves_that_as_it_was(spool):
    queue_id = queue_sync(spool)
    path = spool.message_path(queue_id)
    with open(path, "rb") as file:
        before = file.read()
    record = spool.load(queue_id)
    record["attempts"] = 1
    spool.update(queue_id, record)
    assert listing(spool, "active") == [queue_id + ".json", queue_id + ".msg"]
    with open(active_file(spool, queue_id, ".json"), "rb") as file:
        assert file.read() == records.encode(record)
    with open(path, "rb") as file:
        assert file.read() == before
    assert spool.load(queue_id) == record


def test_remove_deletes_the_queue_file_and_the_record_beside_it(spool):
    queue_id = queue_sync(spool)
    spool.update(queue_id, spool.load(queue_id) | {"attempts": 1})
    assert spool.remove(queue_id) is True
    assert spool.remove(queue_id) is False
    assert listing(spool, "active") == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "0" * 15, "0" * 15 + "u", ""])
def test_helpers_refuse_what_is_not_a_queue_id(spool, bad):
    for helper in (spool.load, spool.message_path, spool.remove):
        with pytest.raises(ValueError):
            helper(bad)


# -- queue ids ----------------------------------------------------------------------

def test_queue_ids_are_unique_and_sort_by_creation():
    made = [new_queue_id() for _ in range(10_000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(len(queue_id) == 16 and set(queue_id) <= set(ALPHABET)
               for queue_id in made)


def test_queue_ids_from_later_sort_later():
    first = new_queue_id()
    time.sleep(0.002)
    assert new_queue_id() > first


def test_queue_ids_from_threads_are_unique():
    made = []

    def make():
        made.extend(new_queue_id() for _ in range(1_000))

    workers = [threading.Thread(target=make) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(set(made)) == 4_000


# -- group commit ---------------------------------------------------------------------

class BlockingFsync:
    """A directory fsync that waits to be let go, one gate per call."""

    def __init__(self, fail_on=()):
        self.started = [threading.Event() for _ in range(5)]
        self.release = [threading.Event() for _ in range(5)]
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, path):
        number = self.calls
        self.calls += 1
        self.started[number].set()
        assert self.release[number].wait(5)
        if number in self.fail_on:
            raise OSError(errno.EIO, "injected")


def run_in_thread(function):
    outcome = {}

    def run():
        try:
            function()
            outcome["returned"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_until(condition):
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def start_batch(fake):
    """One sync running and two more callers waiting behind it."""
    syncer = GroupSync("unused", fsync=fake)
    first = run_in_thread(syncer.sync)
    assert fake.started[0].wait(5)
    later = [run_in_thread(syncer.sync) for _ in range(2)]
    wait_until(lambda: syncer.waiting == 2)
    return syncer, first, later


def test_callers_during_a_sync_wait_for_the_next_one_and_share_it():
    fake = BlockingFsync()
    syncer, first, later = start_batch(fake)
    fake.release[0].set()
    first[0].join(5)
    assert first[1] == {"returned": True}
    # Their renames may have missed the first fsync: they must still wait.
    assert fake.started[1].wait(5)
    assert not any(outcome for _, outcome in later)
    fake.release[1].set()
    for thread, outcome in later:
        thread.join(5)
        assert outcome == {"returned": True}
    assert syncer.count == fake.calls == 2


def test_a_failed_shared_sync_fails_every_caller_relying_on_it():
    fake = BlockingFsync(fail_on={1})
    syncer, first, later = start_batch(fake)
    fake.release[0].set()
    fake.release[1].set()
    for thread, outcome in [first] + later:
        thread.join(5)
    assert first[1] == {"returned": True}
    for _, outcome in later:
        assert outcome["error"].errno == errno.EIO


# -- the Deferred path, with the reactor running (trial) ----------------------------

class DeferredCommitTests(unittest.TestCase):
    """commit() through the spool's own thread pool."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.spool = Spool(os.path.join(directory, "spool"))
        self.spool.start()
        self.addCleanup(self.spool.stop)

    def begin(self):
        writer = self.spool.new_message()
        writer.write(BODY)
        return writer

    @defer.inlineCallbacks
    def test_commit_fires_with_the_queue_id(self):
        writer = self.begin()
        queue_id = yield writer.commit(make_envelope())
        self.assertEqual(queue_id, writer.queue_id)
        self.assertEqual(list(self.spool.ids()), [queue_id])
        self.assertEqual(self.spool.load(queue_id)["size"], len(BODY))

    @defer.inlineCallbacks
    def test_remove_soon_unlinks_both_files_in_the_spools_own_thread(self):
        queue_ids = yield defer.gatherResults(
            [self.begin().commit(make_envelope()) for _ in range(20)])
        unlinked_in = set()
        real_unlink = os.unlink

        def watched_unlink(path, *args, **kwargs):
            unlinked_in.add(threading.current_thread().name)
            return real_unlink(path, *args, **kwargs)
        self.patch(os, "unlink", watched_unlink)
        removed = yield defer.gatherResults([self.spool.remove_soon(q) for q in queue_ids])
        self.assertEqual(removed, [True] * 20)
        self.assertEqual(listing(self.spool, "active"), [])
        # Never the reactor's thread, which every session shares.
        self.assertEqual(unlinked_in, {"relaymail-unlink"})
        self.assertEqual((yield self.spool.remove_soon(queue_ids[0])), False)

    @defer.inlineCallbacks
    def test_the_removals_of_one_reactor_turn_reach_the_thread_as_one_batch(self):
        queue_ids = yield defer.gatherResults(
            [self.begin().commit(make_envelope()) for _ in range(3)])
        yield self.spool.stop()
        batches = []
        remove_batch = self.spool._remove_batch

        def recorded(ids):
            batches.append(list(ids))
            return remove_batch(ids)
        # Before start(), which hands it to the unlink thread.
        self.spool._remove_batch = recorded
        self.spool.start()
        removals = []
        for queue_id in queue_ids:
            removals.append(self.spool.remove_soon(queue_id))
            # The reactor thread lets the GIL go between two deliveries'
            # replies (a sendto, a read): time for the thread to take a
            # removal handed over at once on its own.
            time.sleep(0.02)
        self.assertEqual(batches, [])
        removed = yield defer.gatherResults(removals)
        self.assertEqual(removed, [True] * 3)
        self.assertEqual(batches, [queue_ids])
        self.assertEqual(listing(self.spool, "active"), [])

    @defer.inlineCallbacks
    def test_stop_waits_for_the_removals_asked_for(self):
        queue_id = yield self.begin().commit(make_envelope())
        removal = self.spool.remove_soon(queue_id)
        yield self.spool.stop()
        self.assertTrue(removal.called)
        self.assertEqual(listing(self.spool, "active"), [])
        self.spool.start()

    @defer.inlineCallbacks
    def test_fifty_concurrent_commits_all_land(self):
        writers = [self.begin() for _ in range(50)]
        landed = yield defer.gatherResults(
            [writer.commit(make_envelope()) for writer in writers])
        self.assertEqual(sorted(landed), sorted(w.queue_id for w in writers))
        self.assertEqual(sorted(self.spool.ids()), sorted(landed))
        self.assertEqual(listing(self.spool, "tmp"), [])
        for queue_id in landed:
            self.assertEqual(
                queue_files.message_of(os.path.join(self.spool.path, "active"), queue_id), BODY)

    @defer.inlineCallbacks
    def test_failed_commit_fails_the_deferred_and_leaves_nothing(self):
        capture_log(self.spool)
        real_fsync = os.fsync

        def failing_for_directories(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOSPC, "injected")
            return real_fsync(fd)

        self.patch(os, "fsync", failing_for_directories)
        with self.assertRaises(OSError):
            yield self.begin().commit(make_envelope())
        self.assertEqual(listing(self.spool, "active"), [])
        self.assertEqual(listing(self.spool, "tmp"), [])

    @defer.inlineCallbacks
    def test_failed_sync_fails_the_whole_batch_and_leaves_nothing(self):
        capture_log(self.spool)
        from relaymail.queue import spool as spool_module

        def failing(directory, paths):
            raise OSError(errno.EIO, "injected write-back error")
        self.patch(spool_module, "sync_files", failing)
        results = yield defer.DeferredList(
            [self.begin().commit(make_envelope()) for _ in range(5)], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [False] * 5)
        self.assertTrue(all(r.check(OSError) for _, r in results))
        self.assertEqual(listing(self.spool, "active"), [])
        self.assertEqual(listing(self.spool, "tmp"), [])

    @defer.inlineCallbacks
    def test_a_failed_rename_fails_only_its_own_message(self):
        capture_log(self.spool)
        writers = [self.begin() for _ in range(4)]
        victim = writers[2].queue_id
        real_rename = os.rename

        def rename(source, destination):
            if victim in source:
                raise OSError(errno.ENOSPC, "injected")
            return real_rename(source, destination)
        self.patch(os, "rename", rename)
        results = yield defer.DeferredList(
            [writer.commit(make_envelope()) for writer in writers], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertEqual(sorted(self.spool.ids()),
                         sorted(w.queue_id for w in writers if w.queue_id != victim))
        self.assertEqual(listing(self.spool, "tmp"), [])
        self.assertFalse(any(name.startswith(victim) for name in listing(self.spool, "active")))

    @defer.inlineCallbacks
    def test_stop_waits_for_commits_in_flight(self):
        committed = self.begin().commit(make_envelope())
        yield self.spool.stop()
        self.assertEqual(len(list(self.spool.ids())), 1)
        queue_id = yield committed
        self.assertEqual(list(self.spool.ids()), [queue_id])

    @defer.inlineCallbacks
    def test_commit_after_stop_fails_and_abort_cleans_up(self):
        writer = self.begin()
        yield self.spool.stop()
        with self.assertRaises(RuntimeError):
            yield writer.commit(make_envelope())
        writer.abort()
        self.assertEqual(listing(self.spool, "tmp"), [])

    @defer.inlineCallbacks
    def test_update_in_thread(self):
        queue_id = yield self.begin().commit(make_envelope())
        record = self.spool.load(queue_id)
        record["next_attempt_at"] += 300
        yield self.spool.update_in_thread(queue_id, record)
        self.assertEqual(self.spool.load(queue_id), record)


# -- hold, release and administration -------------------------------------------------

def held_file(spool, queue_id, suffix):
    return os.path.join(spool.path, "hold", queue_id + suffix)


def both_files(queue_id):
    return [queue_id + ".json", queue_id + ".msg"]


def queue_with_record_beside(spool):
    """A message retried once: its record beside the queue file."""
    queue_id = queue_sync(spool)
    spool.update(queue_id, spool.load(queue_id) | {"attempts": 1})
    return queue_id


@pytest.mark.parametrize("retried", [False, True])
def test_hold_moves_the_message_out_of_delivery_s_sight(spool, retried):
    queue_id = queue_with_record_beside(spool) if retried else queue_sync(spool)
    record = spool.load(queue_id)
    names = listing(spool, "active")

    assert spool.hold(queue_id) is True

    assert listing(spool, "active") == []
    assert listing(spool, "hold") == names
    assert listing(spool, "tmp") == []
    assert list(spool.ids()) == [] and list(spool.held_ids()) == [queue_id]
    assert spool.load_any(queue_id) == (record, "hold")
    assert queue_files.message_of(os.path.join(spool.path, "hold"), queue_id) == BODY


def test_hold_of_a_held_message_is_true_and_of_none_false(spool):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    assert spool.hold(queue_id) is True
    assert spool.hold(new_queue_id()) is False
    assert listing(spool, "hold") == [queue_id + ".msg"]


def test_hold_drops_a_record_a_cut_move_left_in_hold(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    queue_files.write_record_beside(os.path.join(spool.path, "hold"), queue_id,
                                    record | {"attempts": 5})
    assert spool.hold(queue_id) is True
    assert listing(spool, "hold") == [queue_id + ".msg"]
    assert spool.load_any(queue_id) == (record, "hold")


def test_release_brings_it_back_due_now(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    spool.hold(queue_id)

    assert spool.release(queue_id, now=1767230000.0) is True

    assert listing(spool, "hold") == listing(spool, "tmp") == []
    assert listing(spool, "active") == both_files(queue_id)
    record["next_attempt_at"] = 1767230000.0
    assert spool.load_any(queue_id) == (record, "active")
    assert queue_files.message_of(os.path.join(spool.path, "active"), queue_id) == BODY


def test_release_of_an_active_message_is_true_and_of_none_false(spool):
    queue_id = queue_sync(spool)
    before = spool.load(queue_id)
    assert spool.release(queue_id) is True
    assert spool.load(queue_id) == before
    assert spool.release(new_queue_id()) is False


def test_release_uses_the_spool_clock_by_default(spool):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    spool._now = lambda: 1767240000.0
    spool.release(queue_id)
    assert spool.load(queue_id)["next_attempt_at"] == 1767240000.0


def test_release_of_a_bad_held_record_raises_and_keeps_it_held(spool):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    with open(held_file(spool, queue_id, ".json"), "wb") as file:
        file.write(b"{")
    with pytest.raises(records.CorruptRecord):
        spool.release(queue_id)
    assert listing(spool, "hold") == both_files(queue_id)
    assert listing(spool, "active") == []


def test_make_due_sets_next_attempt_at(spool):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    record["next_attempt_at"] = 1767300000.0
    spool.update(queue_id, record)

    assert spool.make_due(queue_id, 1767290000.0) is True
    assert spool.load(queue_id)["next_attempt_at"] == 1767290000.0
    assert listing(spool, "tmp") == []


def test_make_due_leaves_a_due_message_alone(spool):
    queue_id = queue_sync(spool)
    path = active_file(spool, queue_id, ".msg")
    inode = os.stat(path).st_ino
    assert spool.make_due(queue_id, time.time() + 60) is True
    # Not rewritten: a flush of a big queue costs nothing for these.
    assert os.stat(path).st_ino == inode
    assert listing(spool, "active") == [queue_id + ".msg"]


def test_make_due_is_false_for_a_held_or_missing_message(spool):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    assert spool.make_due(queue_id, time.time()) is False
    assert spool.make_due(new_queue_id(), time.time()) is False
    assert listing(spool, "active") == []


def test_delete_removes_a_message_wherever_it_is(spool):
    active, held = queue_sync(spool), queue_sync(spool)
    spool.hold(held)
    assert spool.delete(active) is True
    assert spool.delete(held) is True
    assert spool.delete(held) is False
    for directory in ("active", "hold", "tmp"):
        assert listing(spool, directory) == []


def test_delete_all_counts_each_message_once(spool):
    queued = [queue_sync(spool), queue_with_record_beside(spool), queue_sync(spool)]
    spool.hold(queued[0])
    # Left in both by an interrupted move: still one message.
    os.link(active_file(spool, queued[1], ".msg"), held_file(spool, queued[1], ".msg"))
    os.link(active_file(spool, queued[1], ".json"), held_file(spool, queued[1], ".json"))
    assert spool.delete_all() == 3
    assert listing(spool, "active") == listing(spool, "hold") == []
    assert spool.delete_all() == 0


def test_load_any_of_a_missing_message_raises(spool):
    with pytest.raises(FileNotFoundError):
        spool.load_any(new_queue_id())


@pytest.mark.parametrize("bad", ["../../etc/passwd", "0" * 15, ""])
def test_administration_refuses_what_is_not_a_queue_id(spool, bad):
    for helper in (spool.hold, spool.release, spool.delete, spool.load_any,
                   lambda queue_id: spool.make_due(queue_id, 0.0),
                   lambda queue_id: spool.read_record(queue_id, "hold")):
        with pytest.raises(ValueError):
            helper(bad)


def test_a_new_message_never_takes_the_id_of_a_held_one(spool, monkeypatch):
    from relaymail.queue import spool as spool_module
    held = queue_sync(spool)
    spool.hold(held)
    fresh = new_queue_id()
    monkeypatch.setattr(spool_module, "new_queue_id", iter([held, fresh]).__next__)
    writer = spool.new_message()
    assert writer.queue_id == fresh
    writer.abort()


@pytest.mark.parametrize("n", [1, 2])
def test_hold_failing_half_way_leaves_the_message_active(spool, monkeypatch, n):
    queue_id = queue_with_record_beside(spool)
    capture_log(spool)
    FaultInjector(monkeypatch, "link", n)
    with pytest.raises(OSError):
        spool.hold(queue_id)
    monkeypatch.undo()
    assert listing(spool, "active") == both_files(queue_id)
    assert listing(spool, "hold") == listing(spool, "tmp") == []


def test_a_failed_undo_after_a_failed_move_logs_and_keeps_the_first_error(spool, monkeypatch):
    # The error the caller sees is the one that stopped the move, not the
    # clean-up's after it.
    queue_id = queue_with_record_beside(spool)
    events = capture_log(spool)
    FaultInjector(monkeypatch, "link", 2)

    def cannot_remove(directory, queue_ids, raise_errors=False):
        raise OSError(errno.EROFS, "injected clean-up failure")
    monkeypatch.setattr(spool, "_remove_entries", cannot_remove)
    with pytest.raises(OSError, match="injected link failure"):
        spool.hold(queue_id)
    monkeypatch.undo()
    assert f"Could not remove the copy of {queue_id} in {spool.path}/hold" in log_text(events)
    assert listing(spool, "active") == both_files(queue_id)
    # What is left in hold/ (the record) is a lone record recover() removes.
    restarted, good, _ = restart(spool)
    assert good == [queue_id] and listing(spool, "hold") == []


# The new record's fsync; active/'s, once record and file are there.
@pytest.mark.parametrize("n", [1, 2])
def test_release_failing_half_way_leaves_the_message_held(spool, monkeypatch, n):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    capture_log(spool)
    FaultInjector(monkeypatch, "fsync", n)
    with pytest.raises(OSError):
        spool.release(queue_id)
    monkeypatch.undo()
    assert listing(spool, "hold") == [queue_id + ".msg"]
    assert listing(spool, "active") == listing(spool, "tmp") == []


# -- crashes in the middle of a move: do the first steps by hand, then recover() --

def link(spool, queue_id, suffix, source, target):
    os.link(os.path.join(spool.path, source, queue_id + suffix),
            os.path.join(spool.path, target, queue_id + suffix))


def crash_during_hold(spool, queue_id, steps):
    """Do the first ``steps`` steps of Spool.hold by hand, for a message
    with a record beside its queue file."""
    if steps >= 1:
        link(spool, queue_id, ".json", "active", "hold")
    if steps >= 2:
        link(spool, queue_id, ".msg", "active", "hold")
    if steps >= 3:
        os.unlink(active_file(spool, queue_id, ".msg"))


def crash_during_release(spool, queue_id, steps, due):
    """Do the first ``steps`` steps of Spool.release by hand."""
    if steps >= 1:
        record = spool.read_record(queue_id, "hold")
        record["next_attempt_at"] = due
        with open(active_file(spool, queue_id, ".json"), "wb") as file:
            file.write(records.encode(record))
    if steps >= 2:
        link(spool, queue_id, ".msg", "hold", "active")
    if steps >= 3:
        os.unlink(held_file(spool, queue_id, ".msg"))


def restart(spool):
    restarted = Spool(spool.path)
    events = capture_log(restarted)
    return restarted, restarted.recover(), events


# After steps 1 and 2 the hold is undone; after step 3 it is done.
@pytest.mark.parametrize("steps, held", [(1, False), (2, False), (3, True)])
def test_recover_after_a_crash_during_hold(spool, steps, held):
    queue_id = queue_with_record_beside(spool)
    record = spool.load(queue_id)
    crash_during_hold(spool, queue_id, steps)

    restarted, good, _ = restart(spool)

    where = "hold" if held else "active"
    other = "active" if held else "hold"
    assert good == ([] if held else [queue_id])
    assert list(restarted.held_ids()) == ([queue_id] if held else [])
    assert listing(spool, where) == both_files(queue_id)
    assert listing(spool, other) == listing(spool, "corrupt") == []
    assert restarted.load_any(queue_id) == (record, where)


# After step 1 the message stays held; after steps 2 and 3 it is released.
@pytest.mark.parametrize("steps, released", [(1, False), (2, True), (3, True)])
def test_recover_after_a_crash_during_release(spool, steps, released):
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    spool.hold(queue_id)
    crash_during_release(spool, queue_id, steps, due=1767250000.0)

    restarted, good, _ = restart(spool)

    where = "active" if released else "hold"
    other = "hold" if released else "active"
    assert good == ([queue_id] if released else [])
    # A release writes a record beside; a hold of a fresh message has none.
    assert listing(spool, where) == (both_files(queue_id) if released else [queue_id + ".msg"])
    assert listing(spool, other) == listing(spool, "corrupt") == []
    if released:
        record["next_attempt_at"] = 1767250000.0
    assert restarted.load_any(queue_id) == (record, where)


def test_load_any_prefers_active_when_a_move_was_interrupted(spool):
    queue_id = queue_with_record_beside(spool)
    crash_during_hold(spool, queue_id, 2)
    assert spool.load_any(queue_id)[1] == "active"


def test_hold_and_release_finish_after_an_interrupted_move(spool):
    queue_id = queue_with_record_beside(spool)
    crash_during_hold(spool, queue_id, 2)
    # The tool, offline, before any recover(): the moves still come out whole.
    assert spool.release(queue_id) is True
    assert listing(spool, "hold") == []
    crash_during_hold(spool, queue_id, 1)
    assert spool.hold(queue_id) is True
    assert listing(spool, "active") == listing(spool, "tmp") == []
    assert listing(spool, "hold") == both_files(queue_id)


def test_recover_quarantines_bad_held_entries_and_drops_lone_records(spool):
    good, bad, truncated = queue_sync(spool), queue_sync(spool), queue_sync(spool)
    bodiless = queue_with_record_beside(spool)
    for queue_id in (good, bad, truncated, bodiless):
        spool.hold(queue_id)
    with open(held_file(spool, bad, ".json"), "wb") as file:
        file.write(b"not json")
    os.truncate(held_file(spool, truncated, ".msg"), 10)
    os.unlink(held_file(spool, bodiless, ".msg"))

    restarted, active, events = restart(spool)

    assert active == []
    assert list(restarted.held_ids()) == [good]
    assert listing(spool, "hold") == [good + ".msg"]
    assert listing(spool, "corrupt") == sorted(both_files(bad) + [truncated + ".msg"])
    assert "JSON" in log_text(events) and "no record" in log_text(events)
    assert f"Removing {bodiless}.json from {spool.path}/hold" in log_text(events)


def test_recover_keeps_the_held_copy_when_the_active_one_is_bad(spool):
    queue_id = queue_with_record_beside(spool)
    crash_during_hold(spool, queue_id, 2)
    # A copy, not a link, so that spoiling one leaves the other good.
    path = active_file(spool, queue_id, ".json")
    with open(path, "rb") as file:
        data = file.read()
    os.unlink(path)
    with open(path, "wb") as file:
        file.write(data.replace(b'"version":1', b'"version":9'))

    restarted, good, _ = restart(spool)

    assert good == []
    assert list(restarted.held_ids()) == [queue_id]
    assert listing(spool, "corrupt") == both_files(queue_id)


def test_recover_removes_lone_records_in_hold(spool):
    orphan = new_queue_id()
    with open(held_file(spool, orphan, ".json"), "wb") as file:
        file.write(b"{}")
    restarted, _, events = restart(spool)
    assert listing(spool, "hold") == listing(spool, "corrupt") == []
    assert orphan in log_text(events)


# -- reading many records --------------------------------------------------------------

def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def test_read_records_reads_each_in_the_order_asked(spool):
    queued = [queue_sync(spool) for _ in range(300)]    # more than read ahead
    missing = new_queue_id()
    rewrite_record(spool, queued[5], lambda record: record.update(version=7))
    asked = queued[:10] + [missing] + queued[10:]

    results = list(spool.read_records(asked))

    assert [queue_id for queue_id, _, _ in results] == asked
    for queue_id, record, error in results:
        if queue_id == missing:
            assert record is None and isinstance(error, FileNotFoundError)
        elif queue_id == queued[5]:
            assert record is None and isinstance(error, records.CorruptRecord)
        else:
            assert error is None and record == spool.load(queue_id)


def test_read_records_from_hold(spool):
    queue_id = queue_sync(spool)
    spool.hold(queue_id)
    [(_, record, error)] = spool.read_records([queue_id], "hold")
    assert error is None and record["id"] == queue_id


def test_read_records_closes_its_files_when_left_early(spool):
    queued = [queue_sync(spool) for _ in range(50)]
    before = open_descriptors()
    reading = spool.read_records(queued)
    next(reading)
    assert open_descriptors() > before
    reading.close()
    assert open_descriptors() == before


def test_read_records_refuses_what_is_not_a_queue_id(spool):
    with pytest.raises(ValueError):
        list(spool.read_records(["../../etc/passwd"]))


# -- the order of two files' removal -------------------------------------------------

def test_a_message_retried_is_removed_queue_file_first_and_that_on_disk_before_its_record(
        spool, monkeypatch):
    # Without a journal the file system keeps no order between two unlinks:
    # the record beside must not go first, or the queue file would come
    # back after a crash with the record it was committed with.
    retried, fresh = queue_with_record_beside(spool), queue_sync(spool)
    events = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: (events.append(os.path.basename(path)),
                                                    real_unlink(path))[1])
    monkeypatch.setattr(spool._active_sync, "sync", lambda: events.append("sync"))
    assert spool.remove(retried) is True
    assert events == [retried + ".msg", "sync", retried + ".json"]
    del events[:]
    assert spool.remove(fresh) is True
    assert events == [fresh + ".msg"]      # nothing beside it: no sync
    assert listing(spool, "active") == []


def test_a_quarantine_cut_half_way_never_brings_back_the_record_it_was_committed_with(
        spool, monkeypatch):
    queue_id = queue_with_record_beside(spool)
    rewrite_record(spool, queue_id, lambda record: record["recipients"][0].update(
        status="sent") or record.update(version=2))
    real_rename = os.rename

    def rename(source, target):
        if source.endswith(".json"):
            raise OSError(errno.EIO, "injected")
        return real_rename(source, target)
    monkeypatch.setattr(os, "rename", rename)
    events = capture_log(spool)
    # Raised for the scheduler, which looks at what is left again later.
    with pytest.raises(OSError, match="injected"):
        spool.quarantine(queue_id, "bad record: unsupported version 2")
    monkeypatch.undo()
    assert "Could not move" in log_text(events)
    # The queue file is set aside first; what is left is a lone record.
    assert listing(spool, "corrupt") == [queue_id + ".msg"]
    assert listing(spool, "active") == [queue_id + ".json"]
    restarted, good, _ = restart(spool)
    assert good == [] and listing(spool, "active") == []


def test_a_quarantined_message_is_on_disk_in_corrupt_after_its_moves(spool, monkeypatch):
    # Set aside for a person to read: the renames into corrupt/ must
    # survive a power cut like the queue's own, so corrupt/ is synced
    # after both files moved, and only then.
    queue_id = queue_with_record_beside(spool)
    events = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda source, target: (
        events.append(os.path.basename(target)), real_rename(source, target))[1])
    monkeypatch.setattr(spool._active_sync, "sync", lambda: events.append("sync active"))
    monkeypatch.setattr(spool._corrupt_sync, "sync", lambda: events.append("sync corrupt"))
    spool.quarantine(queue_id, "bad record: unsupported version 2")
    assert events == [queue_id + ".msg", "sync active", queue_id + ".json", "sync corrupt"]
    assert listing(spool, "corrupt") == [queue_id + ".json", queue_id + ".msg"]


def test_a_failed_sync_of_corrupt_is_logged_and_the_files_stay_set_aside(spool, monkeypatch):
    queue_id = queue_sync(spool)

    def fail():
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(spool._corrupt_sync, "sync", fail)
    events = capture_log(spool)
    spool.quarantine(queue_id, "bad record: unsupported version 2")
    assert f"Could not sync {spool.path}/corrupt after moving {queue_id} there" in log_text(events)
    assert listing(spool, "corrupt") == [queue_id + ".msg"]
    assert listing(spool, "active") == []


def cut_move_with_a_bad_active_copy(spool):
    """A message whole in hold/ and in active/ (a move a crash cut), the
    active/ copy's record damaged since: the held copy is the good one."""
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    shutil.copyfile(active_file(spool, queue_id, ".msg"),
                    os.path.join(spool.path, "hold", queue_id + ".msg"))
    rewrite_record(spool, queue_id, lambda record: record.update(version=2))
    return queue_id, record


def test_release_of_a_cut_move_keeps_the_good_held_copy_over_a_bad_active_one(spool):
    queue_id, record = cut_move_with_a_bad_active_copy(spool)
    events = capture_log(spool)
    assert spool.release(queue_id, now=record["created_at"]) is True
    # As recover() settles it: the bad copy set aside, the good one released.
    assert listing(spool, "corrupt") == [queue_id + ".json", queue_id + ".msg"]
    assert "bad record" in log_text(events)
    assert listing(spool, "hold") == []
    assert spool.load(queue_id)["envelope"] == record["envelope"]
    assert queue_files.message_of(os.path.join(spool.path, "active"), queue_id) == BODY


def test_hold_of_a_cut_move_keeps_the_good_held_copy_over_a_bad_active_one(spool):
    queue_id, record = cut_move_with_a_bad_active_copy(spool)
    assert spool.hold(queue_id) is True
    assert listing(spool, "corrupt") == [queue_id + ".json", queue_id + ".msg"]
    assert listing(spool, "active") == []
    assert spool.load_any(queue_id) == (record, "hold")


def test_hold_and_release_of_a_cut_move_with_a_good_active_copy_keep_that_one(spool):
    # The other way round, as recover() has it too: the active/ copy wins.
    queue_id, record = cut_move_with_a_bad_active_copy(spool)
    rewrite_record(spool, queue_id, lambda record: record.update(version=1, attempts=3))
    assert spool.release(queue_id) is True
    assert listing(spool, "hold") == [] and listing(spool, "corrupt") == []
    assert spool.load(queue_id)["attempts"] == 3


def test_hold_of_a_cut_move_with_a_good_active_copy_holds_that_one(spool):
    queue_id, record = cut_move_with_a_bad_active_copy(spool)
    rewrite_record(spool, queue_id, lambda record: record.update(version=1, attempts=3))
    assert spool.hold(queue_id) is True
    assert listing(spool, "active") == [] and listing(spool, "corrupt") == []
    assert spool.load_any(queue_id) == (record | {"attempts": 3}, "hold")


@pytest.mark.parametrize("move", ["hold", "release"])
def test_a_cut_move_whose_bad_copy_cannot_be_set_aside_is_left_as_it_is(spool, monkeypatch,
                                                                        move):
    queue_id, _ = cut_move_with_a_bad_active_copy(spool)
    before = {name: listing(spool, name) for name in ("active", "hold")}
    capture_log(spool)
    FaultInjector(monkeypatch, "rename", 1)
    with pytest.raises(OSError, match="injected rename failure"):
        getattr(spool, move)(queue_id)
    monkeypatch.undo()
    assert {name: listing(spool, name) for name in ("active", "hold")} == before
    assert listing(spool, "corrupt") == []


def refuse_removals_in(spool, name, monkeypatch):
    """Make the removal of entries from the spool's directory ``name``
    (``active``, ``hold``) fail with EIO, as a failing disk would."""
    real_remove = spool._remove_entries

    def cannot_remove(directory, *args, **kwargs):
        if directory.endswith(name):
            raise OSError(errno.EIO, "injected unlink failure")
        return real_remove(directory, *args, **kwargs)
    monkeypatch.setattr(spool, "_remove_entries", cannot_remove)


@pytest.mark.parametrize("move", ["hold", "release"])
def test_a_cut_move_whose_held_copy_cannot_be_removed_leaves_it_to_delivery(spool, monkeypatch,
                                                                             move):
    # Both copies good, the active/ one wins; the disk refuses to remove the
    # other.  Delivering the message must take it too: released later, it
    # would be delivered a second time.
    queue_id, _ = cut_move_with_a_bad_active_copy(spool)
    rewrite_record(spool, queue_id, lambda record: record.update(version=1))
    refuse_removals_in(spool, "hold", monkeypatch)
    with pytest.raises(OSError, match="injected unlink failure"):
        getattr(spool, move)(queue_id)
    monkeypatch.undo()
    assert listing(spool, "hold") == [queue_id + ".msg"]
    assert spool.remove(queue_id) is True
    assert listing(spool, "hold") == listing(spool, "active") == []


@pytest.mark.parametrize("removal", ["remove", "_remove_batch"])
def test_a_delivered_message_takes_the_held_copy_a_failed_hold_left(spool, monkeypatch, removal):
    # hold/ synced, then that failed, and so did the undo: a whole copy in
    # hold/ that releasing would deliver a second time.
    queue_id = queue_with_record_beside(spool)
    events = capture_log(spool)

    def fail():
        raise OSError(errno.EIO, "injected sync failure")
    monkeypatch.setattr(spool._hold_sync, "sync", fail)
    real_remove = spool._remove_entries
    monkeypatch.setattr(spool, "_remove_entries", lambda directory, *args, **kwargs: (
        fail() if directory.endswith("hold") else real_remove(directory, *args, **kwargs)))
    with pytest.raises(OSError, match="injected sync failure"):
        spool.hold(queue_id)
    monkeypatch.undo()
    assert listing(spool, "hold") == listing(spool, "active") == both_files(queue_id)
    assert "Could not remove the copy" in log_text(events)
    getattr(spool, removal)(queue_id if removal == "remove" else [queue_id])
    assert listing(spool, "hold") == listing(spool, "active") == []


@pytest.mark.parametrize("move", ["hold", "release"])
def test_a_move_whose_last_removal_fails_leaves_both_copies_to_delivery(spool, monkeypatch, move):
    # The whole copy made, then the disk refused to remove the one it came
    # from: the active/ copy is delivered (as recover() would keep it), and
    # the held one goes with it, never to be released and delivered again.
    queue_id = queue_with_record_beside(spool)
    if move == "release":
        spool.hold(queue_id)
    source = "active" if move == "hold" else "hold"
    refuse_removals_in(spool, source, monkeypatch)
    with pytest.raises(OSError, match="injected unlink failure"):
        getattr(spool, move)(queue_id)
    monkeypatch.undo()
    assert listing(spool, "hold") == listing(spool, "active") == both_files(queue_id)
    spool.remove(queue_id)
    assert listing(spool, "hold") == listing(spool, "active") == []


def test_the_tool_offline_on_a_cut_two_file_hold_keeps_the_only_record(spool):
    # A hold by the two-file format cut after its third step: the message
    # whole in hold/, its bare message file still in active/.  The queue
    # tool works offline, with no recover() first.
    queue_id = queue_sync(spool)
    record = spool.load(queue_id)
    active = os.path.join(spool.path, "active")
    queue_files.to_old_format(active, queue_id)
    for suffix in (".msg", ".json"):
        link(spool, queue_id, suffix, "active", "hold")
    os.unlink(active_file(spool, queue_id, ".json"))

    assert spool.hold(queue_id) is True
    assert listing(spool, "hold") == both_files(queue_id)
    assert spool.load_any(queue_id) == (record, "hold")
    assert spool.release(queue_id, now=1767260000.0) is True
    assert listing(spool, "hold") == []
    assert spool.load(queue_id) == record | {"next_attempt_at": 1767260000.0}
    assert queue_files.message_of(active, queue_id) == BODY


def test_removals_in_one_batch_share_the_sync_between_queue_files_and_records(
        spool, monkeypatch):
    retried = sorted(queue_with_record_beside(spool) for _ in range(3))
    fresh = queue_sync(spool)
    events = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda path: (events.append(os.path.basename(path)),
                                                    real_unlink(path))[1])
    monkeypatch.setattr(spool._active_sync, "sync", lambda: events.append("sync"))
    gone = new_queue_id()
    assert spool._remove_batch(retried + [fresh, gone]) == [True] * 4 + [False]
    assert events == ([q + ".msg" for q in retried] + [fresh + ".msg", gone + ".msg", "sync"]
                      + [q + ".json" for q in retried])
    assert listing(spool, "active") == []


def test_a_quarantine_into_a_missing_corrupt_directory_fails(spool):
    # corrupt/ removed while the relay runs (or a dangling symlink in its
    # place): rename says ENOENT, which must not pass for "nothing to move".
    queue_id = queue_with_record_beside(spool)
    os.rmdir(os.path.join(spool.path, "corrupt"))
    events = capture_log(spool)
    with pytest.raises(FileNotFoundError):
        spool.quarantine(queue_id, "bad record: test")
    assert listing(spool, "active") == both_files(queue_id)
    assert f"Could not move {queue_id}.msg to {spool.path}/corrupt" in log_text(events)


def test_set_aside_copies_never_replace_earlier_ones(spool):
    # corrupt/ keeps what earlier runs set aside for a person to read.
    queue_id = queue_sync(spool)
    corrupt = os.path.join(spool.path, "corrupt")
    for stem in (queue_id, queue_id + "-active"):
        with open(os.path.join(corrupt, stem + ".msg"), "wb") as file:
            file.write(b"EVIDENCE " + stem.encode())
    capture_log(spool)
    spool.quarantine(queue_id, "bad record: test")
    assert listing(spool, "corrupt") == sorted(
        [queue_id + ".msg", queue_id + "-active.msg", queue_id + "-active-2.msg"])
    for stem in (queue_id, queue_id + "-active"):
        with open(os.path.join(corrupt, stem + ".msg"), "rb") as file:
            assert file.read() == b"EVIDENCE " + stem.encode()
    with open(os.path.join(corrupt, queue_id + "-active-2.msg"), "rb") as file:
        assert file.read().startswith(BODY)


def test_recover_keeps_going_when_the_losing_copy_of_a_cut_move_cannot_go(spool, monkeypatch):
    # Complete in active/ and hold/: the hold/ copy is removed at start.  If
    # the disk refuses, recover still returns (it never raises for a file),
    # and delivery takes the held copy with the message.
    queue_id = queue_sync(spool)
    link(spool, queue_id, ".msg", "active", "hold")
    restarted = Spool(spool.path)
    events = capture_log(restarted)
    refuse_removals_in(restarted, "hold", monkeypatch)
    assert restarted.recover() == [queue_id]
    assert f"Could not remove the copy of {queue_id} in {spool.path}/hold" in log_text(events)
    monkeypatch.undo()
    restarted.remove(queue_id)
    assert listing(spool, "active") == listing(spool, "hold") == []
