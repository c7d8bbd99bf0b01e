"""The ``ratelimit`` plugin: its sliding window and memory counters on a
fake clock, its Redis counters on a real redis-server (two plugin
instances standing for two nodes of a fleet), and the real relay over a
socket, with memory counters and with two relays sharing one Redis."""

import os
import signal
import time
from types import SimpleNamespace

import pytest
import redis
from twisted.logger import globalLogPublisher
from twisted.plugin import IPlugin

from relaymail.address import parse_reverse_path
from relaymail.config import ConfigError
from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator, ISenderPolicy
from relaymail.plugins.ratelimit import COUNTERS_UNAVAILABLE, RateLimit, ratelimit
from relaymail.plugins.ratelimit_counters import Count, MemoryCounters, SlidingWindow
from relaymail.plugins.ratelimit_redis import CountersUnavailable, RedisCounters
from relaymail.policy.loader import PluginContext, build_hooks
from tests.redis_server import RedisServer
from tests.relay_process import RelayProcess
from tests.support import make_settings
from tests.test_delivery import wait_until
from tests.test_hooks import Client


class FakeClock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def context(ip="192.0.2.1", user=None, trusted=False, sender=None):
    return SimpleNamespace(client_ip=ip, client_port=40000, helo="client.test", sender=sender,
                           trusted=trusted, authenticated_user=user)


def mailbox(text):
    return parse_reverse_path(f"<{text}>", smtputf8=True)


def build(tmp_path, options, plugin_options=None, **settings_keys):
    settings_keys.setdefault("plugins__senders", "ratelimit")
    settings_keys.setdefault("plugins__recipients", "ratelimit, domains")
    settings = make_settings(tmp_path, **settings_keys)
    settings.plugin_options["ratelimit"] = dict(plugin_options or options)
    return ratelimit.build(PluginContext("ratelimit", dict(options), settings))


def deferred_text(decision):
    assert (decision.kind, decision.code, decision.enhanced) == ("defer", 450, "4.7.1")
    return decision.text


@pytest.fixture
def captured_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def log_text(events):
    from twisted.logger import formatEvent
    return "\n".join(formatEvent(event) for event in events)


# -- the window ---------------------------------------------------------------

def test_buckets_are_aligned_on_the_epoch_and_the_previous_one_fades():
    window = SlidingWindow(60)
    assert window.bucket(120.0) == 2 and window.bucket(179.9) == 2 and window.bucket(180.0) == 3
    assert window.previous_weight(120.0) == 1.0
    assert window.previous_weight(135.0) == 0.75
    assert window.previous_weight(165.0) == 0.25


def test_a_window_must_be_positive():
    with pytest.raises(ValueError):
        SlidingWindow(0)


# -- memory counters ----------------------------------------------------------

def test_memory_counters_allow_the_limit_and_refuse_the_next():
    counters = MemoryCounters(SlidingWindow(60))
    counts = [Count("messages_per_client", "192.0.2.1", 3)]
    assert [counters.take(counts, 60.0 + i) for i in range(3)] == [None, None, None]
    assert counters.take(counts, 64.0) == counts[0]


def test_the_previous_bucket_counts_for_the_part_still_in_the_window():
    counters = MemoryCounters(SlidingWindow(60))
    counts = [Count("messages_per_client", "192.0.2.1", 4)]
    for _ in range(4):
        assert counters.take(counts, 119.0) is None      # the end of bucket 1
    # A burst at a bucket's edge still counts just after it: 4 * 1.0 + 1 > 4.
    assert counters.take(counts, 120.0) == counts[0]
    # A quarter into bucket 2, three quarters of the 4 still count: one
    # more fits (3 + 1 <= 4), a second does not (3 + 1 + 1 > 4).
    assert counters.take(counts, 135.0) is None
    assert counters.take(counts, 135.0) == counts[0]
    # At the end of bucket 3 the burst of bucket 1 is gone; the one of
    # bucket 2 still weighs a little (1/600): three fit, not four.
    for _ in range(3):
        assert counters.take(counts, 239.9) is None
    assert counters.take(counts, 239.9) == counts[0]
    # In bucket 5 nothing is left of either.
    assert [counters.take(counts, 300.0) for _ in range(5)] == [None] * 4 + [counts[0]]


def test_a_refused_event_is_not_counted():
    counters = MemoryCounters(SlidingWindow(60))
    counts = [Count("messages_per_client", "192.0.2.1", 2)]
    counters.take(counts, 60.0)
    counters.take(counts, 60.0)
    for _ in range(50):     # a client hammering while over its limit
        assert counters.take(counts, 61.0) == counts[0]
    # Two windows later everything is forgotten: a full allowance again.
    assert [counters.take(counts, 180.0) for _ in range(3)] == [None, None, counts[0]]


def test_one_name_over_its_limit_charges_none_of_the_others():
    counters = MemoryCounters(SlidingWindow(60))
    client = Count("messages_per_client", "192.0.2.1", 1)
    sender = Count("messages_per_sender", "a@example.org", 2)
    assert counters.take([sender, client], 60.0) is None
    assert counters.take([sender, client], 60.0) == client
    # The sender was charged once, not twice: from another client it may
    # still send one message.
    other = Count("messages_per_client", "192.0.2.2", 5)
    assert counters.take([sender, other], 60.0) is None
    assert counters.take([sender, other], 60.0) == sender


def test_names_not_counted_for_two_windows_are_swept_out():
    counters = MemoryCounters(SlidingWindow(60))
    for i in range(100):
        counters.take([Count("messages_per_client", f"192.0.2.{i}", 5)], 60.0)
    counters.take([Count("messages_per_client", "198.51.100.1", 5)], 130.0)
    assert len(counters) == 101           # bucket 1 still counts as the previous one
    counters.take([Count("messages_per_client", "198.51.100.2", 5)], 180.0)
    assert len(counters) == 2             # bucket 1 is two windows back: gone


def test_memory_counters_never_hold_more_than_max_keys(captured_log):
    counters = MemoryCounters(SlidingWindow(60), max_keys=10)
    first = Count("messages_per_client", "192.0.2.0", 1)
    counters.take([first], 60.0)
    for i in range(1, 50):
        counters.take([Count("messages_per_client", f"192.0.2.{i}", 1)], 60.0)
        assert len(counters) <= 10
    # The one counted longest ago was forgotten: it may send again.
    assert counters.take([first], 60.0) is None
    text = log_text(captured_log)
    assert text.count("more than 10 names counted at once") == 1


# -- the plugin, on memory counters ----------------------------------------

def plugin_with(limits, clock=None, **keywords):
    full = {key: 0 for key in ("messages_per_sender", "messages_per_user", "messages_per_client",
                               "recipients_per_sender", "recipients_per_user",
                               "recipients_per_client")}
    full.update(limits)
    return RateLimit(full, MemoryCounters(SlidingWindow(60)), clock=clock or FakeClock(),
                     **keywords)


def test_the_plugin_provides_both_hooks_and_is_a_builtin():
    assert IPlugin.providedBy(ratelimit) and IPluginFactory.providedBy(ratelimit)
    assert ratelimit.__module__ == "relaymail.plugins.ratelimit"
    plugin = plugin_with({"messages_per_client": 1})
    assert ISenderPolicy.providedBy(plugin) and IRecipientValidator.providedBy(plugin)
    assert plugin.blocking is False


def test_messages_per_client_refuses_past_the_limit_with_450_4_7_1():
    plugin = plugin_with({"messages_per_client": 2})
    sender = mailbox("a@example.org")
    assert plugin.check_sender(sender, {}, context()) is Decision.NO_OPINION
    assert plugin.check_sender(sender, {}, context()) is Decision.NO_OPINION
    assert deferred_text(plugin.check_sender(sender, {}, context())) == (
        "Error: too much mail from client 192.0.2.1 (messages_per_client), try again later")
    assert plugin.check_sender(sender, {}, context("192.0.2.2")) is Decision.NO_OPINION


def test_messages_per_sender_counts_an_address_whatever_its_case_and_client():
    plugin = plugin_with({"messages_per_sender": 2})
    plugin.check_sender(mailbox("Bulk@Example.ORG"), {}, context("192.0.2.1"))
    plugin.check_sender(mailbox("bulk@example.org"), {}, context("192.0.2.2"))
    assert deferred_text(plugin.check_sender(mailbox("BULK@example.org"), {}, context("192.0.2.3"))) == (
        "Error: too much mail from sender bulk@example.org (messages_per_sender), try again later")
    assert plugin.check_sender(mailbox("other@example.org"), {}, context()) is Decision.NO_OPINION


def test_the_null_sender_is_not_counted_as_a_sender_but_its_client_is():
    plugin = plugin_with({"messages_per_sender": 1, "messages_per_client": 3})
    for _ in range(3):
        assert plugin.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert "(messages_per_client)" in deferred_text(plugin.check_sender(None, {}, context()))


def test_messages_per_user_counts_the_auth_user_only():
    plugin = plugin_with({"messages_per_user": 1})
    sender = mailbox("a@example.org")
    assert plugin.check_sender(sender, {}, context(user="alice")) is Decision.NO_OPINION
    assert deferred_text(plugin.check_sender(sender, {}, context("192.0.2.9", user="alice"))) == (
        "Error: too much mail from user alice (messages_per_user), try again later")
    for _ in range(3):      # no user, no user count
        assert plugin.check_sender(sender, {}, context()) is Decision.NO_OPINION


def test_recipients_are_counted_at_rcpt_for_the_transaction_sender():
    plugin = plugin_with({"recipients_per_sender": 2, "recipients_per_client": 3})
    session = context(sender=mailbox("list@example.org"))
    rcpt = mailbox("bob@example.com")
    assert plugin.check_recipient(rcpt, session) is Decision.NO_OPINION
    assert plugin.check_recipient(rcpt, session) is Decision.NO_OPINION
    assert deferred_text(plugin.check_recipient(rcpt, session)) == (
        "Error: too many recipients from sender list@example.org (recipients_per_sender), "
        "try again later")
    # MAIL does not spend the recipient allowance, nor RCPT the message one.
    assert plugin.check_sender(mailbox("list@example.org"), {}, session) is Decision.NO_OPINION
    other = context(sender=mailbox("x@example.org"))
    assert plugin.check_recipient(rcpt, other) is Decision.NO_OPINION
    assert "(recipients_per_client)" in deferred_text(plugin.check_recipient(rcpt, other))
    assert plugin.verify("bob@example.com", session) is Decision.NO_OPINION


def test_trusted_clients_are_exempt_unless_told_otherwise():
    exempt = plugin_with({"messages_per_client": 1})
    counted = plugin_with({"messages_per_client": 1}, exempt_trusted=False)
    for _ in range(5):
        assert exempt.check_sender(None, {}, context(trusted=True)) is Decision.NO_OPINION
    assert counted.check_sender(None, {}, context(trusted=True)) is Decision.NO_OPINION
    assert counted.check_sender(None, {}, context(trusted=True)).code == 450


def test_the_limit_passes_again_as_the_window_slides():
    clock = FakeClock(600.0)        # the start of a bucket
    plugin = plugin_with({"messages_per_client": 2}, clock=clock)
    plugin.check_sender(None, {}, context())
    plugin.check_sender(None, {}, context())
    clock.now = 659.0
    assert plugin.check_sender(None, {}, context()).code == 450
    clock.now = 660.0 + 30.0        # half of the old bucket still counts: 1 + 1 <= 2
    assert plugin.check_sender(None, {}, context()) is Decision.NO_OPINION


def test_the_factory_builds_memory_counters_with_the_ipv6_prefix(tmp_path):
    plugin = build(tmp_path, {"messages_per_client": "1", "window": "1m"})
    assert plugin.blocking is False
    assert plugin.check_sender(None, {}, context("2001:db8::1")) is Decision.NO_OPINION
    # [limits] ipv6_prefix is 64 by default: one site, one count.
    assert deferred_text(plugin.check_sender(None, {}, context("2001:db8::2"))) == (
        "Error: too much mail from client 2001:db8::/64 (messages_per_client), try again later")
    assert plugin.check_sender(None, {}, context("2001:db8:1::1")) is Decision.NO_OPINION


@pytest.mark.parametrize("options, problem", [
    ({}, "[plugin:ratelimit]: no limit set: give at least one of messages_per_sender, "
         "messages_per_user, messages_per_client, recipients_per_sender, recipients_per_user, "
         "recipients_per_client"),
    ({"messages_per_client": "0", "recipients_per_user": ""}, "[plugin:ratelimit]: no limit set"),
    ({"messages_per_client": "-1"}, "[plugin:ratelimit] messages_per_client: must be at least 0"),
    ({"messages_per_client": "lots"},
     "[plugin:ratelimit] messages_per_client: expected a whole number, got 'lots'"),
    ({"messages_per_client": "1", "window": "0"}, "[plugin:ratelimit] window: must be more than 0"),
    ({"messages_per_client": "1", "window": "soon"},
     "[plugin:ratelimit] window: expected a duration"),
    ({"messages_per_client": "1", "exempt_trusted": "maybe"},
     "[plugin:ratelimit] exempt_trusted: expected yes or no"),
    ({"messages_per_client": "1", "messages_per_ip": "1"},
     "[plugin:ratelimit] messages_per_ip: unknown option; [plugin:ratelimit] takes window, "),
    ({"messages_per_client": "1", "on_redis_failure": "defer"},
     "[plugin:ratelimit] on_redis_failure: set without redis, which it is for"),
    ({"messages_per_client": "1", "redis_prefix": "x:"},
     "[plugin:ratelimit] redis_prefix: set without redis"),
    ({"messages_per_client": "1", "max_keys": "0"}, "[plugin:ratelimit] max_keys: must be at least 1"),
    ({"messages_per_client": "1", "max_keys": "2000001"},
     "[plugin:ratelimit] max_keys: must be at most 2000000, got '2000001'"),
    ({"messages_per_client": "1", "redis": "redis://127.0.0.1:1/0", "max_keys": "5"},
     "[plugin:ratelimit] max_keys: memory counters only; Redis expires its own keys"),
    ({"messages_per_client": "1", "redis": "http://127.0.0.1:6379"},
     "[plugin:ratelimit] redis: not a Redis URL: "),
    ({"messages_per_client": "1", "redis": "redis://127.0.0.1:1/0", "on_redis_failure": "drop"},
     "[plugin:ratelimit] on_redis_failure: expected accept or defer, got 'drop'"),
    ({"messages_per_client": "1", "redis": "redis://127.0.0.1:1/0", "redis_prefix": " "},
     "[plugin:ratelimit] redis_prefix: empty"),
    ({"messages_per_client": "1", "redis": "redis://127.0.0.1:1/0", "redis_timeout": "0"},
     "[plugin:ratelimit] redis_timeout: must be more than 0"),
])
def test_bad_options_are_config_errors_naming_the_key(tmp_path, options, problem):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, options)
    assert problem in str(info.value)


def test_an_answer_cache_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, {"messages_per_client": "1"},
              plugin_options={"messages_per_client": "1", "cache_ttl": "60"})
    assert "[plugin:ratelimit] cache_ttl: a rate limit counts every command" in str(info.value)


@pytest.mark.parametrize("limit, hooks, problem", [
    ("messages_per_user", {"plugins__senders": ""},
     "[plugin:ratelimit] messages_per_user: counted only when [plugins] senders lists ratelimit"),
    ("recipients_per_client", {"plugins__recipients": "domains"},
     "[plugin:ratelimit] recipients_per_client: counted only when [plugins] recipients lists "
     "ratelimit"),
])
def test_a_limit_at_a_hook_the_plugin_is_not_listed_at_is_refused(tmp_path, limit, hooks, problem):
    with pytest.raises(ConfigError) as info:
        build(tmp_path, {limit: "5"}, **hooks)
    assert problem in str(info.value)


def test_a_recipient_plugin_before_it_gets_a_warning(tmp_path, captured_log):
    build(tmp_path, {"recipients_per_client": "5"}, plugins__recipients="domains, ratelimit")
    assert ("[plugins] recipients lists domains before ratelimit: recipients they accept are "
            "not counted") in log_text(captured_log)
    captured_log.clear()
    build(tmp_path, {"recipients_per_client": "5"})
    assert "before ratelimit" not in log_text(captured_log)


def test_the_loader_uses_one_object_at_both_hooks(tmp_path):
    settings = make_settings(tmp_path, plugins__senders="ratelimit",
                             plugins__recipients="ratelimit, domains")
    settings.plugin_options["ratelimit"] = {"messages_per_client": "5"}
    hooks = build_hooks(settings)
    assert hooks["senders"][0] is hooks["recipients"][0]
    assert isinstance(hooks["senders"][0], RateLimit)


# -- Redis counters, on a real redis-server --------------------------------

@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def redis_plugin(tmp_path, server, clock, **options):
    options = {"messages_per_client": "3", "recipients_per_sender": "2",
               "redis": server.url, **options}
    plugin = build(tmp_path, options)
    plugin._clock = clock
    return plugin


def test_two_nodes_sharing_one_redis_enforce_one_limit(tmp_path, redis_server):
    clock = FakeClock(1_200_000.0)
    node_a = redis_plugin(tmp_path, redis_server, clock)
    node_b = redis_plugin(tmp_path, redis_server, clock)
    assert node_a.blocking is True and node_b.blocking is True
    assert node_a.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert node_b.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert node_a.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert deferred_text(node_b.check_sender(None, {}, context())) == (
        "Error: too much mail from client 192.0.2.1 (messages_per_client), try again later")
    assert node_a.check_sender(None, {}, context()).code == 450
    assert node_b.check_sender(None, {}, context("192.0.2.2")) is Decision.NO_OPINION
    session = context(sender=mailbox("list@example.org"))
    rcpt = mailbox("bob@example.com")
    assert node_a.check_recipient(rcpt, session) is Decision.NO_OPINION
    assert node_b.check_recipient(rcpt, session) is Decision.NO_OPINION
    assert "(recipients_per_sender)" in deferred_text(node_a.check_recipient(rcpt, session))
    # Two windows later both nodes see a full allowance again.
    clock.now += 120.0
    answers = [node_b.check_sender(None, {}, context()).kind for _ in range(4)]
    assert answers == ["no-opinion", "no-opinion", "no-opinion", "defer"]


def test_redis_keys_live_two_windows_and_refusals_write_nothing(tmp_path, redis_server):
    clock = FakeClock(1_200_000.0)          # bucket 20000 of 60 s
    plugin = redis_plugin(tmp_path, redis_server, clock, messages_per_client="1",
                          redis_prefix="test:rl:")
    plugin.check_sender(None, {}, context())
    for _ in range(5):
        assert plugin.check_sender(None, {}, context()).code == 450
    client = redis.Redis.from_url(redis_server.url)
    assert client.keys("*") == [b"test:rl:messages_per_client:192.0.2.1:20000"]
    assert client.get("test:rl:messages_per_client:192.0.2.1:20000") == b"1"
    assert 120_000 < client.pttl("test:rl:messages_per_client:192.0.2.1:20000") <= 121_000
    client.close()


def test_redis_counters_slide_like_memory_ones(tmp_path, redis_server):
    window = SlidingWindow(60)
    shared = RedisCounters(window, redis_server.url, "slide:")
    local = MemoryCounters(window)
    counts = [Count("messages_per_client", "192.0.2.1", 4)]
    moments = ([119.0] * 5 + [120.0, 135.0, 135.0, 150.0, 150.0, 179.0, 200.0, 200.0]
               + [239.9] * 4 + [240.0, 241.0, 300.0, 300.5, 301.0, 302.0, 302.0, 420.0])
    expected = [local.take(counts, t) for t in moments]
    assert None in expected and counts[0] in expected
    assert [shared.take(counts, t) for t in moments] == expected
    shared.close()


def test_redis_down_accepts_by_default_with_one_warning_and_recovers(
        tmp_path, redis_server, captured_log):
    clock = FakeClock(1_200_000.0)
    plugin = redis_plugin(tmp_path, redis_server, clock, messages_per_client="2")
    plugin.check_sender(None, {}, context())
    redis_server.stop()
    for _ in range(5):
        assert plugin.check_sender(None, {}, context()) is Decision.NO_OPINION
    text = log_text(captured_log)
    assert text.count("ratelimit: cannot reach the counters") == 1
    assert "commands pass uncounted (on_redis_failure), 1 so far" in text
    clock.now += 61.0       # a minute on: said again
    plugin.check_sender(None, {}, context("192.0.2.7"))
    assert "commands pass uncounted (on_redis_failure), 6 so far" in log_text(captured_log)
    redis_server.start()    # empty again: nothing was saved
    clock.now += 1.0
    assert plugin.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert "ratelimit: counting again after 62 s without the counters (6 commands not counted)" in (
        log_text(captured_log))
    assert plugin.check_sender(None, {}, context()) is Decision.NO_OPINION
    assert plugin.check_sender(None, {}, context()).code == 450


def test_redis_down_defers_with_451_4_3_0_when_told_to(tmp_path, redis_server):
    plugin = redis_plugin(tmp_path, redis_server, FakeClock(), on_redis_failure="defer")
    redis_server.stop()
    answer = plugin.check_sender(None, {}, context())
    assert answer == COUNTERS_UNAVAILABLE
    assert (answer.code, answer.enhanced, answer.text) == (
        451, "4.3.0", "Temporary failure counting the rate limits, try again later")
    assert plugin.check_recipient(mailbox("b@example.com"),
                                  context(sender=mailbox("list@example.org"))) == answer


def test_a_redis_that_hangs_costs_one_timeout(tmp_path, redis_server):
    redis_server.process.send_signal(signal.SIGSTOP)     # accepts, never answers
    try:
        counters = RedisCounters(SlidingWindow(60), redis_server.url, "hang:", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(CountersUnavailable) as info:
            counters.take([Count("messages_per_client", "192.0.2.1", 1)], 60.0)
        assert time.monotonic() - started < 1.0
        assert "Timeout" in str(info.value)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


# -- the real relay over a socket ---------------------------------------------

#: Short enough to wait out, long enough for a burst to fit in one window.
WINDOW = 2.0


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One inbound worker; one trusted address, so that the other 127/8
    clients are counted."""
    process = RelayProcess(tmp_path_factory.mktemp("ratelimit"), {
        "server": {"trusted_networks": "127.0.0.250/32", "workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"senders": "ratelimit", "recipients": "ratelimit, domains"},
        "plugin:ratelimit": {"window": str(WINDOW), "messages_per_client": "3",
                             "messages_per_sender": "2", "recipients_per_client": "4"},
    })
    yield process.start()
    process.stop()


def session(port, source):
    client = Client(port, source)
    assert client.reply() == "220 relay.test ESMTP relaymail\r\n"
    assert client.ask("EHLO client.test").startswith("250-relay.test")
    return client


def mail(client, sender):
    answer = client.ask(f"MAIL FROM:<{sender}>")
    if answer.startswith("250"):
        assert client.ask("RSET") == "250 2.0.0 Ok\r\n"
    return answer


def test_the_mail_past_the_client_limit_gets_450_until_the_window_slides(relay):
    client = session(relay.port, "127.0.0.11")
    for n in range(3):
        assert mail(client, f"a{n}@example.org") == "250 2.1.0 Ok\r\n"
    assert mail(client, "a3@example.org") == (
        "450 4.7.1 Error: too much mail from client 127.0.0.11 (messages_per_client), "
        "try again later\r\n")
    refused_at = time.monotonic()
    # Another client is not touched by this one's count.
    other = session(relay.port, "127.0.0.12")
    assert mail(other, "b@example.org") == "250 2.1.0 Ok\r\n"
    other.close()
    client.close()
    # Retried (refusals are not counted), it passes once the burst has slid
    # far enough out: past the end of its bucket plus a third of the next
    # (3 allowed), and no later than two windows.  A new session each try,
    # as a client would come back ([limits] errors ends a session that
    # collects 4xx replies).
    while True:
        client = session(relay.port, "127.0.0.11")
        answer = mail(client, "a3@example.org")
        client.close()
        if answer.startswith("250"):
            break
        assert answer.startswith("450 4.7.1 Error: too much mail from client 127.0.0.11")
        assert time.monotonic() - refused_at < 2 * WINDOW + 0.5, "still refused"
        time.sleep(0.1)
    assert time.monotonic() - refused_at >= WINDOW / 3 - 0.05
    assert ("mail from=<a3@example.org> refused by ratelimit: 450 4.7.1 Error: too much mail "
            "from client 127.0.0.11 (messages_per_client), try again later") in relay.log()


def test_the_recipient_past_the_limit_gets_450_and_the_others_are_delivered(relay):
    client = session(relay.port, "127.0.0.13")
    assert client.ask("MAIL FROM:<c@example.org>") == "250 2.1.0 Ok\r\n"
    for n in range(4):
        assert client.ask(f"RCPT TO:<r{n}@example.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("RCPT TO:<r4@example.com>") == (
        "450 4.7.1 Error: too many recipients from client 127.0.0.13 (recipients_per_client), "
        "try again later\r\n")
    assert client.ask("DATA").startswith("354 ")
    queued = client.ask("Subject: four\r\n\r\nof five\r\n.")
    assert queued.startswith("250 2.0.0 Ok: queued as ")
    client.close()
    queue_id = queued.split()[-1]
    log = relay.log()
    assert ("rcpt from=<c@example.org> to=<r4@example.com> by=ratelimit: 450 4.7.1 Error: too "
            "many recipients from client 127.0.0.13") in log
    assert (f"{queue_id}: queued from=<c@example.org> to=<r0@example.com>,<r1@example.com>,"
            "<r2@example.com>,<r3@example.com> size=") in log
    # Another client's recipients are its own.
    other = session(relay.port, "127.0.0.14")
    assert other.ask("MAIL FROM:<d@example.org>") == "250 2.1.0 Ok\r\n"
    assert other.ask("RCPT TO:<r0@example.com>") == "250 2.1.5 Ok\r\n"
    other.close()


def test_a_sender_is_counted_across_clients(relay):
    for source in ("127.0.0.15", "127.0.0.16"):
        client = session(relay.port, source)
        assert mail(client, "Bulk@example.org") == "250 2.1.0 Ok\r\n"
        client.close()
    client = session(relay.port, "127.0.0.17")
    assert mail(client, "bulk@EXAMPLE.org") == (
        "450 4.7.1 Error: too much mail from sender bulk@example.org (messages_per_sender), "
        "try again later\r\n")
    assert mail(client, "someone.else@example.org") == "250 2.1.0 Ok\r\n"
    client.close()


def test_a_trusted_client_is_not_counted(relay):
    client = session(relay.port, "127.0.0.250")
    for n in range(6):
        assert mail(client, f"app{n}@example.org") == "250 2.1.0 Ok\r\n"
    client.close()


def test_two_relays_sharing_one_redis_enforce_one_limit_and_ride_out_its_restart(tmp_path):
    server = RedisServer(tmp_path).start()
    nodes = {}
    try:
        for name, failure in (("a", "accept"), ("b", "defer")):
            workdir = tmp_path / name
            workdir.mkdir()
            nodes[name] = RelayProcess(workdir, {
                # Two inbound workers each: four processes, one count.
                "server": {"trusted_networks": "127.0.0.250/32", "workers": "2"},
                "relay": {"domains": "example.com"},
                "plugins": {"senders": "ratelimit", "recipients": "ratelimit, domains"},
                "plugin:ratelimit": {"messages_per_client": "3", "redis": server.url,
                                     "redis_prefix": "fleet:", "on_redis_failure": failure},
            }).start()
        a, b = nodes["a"], nodes["b"]
        answers = []
        for node in (a, b, a, b, a):
            client = session(node.port, "127.0.0.21")
            answers.append(mail(client, "x@example.org"))
            client.close()
        assert answers[:3] == ["250 2.1.0 Ok\r\n"] * 3
        assert answers[3:] == [
            "450 4.7.1 Error: too much mail from client 127.0.0.21 (messages_per_client), "
            "try again later\r\n"] * 2
        other = session(b.port, "127.0.0.22")
        assert mail(other, "x@example.org") == "250 2.1.0 Ok\r\n"
        other.close()

        server.stop()
        client_a, client_b = session(a.port, "127.0.0.21"), session(b.port, "127.0.0.21")
        assert mail(client_a, "x@example.org") == "250 2.1.0 Ok\r\n"     # accept: uncounted
        assert mail(client_b, "x@example.org") == (
            "451 4.3.0 Temporary failure counting the rate limits, try again later\r\n")
        # Logged from a plugin thread, by way of the worker's reactor.
        wait_until(lambda: "commands get 451 4.3.0 (on_redis_failure)" in b.log(),
                   timeout=5, what="b's warning")
        wait_until(lambda: "commands pass uncounted (on_redis_failure)" in a.log(),
                   timeout=5, what="a's warning")
        assert "ratelimit: cannot reach the counters (ConnectionError" in a.log()

        server.start()      # the same port, empty: nothing was saved
        for _ in range(3):
            assert mail(client_a, "x@example.org") == "250 2.1.0 Ok\r\n"
        assert mail(client_b, "x@example.org").startswith("450 4.7.1 Error: too much mail")
        client_a.close()
        client_b.close()
        wait_until(lambda: "ratelimit: counting again after" in a.log(), timeout=5,
                   what="a's line on Redis back")
    finally:
        for node in nodes.values():
            node.stop()
        if server.process is not None:
            server.stop()


def test_a_dry_run_is_answered_but_not_counted():
    from types import SimpleNamespace as Namespace
    from relaymail.plugins.ratelimit import RateLimit
    from relaymail.plugins.ratelimit_counters import MemoryCounters, SlidingWindow
    plugin = RateLimit({"messages_per_client": 1}, MemoryCounters(SlidingWindow(60)),
                       clock=lambda: 1000.0)
    dry = Namespace(trusted=False, authenticated_user=None, client_ip="192.0.2.7",
                    sender=None, dry_run=True)
    real = Namespace(**{**vars(dry), "dry_run": False})
    for _ in range(3):
        assert plugin.check_sender(None, {}, dry).kind == "no-opinion"
    assert plugin.check_sender(None, {}, real).kind == "no-opinion"
    assert plugin.check_sender(None, {}, dry).code == 450     # looks, and sees the limit
    assert plugin.check_sender(None, {}, real).code == 450


# -- memory counters shared by inbound workers ---------------------------------

@pytest.fixture
def region(tmp_path):
    """A master's shared region for two inbound workers, as they map it."""
    from relaymail.process.shared_counts import SharedLimits, make_limits_region
    from twisted.internet import task
    settings = make_settings(tmp_path)
    settings.plugin_options["ratelimit"] = {"max_keys": "10"}
    fd = make_limits_region(2, settings)

    def worker(row):
        return SharedLimits(fd, 2, row, settings, task.Clock(), 60.0).rate_limits
    yield worker
    os.close(fd)


def test_two_workers_count_one_name_together(region):
    from relaymail.plugins.ratelimit_counters import SharedCounters
    window = SlidingWindow(60)
    first, second = SharedCounters(window, region(0)), SharedCounters(window, region(1))
    client = Count("messages_per_client", "192.0.2.7", 3)
    assert first.take([client], 60.0) is None
    assert second.take([client], 61.0) is None
    assert first.take([client], 62.0) is None
    # The fourth in the window is refused by either worker.
    assert second.take([client], 63.0) == client
    assert first.take([client], 63.0) == client
    assert second.take([Count("messages_per_client", "198.51.100.1", 3)], 63.0) is None
    # Half-way through the next bucket, half of the three still count:
    # 1.5 and one more is all that fits under 3, in either worker.
    assert first.take([client], 150.0) is None
    assert second.take([client], 150.0) == client
    assert first.take([client], 150.0) == client
    assert len(first) == 1 and len(second) == 2


def test_a_workers_successor_takes_over_its_counts(region):
    from relaymail.plugins.ratelimit_counters import SharedCounters
    window = SlidingWindow(60)
    client = Count("messages_per_client", "192.0.2.7", 2)
    dying = SharedCounters(window, region(0))
    # A row of 1,024 entries (max_keys 10) holds 768: all taken.
    for name in range(767):
        dying.take([Count("messages_per_client", f"n{name}", 5)], 60.0)
    dying.take([client], 60.0)
    dying.take([client], 60.0)
    successor = SharedCounters(window, region(0))
    assert successor.take([client], 61.0) == client
    assert len(successor) == 768
    # It knows the row is full: a new name is not counted, so not refused.
    newcomer = Count("messages_per_client", "newcomer", 1)
    assert successor.take([newcomer], 61.0) is None
    assert successor.take([newcomer], 61.0) is None


def test_a_reloads_new_workers_go_on_counting_where_the_old_ones_were(tmp_path):
    # A reload's workers write the region's other bank and read both: a
    # client limited before a SIGHUP stays limited after it.
    from relaymail.plugins.ratelimit_counters import SharedCounters
    from relaymail.process.shared_counts import LimitsRegion, SharedLimits
    from twisted.internet import task
    settings = make_settings(tmp_path)
    shared = LimitsRegion(2, settings)

    def worker(number):
        return SharedCounters(window, SharedLimits(shared.fd, shared.rows, shared.row(number),
                                                   settings, task.Clock(), 60.0).rate_limits)
    window = SlidingWindow(60)
    client = Count("messages_per_client", "192.0.2.7", 2)
    old = worker(0)
    assert old.take([client], 60.0) is None
    assert old.take([client], 61.0) is None
    shared.next_bank()
    new = [worker(0), worker(1)]
    assert new[0].take([client], 62.0) == client
    assert new[1].take([client], 62.0) == client
    shared.close()


def test_a_full_row_counts_no_new_name_until_old_ones_run_out(region, captured_log, monkeypatch):
    from relaymail.plugins.ratelimit_counters import SharedCounters
    from relaymail.process import shared_counts
    monkeypatch.setattr(shared_counts, "_PACK_PAUSE", 0.0)
    window = SlidingWindow(60)
    counters = SharedCounters(window, region(0), max_keys=10)
    # max_keys 10 gives the smallest row, 1,024 entries, 768 of them used.
    for name in range(768):
        assert counters.take([Count("messages_per_client", f"n{name}", 1)], 60.0) is None
    newcomer = Count("messages_per_client", "newcomer", 1)
    for _ in range(3):
        assert counters.take([newcomer], 61.0) is None
    # Never counted, so never refused; said once in the bucket.
    assert log_text(captured_log).count(
        "more than 10 names counted at once in this worker; new names are not counted") == 1
    assert len(counters) == 768
    # Two buckets on, the old names no longer count and make room.
    assert counters.take([newcomer], 180.0) is None
    assert counters.take([newcomer], 180.0) == newcomer
    assert len(counters) == 1


def test_a_flood_of_new_names_packs_a_full_row_once_a_second(region):
    from relaymail.plugins.ratelimit_counters import SharedCounters
    table = region(0)
    counters = SharedCounters(SlidingWindow(60), table)
    packs = []
    pack = table._pack
    table._pack = lambda: (packs.append(1), pack())
    for name in range(900):
        counters.take([Count("messages_per_client", f"n{name}", 1)], 60.0)
    # One pack as the row filled; the next 131 names were turned away
    # without walking the row again.
    assert len(packs) == 1 and len(counters) == 768


@pytest.fixture
def shared_table(region):
    from relaymail.plugins import ratelimit_counters
    ratelimit_counters.share_between_workers(region(0))
    yield
    ratelimit_counters.share_between_workers(None)


def test_the_factory_in_an_inbound_worker_counts_in_the_shared_region(tmp_path, shared_table):
    from relaymail.plugins.ratelimit_counters import SharedCounters
    plugin = build(tmp_path, {"messages_per_client": "1"})
    assert isinstance(plugin._counters, SharedCounters)
    assert plugin.check_sender(None, {}, context("192.0.2.1")) is Decision.NO_OPINION
    assert deferred_text(plugin.check_sender(None, {}, context("192.0.2.1"))).startswith(
        "Error: too much mail from client 192.0.2.1")


def test_two_inbound_workers_of_a_relay_enforce_one_limit(tmp_path):
    from tests.test_processes import wait_for_worker, worker_of_session
    relay = RelayProcess(tmp_path, {
        "server": {"trusted_networks": "127.0.0.250/32", "workers": "2"},
        "relay": {"domains": "example.com"},
        "plugins": {"senders": "ratelimit", "recipients": "ratelimit, domains"},
        "plugin:ratelimit": {"window": "1h", "messages_per_client": "4"},
    }).start()
    stopped = None

    def mail_in_a_session(sender):
        client = session(relay.port, "127.0.0.21")
        answer = mail(client, sender)
        client.close()
        return worker_of_session(relay, client, "127.0.0.21"), answer
    try:
        pids = {name: wait_for_worker(relay, name) for name in ("inbound.1", "inbound.2")}
        first = [mail_in_a_session(f"a{n}@example.org") for n in range(2)]
        # The worker that took the first stops accepting: the next sessions
        # are the other's, which must know of what the stopped one counted.
        stopped = pids[first[0][0]]
        os.kill(stopped, signal.SIGSTOP)
        later = [mail_in_a_session(f"b{n}@example.org") for n in range(3)]
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        relay.stop()
    assert {worker for worker, _ in later} == {"inbound.1", "inbound.2"} - {first[0][0]}
    assert [answer for _, answer in first + later] == ["250 2.1.0 Ok\r\n"] * 4 + [
        "450 4.7.1 Error: too much mail from client 127.0.0.21 (messages_per_client), "
        "try again later\r\n"]
