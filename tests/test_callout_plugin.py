"""The ``callout`` plugin: the real relay (twistd) with ``[plugins] recipients
= callout`` asking a real next-hop SMTP server (tests/nexthop.py) about each
recipient, over real sockets; and its options refused as config errors."""

import os
import re
import signal
import socket
import threading
import time

import pytest
from twisted.internet import defer, task

from relaymail.config import ConfigError
from relaymail.delivery.client import ClientConfig, DeliveryError, RecipientResult
from relaymail.interfaces import Decision
from relaymail.plugins.callout import callout
from relaymail.plugins.callout_client import REUSE_TIME_LIMIT, CalloutHop, SessionPool
from relaymail.policy.loader import RELAY_KEYS, PluginContext, build_hooks
from relaymail.process.shared_counts import client_hash, pack_enhanced, unpack_enhanced
from relaymail.address import parse_forward_path
from tests.certs import self_signed
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess, free_port
from tests.support import make_settings
from tests.test_delivery import wait_until
from tests.test_hooks import Client

#: Short enough to wait out in a test; the RCPTs of one test come well
#: within it.
POSITIVE_TTL = 3.0
NEGATIVE_TTL = 2.0
IDLE_TIME = 0.5


def script(address):
    """The hop's answers, by local part."""
    local = address.split("@")[0]
    if local.startswith("unknown"):
        # A stranger's text, with a byte a terminal would obey: it must
        # stay out of our replies.
        return 550, "5.1.1 <\x1b[31m> User unknown in virtual mailbox table"
    if local.startswith("busy"):
        return 451, "4.3.0 Temporary lookup failure"
    if local.startswith("odd"):
        return 553, "mailbox name not allowed"
    return 250, "2.1.5 Ok"


@pytest.fixture(scope="module")
def hop():
    server = NextHop(starttls=self_signed("127.0.0.1"))
    server.rcpt_reply = script
    yield server
    server.stop()


@pytest.fixture(scope="module")
def silent():
    """A listener that takes connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, hop, silent):
    """One inbound worker (the caches and sessions are per process).
    example.com is routed to the hop; slow.example to a hop that never
    answers; down.example has no route, so it is asked at the smarthost,
    where nobody listens."""
    process = RelayProcess(tmp_path_factory.mktemp("callout"), {
        "server": {"workers": "1", "trusted_networks": "127.0.0.1/32"},
        "relay": {"domains": "example.com, slow.example, down.example"},
        "routes": {"example.com": f"[127.0.0.1]:{hop.port}",
                   "slow.example": f"[127.0.0.1]:{silent}"},
        "plugins": {"recipients": "callout"},
        "plugin:callout": {"positive_ttl": str(POSITIVE_TTL), "negative_ttl": str(NEGATIVE_TTL),
                           "idle_time": str(IDLE_TIME), "timeout": "1.5"},
    })
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def lenient(tmp_path_factory):
    """A relay that accepts when the next hop cannot be asked, at a fixed
    ``next_hop`` where nobody listens."""
    process = RelayProcess(tmp_path_factory.mktemp("callout-accept"), {
        "server": {"workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "callout"},
        "plugin:callout": {"next_hop": f"localhost:{free_port()}",
                           "on_temporary_failure": "accept"},
    })
    yield process.start()
    process.stop()


def session(port):
    client = Client(port)
    assert client.reply() == "220 relay.test ESMTP relaymail\r\n"
    assert client.ask("EHLO client.test").startswith("250-relay.test")
    assert client.ask("MAIL FROM:<sender@example.org>") == "250 2.1.0 Ok\r\n"
    return client


def settled(hop):
    """Wait until no session is open at the hop (the pool's idle ones
    closed), and return where its command log stands."""
    wait_until(lambda: hop.active == 0, timeout=10, what="the hop's sessions to close")
    return len(hop.commands), hop.connections


def asked(hop, start):
    return [command for command in hop.commands[start:] if command.startswith("RCPT")]


def test_a_known_user_is_accepted(relay, hop):
    start, _ = settled(hop)
    client = session(relay.port)
    assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert asked(hop, start) == ["RCPT TO:<alice@example.com>"]
    assert "to=<alice@example.com> by=callout: 250 2.1.5 Ok" in relay.log()


def test_an_unknown_user_is_refused_with_the_hops_codes_and_not_its_text(relay, hop):
    client = session(relay.port)
    assert client.ask("RCPT TO:<unknown.bob@example.com>") == (
        "550 5.1.1 Recipient address rejected: unknown at the next hop (550 5.1.1)\r\n")
    # Without an enhanced code from the hop, the generic one of its class
    # (RFC 3463 3.1), as delivery reports it.
    assert client.ask("RCPT TO:<odd.carol@example.com>") == (
        "550 5.1.1 Recipient address rejected: unknown at the next hop (553 5.0.0)\r\n")
    client.close()
    log = relay.log()
    # The hop's text is in the log, escaped, after the session's id.
    session_id, = re.findall(r"\] (\w{8}) \S+: rcpt from=\S+ to=<unknown\.bob@example\.com>", log)
    assert (f"{session_id} callout: [127.0.0.1]:{hop.port} said 550 5.1.1 <\\x{{1B}}[31m> User "
            "unknown in virtual mailbox table to RCPT TO:<unknown.bob@example.com>") in log


def test_a_hop_4xx_defers_with_450(relay, hop):
    client = session(relay.port)
    assert client.ask("RCPT TO:<busy.dave@example.com>") == (
        "450 4.4.3 Recipient address not verified: the next hop could not be asked "
        "(it said 451 4.3.0), try again later\r\n")
    client.close()


def test_a_hop_that_is_down_defers_with_451(relay):
    client = session(relay.port)
    started = time.monotonic()
    assert client.ask("RCPT TO:<erin@down.example>") == (
        "451 4.4.1 Recipient address not verified: the next hop could not be asked, "
        "try again later\r\n")
    assert time.monotonic() - started < 1.5
    client.close()
    assert "could not be asked about <erin@down.example>: connect to" in relay.log()
    assert "Connection refused" in relay.log()


def test_a_hop_that_does_not_answer_defers_within_the_callout_timeout(relay):
    client = session(relay.port)
    started = time.monotonic()
    assert client.ask("RCPT TO:<frank@slow.example>") == (
        "451 4.4.1 Recipient address not verified: the next hop could not be asked, "
        "try again later\r\n")
    took = time.monotonic() - started
    assert 1.4 < took < 4, took
    client.close()
    assert "could not be asked about <frank@slow.example>: no answer within 1.5 s" in relay.log()


def test_temporary_failures_are_not_remembered(relay, hop):
    start, _ = settled(hop)
    client = session(relay.port)
    for _ in range(2):
        assert client.ask("RCPT TO:<busy.gina@example.com>").startswith("450 4.4.3 ")
    client.close()
    assert asked(hop, start) == ["RCPT TO:<busy.gina@example.com>"] * 2


def test_known_and_unknown_answers_are_remembered_until_their_ttl(relay, hop):
    start, _ = settled(hop)
    client = session(relay.port)
    assert client.ask("RCPT TO:<harry@example.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("RCPT TO:<unknown.ivy@example.com>").startswith("550 5.1.1 ")
    answered = time.monotonic()
    # Again, the domain in another case: from the caches, the hop not asked.
    assert client.ask("RSET") == "250 2.0.0 Ok\r\n"
    assert client.ask("MAIL FROM:<sender@example.org>") == "250 2.1.0 Ok\r\n"
    assert client.ask("RCPT TO:<harry@EXAMPLE.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("RCPT TO:<unknown.ivy@Example.Com>") == (
        "550 5.1.1 Recipient address rejected: unknown at the next hop (550 5.1.1)\r\n")
    assert time.monotonic() - answered < NEGATIVE_TTL, "too slow to test the cache"
    assert asked(hop, start) == ["RCPT TO:<harry@example.com>", "RCPT TO:<unknown.ivy@example.com>"]
    # The local part is compared as written (RFC 5321 2.4): another question.
    assert client.ask("RCPT TO:<Harry@example.com>") == "250 2.1.5 Ok\r\n"
    assert asked(hop, start)[2:] == ["RCPT TO:<Harry@example.com>"]

    # The negative answer goes first, the positive one later.
    time.sleep(max(0.0, answered + NEGATIVE_TTL + 0.1 - time.monotonic()))
    assert client.ask("RCPT TO:<unknown.ivy@example.com>").startswith("550 5.1.1 ")
    assert client.ask("RCPT TO:<harry@example.com>") == "250 2.1.5 Ok\r\n"
    assert asked(hop, start)[3:] == ["RCPT TO:<unknown.ivy@example.com>"]
    time.sleep(max(0.0, answered + POSITIVE_TTL + 0.1 - time.monotonic()))
    assert client.ask("RCPT TO:<harry@example.com>") == "250 2.1.5 Ok\r\n"
    assert asked(hop, start)[4:] == ["RCPT TO:<harry@example.com>"]
    client.close()


def test_recipients_of_one_session_share_one_hop_connection_and_the_mail_is_delivered(
        relay, hop):
    start, connections = settled(hop)
    delivered = len(hop.messages)
    client = session(relay.port)
    for name in ("jack", "kate", "unknown.liam", "mia"):
        client.send(f"RCPT TO:<{name}@example.com>")
    assert [client.reply() for _ in range(4)] == [
        "250 2.1.5 Ok\r\n", "250 2.1.5 Ok\r\n",
        "550 5.1.1 Recipient address rejected: unknown at the next hop (550 5.1.1)\r\n",
        "250 2.1.5 Ok\r\n"]
    assert hop.connections == connections + 1
    # Opportunistic STARTTLS, then one question after another, each
    # transaction reset before the next; QUIT once the session idled.
    wait_until(lambda: "QUIT" in hop.commands[start:], timeout=10, what="QUIT")
    assert hop.commands[start:] == [
        "EHLO relay.test", "STARTTLS", "EHLO relay.test",
        "MAIL FROM:<>", "RCPT TO:<jack@example.com>",
        "RSET", "MAIL FROM:<>", "RCPT TO:<kate@example.com>",
        "RSET", "MAIL FROM:<>", "RCPT TO:<unknown.liam@example.com>",
        "RSET", "MAIL FROM:<>", "RCPT TO:<mia@example.com>",
        "QUIT"]

    assert client.ask("DATA").startswith("354 ")
    assert client.ask("Subject: verified\r\n\r\nthree of four\r\n.").startswith(
        "250 2.0.0 Ok: queued as ")
    client.close()
    message = hop.wait_for(delivered + 1)[-1]
    assert message["sender"] == "sender@example.org"
    assert message["recipients"] == ["jack@example.com", "kate@example.com", "mia@example.com"]
    assert b"three of four" in message["data"]


def test_an_idle_session_is_reused_by_the_next_client(relay, hop):
    start, connections = settled(hop)
    for name in ("nina", "oscar"):
        client = session(relay.port)
        assert client.ask(f"RCPT TO:<{name}@example.com>") == "250 2.1.5 Ok\r\n"
        client.close()
    assert hop.connections == connections + 1
    assert asked(hop, start) == ["RCPT TO:<nina@example.com>", "RCPT TO:<oscar@example.com>"]


def test_vrfy_gets_no_opinion(relay, hop):
    start, _ = settled(hop)
    client = Client(relay.port)
    client.reply()
    client.ask("EHLO client.test")
    assert client.ask("VRFY unknown.pat@example.com").startswith("252 ")
    client.close()
    assert asked(hop, start) == []


def test_other_domains_are_left_to_the_relay_rule(relay, hop):
    start, _ = settled(hop)
    client = session(relay.port)
    # 127.0.0.1 is trusted: it may relay anywhere, without a callout.
    assert client.ask("RCPT TO:<quinn@example.net>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert asked(hop, start) == []
    assert "to=<quinn@example.net> by=relay-rule: 250 2.1.5 Ok" in relay.log()


def test_on_temporary_failure_accept_takes_what_cannot_be_checked(lenient):
    client = session(lenient.port)
    assert client.ask("RCPT TO:<rose@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert "could not be asked about <rose@example.com>: connect to" in lenient.log()


def test_accept_on_a_hop_4xx_and_sessions_are_capped_per_hop(tmp_path):
    hop = NextHop(extensions=("ENHANCEDSTATUSCODES",))      # no PIPELINING, no STARTTLS
    gate = threading.Event()

    def slow(address):
        if address.startswith("busy"):
            return 450, "4.2.1 Mailbox busy"
        gate.wait(5)
        return 250, "2.1.5 Ok"
    hop.rcpt_reply = slow
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "callout"},
        "plugin:callout": {"next_hop": f"[127.0.0.1]:{hop.port}", "max_sessions": "1",
                           "on_temporary_failure": "accept", "timeout": "5"},
    })
    relay.start()
    try:
        first, second = session(relay.port), session(relay.port)
        first.send("RCPT TO:<sam@example.com>")
        wait_until(lambda: len(asked(hop, 0)) == 1, timeout=5, what="the first question")
        second.send("RCPT TO:<tess@example.com>")
        time.sleep(0.3)
        # The second question waits for the one session there may be.
        assert len(asked(hop, 0)) == 1 and hop.connections == 1
        gate.set()
        assert first.reply() == "250 2.1.5 Ok\r\n"
        assert second.reply() == "250 2.1.5 Ok\r\n"
        assert hop.max_active == 1
        assert first.ask("RCPT TO:<busy.uma@example.com>") == "250 2.1.5 Ok\r\n"
        first.close()
        second.close()
        # Without PIPELINING every command waits for its reply; the same
        # order still.
        assert hop.commands[:5] == ["EHLO relay.test", "MAIL FROM:<>", "RCPT TO:<sam@example.com>",
                                    "RSET", "MAIL FROM:<>"]
    finally:
        relay.stop()
        hop.stop()


def test_the_same_address_asked_by_two_sessions_at_once_is_one_question(tmp_path):
    hop = NextHop(extensions=("ENHANCEDSTATUSCODES",))
    gate = threading.Event()

    def slow(address):
        gate.wait(5)
        return (550, "5.1.1 User unknown") if address.startswith("gone") else (250, "2.1.5 Ok")
    hop.rcpt_reply = slow
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "callout"},
        "plugin:callout": {"next_hop": f"[127.0.0.1]:{hop.port}", "max_sessions": "4",
                           "timeout": "5", "positive_ttl": "0", "negative_ttl": "0"},
    })
    relay.start()
    try:
        clients = [session(relay.port) for _ in range(4)]
        clients[0].send("RCPT TO:<gone@example.com>")
        wait_until(lambda: len(asked(hop, 0)) == 1, timeout=5, what="the first question")
        for client in clients[1:3]:
            client.send("RCPT TO:<gone@example.com>")
        # A different address is a question of its own, on another hop
        # session, while the first is still unanswered.  (It comes from a
        # session of its own: a session's next RCPT waits for its last.)
        clients[3].send("RCPT TO:<other@example.com>")
        wait_until(lambda: len(asked(hop, 0)) == 2, timeout=4, what="the second question")
        assert hop.max_active == 2
        gate.set()
        refused = ("550 5.1.1 Recipient address rejected: unknown at the next hop "
                   "(550 5.1.1)\r\n")
        assert [client.reply() for client in clients[:3]] == [refused] * 3
        assert clients[3].reply() == "250 2.1.5 Ok\r\n"
        assert sorted(asked(hop, 0)) == ["RCPT TO:<gone@example.com>",
                                         "RCPT TO:<other@example.com>"]
        # With no cache (ttl 0), a question after the answer is asked again.
        assert clients[1].ask("RCPT TO:<gone@example.com>") == refused
        assert asked(hop, 0).count("RCPT TO:<gone@example.com>") == 2
        for client in clients:
            client.close()
    finally:
        relay.stop()
        hop.stop()


# -- answers shared by the inbound workers -------------------------------------

@pytest.fixture
def verdicts(tmp_path):
    """A master's shared region for two inbound workers: ``verdicts(row)``
    is that worker's table of known recipients."""
    from relaymail.process.shared_counts import SharedLimits, make_limits_region
    settings = make_settings(tmp_path, **{"plugin:callout__cache_entries": "10"})
    fd = make_limits_region(2, settings)
    tables = []

    def worker(row):
        tables.append(SharedLimits(fd, 2, row, settings, task.Clock(), 60.0))
        return tables[-1].known_recipients
    yield worker
    os.close(fd)


def test_one_workers_answer_is_every_workers_until_it_is_too_old(verdicts):
    first, second = verdicts(0), verdicts(1)
    assert first.put("bob@example.com", 550, pack_enhanced("5.1.1"), 1000.0, ttl=60)
    assert second.get("bob@example.com", 1030.0, ttl=60) == (550, 5_001_001)
    assert unpack_enhanced(5_001_001) == "5.1.1" and unpack_enhanced(0) is None
    assert second.get("bob@example.com", 1060.0, ttl=60) is None
    assert second.get("other@example.com", 1030.0, ttl=60) is None
    # The newest answer wins, whichever worker wrote it.
    assert second.put("bob@example.com", 250, pack_enhanced("2.1.5"), 1050.0, ttl=60)
    assert first.get("bob@example.com", 1051.0, ttl=60) == (250, 2_001_005)
    # An entry being rewritten (its time zeroed first) is not read half-way.
    index = first._find(0, client_hash("bob@example.com"))
    first._words[index + 1] = 0
    assert second.get("bob@example.com", 1051.0, ttl=60) == (250, 2_001_005)
    second._words[second._find(1, client_hash("bob@example.com")) + 1] = 0
    assert first.get("bob@example.com", 1051.0, ttl=60) is None
    # Nor is a row read while its writer packs it (its pack count odd):
    # entries move and are zeroed then, and a known address read as code 0
    # would be refused.
    assert first.put("carl@example.com", 250, 0, 1052.0, ttl=60)
    assert second.get("carl@example.com", 1053.0, ttl=60) == (250, 0)
    first._words[first._row_start(0)] += 1
    assert second.get("carl@example.com", 1053.0, ttl=60) is None
    first._words[first._row_start(0)] += 1
    assert second.get("carl@example.com", 1053.0, ttl=60) == (250, 0)
    packs = first._words[first._row_start(0)]
    first._pack()
    assert first._words[first._row_start(0)] == packs + 2
    assert second.get("carl@example.com", time.time(), ttl=60) is None   # 1052 is long gone


def test_a_successor_ends_the_pack_its_killed_predecessor_was_in(verdicts):
    dying, reader = verdicts(0), verdicts(1)
    assert dying.put("bob@example.com", 250, 0, 1000.0, ttl=60)
    dying._words[dying._row_start(0)] += 1          # killed mid-pack
    assert reader.get("bob@example.com", 1001.0, ttl=60) is None
    successor = verdicts(0)
    assert successor._words[successor._row_start(0)] % 2 == 0
    assert reader.get("bob@example.com", 1001.0, ttl=60) == (250, 0)
    # A rewrite within the same millisecond still moves the time.
    assert successor.put("bob@example.com", 550, 0, 1000.0, ttl=60)
    index = successor._find(0, client_hash("bob@example.com"))
    assert successor._words[index + 1] == 1_000_001


def test_a_full_row_remembers_no_new_answer_until_old_ones_are_too_old(verdicts, monkeypatch):
    from relaymail.process import shared_counts
    monkeypatch.setattr(shared_counts, "_PACK_PAUSE", 0.0)
    table = verdicts(0)
    now = time.time()
    # cache_entries 10 gives the smallest row, 1,024 entries, 768 of them
    # used; these answers are 10 s old.
    for n in range(768):
        assert table.put(f"u{n}@example.com", 550, 0, now - 10, ttl=60)
    assert not table.put("late@example.com", 550, 0, now, ttl=60)
    assert table.get("late@example.com", now, ttl=60) is None
    assert table.get("u0@example.com", now, ttl=60) == (550, 0)
    # With answers kept 5 s, the old ones are too old: the row packs and
    # takes the new one.
    assert table.put("late@example.com", 550, 0, now, ttl=5)
    assert table.get("late@example.com", now, ttl=5) == (550, 0)
    assert table.get("u0@example.com", now, ttl=60) is None


@pytest.mark.parametrize("row, step", [(0, -3600), (1, 3600)])
def test_a_full_row_ages_answers_by_the_callers_clock_not_the_wall_clock(verdicts, monkeypatch,
                                                                        row, step):
    # The callers' times are the reactor's steady clock (relaymail.clock),
    # which a step of the wall clock leaves an hour off it, either way: a
    # pack must neither drop answers still young nor keep ones too old,
    # the row full for good.  Found by review.
    from relaymail.process import shared_counts
    monkeypatch.setattr(shared_counts, "_PACK_PAUSE", 0.0)
    table = verdicts(row)
    now = time.time() + step
    for n in range(768):
        assert table.put(f"u{n}@example.com", 550, 0, now - 10, ttl=60)
    assert not table.put("late@example.com", 550, 0, now, ttl=60)
    assert table.get("u0@example.com", now, ttl=60) == (550, 0)
    assert table.put("late@example.com", 550, 0, now, ttl=5)
    assert table.get("u0@example.com", now, ttl=60) is None


def test_two_inbound_workers_ask_the_next_hop_once_about_an_address(tmp_path):
    from tests.test_processes import wait_for_worker, worker_of_session
    hop = NextHop(extensions=("ENHANCEDSTATUSCODES",))
    hop.rcpt_reply = script
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "2"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "callout"},
        "plugin:callout": {"next_hop": f"[127.0.0.1]:{hop.port}", "idle_time": "0"},
    }).start()
    stopped = None

    def rcpt_in_a_session(address):
        client = session(relay.port)
        answer = client.ask(f"RCPT TO:<{address}>")
        client.close()
        return worker_of_session(relay, client), answer
    try:
        pids = {name: wait_for_worker(relay, name) for name in ("inbound.1", "inbound.2")}
        asker, refused = rcpt_in_a_session("unknown.carl@example.com")
        _, accepted = rcpt_in_a_session("dora@example.com")
        # The worker that asked stops: the next sessions are the other's.
        stopped = pids[asker]
        os.kill(stopped, signal.SIGSTOP)
        later = [rcpt_in_a_session(address)
                 for address in ("unknown.carl@example.com", "dora@example.com")]
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        relay.stop()
        hop.stop()
    assert {worker for worker, _ in later} == {"inbound.1", "inbound.2"} - {asker}
    assert refused == ("550 5.1.1 Recipient address rejected: unknown at the next hop "
                       "(550 5.1.1)\r\n")
    assert accepted == "250 2.1.5 Ok\r\n"
    assert [answer for _, answer in later] == [refused, accepted]
    assert asked(hop, 0).count("RCPT TO:<unknown.carl@example.com>") == 1
    assert asked(hop, 0).count("RCPT TO:<dora@example.com>") <= 1


# -- options ------------------------------------------------------------------

def build(tmp_path, options, **keys):
    keys.setdefault("plugins__recipients", "callout")
    settings = make_settings(tmp_path, **keys)
    settings.plugin_options["callout"] = dict(options)
    # As the loader does: the relay's own keys never reach the factory.
    given = {key: value for key, value in options.items() if key not in RELAY_KEYS}
    return callout.build(PluginContext("callout", given, settings))


@pytest.mark.parametrize("options, key, problem", [
    ({"next_hop": "10.0.0.5:25"}, "next_hop", "put an IP address in brackets"),
    ({"timeout": "soon"}, "timeout", "expected a duration"),
    ({"timeout": "10"}, "timeout", "must be shorter than [plugins] timeout (10 s): "),
    ({"on_temporary_failure": "reject"}, "on_temporary_failure",
     "expected defer or accept, got 'reject'"),
    ({"positive_ttl": "-1"}, "positive_ttl", "expected a duration"),
    ({"cache_entries": "0"}, "cache_entries", "must be at least 1"),
    ({"cache_entries": "1000001"}, "cache_entries", "must be at most 1000000"),
    ({"max_sessions": "many"}, "max_sessions", "expected a whole number"),
    ({"negative_ttl": "1", "cache_ttl": "60"}, "cache_ttl", "keeps its own caches"),
    ({"port": "25"}, "port", "unknown option; [plugin:callout] takes next_hop, timeout, "),
])
def test_bad_options_are_config_errors_naming_the_key(tmp_path, options, key, problem):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, options)
    assert (info.value.section, info.value.key) == ("plugin:callout", key)
    assert problem in info.value.problem, info.value.problem


def test_the_default_timeout_must_be_shorter_than_the_plugins_timeout(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, {}, plugins__timeout="5")
    assert str(info.value) == (
        "<defaults>: [plugin:callout] timeout: must be shorter than [plugins] timeout (5 s) "
        "(the default, 6 s): the plugin must answer before the relay gives up on it")
    assert build(tmp_path, {"timeout": "4"}, plugins__timeout="5") is not None


def test_the_loader_builds_it_for_recipients_and_it_has_no_opinion_outside_the_domains(
        tmp_path):
    hooks = build_hooks(make_settings(tmp_path, plugins__recipients="callout"))
    plugin, = hooks["recipients"]
    assert plugin.name == "callout"
    recipient = parse_forward_path("<anyone@example.org>", smtputf8=True)
    assert plugin.check_recipient(recipient, None) is Decision.NO_OPINION
    # No route and no smarthost: the domain goes by MX, which is not asked.
    recipient = parse_forward_path("<anyone@example.com>", smtputf8=True)
    assert plugin.check_recipient(recipient, None) is Decision.NO_OPINION
    assert plugin.verify("anyone@example.com", None) is Decision.NO_OPINION


# -- the session pool, on a fake clock ------------------------------------------

class FakeSession:
    """An OutboundSession as the pool uses it; ``answers`` are what its
    questions get, a DeliveryError raised, a Deferred waited for."""

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.asked = []
        self.open = True
        self.quits = 0
        self.aborts = 0

    def ask_recipient(self, recipient):
        self.asked.append(recipient)
        answer = self.answers.pop(0) if self.answers else RecipientResult(
            recipient, 250, "2.1.5", "Ok")
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

    def is_open(self):
        return self.open

    def quit(self):
        self.quits += 1
        self.open = False
        return defer.succeed(None)

    def abort(self):
        self.aborts += 1
        self.open = False


class Opener:
    def __init__(self, *sessions):
        self.sessions = list(sessions)
        self.opened = []

    def __call__(self, reactor, hop, config):
        session = self.sessions.pop(0) if self.sessions else FakeSession()
        self.opened.append(session)
        return defer.succeed(session)


HOP = CalloutHop("127.0.0.1", 25, ClientConfig(helo_name="relay.test"))


def results(d):
    got = []
    d.addBoth(got.append)
    return got


def test_the_pool_reuses_an_idle_session_and_quits_it_after_idle_time():
    clock, opener = task.Clock(), Opener()
    pool = SessionPool(clock, max_sessions=2, idle_time=2, open_session=opener)
    for name in ("a", "b"):
        assert results(pool.ask(HOP, f"{name}@example.com"))[0].code == 250
        clock.advance(1.5)
    session, = opener.opened
    assert session.asked == ["a@example.com", "b@example.com"]
    assert pool.idle_sessions(HOP) == 1 and session.quits == 0
    clock.advance(0.6)
    assert pool.idle_sessions(HOP) == 0 and session.quits == 1


def test_a_reused_session_that_fails_is_replaced_once_and_the_question_put_again():
    clock = task.Clock()
    stale = FakeSession([RecipientResult("a@example.com", 250, "2.1.5", "Ok"),
                         DeliveryError(True, 421, "4.4.2", "closing", remote="hop")])
    opener = Opener(stale)
    pool = SessionPool(clock, max_sessions=1, idle_time=5, open_session=opener)
    results(pool.ask(HOP, "a@example.com"))
    got = results(pool.ask(HOP, "b@example.com"))
    assert got[0].code == 250
    assert len(opener.opened) == 2 and stale.aborts == 1
    assert opener.opened[1].asked == ["b@example.com"]
    # A new session that fails is not tried again: the failure is the answer.
    opener.sessions.append(FakeSession([DeliveryError(True, None, "4.4.2", "lost")]))
    clock.advance(6)
    got = results(pool.ask(HOP, "c@example.com"))
    assert got[0].check(DeliveryError) and len(opener.opened) == 3


def test_past_max_sessions_a_question_waits_and_a_cancelled_one_holds_no_slot():
    clock = task.Clock()
    slow = defer.Deferred()
    opener = Opener(FakeSession([slow]))
    pool = SessionPool(clock, max_sessions=1, idle_time=5, open_session=opener)
    first = results(pool.ask(HOP, "a@example.com"))
    waiting = pool.ask(HOP, "b@example.com")
    cancelled = results(waiting)
    waiting.cancel()
    assert cancelled[0].check(defer.CancelledError)
    third = results(pool.ask(HOP, "c@example.com"))
    assert not first and not third and len(opener.opened) == 1
    slow.callback(RecipientResult("a@example.com", 250, "2.1.5", "Ok"))
    assert first[0].code == 250 and third[0].code == 250
    assert opener.opened[0].asked == ["a@example.com", "c@example.com"]


def test_a_question_cut_short_drops_its_session():
    clock = task.Clock()
    opener = Opener(FakeSession([defer.Deferred()]))
    pool = SessionPool(clock, max_sessions=1, idle_time=5, open_session=opener)
    d = pool.ask(HOP, "a@example.com")
    results(d)
    d.cancel()
    assert opener.opened[0].aborts == 1 and pool.idle_sessions(HOP) == 0


def test_a_session_is_not_reused_past_the_reuse_time_limit():
    clock, opener = task.Clock(), Opener()
    pool = SessionPool(clock, max_sessions=1, idle_time=REUSE_TIME_LIMIT * 2,
                       open_session=opener)
    results(pool.ask(HOP, "a@example.com"))
    clock.advance(REUSE_TIME_LIMIT)
    results(pool.ask(HOP, "b@example.com"))
    assert opener.opened[0].quits == 1 and pool.idle_sessions(HOP) == 0
    results(pool.ask(HOP, "c@example.com"))
    assert len(opener.opened) == 2
