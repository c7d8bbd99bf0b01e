"""AUTH under a password-guessing flood: hashes in progress, AUTH commands
per address per minute, and memory (relaymail.smtp.authentication)."""

import functools
import socket

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from relaymail.auth import passwords
from relaymail.auth.checker import IRelayUser
from relaymail.config import usable_cpus
from relaymail.smtp import authentication, limits
from relaymail.smtp.authentication import Authenticator, HashSlots, Unavailable
from tests.auth_flood import FloodProcess, RSSSampler, WRONG, auth_plain, rss_kib, timed_login
from tests.relay_process import RelayProcess
from tests.support import make_settings


# --- over real sockets, real scrypt ----------------------------------------

@pytest.fixture
def password_file(tmp_path):
    # The production parameters (32 MiB, ~0.2 s): what is measured is the
    # cost of real hashes.
    path = str(tmp_path / "passwd")
    passwords.set_password(path, "alice", "correct horse")
    return path


def flood_relay(tmp_path, password_file, trusted_networks="10.9.9.0/24", **auth):
    return RelayProcess(tmp_path, {
        # One inbound worker: these tests are about one process's hash
        # slots, which [server] workers would divide among several.
        "server": {"trusted_networks": trusted_networks, "workers": "1"},
        # Plain text, so that what the flood costs is hashing, not TLS
        # handshakes; and no connection limits, so that the AUTH limits
        # alone stand between the flood and the hashing.
        "auth": {"passwords": password_file, "allow_plaintext": "yes",
                 "max_concurrent_hashes": "2", **auth},
        "limits": {"connections_per_ip": "0", "connection_rate_per_ip": "0"},
    }).start()


def test_correct_login_stays_under_a_second_during_a_150_session_flood(tmp_path, password_file):
    # A short failure delay, so that the flood's hashed guesses are
    # answered (535) while the test still watches.
    relay = flood_relay(tmp_path, password_file, attempts_per_minute="0", failure_delay="0.1")
    try:
        idle = rss_kib(relay.process.pid)
        # Each session guesses again as soon as it has its answer, but at
        # most every 0.5 s: 300 guesses a second, thirty times what two
        # cores can hash and more than twice the rate of the flood
        # (whose every guess waited for the 1 s failure delay).  Unpaced,
        # the 454s come back so fast that the flood's own command traffic,
        # not hashing, is what loads this shared 2-core machine; the
        # benchmark measures that case too (benchmarks/auth_flood.py).
        flood = FloodProcess(relay.port, 150, interval=0.5)
        try:
            with RSSSampler(relay.process.pid) as rss:
                flood.wait_until_flooding()
                logins = [timed_login(relay.port, "alice", "correct horse", source="127.0.0.2")
                          for _ in range(3)]
        finally:
            flood.stop()
        replies = flood.replies
    finally:
        relay.stop()
    print(f"\nRSS idle {idle} KiB, peak during the flood {rss.peak} KiB; logins {logins}; "
          f"flood replies {replies}")
    for line, seconds in logins:
        assert line == b"235 2.7.0 Authentication successful\r\n"
        assert seconds < 1.0
    # Past the two hash slots the flood is refused at once; some of its
    # guesses were hashed and failed.
    assert replies.get("454 4.7.0 Temporary authentication failure", 0) >= 100
    assert replies.get("535 5.7.8 Error: authentication failed", 0) >= 1
    assert set(replies) <= {"454 4.7.0 Temporary authentication failure",
                            "535 5.7.8 Error: authentication failed",
                            "421 4.7.0 relay.test Error: too many errors"}
    # Two 32 MiB scrypt buffers at most, plus 150 sessions and slack; the
    # reactor's pool of ten threads hashing at once grew it by 300 MiB.
    assert rss.peak - idle < 120 * 1024


def test_believed_clients_log_in_during_a_flood_from_many_addresses(tmp_path, password_file):
    # 150 guessing sessions, each from an address of its own (the trial's
    # second flood), keep both shared slots busy however the per-address
    # rules count.  A client in trusted_networks, and one that logged in
    # before the flood, still get the reserved slot at once.
    relay = flood_relay(tmp_path, password_file, trusted_networks="127.0.0.3/32",
                        attempts_per_minute="0", failure_delay="0.1")
    try:
        line, _ = timed_login(relay.port, "alice", "correct horse", source="127.0.0.2")
        assert line == b"235 2.7.0 Authentication successful\r\n"
        sources = ",".join(f"127.0.1.{n}" for n in range(1, 151))
        flood = FloodProcess(relay.port, 150, interval=0.5, source=sources)
        try:
            flood.wait_until_flooding()
            logins = [timed_login(relay.port, "alice", "correct horse", source=source)
                      for source in ("127.0.0.2", "127.0.0.3") * 3]
        finally:
            flood.stop()
    finally:
        relay.stop()
    for line, seconds in logins:
        assert line == b"235 2.7.0 Authentication successful\r\n"
        assert seconds < 1.0
    assert flood.replies.get("454 4.7.0 Temporary authentication failure", 0) >= 100


def test_the_reserved_slot_is_for_trusted_and_known_clients_only():
    auth, portal, clock = authenticator(max_hashes=2)
    auth.check(object(), "192.0.2.1")
    auth.check(object(), "192.0.2.2")
    # Both shared slots taken: a stranger is refused, a trusted client
    # gets the one reserved slot, and nobody a second one.
    with pytest.raises(Unavailable):
        auth.check(object(), "192.0.2.3")
    auth.check(object(), "10.0.0.1", trusted=True)
    with pytest.raises(Unavailable):
        auth.check(object(), "10.0.0.2", trusted=True)
    assert (auth.slots.in_progress, auth.slots.reserved_in_progress) == (2, 1)
    portal.succeed(2)         # the trusted client's login: its slot is back
    assert (auth.slots.in_progress, auth.slots.reserved_in_progress) == (2, 0)
    portal.succeed(0)         # 192.0.2.1 logs in: known from now on
    auth.check(object(), "192.0.2.9")
    auth.check(object(), "192.0.2.1")       # the reserved slot
    assert auth.slots.reserved_in_progress == 1
    portal.succeed(2)                       # ... given back
    portal.fail(1)                          # 192.0.2.9's shared slot too
    assert (auth.slots.in_progress, auth.slots.reserved_in_progress) == (1, 0)
    # A week later it is a stranger again.
    clock.advance(authentication.KNOWN_FOR)
    auth.check(object(), "192.0.2.5")
    with pytest.raises(Unavailable):
        auth.check(object(), "192.0.2.1")
    assert auth.slots.reserved_in_progress == 0


def test_auth_commands_past_the_per_minute_limit_get_454(tmp_path, password_file):
    relay = flood_relay(tmp_path, password_file, attempts_per_minute="3", failure_delay="0")
    try:
        with RelayTalk(relay.port, "127.0.0.3") as talk:
            for _ in range(3):
                assert talk.command(f"AUTH PLAIN {WRONG}") == b"535 5.7.8 Error: authentication failed\r\n"
            assert talk.command(f"AUTH PLAIN {auth_plain('alice', 'correct horse')}") == (
                b"454 4.7.0 Error: too many AUTH commands from 127.0.0.3\r\n")
            # Refused before the exchange starts: no 334 challenge.
            assert talk.command("AUTH LOGIN") == (
                b"454 4.7.0 Error: too many AUTH commands from 127.0.0.3\r\n")
            # The session goes on.
            assert talk.command("NOOP") == b"250 2.0.0 Ok\r\n"
        # Another address has its own minute.
        line, _seconds = timed_login(relay.port, "alice", "correct horse", source="127.0.0.4")
        assert line == b"235 2.7.0 Authentication successful\r\n"
    finally:
        relay.stop()


class RelayTalk:
    """A plain session from ``source``, after EHLO; one line per reply."""

    def __init__(self, port, source):
        self.socket = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
        self.stream = self.socket.makefile("rb")

    def __enter__(self):
        assert self.stream.readline().startswith(b"220 ")
        self.socket.sendall(b"EHLO client.test\r\n")
        while not self.stream.readline().startswith(b"250 "):
            pass
        return self

    def __exit__(self, *exc):
        self.socket.close()

    def command(self, line):
        self.socket.sendall(line.encode() + b"\r\n")
        return self.stream.readline()


# --- the limits alone, with a fake clock and a portal the test answers -------

class ScriptedPortal:
    """Logs in whatever is asked, once the test fires the login's Deferred."""

    def __init__(self):
        self.pending = []

    def login(self, credentials, mind, *interfaces):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def succeed(self, index=0):
        self.pending.pop(index).callback((IRelayUser, "alice", lambda: None))

    def fail(self, index=0):
        self.pending.pop(index).errback(UnauthorizedLogin())


def authenticator(max_hashes=2, attempts_per_minute=0, failure_delay=1.0):
    clock = task.Clock()
    portal = ScriptedPortal()
    return Authenticator(portal, failure_delay, clock, max_hashes=max_hashes,
                         attempts_per_minute=attempts_per_minute), portal, clock


def test_past_the_hash_limit_the_check_is_refused_at_once_with_454():
    auth, portal, _clock = authenticator(max_hashes=2)
    auth.check(object(), "192.0.2.1")
    auth.check(object(), "192.0.2.2")
    with pytest.raises(Unavailable) as info:
        auth.check(object(), "192.0.2.3")
    assert info.value.reply.encode() == b"454 4.7.0 Temporary authentication failure\r\n"
    assert len(portal.pending) == 2          # nothing queued for later


def test_one_address_holds_at_most_half_the_slots():
    auth, portal, _clock = authenticator(max_hashes=4)
    auth.check(object(), "192.0.2.1")
    # An IPv4-mapped IPv6 address is the same client.
    auth.check(object(), "::ffff:192.0.2.1")
    with pytest.raises(Unavailable):
        auth.check(object(), "192.0.2.1")
    auth.check(object(), "192.0.2.9")
    assert len(portal.pending) == 3


def test_one_slot_is_all_one_address_gets_when_there_are_one_or_two():
    assert HashSlots(1).per_address == 1
    assert HashSlots(2).per_address == 1
    assert HashSlots(5).per_address == 2


def test_the_slot_is_freed_when_the_hash_is_done_not_after_the_failure_delay():
    auth, portal, clock = authenticator(max_hashes=1)
    answers = []
    auth.check(object(), "192.0.2.1").addCallback(answers.append)
    portal.fail()
    assert answers == [] and auth.slots.in_progress == 0
    # Another client's check may start while the first waits out its delay.
    auth.check(object(), "192.0.2.2").addCallback(answers.append)
    portal.succeed()
    assert answers == ["alice"]
    clock.advance(1.0)
    assert answers == ["alice", None]


def test_attempts_past_the_per_minute_limit_are_454_until_the_minute_is_over():
    auth, _portal, clock = authenticator(attempts_per_minute=2)
    assert auth.admit("192.0.2.1", trusted=False) is None
    assert auth.admit("192.0.2.1", trusted=False) is None
    refusal = auth.admit("192.0.2.1", trusted=False)
    assert refusal.encode() == b"454 4.7.0 Error: too many AUTH commands from 192.0.2.1\r\n"
    assert auth.admit("192.0.2.2", trusted=False) is None
    # Refused attempts count too: hammering keeps the address refused.
    clock.advance(59.9)
    assert auth.admit("192.0.2.1", trusted=False) is not None
    clock.advance(0.1)
    assert auth.admit("192.0.2.1", trusted=False) is None


def test_addresses_of_one_ipv6_prefix_are_one_client_for_both_limits():
    # The relay passes the connection gate's key, so AUTH counts clients
    # by [limits] ipv6_prefix as the connection limits do.
    clock = task.Clock()
    portal = ScriptedPortal()
    auth = Authenticator(portal, 1.0, clock, max_hashes=2, attempts_per_minute=2,
                         key=functools.partial(limits.client_key, ipv6_prefix=64))
    assert auth.admit("2001:db8::1", trusted=False) is None
    assert auth.admit("2001:db8::2", trusted=False) is None
    assert auth.admit("2001:db8::3", trusted=False).encode() == (
        b"454 4.7.0 Error: too many AUTH commands from 2001:db8::/64\r\n")
    assert auth.admit("2001:db8:0:1::1", trusted=False) is None
    auth.check(object(), "2001:db8::1")
    with pytest.raises(Unavailable):
        auth.check(object(), "2001:db8::ffff")
    auth.check(object(), "2001:db8:0:1::1")
    assert len(portal.pending) == 2


def test_trusted_clients_are_exempt_from_the_per_minute_limit():
    auth, _portal, _clock = authenticator(attempts_per_minute=1)
    for _ in range(5):
        assert auth.admit("127.0.0.1", trusted=True) is None


def test_per_minute_limit_zero_is_no_limit():
    auth, _portal, _clock = authenticator(attempts_per_minute=0)
    for _ in range(1000):
        assert auth.admit("192.0.2.1", trusted=False) is None


def test_the_per_minute_table_is_bounded():
    clock = task.Clock()
    windows = limits.AttemptWindows(clock, max_tracked=3)
    for n in range(10):
        windows.count(f"192.0.2.{n}")
    assert windows.tracked() == 3
    clock.advance(60)
    assert windows.tracked() == 0


def test_max_concurrent_hashes_auto_is_the_cpu_count(tmp_path):
    assert make_settings(tmp_path).auth.max_concurrent_hashes == usable_cpus() >= 1
    assert make_settings(tmp_path, auth__max_concurrent_hashes="3").auth.max_concurrent_hashes == 3
    assert make_settings(tmp_path).auth.attempts_per_minute == 30


@pytest.mark.parametrize("raw", ["0", "many", "-1"])
def test_bad_max_concurrent_hashes_is_a_config_error(tmp_path, raw):
    from relaymail.config import ConfigError
    with pytest.raises(ConfigError) as info:
        make_settings(tmp_path, auth__max_concurrent_hashes=raw)
    assert "[auth] max_concurrent_hashes" in str(info.value)
    assert "(or auto)" in str(info.value)


def test_an_auth_line_over_12288_octets_is_500_5_5_6_and_the_session_goes_on(
        tmp_path, password_file):
    # RFC 4954 4: the reply to an over-long line in an AUTH exchange, the
    # rest of the line read as nothing, and the exchange over.
    relay = flood_relay(tmp_path, password_file, failure_delay="0")
    try:
        with RelayTalk(relay.port, "127.0.0.5") as talk:
            assert talk.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
            assert talk.command("A" * 20000) == (
                b"500 5.5.6 Authentication exchange line is too long\r\n")
            assert talk.command("NOOP") == b"250 2.0.0 Ok\r\n"
            # Outside an exchange the same line is a command too long.
            assert talk.command("NOOP " + "x" * 20000) == b"500 5.5.2 Error: line too long\r\n"
    finally:
        relay.stop()


def test_one_account_cannot_push_the_others_out_of_the_known_clients():
    # One (phished) account logging in from many networks keeps only its
    # most recent ones; the office's success is still remembered.
    clock = task.Clock()
    portal = ScriptedPortal()
    auth = Authenticator(portal, 1.0, clock, max_hashes=2,
                         key=functools.partial(limits.client_key, ipv6_prefix=64))
    auth.check(object(), "192.0.2.10")
    portal.succeed()                                    # alice, from the office
    networks = [f"2001:db8:0:{n:x}::1" for n in range(authentication.MAX_KNOWN + 5)]
    for address in networks:
        auth.check(object(), address)
        portal.pending.pop(0).callback((IRelayUser, "mallory", lambda: None))
    assert auth._is_known("192.0.2.10")
    recent = networks[-authentication.MAX_KNOWN_PER_USER:]
    assert [auth._is_known(auth._key(a)) for a in recent] == (
        [True] * authentication.MAX_KNOWN_PER_USER)
    assert not auth._is_known(auth._key(networks[-authentication.MAX_KNOWN_PER_USER - 1]))
    assert len(auth._known) == authentication.MAX_KNOWN_PER_USER + 1
