"""Whether the spool can live at the configured path, asked before the
relay makes or locks anything there.

A spool path that names a file, a spool on a read-only file system (or
marked immutable, which even root cannot write), a directory on the way
that is missing and cannot be made: each would otherwise surface as an
``OSError`` from deep inside the lock or the spool's start, after part of
the spool had been made, as a traceback.  :func:`check_spool_path` says
which of them it is in one line, and creates nothing: the write test is a
file made and removed at once, since only the kernel knows every reason a
write may be refused (mode bits, ``chattr +i``, a read-only mount, an
LSM), and root ignores the mode bits that ``access(2)`` would look at.
"""

import errno
import os
import stat

from relaymail.queue.layout import DIRECTORIES, kind_of


class SpoolUnusable(Exception):
    """The spool cannot be made or written at its path; the text says why
    in one line (the path and the system's reason)."""


def check_spool_path(path):
    """Refuse a spool path the relay could not make, lock or write.

    :param path: the absolute [queue] path.
    :raise SpoolUnusable: saying what is in the way.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        # Missing, or a file on the way: the walk up says which.
        _check_can_create(path)
        return
    except OSError as error:
        # ELOOP, EACCES...
        raise SpoolUnusable(f"cannot use {path}: {_reason(error, path)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SpoolUnusable(f"{path} is not a directory (it is {kind_of(info.st_mode)})")
    for name in ("", *DIRECTORIES):
        directory = os.path.join(path, name) if name else path
        if name and not os.path.isdir(directory):
            continue    # made at start, in a directory just found writable
        _check_writable(directory, f"cannot write in {directory}")


def _check_can_create(path):
    """The spool is missing: the nearest directory above it that exists
    must be a directory, and writable, for the start to make the rest."""
    missing, parent = path, os.path.dirname(path)
    while parent != missing:
        try:
            info = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            missing, parent = parent, os.path.dirname(parent)
            continue
        except OSError as error:
            raise SpoolUnusable(f"cannot create {path}: {_reason(error, parent)}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise SpoolUnusable(f"cannot create {path}: {parent} is not a directory "
                                f"(it is {kind_of(info.st_mode)})")
        _check_writable(parent, f"cannot create {path}: cannot write in {parent}")
        return


def _check_writable(directory, what):
    """Make and remove a file in ``directory``, or raise SpoolUnusable
    starting with ``what``."""
    probe = os.path.join(directory, f".relaymail-write-test.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as error:
        if error.errno == errno.EEXIST:
            return      # a test of ours that died half way: writable all the same
        raise SpoolUnusable(f"{what}: {_reason(error, directory)}") from None
    os.close(fd)
    os.unlink(probe)


def _reason(error, path):
    """The system's words for ``error``, with what to do where the
    words alone leave the administrator guessing."""
    text = error.strerror or str(error)
    if error.errno == errno.EPERM:
        text += f" (an immutable directory? lsattr -d {path})"
    return text

