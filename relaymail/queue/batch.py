"""Group commit: one thread makes many new messages durable at once.

Each message needs its body and record on stable storage before they are
renamed into ``active/``, and the renames on stable storage before the
250.  Done one message at a time that is two file fsyncs and a directory
fsync per message, each in a pool thread that must take Python's GIL back
from the busy reactor thread after every system call; measured here, the
thread hand-offs cost more CPU than the disk.  Instead, one thread takes
every commit waiting, writes the batch's records, flushes the file system
once (``syncfs(2)``, Linux 5.8+ reports write-back errors through it),
renames the batch into place and fsyncs the directory once.
"""

import ctypes
import ctypes.util
import errno
import os
import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

_STOP = object()
#: Most messages in one batch: a bound on what one failure can take down.
MAX_BATCH = 256


def _load_syncfs():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()


def sync_files(directory, paths):
    """Put the data of ``paths`` (files in ``directory``) on stable storage:
    one syncfs of the file system where there is one, else an fsync each."""
    if _syncfs is not None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd) != 0:
                code = ctypes.get_errno() or errno.EIO
                raise OSError(code, os.strerror(code), directory)
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CommitBatcher:
    """Runs ``store_batch(items) -> [result or exception]`` in one thread
    over every item submitted meanwhile; each ``submit`` gets a Deferred of
    its own result."""

    def __init__(self, reactor, store_batch, name="relaymail-commit"):
        self._reactor = reactor
        self._store_batch = store_batch
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """End the thread once what was submitted is done."""
        self._queue.put(_STOP)
        self._thread.join()

    def submit(self, item):
        d = defer.Deferred()
        self._queue.put((item, d))
        return d

    def _run(self):
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            try:
                results = self._store_batch([item for item, _ in batch])
            except BaseException as error:      # a bug: fail the batch, keep going
                results = [error] * len(batch)
            self._reactor.callFromThread(self._deliver, batch, results)
            if stop:
                return

    @staticmethod
    def _deliver(batch, results):
        for (_, d), result in zip(batch, results):
            if isinstance(result, BaseException):
                d.errback(Failure(result))
            else:
                d.callback(result)
