"""The thread pool that plugins declaring ``blocking = True`` run in.

A plugin that blocks (a database driver, a directory lookup, a sleep) must
never run on the reactor thread: every session of the process would wait
for it (in an outside trial, a 4 s sleep in one plugin delayed another
client's banner by 3.5 s).  Its calls go to this pool instead, which is bounded
(``[plugins] threads``) so a plugin that hangs holds threads, not the
process: further calls wait for a free thread inside their own
``[plugins] timeout`` and then get the temporary failure like any late
answer.

The pool is its own, not the reactor's: the queue's commits and DNS
lookups use the reactor's threads, and a hung plugin must not starve them.
"""

import threading

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

#: How long a stop waits for each thread still running a plugin call.  A
#: plugin hung for good cannot be interrupted; its thread is a daemon, so
#: it does not keep the process from exiting either.
_STOP_WAIT = 1.0


class _DaemonThreadPool(ThreadPool):
    """A ThreadPool whose threads never hold up the process's exit."""

    @staticmethod
    def threadFactory(*args, **kwargs):
        thread = threading.Thread(*args, **kwargs)
        thread.daemon = True
        return thread

    def stop(self):
        # ThreadPool.stop joins every thread without a limit: a plugin
        # stuck in a call would hang the relay's shutdown with it.
        self.joined = True
        self.started = False
        self._team.quit()
        for thread in self.threads:
            thread.join(_STOP_WAIT)


class PluginThreads:
    """Runs blocking plugin calls, started on first use.

    :param reactor: the reactor the results are handed back to.
    :param size: the most calls running at once.
    """

    def __init__(self, reactor, size):
        self._reactor = reactor
        self._size = size
        self._pool = None

    def run(self, function, *args):
        """Call ``function(*args)`` in a pool thread.

        :return: a Deferred firing with its result in the reactor thread.
            Cancelling it (a timeout) gives up waiting; the call itself
            goes on in its thread until it returns.
        """
        if self._pool is None:
            self._pool = _DaemonThreadPool(0, self._size, name="relaymail-plugins")
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def stop(self):
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()
