"""The scheduler's decisions when its collaborators fail.

Disk errors (EMFILE, ENOSPC, EIO) cannot be produced on demand with real
files, so the spool here is an in-memory stand-in with the real spool's
methods, failing where a test says; the real spool has its own tests, and
tests/test_delivery.py runs the scheduler on it end to end."""

import copy
import errno

import pytest

from twisted.internet import defer, task

from relaymail.delivery.destinations import BOUNCED, DEFERRED, SENT, Job, Outcome
from relaymail.delivery.routing import Router
from relaymail.envelope import Envelope
from relaymail.queue import record as records
from relaymail.queue.control import ControlError
from relaymail.queue.scheduler import Scheduler
from tests.support import make_settings

T0 = 1_700_000_000.0


class Writer:
    def __init__(self, spool, queue_id):
        self.spool, self.queue_id, self.data = spool, queue_id, b""

    def write(self, data):
        self.data += data

    def commit(self, envelope):
        if self.spool.fail_commit:
            return defer.fail(OSError(errno.ENOSPC, "No space left on device"))
        self.spool.records[self.queue_id] = records.new_record(self.queue_id, envelope, len(self.data), T0)
        return defer.succeed(self.queue_id)

    def abort(self):
        pass


class Spool:
    def __init__(self, tmp_path):
        self.records, self.held, self.tmp = {}, {}, tmp_path
        self.fail_commit = False
        self.load_errors = {}
        self.fail_updates = False
        self.fail_hold = False
        self.count = 0
        self.threads_wait = False
        self.threaded = []

    def add(self, queue_id, recipients, sender="s@example.org"):
        envelope = Envelope(sender=sender, recipients=recipients, received_at=T0)
        self.records[queue_id] = records.new_record(queue_id, envelope, 10, T0)
        (self.tmp / f"{queue_id}.msg").write_bytes(b"Subject: x\r\n\r\nbody\r\n")

    def ids(self):
        return list(self.records)

    def held_ids(self):
        return []

    def is_held(self, queue_id):
        return False

    def is_active(self, queue_id):
        return queue_id in self.records

    def load(self, queue_id):
        if queue_id in self.load_errors:
            raise self.load_errors[queue_id]
        if queue_id not in self.records:
            raise FileNotFoundError(queue_id)
        return copy.deepcopy(self.records[queue_id])

    def message_path(self, queue_id):
        return str(self.tmp / f"{queue_id}.msg")

    def update_in_thread(self, queue_id, state):
        if self.fail_updates:
            return defer.fail(OSError(errno.ENOSPC, "No space left on device"))
        self.records[queue_id] = state
        return defer.succeed(None)

    def remove(self, queue_id):
        return self.records.pop(queue_id, None) is not None

    def remove_soon(self, queue_id):
        return defer.maybeDeferred(self.remove, queue_id)

    def new_message(self):
        self.count += 1
        return Writer(self, f"DSN{self.count}")

    def call_in_thread(self, function, *args):
        if self.threads_wait:
            # A thread that has not run yet: the test fires it.
            d = defer.Deferred().addCallback(lambda _: function(*args))
            self.threaded.append((function.__name__, args, d))
            return d
        return defer.maybeDeferred(function, *args)

    def update(self, queue_id, state):
        if self.fail_updates:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records[queue_id] = copy.deepcopy(state)

    def hold(self, queue_id):
        if self.fail_hold:
            raise OSError(errno.EIO, "Input/output error")
        self.held[queue_id] = self.records.pop(queue_id)
        return True

    def quarantine(self, queue_id, reason):
        self.records.pop(queue_id, None)

    def body_problem(self, queue_id, record):
        return None


class Pool:
    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)

    def take(self):
        jobs, self.jobs = self.jobs, []
        return jobs

    def stop(self):
        pass


def scheduler(tmp_path, **keys):
    settings = make_settings(tmp_path, **{"delivery__smarthost": "[127.0.0.1]:2526",
                                          "queue__min_backoff": "10",
                                          "queue__max_backoff": "10", **keys})
    clock = task.Clock()
    clock.advance(T0)
    spool, pool = Spool(tmp_path), Pool()
    return Scheduler(spool, pool, Router(settings, resolver=object()), settings, clock,
                     clock=clock.seconds), spool, pool, clock


def finish(job, status, code):
    job.on_done(job, [Outcome(r, status, code, f"{str(code)[0]}.0.0", "reply", "mx[192.0.2.1]:25")
                      for r in job.recipients])


def test_one_unreadable_message_does_not_stop_the_others(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    spool.add("BBBB", ["b@example.net"])
    spool.load_errors["AAAA"] = OSError(errno.EMFILE, "Too many open files")
    sched.startService()
    clock.advance(0)
    assert [job.queue_id for job in pool.take()] == ["BBBB"]
    spool.load_errors.clear()
    clock.advance(10)
    assert [job.queue_id for job in pool.take()] == ["AAAA"]


def being_set_aside(tmp_path):
    """A scheduler whose one message, AAAA, has a bad record and is being
    set aside: the quarantine waits in ``spool.threaded`` for the test."""
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    spool.load_errors["AAAA"] = records.CorruptRecord("unsupported version 2")
    spool.threads_wait = True
    sched.startService()
    clock.advance(0)
    return sched, spool, pool, clock


def test_a_damaged_message_is_set_aside_in_a_thread_and_not_started_meanwhile(tmp_path):
    sched, spool, pool, clock = being_set_aside(tmp_path)
    # Two renames and a sync: not on the reactor thread.
    [(name, args, moved)] = spool.threaded
    assert (name, args) == ("quarantine", ("AAAA", "bad record: unsupported version 2"))
    assert "AAAA" in spool.records
    # A scan meanwhile neither starts it nor sets it aside a second time.
    sched.message_queued("AAAA")
    clock.advance(0)
    assert pool.take() == [] and len(spool.threaded) == 1
    moved.callback(None)
    assert "AAAA" not in spool.records
    sched.message_queued("AAAA")
    clock.advance(0)
    assert pool.take() == [] and len(spool.threaded) == 2


def test_a_message_asked_for_while_set_aside_is_not_left_to_retry(tmp_path):
    sched, spool, pool, clock = being_set_aside(tmp_path)
    [(_, _, moved)] = spool.threaded
    # A flush while it moves: it is there to flush, but not started.
    assert sched.retry("AAAA") is True
    clock.advance(0)
    assert pool.take() == [] and len(spool.threaded) == 1
    moved.callback(None)
    # Set aside: nothing left that says it is queued here.
    assert sched.retry("AAAA") is False
    assert sched.deferred_count(clock.seconds() - 1) == 0


def test_a_person_s_move_is_refused_while_another_moves_the_message(tmp_path):
    # A hold and a release in two spool threads at once could each remove
    # the copy the other kept: one move of a message at a time.
    sched, spool, pool, clock = being_set_aside(tmp_path)
    for ask in (sched.hold, sched.release, sched.delete):
        with pytest.raises(ControlError, match="AAAA is being moved; try again"):
            ask("AAAA")
    assert len(spool.threaded) == 1 and "AAAA" in spool.records
    clock.advance(10)
    assert pool.take() == []
    spool.threaded[0][2].callback(None)
    assert "AAAA" not in spool.records and sched.retry("AAAA") is False


def test_a_release_that_fails_looks_at_the_message_in_active_again(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    spool.is_held = lambda queue_id: True

    def release(queue_id):
        # Cut after the copy into active/, its record due now: the last
        # sync, of hold/, failed.
        spool.records[queue_id]["next_attempt_at"] = clock.seconds()
        raise OSError(errno.EIO, "Input/output error")
    spool.release = release
    sched.startService()
    clock.advance(0)
    [first] = pool.take()
    finish(first, DEFERRED, 451)
    clock.advance(0)
    failures = []
    sched.release("AAAA").addErrback(failures.append)
    assert [f.type for f in failures] == [OSError]
    clock.advance(0)
    assert [job.queue_id for job in pool.take()] == ["AAAA"]


def test_a_message_that_could_not_be_set_aside_is_looked_at_again(tmp_path):
    sched, spool, pool, clock = being_set_aside(tmp_path)
    [(_, _, moved)] = spool.threaded
    moved.errback(OSError(errno.EIO, "Input/output error"))
    clock.advance(9)
    assert len(spool.threaded) == 1
    clock.advance(1)        # min_backoff later: tried, still bad, set aside again
    assert [name for name, _, _ in spool.threaded] == ["quarantine", "quarantine"]
    spool.threaded[1][2].callback(None)
    assert "AAAA" not in spool.records and pool.take() == []


def test_a_failed_record_write_does_not_resend_to_delivered_recipients(tmp_path):
    sched, spool, pool, clock = sent_once_record_unsaved(tmp_path)
    clock.advance(10)
    [retry] = pool.take()
    assert retry.recipients == ["c@example.org"]


def sent_once_record_unsaved(tmp_path):
    """A scheduler whose one message, AAAA, was sent to a@ and deferred
    for c@ in its first attempt, the record of which could not be
    written: memory alone knows a@ was sent."""
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net", "c@example.org"])
    spool.fail_updates = True
    sched.startService()
    first_sent_second_deferred(pool, clock)
    return sched, spool, pool, clock


def first_sent_second_deferred(pool, clock):
    """Start the one message queued and end its attempt: its first
    recipient sent, the second deferred."""
    clock.advance(0)
    [job] = pool.take()
    first, second = job.recipients
    job.on_done(job, [Outcome(first, SENT, 250, "2.0.0", "ok", "mx"),
                      Outcome(second, DEFERRED, 451, "4.0.0", "later", "mx")])


def test_a_bounce_that_cannot_be_queued_keeps_the_message(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    sched.startService()
    clock.advance(0)
    spool.fail_commit = True
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    assert "AAAA" in spool.records
    assert spool.records["AAAA"]["recipients"][0]["status"] == "deferred"
    # Next time the DSN can be queued: the message bounces and goes.
    spool.fail_commit = False
    clock.advance(10)
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    assert "AAAA" not in spool.records
    assert "DSN2" in spool.records


def being_delivered(tmp_path):
    """A scheduler with one message, AAAA, whose one job has started."""
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    sched.startService()
    clock.advance(0)
    [job] = pool.take()
    return sched, spool, pool, clock, job


def test_a_failed_hold_keeps_the_message_scheduled(tmp_path):
    sched, spool, pool, clock, job = being_delivered(tmp_path)
    assert sched.hold("AAAA") is True      # asked during the attempt
    spool.fail_hold = True
    finish(job, DEFERRED, 451)
    clock.advance(10)
    assert [job.queue_id for job in pool.take()] == ["AAAA"]


def test_soft_bounce_defers_a_5xx_but_the_lifetime_still_ends(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path, delivery__soft_bounce="yes",
                                          queue__lifetime="25")
    spool.add("AAAA", ["a@example.net"])
    sched.startService()
    clock.advance(0)
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    entry = spool.records["AAAA"]["recipients"][0]
    assert (entry["status"], entry["last_error"]) == (
        "deferred", "4.0.0 550 5.0.0 reply; soft_bounce = yes: deferred, not bounced "
                    "(from mx[192.0.2.1]:25)")
    assert set(spool.records) == {"AAAA"}          # no DSN
    clock.advance(10)
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    assert set(spool.records) == {"AAAA"}
    # Past [queue] lifetime the message is returned after all: soft_bounce
    # keeps mail while a set-up is tried out, not for ever.
    clock.advance(20)
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    assert set(spool.records) == {"DSN1"}
    assert spool.records["DSN1"]["envelope"]["recipients"] == ["s@example.org"]


def test_a_double_bounce_is_queued_once_and_its_failure_discarded(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path, relay__domains="example.com example.org")
    spool.add("AAAA", ["a@example.net"], sender="")
    sched.startService()
    clock.advance(0)
    [job] = pool.take()
    finish(job, BOUNCED, 550)
    assert set(spool.records) == {"DSN1"}
    envelope = spool.records["DSN1"]["envelope"]
    assert (envelope["sender"], envelope["recipients"], envelope["double_bounce"]) == (
        "", ["postmaster@example.com"], True)
    clock.advance(0)
    [job] = pool.take()
    assert job.recipients == ["postmaster@example.com"]
    finish(job, BOUNCED, 550)
    assert spool.records == {}
    assert spool.count == 1                        # nothing more was written


def test_the_active_set_is_bounded_and_refilled_as_attempts_end(tmp_path):
    sched, spool, pool, clock = scheduler(tmp_path, queue__active_limit="3")
    for number in range(8):
        spool.add(f"ID{number:02d}", [f"r{number}@example.net"])
    sched.startService()
    clock.advance(0)
    jobs = pool.take()
    # The oldest three, and no record of the other five read yet.
    assert [job.queue_id for job in jobs] == ["ID00", "ID01", "ID02"]
    finish(jobs[0], SENT, 250)
    finish(jobs[1], DEFERRED, 451)
    clock.advance(0)
    assert [job.queue_id for job in pool.take()] == ["ID03", "ID04"]
    # The deferred one waits its backoff behind the rest of the queue.
    assert "ID00" not in spool.records


def test_pickup_leaves_alone_a_message_being_deleted(tmp_path, monkeypatch):
    from relaymail.queue import scheduler as scheduling
    # The file is old enough to pick up: what keeps it is the delete.
    monkeypatch.setattr(scheduling, "PICKUP_MIN_AGE", -5.0)
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    deleting = defer.Deferred()
    spool.call_in_thread = lambda function, *args: deleting.addCallback(
        lambda _: function(*args))
    spool.delete = spool.remove
    sched.startService()
    assert sched.delete("AAAA") is not None
    # The delete is still running in its thread; the message is on disk.
    assert sched.pickup() == 0
    clock.advance(0)
    assert pool.take() == []
    deleting.callback(None)
    assert "AAAA" not in spool.records and sched.pickup() == 0


def test_pickup_leaves_a_message_just_committed_to_its_notice(tmp_path, monkeypatch):
    # A commit renames its file into active/ before it sends its notice: a
    # pickup in between must not count the message as never told of.
    from relaymail.queue import scheduler as scheduling
    sched, spool, pool, clock = scheduler(tmp_path)
    sched.startService()
    spool.add("AAAA", ["a@example.net"])        # just now, its notice to come
    assert sched.pickup() == 0
    clock.advance(0)
    assert pool.take() == []
    # Once it has been there longer than a notice takes, it is picked up.
    monkeypatch.setattr(scheduling, "PICKUP_MIN_AGE", -5.0)     # as 5 s later
    assert sched.pickup() == 1
    clock.advance(0)
    assert [job.queue_id for job in pool.take()] == ["AAAA"]
    # Its notice, late after all, finds it known.
    sched.message_queued("AAAA")
    clock.advance(0)
    assert pool.take() == [] and sched.pickup() == 0


def test_the_master_asks_for_a_pickup_only_once_a_notice_would_have_come():
    from relaymail.process.master import PICKUP_DELAY
    from relaymail.queue.scheduler import PICKUP_MIN_AGE
    assert PICKUP_DELAY > PICKUP_MIN_AGE


def test_release_takes_back_a_hold_asked_while_the_message_was_being_delivered(tmp_path):
    from relaymail.queue.control import ControlError
    sched, spool, pool, clock, job = being_delivered(tmp_path)
    assert sched.hold("AAAA") is True
    assert sched.release("AAAA") is True
    # Released: a second release is the mistake it is for any message.
    with pytest.raises(ControlError, match="^AAAA is not on hold: it is being delivered$"):
        sched.release("AAAA")
    finish(job, DEFERRED, 451)
    # Not moved to hold/ when the attempt ended, and due again at once
    # (release means due now), not after the 10 s backoff.
    assert "AAAA" in spool.records
    clock.advance(0)
    assert [job.queue_id for job in pool.take()] == ["AAAA"]


def test_a_release_during_an_attempt_leaves_a_copy_a_failed_move_left_in_hold(tmp_path):
    # A hold whose last removal failed left the message in both active/
    # and hold/; it is being delivered from active/.  Releasing the held
    # copy now would link it into active/ while the attempt removes the
    # files there: refused, and the copy goes when the message is delivered.
    sched, spool, pool, clock, job = being_delivered(tmp_path)
    spool.is_held = lambda queue_id: True
    released = []
    spool.release = lambda queue_id: released.append(queue_id)
    spool.threads_wait = True
    with pytest.raises(ControlError, match="^AAAA is not on hold: it is being delivered$"):
        sched.release("AAAA")
    assert released == [] and spool.threaded == []
    finish(job, SENT, 250)
    clock.advance(0)
    assert "AAAA" not in spool.records and pool.take() == []


def test_a_notice_of_a_message_a_scan_started_leaves_nothing_behind(tmp_path):
    # The scan at start (or a pickup sweep) can start a message before the
    # notice of its commit arrives.  Delivered, it is gone: nothing may
    # still say it is queued, nor hold its record.
    sched, spool, pool, clock, job = being_delivered(tmp_path)
    record = copy.deepcopy(spool.records["AAAA"])
    sched.message_queued("AAAA", record)
    clock.advance(0)
    assert pool.take() == []
    finish(job, SENT, 250)
    clock.advance(0)
    assert "AAAA" not in spool.records
    assert sched.retry("AAAA") is False
    assert sched._unsaved == {}



def test_a_late_notice_does_not_send_again_to_a_recipient_already_sent(tmp_path):
    # Started by a flush before its commit notice came; one recipient sent,
    # the other deferred.  The notice's record, as committed, says neither
    # was tried: trusted, it would send to the first again at once.
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net", "b@example.net"])
    committed = copy.deepcopy(spool.records["AAAA"])
    sched.startService()
    first_sent_second_deferred(pool, clock)
    clock.advance(0)
    sched.message_queued("AAAA", committed)
    clock.advance(0)
    assert pool.take() == []
    clock.advance(10)       # the backoff: b alone
    [retry] = pool.take()
    assert retry.recipients == ["b@example.net"]


def test_a_late_notice_of_a_message_already_delivered_starts_nothing(tmp_path):
    sched, spool, pool, clock, job = being_delivered(tmp_path)
    committed = copy.deepcopy(spool.records["AAAA"])
    finish(job, SENT, 250)
    clock.advance(0)
    assert "AAAA" not in spool.records
    sched.message_queued("AAAA", committed)
    clock.advance(0)
    assert pool.take() == []
    assert sched.retry("AAAA") is False and sched._unsaved == {}


def held_after_a_failed_record_write(tmp_path):
    """AAAA, asked to hold during an attempt whose record write failed:
    a@ sent, c@ deferred, known in memory only; the hold waits in its
    thread for the test."""
    sched, spool, pool, clock = scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net", "c@example.org"])
    spool.fail_updates = True
    sched.startService()
    clock.advance(0)
    assert sched.hold("AAAA") is True
    spool.threads_wait = True
    [job] = pool.take()
    job.on_done(job, [Outcome("a@example.net", SENT, 250, "2.0.0", "ok", "mx"),
                      Outcome("c@example.org", DEFERRED, 451, "4.0.0", "later", "mx")])
    [(name, _, moving)] = spool.threaded
    assert name == "hold"
    return sched, spool, pool, clock, moving


def test_a_hold_after_a_failed_record_write_holds_the_record_memory_has(tmp_path):
    # Held with the record on disk, the message would go to a@ again once
    # released.
    sched, spool, pool, clock, moving = held_after_a_failed_record_write(tmp_path)
    spool.fail_updates = False          # the disk is back
    moving.callback(None)
    assert "AAAA" not in spool.records
    statuses = {entry["address"]: entry["status"] for entry in spool.held["AAAA"]["recipients"]}
    assert statuses["a@example.net"] == "sent" and statuses["c@example.org"] != "sent"
    assert sched._unsaved == {}


def test_a_hold_that_cannot_save_the_record_keeps_the_message_and_its_record(tmp_path):
    sched, spool, pool, clock, moving = held_after_a_failed_record_write(tmp_path)
    moving.callback(None)               # the write fails again: not held
    assert spool.held == {} and "AAAA" in spool.records
    spool.threads_wait = False
    clock.advance(10)                   # min_backoff: tried again, c@ alone
    [retry] = pool.take()
    assert retry.recipients == ["c@example.org"]


def test_a_record_memory_has_outlives_a_start_that_comes_too_early(tmp_path):
    # A failed hold looks at the message again after min_backoff, before
    # its record says it is due: that start must not drop the only record
    # that says a@ was sent.
    sched, spool, pool, clock = scheduler(tmp_path, queue__max_backoff="1000")
    spool.add("AAAA", ["a@example.net", "c@example.org"])
    sched.startService()
    clock.advance(0)
    [job] = pool.take()
    finish(job, DEFERRED, 451)          # attempt 1, written: due in 10 s
    clock.advance(10)
    spool.fail_updates = True
    first_sent_second_deferred(pool, clock)     # attempt 2: due in 20 s, unsaved
    assert sched.hold("AAAA") is not None       # cannot write the record: not held
    assert spool.held == {}
    clock.advance(10)                   # the failed hold's look, 10 s early
    assert pool.take() == []
    clock.advance(10)
    [retry] = pool.take()
    assert retry.recipients == ["c@example.org"]


def test_a_delivered_message_leaves_no_record_in_memory(tmp_path):
    sched, spool, pool, clock = sent_once_record_unsaved(tmp_path)
    assert "AAAA" in sched._unsaved
    clock.advance(10)
    [retry] = pool.take()
    finish(retry, SENT, 250)
    clock.advance(0)
    assert "AAAA" not in spool.records and sched._unsaved == {}


def test_delete_all_leaves_no_record_in_memory(tmp_path):
    sched, spool, pool, clock = sent_once_record_unsaved(tmp_path)
    spool.delete_all = lambda: len([spool.records.pop(q) for q in list(spool.records)])
    assert sched.delete_all() is not None
    assert sched._unsaved == {}
    clock.advance(10)
    assert pool.take() == []


def cut_by_a_stop(tmp_path, recipients, **keys):
    """A message's one job running when a stop's grace ends: (job, spool,
    clock), for the test to end the job as the TransportRunner would."""
    sched, spool, pool, clock = scheduler(tmp_path, **keys)
    spool.add("AAAA", recipients)
    sched.startService()
    clock.advance(30)
    [job] = pool.take()
    pool.drain = lambda: []
    sched.drain(10)
    clock.advance(10)
    return job, spool, clock


def test_a_job_a_stop_cut_keeps_what_it_delivered_and_leaves_the_rest_to_the_next_start(
        tmp_path):
    # The TransportRunner's on_abandoned(job, decided=...) for an lmtp
    # delivery cut by the stop: a is recorded sent, b stays as it was, due
    # at the next start.  Past the lifetime, it is not bounced either: a
    # stop is not a last try.
    job, spool, clock = cut_by_a_stop(tmp_path, ["a@example.net", "b@example.net"],
                                      queue__lifetime="25")
    job.on_abandoned(job, decided=[Outcome("a@example.net", SENT, 250, "2.0.0", "Saved")])
    record = spool.records["AAAA"]
    assert [e["status"] for e in record["recipients"]] == ["sent", "pending"]
    assert (record["attempts"], record["next_attempt_at"]) == (0, clock.seconds())
    assert set(spool.records) == {"AAAA"}


def test_a_job_a_stop_cut_after_delivering_to_everyone_is_finished(tmp_path):
    job, spool, _ = cut_by_a_stop(tmp_path, ["a@example.net"])
    job.on_abandoned(job, decided=[Outcome("a@example.net", SENT, 250, "2.0.0", "Saved")])
    assert "AAAA" not in spool.records


def two_jobs(tmp_path):
    """A message to a and b, one job each, both running: (sched, spool,
    pool, jobs)."""
    sched, spool, pool, clock = scheduler(tmp_path, delivery__recipients_per_transaction="1")
    spool.add("AAAA", ["a@example.net", "b@example.net"])
    sched.startService()
    clock.advance(0)
    return sched, spool, pool, pool.take()


def test_what_a_cut_job_delivered_is_written_before_the_other_jobs_end(tmp_path):
    # As for a job done: a crash before the message's other jobs end must
    # not send it again.
    sched, spool, pool, (first, second) = two_jobs(tmp_path)
    spool.records["AAAA"]["recipients"][0]["status"] = "as it was on disk"
    first.on_abandoned(first, decided=[Outcome("a@example.net", SENT, 250, "2.0.0", "Saved")])
    assert spool.records["AAAA"]["recipients"][0]["status"] == "sent"


def test_a_drain_hands_a_job_of_a_site_transport_to_its_own_callback(tmp_path):
    # The pool's waiting jobs include those SMTPTransport.deliver made for
    # a site transport: the same queue id, their own callbacks.  Counted
    # as the message's own, it ended the attempt early, and b, delivered
    # after, stayed pending, to be sent again.
    sched, spool, pool, (job_a, job_b) = two_jobs(tmp_path)
    told = []
    foreign = Job(queue_id="AAAA", destination=job_a.destination, sender="s@example.org",
                  recipients=["x@example.net"], message_path="/x",
                  on_done=lambda job, outcomes: told.append("done"),
                  on_abandoned=lambda job: told.append("abandoned"))
    pool.drain = lambda: [foreign]
    sched.drain(10)
    finish(job_a, SENT, 250)
    finish(job_b, SENT, 250)
    assert told == ["abandoned"]
    assert "AAAA" not in spool.records
