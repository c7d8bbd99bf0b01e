"""Group commit: one thread makes many new messages durable at once.

Each message needs its queue file (message and record,
relaymail.queue.queue_file) on stable storage before it is renamed into
``active/``, and the rename on stable storage before the 250.  Done one
message at a time that is a file fsync and a directory fsync per message,
each in a pool thread that must take Python's GIL back from the busy
reactor thread after every system call; measured here, the thread
hand-offs cost more CPU than the disk.  Instead, one thread takes every
commit waiting, appends the batch's records, flushes the file system
once (``syncfs(2)``, Linux 5.8+ reports write-back errors through it),
renames the batch into place and fsyncs the directory once.

Under load a batch taken as it comes is small (two messages on average,
20 sessions on two inbound workers here), because each sync starts as
soon as the first commit arrives.  So the thread may wait a little for
more (``linger``, ``[queue] commit_delay``, after PostgreSQL's
``commit_delay``), but only while ``expected()`` says other messages are
on their way: sessions between an accepted MAIL and their final dot.  A
lone sender never waits, and the wait ends as soon as a message comes
and no other is expected (a session that ends its transaction without a
message is noticed at the end of the delay).
Measured here (20 sessions, 4 KiB, five alternating runs of 8,000
messages): 4 ms made batches of about four, 932 -> 1,019 msgs/s and 9%
less CPU per message; one to four sessions went as fast as without it.
"""

import ctypes
import errno
import os
import queue
import threading
import time

from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()
#: Most messages in one batch: a bound on what one failure can take down.
MAX_BATCH = 256


def _load_syncfs():
    # The C library Python itself is linked with (CDLL(None): the symbols
    # already in the process).  ctypes.util.find_library("c") would find
    # the same one by running ``ldconfig -p`` in a child process, which
    # every worker did on its way to its first accept.
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()


#: What syncfs(2) answers when a seccomp filter refuses it (EPERM from a
#: container runtime's profile or systemd's ``SystemCallFilter=``, EACCES
#: when a unit sets ``SystemCallErrorNumber=EACCES``), or an old kernel
#: lacks it.  syncfs itself never gives these (its errors are EBADF, EIO,
#: ENOSPC and EDQUOT), so they never mean the data failed to reach the disk.
_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOSYS)


def sync_files(directory, paths):
    """Put the data of ``paths`` (files in ``directory``) on stable storage:
    one syncfs of the file system where there is one, else an fsync each."""
    global _syncfs
    if _syncfs is not None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd) == 0:
                return
            code = ctypes.get_errno() or errno.EIO
        finally:
            os.close(fd)
        if code not in _REFUSED:
            raise OSError(code, os.strerror(code), directory)
        # Refused, not failed: from now on this process fsyncs each file.
        _syncfs = None
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CommitBatcher:
    """Runs ``store_batch(items) -> [result or exception]`` in one thread
    over every item submitted meanwhile; each ``submit`` gets a Deferred of
    its own result.

    :param linger: seconds the thread may wait for more items before it
        starts a batch, while ``expected()`` (called in the thread: it
        must only read) is more than 0.
    :param gather: hand the thread what is submitted in one turn of the
        reactor at the end of that turn, as one batch, instead of each
        item as it comes.  For work that arrives in bursts and has no
        one waiting on it at once (removals: the 250s of many deliveries
        are read in one turn).  Handed over one by one, each woke the
        thread, which took the GIL from the reactor thread and woke the
        reactor back: a dozen futex(2) calls and a pipe write per item.
        Only submissions from the thread that made the batcher (the
        reactor's) are gathered: ``callLater`` is for that thread alone,
        so one from any other goes to the thread at once.
    """

    def __init__(self, reactor, store_batch, name="relaymail-commit", linger=0.0,
                 expected=None, gather=False):
        self._reactor = reactor
        self._store_batch = store_batch
        self._linger = linger if expected is not None else 0.0
        self._expected = expected
        # Each entry is a list of (item, Deferred), or _STOP.
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._gather = gather
        self._gathering_thread = threading.get_ident()
        self._gathered = []
        self._handing_over = None   # the DelayedCall that hands _gathered over

    def start(self):
        self._thread.start()

    def stop(self):
        """End the thread once what was submitted is done."""
        if self._handing_over is not None and self._handing_over.active():
            self._handing_over.cancel()
        self._hand_over()
        self._queue.put(_STOP)
        self._thread.join()

    def submit(self, item):
        d = defer.Deferred()
        if not self._gather or threading.get_ident() != self._gathering_thread:
            self._queue.put([(item, d)])
        else:
            if not self._gathered:
                self._handing_over = self._reactor.callLater(0, self._hand_over)
            self._gathered.append((item, d))
        return d

    def _hand_over(self):
        gathered, self._gathered = self._gathered, []
        for start in range(0, len(gathered), MAX_BATCH):
            self._queue.put(gathered[start:start + MAX_BATCH])

    def _run(self):
        held = None     # a list taken that would have made the last batch too big
        while True:
            if held is not None:
                first, held = held, None
            else:
                first = self._queue.get()
            if first is _STOP:
                return
            batch = list(first)
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    jobs = self._queue.get_nowait()
                except queue.Empty:
                    break
                if jobs is _STOP:
                    stop = True
                    break
                if len(batch) + len(jobs) > MAX_BATCH:
                    held = jobs
                    break
                batch.extend(jobs)
            if not stop and held is None and self._linger > 0:
                stop, held = self._wait_for_more(batch)
            try:
                results = self._store_batch([item for item, _ in batch])
            except BaseException as error:      # a bug: fail the batch, keep going
                results = [error] * len(batch)
            self._reactor.callFromThread(self._deliver, batch, results)
            if stop:
                return

    def _wait_for_more(self, batch):
        """Add to ``batch`` what comes within the linger while more is
        expected.

        :return: ``(stop, held)``: whether told to stop meanwhile, and a
            list taken that would have made the batch too big, or None.
        """
        deadline = time.monotonic() + self._linger
        while len(batch) < MAX_BATCH and self._expected() > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if jobs is _STOP:
                return True, None
            if len(batch) + len(jobs) > MAX_BATCH:
                return False, jobs
            batch.extend(jobs)
        return False, None

    @staticmethod
    def _deliver(batch, results):
        for (_, d), result in zip(batch, results):
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                d.callback(result)
