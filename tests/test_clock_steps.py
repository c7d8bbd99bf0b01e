"""The wall clock stepped under a running relay (NTP at boot, a virtual
machine restored from a snapshot, ``date -s``): its timeouts keep their
length (relaymail.clock).

The relay runs under libfaketime (Debian's ``faketime``, which ``make
test-tools`` installs), which shifts the clock its processes read, and
only the wall clock (``DONT_FAKE_MONOTONIC``): by the offset in a file
the test rewrites, read at every call.  Stepped back an hour, a relay
timing its calls by the wall clock, as Twisted's reactor does, let an
idle client keep its session for that hour and a stalled next hop its
delivery.
"""

import glob
import os
import socket
import threading
import time

import pytest

from relaymail import clock
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess
from tests.test_delivery import send, wait_until

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


@pytest.fixture
def wall_clock(tmp_path):
    """Write a step (``"-3600"``: seconds) to move the relay's wall clock;
    ``environment`` has the relay run under libfaketime."""
    assert LIBFAKETIME, "libfaketime is missing: make test-tools installs it (package faketime)"
    offset = tmp_path / "clock-offset"
    offset.write_text("+0\n")

    class WallClock:
        environment = {"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME_TIMESTAMP_FILE": str(offset),
                       "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}

        @staticmethod
        def step(seconds):
            offset.write_text(f"{seconds:+d}\n")
    return WallClock()


def relay_under(wall_clock, tmp_path, sections):
    relay = RelayProcess(tmp_path, sections)
    relay.environment = wall_clock.environment
    return relay


def test_an_idle_session_times_out_on_time_after_the_clock_is_stepped_back(tmp_path, wall_clock):
    relay = relay_under(wall_clock, tmp_path, {"limits": {"command_timeout": "2"}}).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), 10) as client:
            assert client.recv(512).startswith(b"220 ")
            client.sendall(b"EHLO client.test\r\n")
            assert client.recv(4096).startswith(b"250")
            wall_clock.step(-3600)
            # Within the socket's 10 s, not an hour later.
            assert client.recv(512) == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
            assert client.recv(512) == b""
    finally:
        relay.stop()


def test_a_stalled_delivery_times_out_on_time_after_the_clock_is_stepped_back(
        tmp_path, wall_clock):
    next_hop = NextHop()
    reached, release = threading.Event(), threading.Event()

    def stalls(sender):
        reached.set()
        release.wait(30)
        return 250, "2.1.0 Ok"
    next_hop.mail_reply = stalls
    relay = relay_under(wall_clock, tmp_path, {
        "delivery": {"smarthost": f"[127.0.0.1]:{next_hop.port}", "smarthost_tls": "none",
                     "command_timeout": "2"},
        "queue": {"min_backoff": "600", "max_backoff": "600"}}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        assert reached.wait(20), "the delivery did not reach MAIL"
        wall_clock.step(-3600)
        wait_until(lambda: relay.record(queue_id)["attempts"] == 1, timeout=15,
                   what="the delivery to time out")
        [recipient] = relay.record(queue_id)["recipients"]
        assert recipient["status"] == "deferred"
        remote = f"127.0.0.1[127.0.0.1]:{next_hop.port}"
        assert recipient["last_error"] == (
            f"4.4.2 conversation with {remote} timed out while receiving the reply to MAIL "
            f"FROM (from {remote})")
    finally:
        release.set()
        relay.stop()
        next_hop.stop()


class _Reactor:
    """What run_steadily sets ``seconds`` on."""


def test_a_worker_runs_on_the_masters_offset(monkeypatch):
    # So that the times workers share in memory (relaymail.process.
    # shared_counts) agree though the wall clock moved between their
    # starts; the variable is not left for what the worker starts.
    monkeypatch.setattr(clock, "_offset", None)
    monkeypatch.setenv(clock.OFFSET_VARIABLE, "1000.5")
    reactor = _Reactor()
    clock.run_steadily(reactor)
    assert clock.OFFSET_VARIABLE not in os.environ
    assert abs(reactor.seconds() - (time.monotonic() + 1000.5)) < 0.1
    assert clock.for_workers({"A": "b"}) == {"A": "b", clock.OFFSET_VARIABLE: "1000.5"}


def test_the_master_anchors_the_steady_clock_at_the_epoch(monkeypatch):
    monkeypatch.setattr(clock, "_offset", None)
    monkeypatch.delenv(clock.OFFSET_VARIABLE, raising=False)
    env = {"A": "b"}
    # A copy, even before there is an offset: the master's _environment()
    # changes what it is given.  Found by review.
    assert clock.for_workers(env) == env and clock.for_workers(env) is not env
    reactor = _Reactor()
    clock.run_steadily(reactor)
    first = reactor.seconds()
    assert abs(first - time.time()) < 0.1
    assert reactor.seconds() >= first
    assert float(clock.for_workers({})[clock.OFFSET_VARIABLE]) == pytest.approx(
        time.time() - time.monotonic(), abs=0.1)
