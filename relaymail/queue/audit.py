"""Who changed the queue by hand, in the relay's log.

Every change the queue tool makes (hold, release, delete, retry, flush)
leaves one line in the relay's log naming the request, the user who ran
the tool and what came of it, as Postfix's postsuper logs each message it
holds or deletes::

    queue tool: hold 4F2A0000000000AB by root (uid 0, pid 4242): ok 4F2A0000000000AB on hold

While the relay runs the tool asks over ``QUEUE/control``, a UNIX socket:
the kernel tells the relay who is at the other end (``SO_PEERCRED``, the
uid and pid the tool connected with, which the tool cannot choose), and
the relay logs the line as it answers.

While it does not run, the tool changes the files itself and nobody is
there to log.  It then appends the same facts, with the time, to
``QUEUE/offline-actions`` (one JSON object a line, written under the
spool lock), and the relay logs each as ``queue tool, offline at TIME:
...`` when it next starts, before it listens for the tool, and removes
the file.  So the relay's log tells every change in the order it was
made, whether the relay was up or not; until the next start the file is
beside the queue it describes.  A crash between the log lines and the
removal logs them twice at the start after, never not at all.
"""

import datetime
import json
import os
import pwd
import socket
import stat
import struct
import time

from twisted.logger import Logger

from relaymail import logline
from relaymail.queue.layout import OFFLINE_ACTIONS_NAME

log = Logger(namespace="relaymail.queue")

#: struct ucred from socket(7): pid, uid, gid, each a C int.
_UCRED = struct.Struct("3i")

#: One journal line is a short request and a short reply; a longer one is
#: not the tool's and is not read whole.
_LINE_LIMIT = 8192


class Caller:
    """Who sent a request: a user id, its name, and a process id (each
    None when the platform does not say)."""

    def __init__(self, uid=None, pid=None, user=None):
        self.uid = uid
        self.pid = pid
        self.user = user if user is not None else user_name(uid)

    def __str__(self):
        if self.uid is None:
            return "an unknown user"
        pid = "" if self.pid is None else f", pid {self.pid}"
        return f"{self.user} (uid {self.uid}{pid})"


def user_name(uid):
    """The login name of ``uid``, or the number as text when it has none."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def peer_of(transport):
    """The :class:`Caller` at the other end of a connected UNIX socket
    transport (Linux ``SO_PEERCRED``); an unknown one for anything else."""
    option = getattr(socket, "SO_PEERCRED", None)
    handle = getattr(transport, "getHandle", lambda: None)()
    if option is None or handle is None:
        return Caller()
    try:
        pid, uid, _gid = _UCRED.unpack(
            handle.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    except (OSError, struct.error):
        return Caller()
    return Caller(uid, pid)


def this_process():
    """The :class:`Caller` for the tool itself: its real uid, which stays
    the administrator's while it works as the spool's owner."""
    return Caller(os.getuid(), os.getpid())


def action_text(request, caller, reply):
    """The log line's text, after ``queue tool:``."""
    return f"{request} by {caller}: {reply}"


def log_action(request, caller, reply):
    """Log one request through the control socket and its reply."""
    logline.info(log, f"queue tool: {action_text(request, caller, reply)}",
                 request=request, user=caller.user, uid=caller.uid, pid=caller.pid,
                 reply=reply)


# -- the offline journal --------------------------------------------------------

def journal_path(spool_path):
    """Where the tool records what it did while the relay was not running."""
    return os.path.join(spool_path, OFFLINE_ACTIONS_NAME)


def record_offline(spool_path, request, caller, reply, now=None):
    """Append one action to the offline journal; the caller holds the
    spool lock (so the relay is not reading it meanwhile).

    :raise OSError: when it cannot be written.
    """
    entry = {"time": time.time() if now is None else now, "request": request,
             "user": caller.user, "uid": caller.uid, "pid": caller.pid, "reply": reply}
    line = json.dumps(entry, ensure_ascii=True).encode("ascii") + b"\n"
    # No link followed: whoever owns the spool must not make the tool,
    # run by root, append to a file elsewhere.
    fd = os.open(journal_path(spool_path),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def log_offline_actions(spool_path):
    """Log what the journal says was done while the relay was not
    running, then remove it.  Called at start, under the spool lock.

    :return: the number of actions logged.
    """
    path = journal_path(spool_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as error:
        log.error("Cannot read {path}, the queue tool's offline actions: {error}",
                  path=path, error=error.strerror)
        return 0
    with open(fd, "rb") as journal:
        if not stat.S_ISREG(os.fstat(journal.fileno()).st_mode):
            log.error("{path} is not a regular file; left alone", path=path)
            return 0
        count = 0
        for line in iter(lambda: journal.readline(_LINE_LIMIT), b""):
            _log_journal_line(line)
            count += 1
    try:
        os.unlink(path)
    except OSError as error:
        # Logged again at the next start, which says so: better than not
        # starting over a record of what was done.
        log.error("cannot remove {path} after logging it: {error}; its entries will be "
                  "logged again at the next start", path=path, error=error.strerror)
    return count


def _log_journal_line(line):
    try:
        entry = json.loads(line)
        when = datetime.datetime.fromtimestamp(float(entry["time"]), datetime.timezone.utc)
        caller = Caller(entry["uid"], entry["pid"], entry["user"])
        text = action_text(entry["request"], caller, entry["reply"])
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        # Not the tool's writing (a hand edit, a cut line): shown as it is.
        logline.info(log, "queue tool, offline: unreadable entry: "
                          + line.decode("ascii", "backslashreplace").rstrip("\n"))
        return
    logline.info(log, f"queue tool, offline at {when:%Y-%m-%d %H:%M:%S} UTC: {text}",
                 request=entry["request"], user=caller.user, uid=caller.uid,
                 pid=caller.pid, reply=entry["reply"], at=entry["time"])
