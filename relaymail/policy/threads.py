"""The thread pool that plugins declaring ``blocking = True`` run in.

A plugin that blocks (a database driver, a directory lookup, a sleep) must
never run on the reactor thread: every session of the process would wait
for it (in an outside trial, a 4 s sleep in one plugin delayed another
client's banner by 3.5 s).  Its calls go to this pool instead, which is bounded
(``[plugins] threads``) so a plugin that hangs holds threads, not the
process: further calls wait for a free thread inside their own
``[plugins] timeout`` and then get the temporary failure like any late
answer.  A call given up on before a thread took it is never made, and
the calls waiting are bounded too: past that, a call fails at once.

The pool is its own, not the reactor's: the queue's commits and DNS
lookups use the reactor's threads, and a hung plugin must not starve them.
"""

import threading

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

#: Calls that may wait for a thread, per thread.
_WAITING_PER_THREAD = 10

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


class PoolFull(Exception):
    """Too many blocking plugin calls wait already: this one is refused at
    once (the client gets the plugin failure's 4xx)."""


class PluginThreads:
    """Runs blocking plugin calls, started on first use.

    :param reactor: the reactor the results are handed back to.
    :param size: the most calls running at once.
    :param waiting: the most calls waiting for a thread; past it a call
        fails at once with :class:`PoolFull`, so a hung plugin cannot make
        the backlog grow without bound.
    """

    def __init__(self, reactor, size, waiting=None):
        self._reactor = reactor
        self._size = size
        self._most_waiting = waiting if waiting is not None else _WAITING_PER_THREAD * size
        self._pending = 0           # calls handed to the pool and not yet begun
        self._pool = None

    def run(self, function, *args):
        """Call ``function(*args)`` in a pool thread.

        :return: a Deferred firing with its result in the reactor thread.
            Cancelling it (a timeout) gives up waiting; a call not begun by
            then is never made (its answer would reach nobody, and a
            plugin that counts or writes would do it for nothing), and one
            under way goes on in its thread until it returns.
        """
        if self._pending >= self._most_waiting:
            return defer.fail(PoolFull(
                f"{self._pending} blocking plugin calls wait for the "
                f"{self._size} [plugins] threads"))
        if self._pool is None:
            self._pool = _DaemonThreadPool(0, self._size, name="relaymail-plugins")
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        call = _Call(function, args)
        result = defer.Deferred(call.cancel)
        self._pending += 1

        def begun():
            self._pending -= 1

        def finished(succeeded, value):
            if not result.called:
                (result.callback if succeeded else result.errback)(value)

        def in_thread():
            self._reactor.callFromThread(begun)
            return call.run()

        self._pool.callInThreadWithCallback(
            lambda succeeded, value: self._reactor.callFromThread(finished, succeeded, value),
            in_thread)
        return result

    def stop(self):
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()


class _Call:
    """One plugin call on its way to a thread; cancelled ones are skipped."""

    def __init__(self, function, args):
        self._function = function
        self._args = args
        self._cancelled = False

    def cancel(self, _deferred):
        # Read by the pool thread: a plain attribute set once is enough.
        self._cancelled = True

    def run(self):
        if self._cancelled:
            return None
        return self._function(*self._args)
