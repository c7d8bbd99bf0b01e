"""Tests for relaymail.smtp.limits: connections at once and per minute."""

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from relaymail.config import load_config
from relaymail.smtp.limits import RATE_WINDOW, ConnectionGate, client_key

CLIENT = "192.0.2.1"
OTHER = "192.0.2.2"


def gate(connections=1000, per_ip=50, rate=120, limits=None, **keywords):
    """A gate with these limits (and ``limits``, more [limits] keys) and a
    fake clock at 1000 s.  No trusted reserve unless ``limits`` sets one."""
    overrides = {
        ("limits", "connections"): str(connections),
        ("limits", "connections_per_ip"): str(per_ip),
        ("limits", "connection_rate_per_ip"): str(rate),
        ("limits", "trusted_reserve"): "0",
    }
    overrides.update((("limits", key), value) for key, value in (limits or {}).items())
    settings = load_config(None, overrides)
    clock = Clock()
    clock.advance(1000)
    return ConnectionGate(settings, clock, **keywords), clock


def admit_many(the_gate, count, ip=CLIENT, exempt=False):
    """Admit ``count`` connections; the answers."""
    return [the_gate.admit(ip, exempt) for _ in range(count)]


# --- how many at once ------------------------------------------------------------

def test_admitted_connections_are_counted():
    the_gate, _ = gate()
    assert the_gate.admit(CLIENT, False) is None
    assert the_gate.admit(OTHER, False) is None
    assert the_gate.connections == 2
    assert the_gate.connections_from(CLIENT) == 1


def test_overall_limit():
    the_gate, _ = gate(connections=3)
    assert admit_many(the_gate, 2) == [None, None]
    assert the_gate.admit(OTHER, False) is None
    assert the_gate.admit("198.51.100.7", False) == "Error: too many connections"
    assert the_gate.connections == 3


def test_overall_limit_applies_to_exempt_clients():
    the_gate, _ = gate(connections=2)
    assert admit_many(the_gate, 2, exempt=True) == [None, None]
    assert the_gate.admit("127.0.0.1", True) == "Error: too many connections"


def test_per_ip_limit():
    the_gate, _ = gate(per_ip=2)
    assert admit_many(the_gate, 3) == [
        None, None, "Error: too many connections from 192.0.2.1"]
    assert the_gate.admit(OTHER, False) is None
    assert the_gate.connections_from(CLIENT) == 2
    assert the_gate.connections == 3


def test_refused_connection_is_not_counted_as_open():
    the_gate, _ = gate(per_ip=1)
    the_gate.admit(CLIENT, False)
    assert the_gate.admit(CLIENT, False) is not None
    assert the_gate.connections == 1
    the_gate.release(CLIENT)
    assert the_gate.connections == 0
    assert the_gate.admit(CLIENT, False) is None


def test_release_makes_room():
    the_gate, _ = gate(connections=1)
    the_gate.admit(CLIENT, False)
    assert the_gate.admit(OTHER, False) == "Error: too many connections"
    the_gate.release(CLIENT)
    assert the_gate.admit(OTHER, False) is None


def test_exempt_clients_skip_the_per_ip_limit_but_are_counted():
    the_gate, _ = gate(per_ip=1)
    assert admit_many(the_gate, 5, exempt=True) == [None] * 5
    assert the_gate.connections_from(CLIENT) == 5
    assert the_gate.connections == 5


def test_per_ip_limit_zero_is_off():
    the_gate, _ = gate(per_ip=0, rate=0)
    assert admit_many(the_gate, 200) == [None] * 200


def test_release_without_admit_changes_nothing():
    the_gate, _ = gate()
    the_gate.admit(CLIENT, False)
    the_gate.release(OTHER)
    the_gate.release(CLIENT)
    the_gate.release(CLIENT)
    assert the_gate.connections == 0
    assert the_gate.connections_from(CLIENT) == 0


def test_ipv4_mapped_ipv6_counts_as_ipv4():
    the_gate, _ = gate(per_ip=2)
    assert the_gate.admit("::ffff:192.0.2.1", False) is None
    assert the_gate.admit(CLIENT, False) is None
    assert the_gate.admit("::FFFF:192.0.2.1", False) == (
        "Error: too many connections from 192.0.2.1")
    the_gate.release("::ffff:192.0.2.1")
    assert the_gate.connections_from(CLIENT) == 1


def test_ipv6_written_differently_is_one_client():
    the_gate, _ = gate(per_ip=1)
    assert the_gate.admit("2001:db8::1", False) is None
    assert the_gate.admit("2001:DB8:0:0::1", False) == (
        "Error: too many connections from 2001:db8::/64")


@pytest.mark.parametrize("raw, key", [
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("2001:0db8::0001", "2001:db8::1"),
    ("192.0.2.1", "192.0.2.1"),
    ("/run/relaymail.sock", "/run/relaymail.sock"),
])
def test_client_key(raw, key):
    assert client_key(raw) == key


@pytest.mark.parametrize("raw, prefixes, key", [
    ("2001:db8:1:2:aaaa::1", (32, 64), "2001:db8:1:2::/64"),
    ("2001:db8:1:2:aaaa:bbbb::1", (32, 84), "2001:db8:1:2:aaaa:b000::/84"),
    ("2001:db8:1:2:aaaa::1", (32, 128), "2001:db8:1:2:aaaa::1"),
    ("192.0.2.77", (24, 64), "192.0.2.0/24"),
    ("::ffff:192.0.2.77", (24, 64), "192.0.2.0/24"),
    ("192.0.2.77", (32, 64), "192.0.2.77"),
])
def test_client_key_with_prefixes(raw, prefixes, key):
    assert client_key(raw, *prefixes) == key


# --- one client, many addresses ------------------------------------------------------

def test_a_thousand_addresses_of_one_ipv6_64_are_one_client():
    the_gate, _ = gate(per_ip=50, rate=0)
    answers = [the_gate.admit(f"2001:db8:1:2:{n:x}::{n:x}", False) for n in range(1000)]
    assert answers == [None] * 50 + ["Error: too many connections from 2001:db8:1:2::/64"] * 950
    assert the_gate.connections_from("2001:db8:1:2::ffff") == 50
    assert the_gate.connections == 50
    # The neighbouring /64 is someone else.
    assert the_gate.admit("2001:db8:1:3::1", False) is None
    for n in range(50):
        the_gate.release(f"2001:db8:1:2:{n:x}::{n:x}")
    assert the_gate.connections == 1


def test_the_rate_is_counted_per_ipv6_64_too():
    the_gate, _ = gate(per_ip=0, rate=3)
    answers = []
    for n in range(4):
        answers.append(the_gate.admit(f"2001:db8::{n + 1}", False))
        the_gate.release(f"2001:db8::{n + 1}")
    assert answers == [None, None, None, "Error: too many connections per minute from 2001:db8::/64"]
    assert the_gate.tracked() == 1


def test_ipv6_prefix_128_counts_single_addresses():
    the_gate, _ = gate(per_ip=1, limits={"ipv6_prefix": "128"})
    assert the_gate.admit("2001:db8::1", False) is None
    assert the_gate.admit("2001:db8::2", False) is None
    assert the_gate.admit("2001:db8::1", False) == "Error: too many connections from 2001:db8::1"


def test_ipv4_prefix_counts_a_network():
    the_gate, _ = gate(per_ip=2, limits={"ipv4_prefix": "24"})
    assert [the_gate.admit(f"198.51.100.{n}", False) for n in (1, 2, 3)] == [
        None, None, "Error: too many connections from 198.51.100.0/24"]
    assert the_gate.admit("198.51.101.1", False) is None


def test_ipv4_is_per_address_by_default():
    the_gate, _ = gate(per_ip=1)
    assert [the_gate.admit(f"198.51.100.{n}", False) for n in range(1, 31)] == [None] * 30


# --- the trusted reserve ---------------------------------------------------------------

def test_outsiders_cannot_take_the_trusted_reserve():
    the_gate, _ = gate(connections=10, per_ip=0, limits={"trusted_reserve": "2"})
    # Thirty addresses of one /24, as in the attack: each counted alone,
    # but together they stop where the reserve begins.
    answers = [the_gate.admit(f"198.51.100.{n}", False) for n in range(1, 31)]
    assert answers == [None] * 8 + ["Error: too many connections"] * 22
    assert the_gate.admit("127.0.0.1", True) is None
    assert the_gate.admit("127.0.0.1", True) is None
    assert the_gate.admit("127.0.0.1", True) == "Error: too many connections"
    assert the_gate.connections == 10


def test_trusted_connections_count_against_outsiders_too():
    the_gate, _ = gate(connections=4, per_ip=0, limits={"trusted_reserve": "1"})
    assert admit_many(the_gate, 2, ip="127.0.0.1", exempt=True) == [None, None]
    assert the_gate.admit(CLIENT, False) is None
    assert the_gate.admit(OTHER, False) == "Error: too many connections"
    assert the_gate.admit("127.0.0.1", True) is None


def test_default_reserve_is_a_tenth_of_the_connections():
    the_gate = ConnectionGate(load_config(None, {("limits", "connections_per_ip"): "0",
                                                 ("limits", "connection_rate_per_ip"): "0"}),
                              Clock())
    answers = [the_gate.admit(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", False)
               for n in range(1000)]
    assert answers.count(None) == 900
    assert answers[900] == "Error: too many connections"
    assert admit_many(the_gate, 101, ip="127.0.0.1", exempt=True) == [None] * 100 + [
        "Error: too many connections"]


# --- stress -------------------------------------------------------------------------------

def stressed_gate(connections=100, threshold="20"):
    the_gate, clock = gate(connections=connections, per_ip=0, rate=0,
                           limits={"stress_threshold": threshold})
    flips = []
    the_gate.watch(flips.append)
    return the_gate, flips


def test_stress_starts_at_the_threshold_and_ends_a_tenth_below():
    the_gate, flips = stressed_gate()
    for n in range(19):
        the_gate.admit(f"10.0.0.{n}", False)
    assert not the_gate.stressed and flips == []
    with capturedLogs() as events:
        the_gate.admit("10.0.0.19", False)
        assert the_gate.stressed and flips == [True]
        the_gate.admit("10.0.0.20", False)       # no second report
        the_gate.release("10.0.0.20")
        the_gate.release("10.0.0.19")
        assert the_gate.stressed and flips == [True]     # 19 open: still stressed
        the_gate.release("10.0.0.18")
        assert not the_gate.stressed and flips == [True, False]
    assert [event["log_format"] for event in events] == [
        "stress: {open} of {limit} connections open; outsiders get the stress timeout "
        "and error limits",
        "stress over: {open} of {limit} connections open"]
    assert [(event["open"], event["limit"]) for event in events] == [(20, 100), (18, 100)]


def test_stress_threshold_as_a_percentage():
    the_gate, flips = stressed_gate(connections=10, threshold="50%")
    admit_many(the_gate, 4, ip="127.0.0.1", exempt=True)
    assert flips == []
    # Trusted clients fill the table as much as anyone.
    the_gate.admit("127.0.0.1", True)
    assert flips == [True]


def test_unwatched_callbacks_are_not_called():
    the_gate, flips = stressed_gate(connections=10, threshold="1")
    the_gate.unwatch(flips.append)
    the_gate.unwatch(flips.append)       # twice: no error
    the_gate.admit(CLIENT, False)
    assert the_gate.stressed and flips == []


# --- how many per minute ---------------------------------------------------------

def test_rate_limit():
    the_gate, _ = gate(rate=3)
    answers = []
    for _ in range(4):
        answers.append(the_gate.admit(CLIENT, False))
        the_gate.release(CLIENT)
    assert answers == [None, None, None,
                       "Error: too many connections per minute from 192.0.2.1"]
    assert the_gate.admit(OTHER, False) is None


def test_rate_window_rolls_over():
    the_gate, clock = gate(rate=2)
    assert admit_many(the_gate, 3)[-1] == (
        "Error: too many connections per minute from 192.0.2.1")
    clock.advance(RATE_WINDOW - 0.1)
    assert the_gate.admit(CLIENT, False) is not None
    clock.advance(0.1)
    assert admit_many(the_gate, 3) == [
        None, None, "Error: too many connections per minute from 192.0.2.1"]


def test_window_starts_at_the_first_attempt():
    the_gate, clock = gate(rate=2)
    the_gate.admit(CLIENT, False)
    clock.advance(30)
    the_gate.admit(CLIENT, False)
    clock.advance(29)
    assert the_gate.admit(CLIENT, False) is not None
    clock.advance(1)   # 60 s after the first attempt: a new minute
    assert the_gate.admit(CLIENT, False) is None


def test_refused_attempts_count_towards_the_rate():
    # Refused for the per-IP count, and then for the rate even though a
    # connection was released: the refused attempts were counted.
    the_gate, _ = gate(per_ip=1, rate=3)
    assert admit_many(the_gate, 3) == [
        None, "Error: too many connections from 192.0.2.1",
        "Error: too many connections from 192.0.2.1"]
    the_gate.release(CLIENT)
    assert the_gate.admit(CLIENT, False) == (
        "Error: too many connections per minute from 192.0.2.1")


def test_attempts_refused_by_the_overall_limit_count_too():
    the_gate, _ = gate(connections=1, rate=2)
    the_gate.admit(OTHER, False)
    assert the_gate.admit(CLIENT, False) == "Error: too many connections"
    the_gate.release(OTHER)
    assert the_gate.admit(CLIENT, False) is None
    the_gate.release(CLIENT)
    assert the_gate.admit(CLIENT, False) == (
        "Error: too many connections per minute from 192.0.2.1")


def test_overall_limit_is_reported_before_the_per_ip_ones():
    the_gate, _ = gate(connections=1, per_ip=1, rate=1)
    the_gate.admit(CLIENT, False)
    assert the_gate.admit(CLIENT, False) == "Error: too many connections"


def test_exempt_clients_skip_the_rate_limit():
    the_gate, _ = gate(rate=1)
    assert admit_many(the_gate, 10, exempt=True) == [None] * 10
    assert the_gate.tracked() == 0


def test_rate_limit_zero_is_off():
    the_gate, _ = gate(rate=0)
    for _ in range(500):
        assert the_gate.admit(CLIENT, False) is None
        the_gate.release(CLIENT)
    assert the_gate.tracked() == 0


def test_rate_is_per_address_after_mapping():
    the_gate, _ = gate(rate=1, per_ip=0)
    assert the_gate.admit("::ffff:192.0.2.1", False) is None
    assert the_gate.admit(CLIENT, False) == (
        "Error: too many connections per minute from 192.0.2.1")


def test_clock_going_backwards_starts_a_new_window():
    the_gate, clock = gate(rate=1)
    the_gate.admit(CLIENT, False)
    clock.rightNow -= 3600   # the wall clock was set back an hour
    assert the_gate.admit(CLIENT, False) is None


# --- memory ------------------------------------------------------------------------

def test_idle_addresses_are_forgotten():
    the_gate, clock = gate()
    for number in range(1000):
        the_gate.admit(f"10.0.{number // 256}.{number % 256}", False)
        the_gate.release(f"10.0.{number // 256}.{number % 256}")
    assert the_gate.tracked() == 1000
    clock.advance(RATE_WINDOW)
    assert the_gate.tracked() == 0


def test_pruning_keeps_addresses_still_in_their_minute():
    the_gate, clock = gate(rate=1)
    the_gate.admit(CLIENT, False)
    clock.advance(40)
    the_gate.admit(OTHER, False)
    clock.advance(20)   # CLIENT's minute is over, OTHER's is not
    assert the_gate.tracked() == 1
    assert the_gate.admit(OTHER, False) == (
        "Error: too many connections per minute from 192.0.2.2")
    assert the_gate.admit(CLIENT, False) is None


def test_admit_prunes_without_being_asked():
    the_gate, clock = gate()
    for number in range(100):
        the_gate.admit(f"10.0.0.{number}", False)
    clock.advance(RATE_WINDOW)
    the_gate.admit(CLIENT, False)
    assert len(the_gate._rates._windows) == 1


def test_table_is_capped_under_a_flood_of_addresses():
    the_gate, _ = gate(per_ip=0, max_tracked=50)
    for number in range(10_000):
        assert the_gate.admit(f"2001:db8:{number:x}::1", False) is None
        the_gate.release(f"2001:db8:{number:x}::1")
    assert the_gate.tracked() == 50
    assert the_gate.connections == 0


def test_cap_forgets_the_oldest_window_first():
    the_gate, clock = gate(rate=1, max_tracked=2)
    the_gate.admit("10.0.0.1", False)
    clock.advance(1)
    the_gate.admit("10.0.0.2", False)
    clock.advance(1)
    the_gate.admit("10.0.0.3", False)   # pushes out 10.0.0.1
    assert the_gate.admit("10.0.0.2", False) == (
        "Error: too many connections per minute from 10.0.0.2")
    assert the_gate.admit("10.0.0.1", False) is None


def test_open_counts_do_not_outlive_their_connections():
    the_gate, _ = gate()
    for number in range(1000):
        the_gate.admit(f"10.1.{number // 256}.{number % 256}", False)
    for number in range(1000):
        the_gate.release(f"10.1.{number // 256}.{number % 256}")
    assert the_gate._open == {}


def test_default_clock_is_the_reactor():
    from twisted.internet import reactor
    the_gate = ConnectionGate(load_config())
    assert the_gate._clock is reactor
    assert the_gate.admit(CLIENT, False) is None
