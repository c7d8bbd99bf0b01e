"""One owner per spool: an advisory lock on ``QUEUE/lock``.

The running daemon takes the lock at start-up and keeps it for as long as
it runs, so that a second daemon on the same spool refuses to start
instead of delivering the same messages twice, and so that the queue tool
knows whether it may change the files itself (lock free: nobody is
running) or must ask the daemon over the control socket (lock held).

The lock is ``flock(2)`` on a file that is never removed: the kernel drops
it when its holder exits, even after a crash, so there is no stale lock to
clean up.  Removing the file would let two processes lock two different
files of the same name.  The holder writes its process id into the file,
only so that the refusal can say who holds it.

The lock is opened as root when twistd starts as root (``--uid``) and by
the queue tool run as root, in a directory the relay user owns: so never
through a symbolic link, never truncated on open, and written only once
it is known to be a regular file of ours with a single link
(:func:`relaymail.queue.layout.open_regular`).
"""

import errno
import fcntl
import os

from relaymail.queue.layout import LOCK_NAME, open_regular

_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600


class SpoolLock:
    """The exclusive lock of the spool in directory ``path``.

    Also a context manager that takes the lock without waiting and raises
    :class:`SpoolBusy` when it cannot::

        with SpoolLock(path):
            ...     # nobody else is changing the spool
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.lock_path = os.path.join(self.path, LOCK_NAME)
        self._fd = None

    @property
    def held(self):
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, blocking=False):
        """Take the lock.

        Creates the spool directory (mode 0700) if it is missing, so the
        daemon can lock before the spool lays out its directories.

        :param blocking: wait for the holder to let go instead of failing.
        :return: True when the lock is now held by this object, False when
            another process (or another open of the file) holds it.
        :raise OSError: when the lock file cannot be created or locked for
            another reason (permissions, a read-only file system).
        :raise relaymail.queue.layout.UnsafeSpool: when ``lock`` is a
            symbolic link, not a regular file, has another hard link, or
            belongs to neither this process's user nor the spool's owner;
            nothing has been written to it.
        """
        if self._fd is not None:
            return True
        os.makedirs(self.path, _DIRECTORY_MODE, exist_ok=True)
        # open_regular() adds O_CLOEXEC: a delivery helper the daemon
        # starts must not inherit the lock and keep the spool "busy" after
        # the daemon has exited.
        owners = {os.geteuid(), os.stat(self.path).st_uid}
        fd = open_regular(self.path, self.lock_path, os.O_RDWR | os.O_CREAT, owners,
                          _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        self.write_pid()
        return True

    def remove_if_spool_is_new(self):
        """After a start that failed before anything was queued: remove
        the lock file and the spool directory if the lock file is all it
        holds (the start made both), so a failed start leaves nothing.
        Call it only with the lock released."""
        try:
            if os.listdir(self.path) != [LOCK_NAME]:
                return
            os.unlink(self.lock_path)
            os.rmdir(self.path)
        except OSError:
            pass

    def fileno(self):
        """The locked descriptor: the master passes it to its workers, so
        the spool stays locked while any of them lives."""
        if self._fd is None:
            raise RuntimeError("the spool lock is not held")
        return self._fd

    def release(self):
        """Let go of the lock; does nothing when it is not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Forget our pid first, so that nobody is later named as the
            # holder of a lock that is free.
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            # Closing the last descriptor drops the flock.
            os.close(fd)

    def holder_pid(self):
        """Return the process id written by the holder, or None when the
        file is missing, empty or unreadable (a holder that has not yet
        written it, or a lock that is free)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            text = os.read(fd, 32).strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else None

    def describe_holder(self):
        """Say, in one line, why the lock could not be taken: for the
        daemon's refusal to start and the tool's messages."""
        pid = self.holder_pid()
        who = f"process {pid}" if pid is not None else "another process"
        return (f"the spool {self.path} is locked by {who} "
                f"(is another relaymail running on it?)")

    def write_pid(self):
        """Write this process's id into the lock file, as :meth:`acquire`
        does.  A process that took the lock and then forked (twistd
        daemonizing) calls it again in the child, which now holds the
        lock, so that :meth:`describe_holder` names a live process."""
        if self._fd is None:
            raise RuntimeError("the spool lock is not held")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            # Only describe_holder() reads it; the lock itself is held.
            pass

    def __enter__(self):
        if not self.acquire():
            raise SpoolBusy(self.describe_holder())
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False


class SpoolBusy(Exception):
    """The spool lock is held by someone else; the text says who."""
