"""``[queue] commit_delay``: the commit thread waits for other sessions'
messages before a sync, but only while sessions are between MAIL and
their final dot (relaymail.queue.batch, relaymail.smtp.sessions).

The count is checked through the dialogue driven with bytes, the wait
with the real commit thread and real files."""

import threading
import time

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaymail.config import ConfigError
from relaymail.queue.batch import MAX_BATCH, CommitBatcher
from relaymail.queue.spool import Spool
from relaymail.smtp.sessions import OpenSessions, OpenTransactions
from tests.relay_process import RelayProcess
from tests.support import Session, make_settings
from tests.test_stop_and_reload import Client
from tests.test_spool import BODY, make_envelope

ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"


# -- what counts as a transaction ----------------------------------------------

@pytest.fixture
def sessions():
    return OpenSessions(reactor=None)


def connect(tmp_path, sessions):
    return Session(make_settings(tmp_path), factory_options={"sessions": sessions})


def test_a_transaction_counts_from_mail_to_the_final_dot(tmp_path, sessions):
    client = connect(tmp_path, sessions)
    count = sessions.transactions
    client.command(b"EHLO client.test")
    assert count.count == 0
    assert client.command(b"MAIL FROM:<a@example.org>").startswith(b"250 2.1.0")
    assert count.count == 1
    # A second MAIL is refused and opens nothing.
    assert client.command(b"MAIL FROM:<c@example.org>").startswith(b"503 5.5.1")
    assert count.count == 1
    client.command(b"RCPT TO:<b@example.com>")
    assert client.command(b"DATA").startswith(b"354")
    assert count.count == 1
    assert client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").startswith(b"250 2.0.0")
    assert count.count == 0


@pytest.mark.parametrize("ending", [b"RSET\r\n", b"EHLO again.test\r\n",
                                    b"BDAT 3 LAST\r\nabc", b"MAIL FROM:<>\r\nRSET\r\n"])
def test_rset_ehlo_and_bdat_last_end_the_count(tmp_path, sessions, ending):
    client = connect(tmp_path, sessions)
    client.send(ENVELOPE)
    assert sessions.transactions.count == 1
    client.send(ending)
    assert sessions.transactions.count == 0


def test_a_lost_connection_ends_its_count_even_in_data(tmp_path, sessions):
    in_data, in_mail = connect(tmp_path, sessions), connect(tmp_path, sessions)
    in_data.send(ENVELOPE + b"DATA\r\nSubject: cut off\r\n")
    in_mail.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
    assert sessions.transactions.count == 2
    in_data.protocol.connectionLost(None)
    assert sessions.transactions.count == 1
    in_mail.protocol.connectionLost(None)
    assert sessions.transactions.count == 0


def test_a_sender_plugins_late_answer_after_the_client_left_counts_nothing(tmp_path, sessions):
    # Found in review: the plugin's accept after the disconnect opened a
    # transaction nothing would close, and every commit of the process
    # then waited the whole delay.
    from twisted.internet import defer
    from zope.interface import implementer
    from relaymail.interfaces import Decision, ISenderPolicy
    from relaymail.policy.loader import Hooks

    @implementer(ISenderPolicy)
    class Later:
        name = "later"

        def __init__(self):
            self.pending = []

        def check_sender(self, sender, parameters, context):
            self.pending.append(defer.Deferred())
            return self.pending[-1]
    later = Later()
    client = connect(tmp_path, sessions)
    hooks = Hooks(recipients=[], expanders=[], connect=[], helo=[], senders=[later], filters=[])
    client.policy.use_hooks(hooks)
    client.command(b"EHLO client.test")
    assert client.command(b"MAIL FROM:<a@example.org>") == b""
    client.protocol.connectionLost(None)
    later.pending[0].callback(Decision.accept())
    assert sessions.transactions.count == 0


def test_a_refused_sender_opens_no_transaction(tmp_path, sessions):
    client = connect(tmp_path, sessions)
    client.command(b"EHLO client.test")
    assert client.command(b"MAIL FROM:<not an address>").startswith(b"501")
    assert sessions.transactions.count == 0


# -- the wait in the commit thread ---------------------------------------------

class Batches:
    """A store_batch that records each batch it is given."""

    def __init__(self):
        self.sizes = []
        self.stored = threading.Event()

    def __call__(self, items):
        self.sizes.append(len(items))
        self.stored.set()
        return list(items)


class _ImmediateReactor:
    def callFromThread(self, function, *args):
        function(*args)


def batcher(linger, expected):
    store = Batches()
    commits = CommitBatcher(_ImmediateReactor(), store, linger=linger, expected=expected)
    commits.start()
    return commits, store


def test_nothing_expected_means_no_wait_however_long_the_linger():
    commits, store = batcher(60.0, lambda: 0)
    started = time.monotonic()
    result = []
    commits.submit("alone").addCallback(result.append)
    assert store.stored.wait(10)
    commits.stop()
    assert result == ["alone"] and store.sizes == [1]
    assert time.monotonic() - started < 10


def test_while_more_is_expected_the_next_commit_joins_the_batch():
    expected = OpenTransactions()
    expected.opened()
    commits, store = batcher(60.0, lambda: expected.count)
    commits.submit("first")
    # The second sender's final dot: its transaction closes as it commits,
    # and with nothing more expected the batch is synced at once.
    time.sleep(0.05)
    expected.closed()
    commits.submit("second")
    assert store.stored.wait(10)
    commits.stop()
    assert store.sizes == [2]


def test_the_wait_ends_at_the_linger_when_the_expected_commit_never_comes():
    # A session that sent MAIL and went quiet costs the others the linger
    # at most, never their 250.
    commits, store = batcher(0.2, lambda: 1)
    started = time.monotonic()
    commits.submit("first")
    assert store.stored.wait(10)
    waited = time.monotonic() - started
    commits.stop()
    assert store.sizes == [1]
    assert waited >= 0.2


def test_stop_during_the_wait_stores_what_was_submitted():
    commits, store = batcher(60.0, lambda: 1)
    result = []
    commits.submit("first").addCallback(result.append)
    stopping = threading.Thread(target=commits.stop)
    stopping.start()
    stopping.join(10)
    assert not stopping.is_alive()
    assert result == ["first"] and store.sizes == [1]


def test_no_linger_without_something_to_expect():
    commits, store = batcher(60.0, None)
    commits.submit("alone")
    assert store.stored.wait(10)
    commits.stop()
    assert store.sizes == [1]


class _TurnReactor(_ImmediateReactor):
    """Runs what is called later only when told to: the end of a turn."""

    def __init__(self):
        self.later = []

    def callLater(self, delay, function, *args):
        call = task.DelayedCall(0, function, args, {}, self.later.remove,
                                lambda call: None, seconds=lambda: 0)
        self.later.append(call)
        return call

    def end_turn(self):
        for call in list(self.later):
            self.later.remove(call)
            call.called = True
            call.func(*call.args)


def gathering(store=None):
    store, turns = store or Batches(), _TurnReactor()
    removals = CommitBatcher(turns, store, gather=True)
    removals.start()
    return removals, store, turns


def test_gathered_items_go_over_together_at_the_end_of_the_turn():
    removals, store, turns = gathering()
    results = []
    for item in ("a", "b", "c"):
        removals.submit(item).addCallback(results.append)
        time.sleep(0.02)        # the thread could take an item handed over at once
    assert store.sizes == [] and len(turns.later) == 1
    turns.end_turn()
    assert store.stored.wait(10)
    removals.stop()
    assert store.sizes == [3] and results == ["a", "b", "c"]


def test_stop_hands_over_what_this_turn_gathered():
    removals, store, turns = gathering()
    results = []
    removals.submit("a").addCallback(results.append)
    removals.stop()
    assert store.sizes == [1] and results == ["a"]
    assert turns.later == []        # the hand-over it would have made is cancelled


def test_a_batch_joined_from_gathered_lists_stays_within_max_batch():
    release = threading.Event()
    sizes = []

    def store(items):
        if items == ["blocker"]:
            release.wait(10)        # the thread is busy while two lists queue up
        sizes.append(len(items))
        return list(items)
    removals, _, turns = gathering(store)
    removals.submit("blocker")
    turns.end_turn()
    for count in (MAX_BATCH - 1, MAX_BATCH):
        time.sleep(0.05)
        for item in range(count):
            removals.submit(item)
        turns.end_turn()
    release.set()
    removals.stop()
    assert sizes == [1, MAX_BATCH - 1, MAX_BATCH]


def test_a_submission_from_another_thread_goes_to_the_thread_at_once():
    # callLater is for the reactor's thread alone, and would not wake a
    # reactor asleep in epoll_wait.
    removals, store, turns = gathering()
    results = []
    submitting = threading.Thread(target=lambda: removals.submit("a").addCallback(results.append))
    submitting.start()
    submitting.join(10)
    assert store.stored.wait(10)
    removals.stop()
    assert store.sizes == [1] and results == ["a"] and turns.later == []


# -- the spool, with real files -------------------------------------------------

class SpoolCommitDelayTests(unittest.TestCase):

    def spool(self, delay, transactions):
        spool = Spool(self.mktemp(), commit_delay=delay)
        spool.expect_commits_from(transactions)
        batches = []
        store = spool._store_batch

        def recorded(items):
            batches.append(sorted(item[0] for item in items))
            return store(items)
        # Before start(), which hands it to the commit thread.
        spool._store_batch = recorded
        spool.start()
        self.addCleanup(spool.stop)
        return spool, batches

    def message(self, spool):
        writer = spool.new_message()
        writer.write(BODY)
        return writer

    @defer.inlineCallbacks
    def test_two_sessions_messages_share_one_sync(self):
        transactions = OpenTransactions()
        transactions.opened()
        transactions.opened()
        spool, batches = self.spool(60.0, transactions)
        first, second = self.message(spool), self.message(spool)
        transactions.closed()
        committed = [first.commit(make_envelope())]
        # The other session's final dot comes a little later.
        yield task.deferLater(reactor, 0.03, lambda: None)
        transactions.closed()
        committed.append(second.commit(make_envelope()))
        ids = yield defer.gatherResults(committed)
        self.assertEqual(batches, [sorted(ids)])
        for queue_id in ids:
            self.assertEqual(spool.read_record(queue_id)["id"], queue_id)

    @defer.inlineCallbacks
    def test_a_lone_sender_is_synced_at_once(self):
        spool, batches = self.spool(60.0, OpenTransactions())
        started = time.monotonic()
        queue_id = yield self.message(spool).commit(make_envelope())
        self.assertEqual(batches, [[queue_id]])
        # Nowhere near the minute it would have waited.
        self.assertLess(time.monotonic() - started, 10)


# -- the setting ------------------------------------------------------------------

def test_commit_delay_defaults_to_four_milliseconds(tmp_path):
    assert make_settings(tmp_path).queue.commit_delay == 0.004


@pytest.mark.parametrize("raw, problem", [
    ("4", "must be at most 0.1 seconds, got '4'"),
    ("1", "must be at most 0.1 seconds, got '1'"),
    ("4ms", "expected a duration in seconds or with a unit"),
])
def test_commit_delay_refuses_what_would_hold_every_message(tmp_path, raw, problem):
    with pytest.raises(ConfigError) as raised:
        make_settings(tmp_path, queue__commit_delay=raw)
    assert "[queue] commit_delay" in str(raised.value)
    assert problem in str(raised.value)


# -- the relay ------------------------------------------------------------------------

def timed_message(client):
    """Send one message; the seconds from its final dot to the 250."""
    for line in (b"EHLO client.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>"):
        assert client.command(line).startswith(b"250")
    assert client.command(b"DATA").startswith(b"354")
    started = time.monotonic()
    reply = client.command(b"Subject: x\r\n\r\nbody\r\n.")
    waited = time.monotonic() - started
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    return waited


@pytest.mark.parametrize("workers", ["0", "1"])
def test_the_relay_waits_for_a_session_in_a_transaction_and_never_for_none(tmp_path, workers):
    relay = RelayProcess(tmp_path, {"server": {"workers": workers},
                                    "relay": {"domains": "example.com"},
                                    "queue": {"commit_delay": "0.1"}}).start()
    try:
        waiting, sender = Client(relay.port), Client(relay.port)
        assert waiting.reply().startswith(b"220") and sender.reply().startswith(b"220")
        waiting.command(b"EHLO other.test")
        assert waiting.command(b"MAIL FROM:<c@example.org>").startswith(b"250 2.1.0")
        # Another session is between MAIL and its final dot: the commit
        # waits the whole delay for it (it never comes)...
        assert timed_message(sender) >= 0.095
        # ...and once that session has reset, waits for nobody (the best
        # of three, so that a busy machine's one slow sync does not count).
        assert waiting.command(b"RSET").startswith(b"250")
        assert min(timed_message(sender) for _ in range(3)) < 0.09
        waiting.close()
        sender.close()
    finally:
        relay.stop()
