"""[delivery_rates]: the excess waits in the queue for its turn, and no
period ever sees more than its messages."""

import os
import time
from types import SimpleNamespace

from relaymail.delivery.shaping import OutboundRates

from tests.test_delivery import queue_empty, relay_with, send, wait_until

SMARTHOST = SimpleNamespace(kind="smarthost")
MX = SimpleNamespace(kind="mx")


def test_reservations_keep_every_period_within_its_count():
    rates = OutboundRates({"smarthost": (3, 60.0)})
    times = [rates.reserve("smarthost", 1000.0) for _ in range(8)]
    assert times == [1000.0, 1000.0, 1000.0, 1060.0, 1060.0, 1060.0, 1120.0, 1120.0]
    # The last slot free in 1120's period goes at once; the next waits for
    # a period after the first of the three in it.
    assert rates.reserve("smarthost", 1130.0) == 1130.0
    assert rates.reserve("smarthost", 1130.0) == 1180.0
    assert rates.reserve("smarthost", 1300.0) == 1300.0


def test_limits_are_shared_between_delivery_workers_and_found_by_key():
    rates = OutboundRates({"smarthost": (250, 3600.0), "example.net": (2, 60.0),
                           ".example.org": (1, 1.0)}, share=2)
    # Rounded down: two workers with 125 an hour each never pass 250.
    assert [rates.reserve("smarthost", 0.0) for _ in range(126)][-2:] == [0.0, 3600.0]
    # Fewer messages than workers: one each, over a longer period.
    assert [rates.reserve("example.net", 0.0) for _ in range(3)] == [0.0, 60.0, 120.0]
    assert OutboundRates({"smarthost": (1, 60.0)}, share=4).period("smarthost") == 240.0
    assert rates.key_for(SMARTHOST, "example.net") == "smarthost"
    assert rates.key_for(MX, "example.net") == "example.net"
    assert rates.key_for(MX, "a.example.org") == ".example.org"
    assert rates.key_for(MX, "example.org") is None
    assert not OutboundRates({})


def test_the_smarthost_gets_no_more_than_its_rate_and_nothing_is_counted_a_failure(
        tmp_path, nexthop):
    arrivals = []

    def data_reply(message):
        arrivals.append(time.monotonic())
        return 250, "2.0.0 Ok: queued"
    nexthop.data_reply = data_reply
    relay = relay_with(tmp_path, nexthop.port, delivery_rates={"smarthost": "2/2s"}).start()
    try:
        queued = [send(relay, "alice@example.org", ["bob@example.net"]) for _ in range(5)]
        wait_until(lambda: len(nexthop.messages) >= 2, what="the first two")
        third = next(q for q in queued
                     if os.path.exists(os.path.join(relay.spool, "active", q + ".msg")))
        record = relay.record(third)
        # Waiting for its turn, not failed: no attempt, no error.
        assert record["attempts"] == 0
        assert record["recipients"][0]["last_error"] is None
        wait_until(lambda: len(nexthop.messages) == 5 and queue_empty(relay), timeout=30,
                   what="all five")
    finally:
        relay.stop()
    # No two-second window holds more than two deliveries (a little slack
    # for the next hop's own clock against the relay's).
    for index in range(len(arrivals) - 2):
        assert arrivals[index + 2] - arrivals[index] >= 1.9, arrivals
    log = relay.log()
    assert "[delivery_rates] smarthost: its turn is in" in log
    assert "status=deferred" not in log


def test_a_limited_domain_sharing_a_route_with_another_waits_on_its_own(tmp_path, nexthop):
    # Found in review: the limit was looked up for a job's first recipient
    # alone, so partner.test mail went unlimited whenever a recipient of
    # another domain routed to the same host came first.
    arrivals = []

    def data_reply(message):
        arrivals.append((time.monotonic(), tuple(message["recipients"])))
        return 250, "2.0.0 Ok: queued"
    nexthop.data_reply = data_reply
    route = f"[127.0.0.1]:{nexthop.port}"
    relay = relay_with(tmp_path, nexthop.port, routes={"other.test": route, "partner.test": route},
                       delivery_rates={"partner.test": "1/2s"}).start()
    try:
        for n in range(2):
            send(relay, "alice@example.org", [f"o{n}@other.test", f"p{n}@partner.test"])
        wait_until(lambda: len(nexthop.messages) == 4 and queue_empty(relay), timeout=30,
                   what="all four transactions")
    finally:
        relay.stop()
    partner = [when for when, recipients in arrivals if recipients[0].endswith("@partner.test")]
    assert sorted(r for _, r in arrivals) == [("o0@other.test",), ("o1@other.test",),
                                              ("p0@partner.test",), ("p1@partner.test",)]
    assert partner[1] - partner[0] >= 1.9, arrivals
    other = [when for when, recipients in arrivals if recipients[0].endswith("@other.test")]
    # The unlimited domain did not wait for the limited one's turn.
    assert other[1] < partner[1], arrivals


def shaping_scheduler(rates):
    """The scheduler's [delivery_rates] part alone, over ``rates``, and a
    function giving the jobs of a message (one a recipient group, all to
    the smarthost) that go at ``now``."""
    from relaymail.queue.scheduler import Scheduler
    scheduler = SimpleNamespace(_rates=OutboundRates(rates), _reserved={},
                                settings=SimpleNamespace(queue=SimpleNamespace(active_limit=5)))
    scheduler._forget_old_reservations = (
        lambda now: Scheduler._forget_old_reservations(scheduler, now))
    scheduler._rate_key = lambda destination, address: Scheduler._rate_key(
        scheduler, destination, address)

    def going(queue_id, now, groups=1):
        jobs = [SimpleNamespace(queue_id=queue_id, recipients=[f"bob{n}@example.net"],
                                destination=SimpleNamespace(kind="smarthost", label="smarthost"))
                for n in range(groups)]
        attempt = SimpleNamespace(shaped_until=None)
        return Scheduler._within_rates(scheduler, queue_id, attempt, jobs, now)
    return scheduler, going


def test_a_message_in_several_transactions_takes_one_slot():
    # Three recipient groups of one message: they go together on one slot,
    # or wait together on one reservation, and no slot is spent unused.
    scheduler, going = shaping_scheduler({"smarthost": (2, 60.0)})
    assert len(going("A", 0.0, groups=3)) == 3
    assert len(going("B", 0.0, groups=3)) == 3
    assert going("C", 1.0, groups=3) == []
    assert scheduler._reserved == {"C": {"smarthost": 60.0}}
    assert going("D", 1.0, groups=2) == []
    assert scheduler._reserved["D"] == {"smarthost": 60.0}
    assert len(going("C", 60.0, groups=3)) == 3
    assert len(going("D", 60.0, groups=2)) == 2
    assert going("E", 60.0) == []


def test_a_slot_reserved_long_ago_is_not_spent_again():
    # Found in review: ten messages that had reserved slots, held and
    # released much later, all went at once on their stale reservations.
    scheduler, going = shaping_scheduler({"smarthost": (1, 60.0)})

    def goes(queue_id, now):
        return bool(going(queue_id, now))

    assert goes("A", 0.0)
    waiting = [f"M{i}" for i in range(10)]
    assert [goes(q, 1.0) for q in waiting] == [False] * 10
    assert len(scheduler._reserved) <= 10
    # Released at t=1000: one slot a minute, as before.
    assert [goes(q, 1000.0) for q in waiting] == [True] + [False] * 9
    assert not goes("N", 1000.0)
    # The reservations of messages that never come back do not pile up.
    assert len(scheduler._reserved) <= 2 * 5 + 1
