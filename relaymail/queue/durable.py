"""Getting bytes and directory entries onto stable storage.

A file is durable once its data is fsync'd; a rename is durable only once
the directory that now holds the name is fsync'd as well (see fsync(2):
"Calling fsync() does not necessarily ensure that the entry in the
directory containing the file has also reached disk").  Postfix answers
250 only after both; so do we.
"""

import os
import threading


def write_durably(path, data):
    """Create (or truncate) ``path``, write ``data`` and fsync it.

    The file is private to the mail system (mode 0600)."""
    write_file(path, data, fsync=True)


def write_file(path, data, fsync=False):
    """Create (or truncate) ``path`` (mode 0600) and write ``data``; fsync
    it too when asked (a batch commit syncs many files at once instead)."""
    # O_NOFOLLOW: a link planted in the spool is refused, not written through.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        view = memoryview(data)
        while view:
            # os.write may write less than asked, e.g. near a quota.
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path):
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """Shares directory fsyncs between threads that need one at once.

    :meth:`sync` returns only after an fsync of the directory that *began*
    after :meth:`sync` was called, so every rename made before the call is
    covered.  While one fsync runs, the threads that arrive wait for it and
    then share the next one: with many commits in flight the directory is
    fsync'd once per batch instead of once per message.
    """

    def __init__(self, path, fsync=fsync_directory):
        self._path = path
        self._fsync = fsync
        self._condition = threading.Condition()
        self._started = 0       # fsyncs begun so far; each one's number
        self._finished = 0      # the number of the last one that ended
        self._running = False
        self._failure = None    # (number, exception) of the last failed one
        #: Threads waiting for an fsync to begin or end (tests look).
        self.waiting = 0
        #: How many fsyncs were done (tests and statistics look).
        self.count = 0

    def sync(self):
        """Fsync the directory on behalf of the caller.

        :raise OSError: when the fsync the caller relied on, or one after
            it, failed: the caller's renames may not be on disk.
        """
        with self._condition:
            # An fsync already running began before our renames, perhaps;
            # the next one to begin is the first that surely covers them.
            needed = self._started + 1
            number = self._wait_for(needed)
            if number is None:
                self._raise_if_failed_since(needed)
                return
        self._run(number)

    def _wait_for(self, needed):
        """With the lock held, wait until fsync ``needed`` has ended (return
        None) or it is our turn to run it (return its number)."""
        self.waiting += 1
        try:
            while self._finished < needed:
                if not self._running:
                    self._running = True
                    self._started += 1
                    return self._started
                self._condition.wait()
            return None
        finally:
            self.waiting -= 1

    def _raise_if_failed_since(self, needed):
        # A failure after ours also fails us: on Linux a failed fsync can
        # clear the error, so a later success would prove nothing.
        if self._failure is not None and self._failure[0] >= needed:
            error = self._failure[1]
            # A new exception per thread: one object raised in several
            # threads would have its traceback rewritten under each.
            raise OSError(getattr(error, "errno", None),
                          f"directory fsync failed: {error}", self._path)

    def _run(self, number):
        """Do fsync ``number`` outside the lock, then wake the waiters."""
        failure = None
        try:
            self._fsync(self._path)
        except BaseException as error:
            failure = error
            raise
        finally:
            with self._condition:
                self.count += 1
                self._running = False
                self._finished = number
                if failure is not None:
                    self._failure = (number, failure)
                self._condition.notify_all()
