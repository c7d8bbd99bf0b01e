"""The blocking plugins' thread pool: calls given up on are never made, and
the calls waiting are bounded (found in review: a hung plugin let timed-out
calls pile up and all run later, counting rate limits for nothing)."""

import threading

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaymail.policy.threads import PluginThreads, PoolFull


class PluginThreadsTests(unittest.TestCase):

    def setUp(self):
        self.pool = PluginThreads(reactor, size=1, waiting=3)
        self.addCleanup(self.pool.stop)

    @defer.inlineCallbacks
    def test_calls_cancelled_before_they_begin_are_never_made(self):
        release = threading.Event()
        made = []
        hung = self.pool.run(release.wait, 10)
        yield task.deferLater(reactor, 0.1, lambda: None)     # it has begun
        waiting = [self.pool.run(made.append, n) for n in range(3)]
        for d in waiting:
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)
        # A fourth is refused at once: three wait already (cancelled ones
        # count until the thread reaches them and skips them).
        self.failureResultOf(self.pool.run(made.append, 99), PoolFull)
        release.set()
        self.assertTrue((yield hung))
        while self.pool._pending:          # the thread skips the cancelled three
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((yield self.pool.run(made.append, "after")), None)
        self.assertEqual(made, ["after"])

    @defer.inlineCallbacks
    def test_results_and_exceptions_come_back_on_the_reactor(self):
        seen = []

        def where():
            seen.append(threading.current_thread().name)
            return 7
        self.assertEqual((yield self.pool.run(where)), 7)
        self.assertIn("relaymail-plugins", seen[0])
        d = self.pool.run(int, "not a number")
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.failureResultOf(d, ValueError)
