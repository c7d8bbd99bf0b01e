"""Tests for relaymail.queue.spare: delivered messages' files written again
by new messages, on real files, through the spool's own paths."""

import os
import threading

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from relaymail.queue import layout, spare
from relaymail.queue.spare import SpareFiles

from tests.test_spool import BODY, listing, make_envelope, queue_sync, running_spool, started_spool

LONG_BODY = b"Subject: long\r\n\r\n" + b"0123456789abcdef" * 1000 + b"\r\n"


@pytest.fixture
def spool(tmp_path):
    yield from running_spool(tmp_path)


def inodes_of(spool, queue_id):
    return {os.stat(os.path.join(spool.path, "active", queue_id + suffix)).st_ino
            for suffix in (".msg", ".json")}


def read(path):
    with open(path, "rb") as file:
        return file.read()


def test_a_delivered_messages_files_wait_in_spare_and_the_next_body_is_written_into_one(spool):
    old = queue_sync(spool, body=LONG_BODY)
    old_inodes = inodes_of(spool, old)
    assert spool.remove(old) is True
    assert listing(spool, "active") == []
    assert len(listing(spool, "spare")) == 2
    new = queue_sync(spool, body=BODY)
    body_inode = os.stat(spool.message_path(new)).st_ino
    assert body_inode in old_inodes
    # Only the new message's bytes: the old one's longer tail is cut off.
    assert read(spool.message_path(new)) == BODY
    assert spool.load(new)["size"] == len(BODY)
    # commit_sync (the tools' path) makes its record afresh: one spare left.
    assert len(listing(spool, "spare")) == 1
    assert listing(spool, "tmp") == []


def test_a_body_over_the_size_kept_is_unlinked_and_only_its_record_is_kept(spool):
    big = queue_sync(spool, body=b"Subject: big\r\n\r\n" + b"x" * spare.MAX_SIZE)
    record_inode = os.stat(os.path.join(spool.path, "active", big + ".json")).st_ino
    assert spool.remove(big) is True
    (kept,) = listing(spool, "spare")
    assert os.stat(os.path.join(spool.path, "spare", kept)).st_ino == record_inode


def test_an_administrators_delete_unlinks_rather_than_keeping(spool):
    queue_id = queue_sync(spool)
    assert spool.delete(queue_id)
    assert listing(spool, "active") == []
    assert listing(spool, "spare") == []


def test_spare_holds_at_most_its_slots_per_process(spool, monkeypatch):
    monkeypatch.setattr(spare, "SLOTS", 3)
    queued = [queue_sync(spool) for _ in range(5)]
    for queue_id in queued:
        spool.remove(queue_id)
    # Ten files retired through three names: the last three remain.
    names = listing(spool, "spare")
    assert names == sorted(f"{os.getpid()}.{slot}" for slot in range(3))


def test_a_filters_view_of_a_body_in_a_spare_sees_only_the_new_bytes(spool):
    spool.remove(queue_sync(spool, body=LONG_BODY))
    writer = spool.new_message()
    writer.write(BODY)
    view = writer.view(make_envelope())
    assert view.size == len(BODY)
    assert read(os.path.join(spool.path, "tmp", writer.queue_id + ".msg")) == BODY
    writer.abort()


def test_a_link_or_a_shared_file_planted_in_spare_is_never_written_through(spool, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the relay's")
    shared = tmp_path / "shared"
    shared.write_bytes(b"linked twice")
    directory = os.path.join(spool.path, "spare")
    os.symlink(outside, os.path.join(directory, "1.1"))
    os.link(shared, os.path.join(directory, "1.2"))
    queue_id = queue_sync(spool)
    assert read(spool.message_path(queue_id)) == BODY
    assert outside.read_bytes() == b"not the relay's"
    assert shared.read_bytes() == b"linked twice"
    assert os.stat(shared).st_nlink == 1
    # Both were taken out of spare/ and thrown away, not left in tmp/.
    assert listing(spool, "spare") == []
    assert listing(spool, "tmp") == []


def test_two_processes_claiming_at_once_never_get_the_same_file(tmp_path):
    directory = tmp_path / "spare"
    directory.mkdir()
    made = set()
    for number in range(300):
        path = directory / f"99.{number}"
        path.write_bytes(b"old")
        made.add(os.stat(path).st_ino)
    claimed = {0: [], 1: []}
    start = threading.Barrier(2)

    def claimer(which):
        # A SpareFiles of its own, as each worker process has.
        files = SpareFiles(str(directory))
        target = tmp_path / f"tmp{which}"
        target.mkdir()
        start.wait()
        for number in range(400):
            got = files.claim(str(target / f"{number}.msg"))
            if got is None:
                return
            fd, size = got
            assert size == 3
            claimed[which].append(os.fstat(fd).st_ino)
            os.close(fd)
    threads = [threading.Thread(target=claimer, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 300
    assert set(everything) == made
    assert os.listdir(directory) == []


def test_without_a_spare_directory_files_are_unlinked_and_nothing_is_claimed(tmp_path):
    files = SpareFiles(str(tmp_path / "spare"))
    victim = tmp_path / "ID.json"
    victim.write_bytes(b"{}")
    assert files.retire(str(victim)) is True
    assert not victim.exists()
    assert files.retire(str(victim)) is False
    assert files.claim(str(tmp_path / "new.msg")) is None


def test_an_empty_spare_is_listed_again_only_after_a_pause(tmp_path):
    now = [100.0]
    directory = tmp_path / "spare"
    directory.mkdir()
    files = SpareFiles(str(directory), clock=lambda: now[0])
    assert files.claim(str(tmp_path / "a")) is None
    (directory / "7.0").write_bytes(b"")
    assert files.claim(str(tmp_path / "b")) is None     # not looked at yet
    now[0] += spare.RESCAN_INTERVAL
    fd, size = files.claim(str(tmp_path / "c"))
    assert size == 0
    os.close(fd)
    assert (tmp_path / "c").exists() and not (directory / "7.0").exists()


def test_the_layout_expects_spare_names_and_nothing_else_there():
    assert layout.expected_kind(None, "spare") == "a directory"
    assert layout.expected_kind("spare", "4242.17") == "a regular file"
    for name in ("4242", "x.1", "4242.17.tmp", "../4242.17", "ABCDEF.msg"):
        assert layout.expected_kind("spare", name) is None


class BatchCommitTests(unittest.TestCase):
    """The daemon's path: commits in the commit thread, removals in the
    unlink thread."""

    def setUp(self):
        self.spool = started_spool(self)

    def commit(self, body):
        writer = self.spool.new_message()
        writer.write(body)
        return writer.commit(make_envelope())

    @defer.inlineCallbacks
    def test_bodies_and_records_of_new_messages_go_into_delivered_ones_files(self):
        old = yield defer.gatherResults([self.commit(LONG_BODY) for _ in range(3)])
        old_inodes = set().union(*(inodes_of(self.spool, queue_id) for queue_id in old))
        yield defer.gatherResults([self.spool.remove_soon(queue_id) for queue_id in old])
        self.assertEqual(len(listing(self.spool, "spare")), 6)
        new = yield defer.gatherResults([self.commit(BODY) for _ in range(3)])
        new_inodes = set().union(*(inodes_of(self.spool, queue_id) for queue_id in new))
        self.assertEqual(new_inodes, old_inodes)
        self.assertEqual(listing(self.spool, "spare"), [])
        for queue_id in new:
            self.assertEqual(read(self.spool.message_path(queue_id)), BODY)
            record = self.spool.load(queue_id)
            self.assertEqual((record["id"], record["size"]), (queue_id, len(BODY)))
        self.assertEqual(sorted(self.spool.ids()), sorted(new))
        self.assertEqual(listing(self.spool, "tmp"), [])


def test_the_masters_start_empties_spare_of_the_last_runs_files(spool):
    spool.remove(queue_sync(spool))
    assert len(listing(spool, "spare")) == 2
    spool.prepare_for_writers()
    assert listing(spool, "spare") == []


def test_inbound_workers_each_claim_only_their_share_of_the_names(tmp_path):
    directory = tmp_path / "spare"
    directory.mkdir()
    for number in range(6):
        (directory / f"99.{number}").write_bytes(b"")
    second_of_two = SpareFiles(str(directory), share=(1, 2))
    taken = []
    while (got := second_of_two.claim(str(tmp_path / f"new{len(taken)}"))) is not None:
        os.close(got[0])
        taken.append(len(taken))
    assert len(taken) == 3
    assert sorted(os.listdir(directory)) == ["99.0", "99.2", "99.4"]


def test_a_new_message_as_long_as_the_spare_keeps_every_byte(spool):
    same = b"Subject: same\r\n\r\n" + b"z" * 5000 + b"\r\n"
    spool.remove(queue_sync(spool, body=same))
    queue_id = queue_sync(spool, body=same.replace(b"z", b"y"))
    assert read(spool.message_path(queue_id)) == same.replace(b"z", b"y")
