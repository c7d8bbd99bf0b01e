"""Queue ids minted per worker slot, the partitions of the queue, and the
spool's work beside live writers (relaymail.process)."""

import contextlib
import os

import pytest

from relaymail.queue import queue_id
from relaymail.queue import record as records
from relaymail.queue.partition import owner_test, partition_of
from relaymail.queue.spool import Spool
from tests.test_spool import listing, queue_sync


@pytest.fixture
def restore_slot():
    yield
    queue_id._slot = None


def test_two_slots_never_mint_the_same_id_in_the_same_microsecond(monkeypatch, restore_slot):
    # Same clock, same sequence, same random bits: only the slot differs.
    monkeypatch.setattr(queue_id.time, "time_ns", lambda: 1_767_225_600_123_456_000)
    monkeypatch.setattr(queue_id.secrets, "randbits", lambda bits: 0)
    minted = {}
    for slot in (3, 4):
        queue_id._generator = queue_id._Generator()
        queue_id.use_slot(slot)
        minted[slot] = queue_id.new_queue_id()
    assert minted[3] != minted[4]
    assert [queue_id.slot_of(minted[slot]) for slot in (3, 4)] == [3, 4]
    assert queue_id.minted_at(minted[3]) == pytest.approx(1_767_225_600.123456)


def test_a_slot_must_fit_in_twelve_bits(restore_slot):
    with pytest.raises(ValueError):
        queue_id.use_slot(4096)


def test_partitions_cover_every_id_and_are_even():
    ids = [queue_id.new_queue_id() for _ in range(6000)]
    counts = [0, 0, 0]
    for each in ids:
        counts[partition_of(each, 3)] += 1
    assert sum(counts) == 6000 and min(counts) > 1700
    assert all(partition_of(each, 1) == 0 for each in ids[:10])
    assert owner_test(0, 1) is None
    owns = owner_test(2, 3)
    assert [owns(each) for each in ids[:50]] == [partition_of(each, 3) == 2 for each in ids[:50]]


def test_a_partitioned_spool_sees_and_mints_only_its_own_ids(tmp_path):
    everyone = Spool(str(tmp_path / "spool"))
    everyone.start()
    ids = [queue_sync(everyone) for _ in range(40)]
    mine = Spool(everyone.path, owns=owner_test(1, 2))
    mine.start()
    try:
        assert sorted(mine.ids()) == sorted(i for i in ids if partition_of(i, 2) == 1)
        assert all(partition_of(queue_sync(mine), 2) == 1 for _ in range(20))
    finally:
        mine.stop()
        everyone.stop()


def test_remove_unfinished_takes_only_the_dead_workers_files(tmp_path, restore_slot):
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    try:
        writers = {}
        for slot in (3, 4):
            queue_id.use_slot(slot)
            writers[slot] = spool.new_message()
            writers[slot].write(b"Subject: unfinished\r\n\r\n")
        tmp = os.path.join(spool.path, "tmp")
        # A record update of the partition-1 delivery worker, left by a crash.
        owned = next(i for i in iter(queue_id.new_queue_id, None) if partition_of(i, 2) == 1)
        other = next(i for i in iter(queue_id.new_queue_id, None) if partition_of(i, 2) == 0)
        for name in (f"{owned}-0123abcd.json", f"{other}-0123abcd.json"):
            open(os.path.join(tmp, name), "w").close()
        assert spool.remove_unfinished(slot=3) == 1
        assert listing(spool, "tmp") == sorted([f"{writers[4].queue_id}.msg",
                                                f"{owned}-0123abcd.json",
                                                f"{other}-0123abcd.json"])
        assert spool.remove_unfinished(owns=owner_test(1, 2)) == 1
        assert listing(spool, "tmp") == sorted([f"{writers[4].queue_id}.msg",
                                                f"{other}-0123abcd.json"])
        writers[4].abort()
        writers[3].abort()
    finally:
        spool.stop()


def test_recovery_beside_writers_leaves_inbound_work_alone_and_drops_its_lone_records(
        tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    active = os.path.join(spool.path, "active")
    # A release a crash cut: its record written into active/, the queue
    # file not linked there yet.
    held = queue_sync(spool)
    assert spool.hold(held)
    with open(os.path.join(active, held + ".json"), "wb") as f:
        f.write(records.encode(spool.read_record(held, "hold")))
    writer = spool.new_message()
    writer.write(b"Subject: arriving\r\n\r\n")
    # The other spool stands for a delivery worker recovering while this
    # one (an inbound worker) writes.
    other = Spool(spool.path, beside_writers=True)
    try:
        assert other.recover(beside_writers=True) == []
        assert listing(spool, "active") == []
        assert listing(spool, "hold") == [held + ".msg"]
        assert listing(spool, "tmp") == [writer.queue_id + ".msg"]
    finally:
        writer.abort()
        spool.stop()


def test_the_masters_start_removes_lone_records_in_active_and_hold(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    kept, retried = queue_sync(spool), queue_sync(spool)
    spool.update(retried, spool.load(retried) | {"attempts": 1})
    lone = [queue_id.new_queue_id() for _ in range(2)]
    for where, lone_id in zip(("active", "hold"), lone):
        with open(os.path.join(spool.path, where, lone_id + ".json"), "w") as f:
            f.write("{}")
    try:
        assert spool.remove_lone_records() == 2
        assert listing(spool, "active") == sorted(
            [kept + ".msg", retried + ".json", retried + ".msg"])
        assert listing(spool, "hold") == []
    finally:
        spool.stop()


def test_notices_wait_in_memory_while_the_socket_is_full_and_arrive_in_order(monkeypatch):
    from twisted.internet import task
    from relaymail.process import pickup
    clock = task.Clock()
    receiving, sending = pickup.socket_pair()
    sender = pickup.PickupSender(clock, [sending])
    ids = [queue_id.new_queue_id() for _ in range(2000)]
    for each in ids:
        sender.message_queued(each)
    # The kernel took a few hundred; the rest wait, nothing is lost.
    got = []

    def drain():
        while True:
            try:
                got.append(receiving.recv(64).decode())
            except BlockingIOError:
                return
    drain()
    assert 0 < len(got) < 2000
    while len(got) < 2000:
        clock.advance(pickup.RETRY_DELAY)
        drain()
    assert got == ids and sender.dropped == 0
    # Past MAX_PENDING the oldest are dropped, counted (and logged).
    monkeypatch.setattr(pickup, "MAX_PENDING", 10)
    for _ in range(400):
        sender.message_queued(queue_id.new_queue_id())
    assert sender.dropped > 0
    sender.stop()
    receiving.close()
    sending.close()


def test_two_workers_gates_count_one_clients_connections_together(tmp_path):
    from twisted.internet import task
    from relaymail.process.shared_counts import LimitsRegion, SharedLimits
    from relaymail.smtp.limits import ConnectionGate
    from tests.support import make_settings
    settings = make_settings(tmp_path, limits__connections="8", limits__connections_per_ip="3",
                             limits__connection_rate_per_ip="0", limits__trusted_reserve="0")
    clock = task.Clock()
    region = LimitsRegion(2, settings)
    gates = [ConnectionGate(settings, clock,
                            shared=SharedLimits(region.fd, region.rows, region.row(number),
                                                settings, clock, 60.0).connections)
             for number in (0, 1)]
    first, second = gates
    assert first.admit("192.0.2.7", exempt=False) is None
    assert second.admit("192.0.2.7", exempt=False) is None
    assert second.admit("192.0.2.7", exempt=False) is None
    # The fourth is refused by either worker: three are open in all.
    for gate in gates:
        assert gate.admit("192.0.2.7", exempt=False) == \
            "Error: too many connections from 192.0.2.7"
        assert gate.connections_from("192.0.2.7") == 3 and gate.connections == 3
    assert first.admit("198.51.100.1", exempt=False) is None
    second.release("192.0.2.7")
    assert first.admit("192.0.2.7", exempt=False) is None
    # The overall limit holds for both together too.
    for address in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"):
        assert second.admit(address, exempt=False) is None
    assert first.connections == 8
    assert first.admit("203.0.113.9", exempt=False) == "Error: too many connections"
    # A worker that died leaves nothing counted behind.
    region.clear_connections(region.row(1))
    assert first.connections == 3 and first.connections_from("192.0.2.7") == 2
    assert first.connections_from("203.0.113.1") == 0
    region.close()


def test_two_workers_count_one_clients_attempts_together(tmp_path):
    from twisted.internet import task
    from relaymail.process.shared_counts import SharedLimits, make_limits_region
    from relaymail.smtp.authentication import Authenticator
    from relaymail.smtp.limits import ConnectionGate
    from tests.support import make_settings
    settings = make_settings(tmp_path, limits__connection_rate_per_ip="4",
                             limits__connections_per_ip="0")
    clock = task.Clock()
    clock.advance(1_767_225_600)
    fd = make_limits_region(2, settings)
    shared = [SharedLimits(fd, 2, row, settings, clock, 60.0) for row in (0, 1)]
    gates = [ConnectionGate(settings, clock, shared=each.connections,
                            rates=each.connection_rates) for each in shared]
    first, second = gates
    for gate in (first, second, first, second):
        assert gate.admit("192.0.2.7", exempt=False) is None
    # The fifth attempt in the minute is refused by either worker.
    assert second.admit("192.0.2.7", exempt=False) == \
        "Error: too many connections per minute from 192.0.2.7"
    assert first.admit("198.51.100.1", exempt=False) is None
    clock.advance(61)
    assert first.admit("192.0.2.7", exempt=False) is None
    # AUTH attempts likewise, through their own table.
    auths = [Authenticator(None, 0, clock, attempts_per_minute=2, windows=each.auth_attempts)
             for each in shared]
    assert auths[0].admit("192.0.2.7", trusted=False) is None
    assert auths[1].admit("192.0.2.7", trusted=False) is None
    assert auths[0].admit("192.0.2.7", trusted=False) is not None
    # Windows that ran out are not tracked: 198.51.100.1 and the second
    # worker's 192.0.2.7 ended with the minute.
    assert shared[0].connection_rates.tracked() == 1 and shared[1].connection_rates.tracked() == 0
    os.close(fd)


def test_a_reloads_new_workers_count_the_old_ones_sessions_and_attempts(tmp_path):
    # After a SIGHUP the new inbound workers write the region's other bank:
    # the old generation's open sessions and its minute of attempts count
    # against the limits until they end.
    from twisted.internet import task
    from relaymail.process.shared_counts import LimitsRegion, SharedLimits
    from relaymail.smtp.authentication import Authenticator
    from relaymail.smtp.limits import ConnectionGate
    from tests.support import make_settings
    settings = make_settings(tmp_path, limits__connections="4", limits__connections_per_ip="2",
                             limits__connection_rate_per_ip="3", limits__trusted_reserve="0")
    clock = task.Clock()
    clock.advance(1_767_225_600)
    region = LimitsRegion(2, settings)

    def generation():
        shared = [SharedLimits(region.fd, region.rows, region.row(number), settings, clock,
                               60.0) for number in (0, 1)]
        gates = [ConnectionGate(settings, clock, shared=each.connections,
                                rates=each.connection_rates) for each in shared]
        auths = [Authenticator(None, 0, clock, attempts_per_minute=2,
                               windows=each.auth_attempts) for each in shared]
        return gates, auths
    (old_first, old_second), old_auths = generation()
    assert old_first.admit("192.0.2.7", exempt=False) is None
    assert old_second.admit("192.0.2.7", exempt=False) is None
    assert old_second.admit("198.51.100.1", exempt=False) is None
    assert old_auths[0].admit("192.0.2.7", trusted=False) is None
    assert old_auths[1].admit("192.0.2.7", trusted=False) is None

    assert region.fits(settings)
    region.next_bank()
    assert [region.row(0), region.row(1)] == [2, 3]
    (first, second), auths = generation()
    assert first.connections == 3
    # 192.0.2.7 holds two connections in the old workers: a third is refused.
    assert second.admit("192.0.2.7", exempt=False) == \
        "Error: too many connections from 192.0.2.7"
    # That was its third attempt of the minute.  One old session ends, and
    # its fourth is refused for the rate: the old workers saw the others.
    old_first.release("192.0.2.7")
    assert first.connections == 2 and first.connections_from("192.0.2.7") == 1
    assert first.admit("192.0.2.7", exempt=False) == \
        "Error: too many connections per minute from 192.0.2.7"
    # AUTH attempts likewise: two in the minute, in the old workers.
    assert auths[0].admit("192.0.2.7", trusted=False) is not None
    assert first.admit("203.0.113.1", exempt=False) is None
    assert second.admit("203.0.113.2", exempt=False) is None
    assert second.admit("203.0.113.3", exempt=False) == "Error: too many connections"
    # An old worker that ends takes its sessions off the count.
    region.clear_connections(1)
    assert second.connections == 2
    assert second.admit("203.0.113.3", exempt=False) is None

    # The next reload gives the first bank back, its open connections
    # zeroed (its workers have ended), its attempts kept as history.
    old_first.admit("192.0.2.99", exempt=False)      # one never released
    region.next_bank()
    assert [region.row(0), region.row(1)] == [0, 1]
    (newest, _), newest_auths = generation()
    assert newest.connections == 3 and newest.connections_from("192.0.2.99") == 0
    assert newest_auths[1].admit("192.0.2.7", trusted=False) is not None
    clock.advance(61)
    assert newest_auths[1].admit("192.0.2.7", trusted=False) is None
    region.close()


def test_a_region_is_kept_across_a_reload_only_for_tables_of_the_same_size(tmp_path):
    from relaymail.process.shared_counts import LimitsRegion
    from tests.support import make_settings
    region = LimitsRegion(2, make_settings(tmp_path, limits__connections="100"))
    assert region.rows == 4
    assert region.fits(make_settings(tmp_path, limits__connections="512",
                                     limits__connections_per_ip="3"))
    assert not region.fits(make_settings(tmp_path, limits__connections="513"))
    assert not region.fits(make_settings(tmp_path, limits__connections="100",
                                         **{"plugin:ratelimit__max_keys": "200000"}))
    region.close()


@contextlib.contextmanager
def counts_of_eight(monkeypatch, now):
    """One worker's SharedCounts with a row of 8 entries (full at 6), on
    the clock ``now[0]`` for its packs."""
    from relaymail.process import shared_counts
    monkeypatch.setattr(shared_counts.time, "monotonic", lambda: now[0])
    fd = os.memfd_create("counts")
    os.ftruncate(fd, shared_counts.SharedCounts.size(1, 8))
    counts = shared_counts.SharedCounts(fd, 0, 1, 8, 0)
    try:
        yield counts
    finally:
        counts.close()
        os.close(fd)


def test_a_row_full_of_clients_still_counts_every_connection_in_the_total(monkeypatch):
    # A flood of new clients fills a worker's row between two packs: a
    # connection then has no entry of its own, but the total every worker
    # reads for [limits] connections counts it, and its end takes off only
    # what it added.
    now = [1000.0]
    with counts_of_eight(monkeypatch, now) as counts:
        clients = [f"192.0.2.{n}" for n in range(6)]      # three quarters of 8
        for client in clients:
            counts.add(client, +1)
        counts.add("198.51.100.1", +1)                     # no room, even packed
        assert counts.total() == 7
        assert counts.open("198.51.100.1") == 0
        counts.add(clients[0], -1)
        now[0] += 2                                        # a pack may run again
        counts.add("198.51.100.1", -1)
        assert counts.total() == 5
        assert [counts.open(client) for client in clients] == [0, 1, 1, 1, 1, 1]
        # The client that had no entry gets one when it comes back.
        counts.add("198.51.100.1", +1)
        assert counts.open("198.51.100.1") == 1 and counts.total() == 6


def test_a_clients_uncounted_connections_join_its_entry_once_there_is_room(monkeypatch):
    # Its connections that came while the row was full are counted for it
    # as soon as one of them finds room, so connections_per_ip sees them.
    now = [1000.0]
    with counts_of_eight(monkeypatch, now) as counts:
        clients = [f"192.0.2.{n}" for n in range(6)]
        for client in clients:
            counts.add(client, +1)
        for _ in range(3):
            counts.add("198.51.100.1", +1)                 # no room: total only
        counts.add(clients[0], -1)
        now[0] += 2
        counts.add("198.51.100.1", +1)                     # room after a pack
        assert counts.open("198.51.100.1") == 4 and counts.total() == 9
        for _ in range(4):
            counts.add("198.51.100.1", -1)
        assert counts.open("198.51.100.1") == 0 and counts.total() == 5


def two_workers_gates(tmp_path, connections, threshold):
    """The connection gates of two inbound workers sharing their counts,
    with no per-client limits: ``(clock, fd of the shared region, first,
    second)``."""
    from twisted.internet import task
    from relaymail.process.shared_counts import SharedLimits, make_limits_region
    from relaymail.smtp.limits import ConnectionGate
    from tests.support import make_settings
    settings = make_settings(tmp_path, limits__connections=str(connections),
                             limits__stress_threshold=str(threshold),
                             limits__connections_per_ip="0", limits__connection_rate_per_ip="0")
    clock = task.Clock()
    fd = make_limits_region(2, settings)
    shared = [SharedLimits(fd, 2, row, settings, clock, 60.0) for row in (0, 1)]
    first, second = [ConnectionGate(settings, clock, shared=each.connections,
                                    rates=each.connection_rates) for each in shared]
    return clock, fd, first, second


def test_a_stress_another_worker_begins_and_ends_reaches_this_one_s_sessions(tmp_path):
    # Outsiders idle in one worker get the stress timeout when the
    # connections that fill the table arrive at the other one, and the
    # normal one back when those close there.
    from relaymail.smtp.limits import FOLLOW_INTERVAL
    clock, fd, first, second = two_workers_gates(tmp_path, connections=4, threshold=3)
    seen = []
    assert first.admit("192.0.2.1", exempt=False) is None
    first.watch(seen.append)
    for ip in ("192.0.2.2", "192.0.2.3"):
        assert second.admit(ip, exempt=False) is None
    assert second.stressed and not first.stressed
    clock.advance(FOLLOW_INTERVAL)
    assert first.stressed and seen == [True]
    second.release("192.0.2.2")
    clock.advance(FOLLOW_INTERVAL)
    assert seen == [True, False] and not first.stressed
    first.unwatch(seen.append)
    assert clock.getDelayedCalls() == []
    os.close(fd)


def test_a_workers_own_admit_and_release_see_the_shared_count_at_once(tmp_path):
    # Between two looks at the shared counts, this worker's next admit or
    # release goes by the total every worker has open: a stress the other
    # worker's connections started or ended is not left for the next look.
    # Stress from 20 open on, until 18 (a tenth of the threshold below).
    _clock, fd, first, second = two_workers_gates(tmp_path, connections=40, threshold=20)
    assert first.admit("192.0.2.1", exempt=False) is None
    assert first.admit("192.0.2.2", exempt=False) is None
    others = [f"198.51.100.{n}" for n in range(19)]
    for ip in others:
        assert second.admit(ip, exempt=False) is None
    assert second.stressed and not first.stressed       # 21 open, 2 of them here
    first.release("192.0.2.2")                           # 20 open: at the threshold
    assert first.stressed
    second.release(others[0])
    assert second.stressed                               # 19 open: not yet a tenth below
    second.release(others[1])
    second.release(others[2])
    assert not second.stressed and first.stressed        # 17 open; first has not looked
    assert first.admit("192.0.2.3", exempt=False) is None  # 18 open
    assert not first.stressed
    os.close(fd)


def test_recovery_beside_writers_keeps_the_held_copy_when_the_active_one_is_bad(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    queued = queue_sync(spool)
    assert spool.hold(queued)
    # A release a crash cut after both steps, and the active/ record
    # damaged since: the hold/ copy is the one to keep.
    with open(os.path.join(spool.path, "active", queued + ".json"), "w") as f:
        f.write("{")
    os.link(os.path.join(spool.path, "hold", queued + ".msg"),
            os.path.join(spool.path, "active", queued + ".msg"))
    other = Spool(spool.path, beside_writers=True)
    try:
        assert other.recover(beside_writers=True) == []
        assert listing(spool, "hold") == [queued + ".msg"]
        assert listing(spool, "corrupt") == [queued + ".json", queued + ".msg"]
    finally:
        spool.stop()
