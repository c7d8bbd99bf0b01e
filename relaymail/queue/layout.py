"""What the spool holds, and how a process with privilege touches it.

The spool directory and everything in it belong to the user the relay
runs as (twistd ``--uid``).  A process running as root that follows a
name in there follows whatever that user put there: ``tmp/x.msg ->
/etc/shadow`` chowned at the next start hands the shadow file to the
relay user, ``lock -> /some/root/file`` opened and truncated as root
overwrites it.  So root never resolves a name inside the spool the way an
ordinary ``open()`` or ``chown()`` would; this module is the one place
that knows what may be there and how to look at it.

The layout (see :mod:`relaymail.queue.spool` for what each is for)::

    lock        regular file        the spool lock (relaymail.queue.lock)
    control     UNIX socket         the queue tool's channel (relaymail.queue.control)
    offline-actions regular file    what the queue tool did with no relay running,
                                    logged and removed at the next start
                                    (relaymail.queue.audit)
    tmp/        directory           ID.msg (a message being received; ID.json
                                    from an earlier release), ID-XXXXXXXX.json
                                    (a record being replaced), ID.msg-XXXXXXXX.link
                                    and ID.json-XXXXXXXX.link (a move's staging
                                    name), ID.msg-XXXXXXXX.new (a message being
                                    given a filter's header changes)
    active/     directory           ID.msg (the queue file: message and record,
                                    relaymail.queue.queue_file), ID.json (a
                                    newer record beside it)
    hold/       directory           ID.msg, ID.json
    corrupt/    directory           ID.msg, ID.json, ID-active.msg, ID-hold.json ...
    spare/      directory           PID.N: left by an earlier version, removed at start

ID is a queue id (:mod:`relaymail.queue.queue_id`), XXXXXXXX eight
lower-case hex digits.  Nothing else belongs, and nothing is nested
deeper.

Four checks, after Postfix (its ``set-permissions`` step runs apart from
the daemon, ``safe_open()`` refuses a link or a file whose owner or link
count is wrong, and ``postsuper`` does its queue work as the mail system
owner, not as root):

* :func:`trusted_path` walks the configured spool path as the kernel
  would, and refuses when a directory on the way, or holding the spool,
  could be changed by anyone but root.  Symbolic links the administrator
  put on the way (``/var/spool/relaymail -> /srv/relaymail``) are fine:
  they are in root's directories, so the relay user cannot point them
  elsewhere.  OpenSSH's StrictModes checks the directories above
  ``authorized_keys`` the same way.
* :func:`hand_over` gives the spool to the relay user as root does at
  start-up: it opens each entry with ``O_NOFOLLOW`` relative to its
  already opened directory, checks what it opened (type, owner, and that
  every hard link of a file is inside the spool, so a link to a file
  elsewhere is refused: ``protected_hardlinks`` is a sysctl, not a
  promise) and only then ``fchown()``\\ s that descriptor.  Anything the
  layout does not expect stops start-up with one line: the administrator
  looks, rather than the daemon guessing what a stray entry means.
* :func:`check_root_owned`: a relay that stays root runs only on a spool
  of root's.
* :func:`open_regular` is how the lock is opened: ``O_NOFOLLOW``, no
  ``O_TRUNC``, and a regular file with a single link owned as expected, or
  :class:`UnsafeSpool` before a byte is written.
"""

import os
import re
import stat

from relaymail.queue.queue_id import is_queue_id

TMP = "tmp"
ACTIVE = "active"
HOLD = "hold"
CORRUPT = "corrupt"
DIRECTORIES = (TMP, ACTIVE, HOLD, CORRUPT)
LOCK_NAME = "lock"
CONTROL_NAME = "control"
OFFLINE_ACTIONS_NAME = "offline-actions"
#: MTA-STS policies cached by the delivery side (relaymail.delivery.mta_sts).
MTA_STS = "mta-sts"
#: A cached policy's name there: the domain (lower-case A-labels), and
#: the temporary a new copy is written to before it is renamed.
MTA_STS_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}\.json(\.[0-9]+\.tmp)?\Z")
#: TLS-RPT counts (relaymail.delivery.tls_report): DAY.TOKEN.json per
#: process, its temporary, and the lock of the process that sends.
TLS_REPORTS = "tls-rpt"
TLS_REPORT_LOCK = "lock"
_TLS_REPORT_NAME = re.compile(r"\d{4}-\d{2}-\d{2}\.[0-9]+\.json(\.tmp)?\Z|lock\Z")

#: Symbolic links followed while resolving the spool path before it is
#: refused: Linux's own limit for one path lookup (path_resolution(7)).
_MAX_LINKS = 40

_DIRECTORY, _FILE, _SOCKET = "a directory", "a regular file", "a socket"

_TOP = {name: _DIRECTORY for name in DIRECTORIES}
_TOP[LOCK_NAME] = _FILE
_TOP[CONTROL_NAME] = _SOCKET
_TOP[OFFLINE_ACTIONS_NAME] = _FILE
_TOP[MTA_STS] = _DIRECTORY
_TOP[TLS_REPORTS] = _DIRECTORY
#: Left by a version that kept delivered messages' files there to write
#: new ones into (PID.N); the spool's start removes it.  Known here so that
#: a spool from that version is handed over, not refused.
RETIRED_SPARE = "spare"
_RETIRED_SPARE_NAME = re.compile(r"[0-9]+\.[0-9]+\Z")
_TOP[RETIRED_SPARE] = _DIRECTORY

_TOKEN = "[0-9a-f]{8}"
_EXTRA_NAMES = {
    TMP: re.compile(rf"(?P<id>[^-.]+)(-{_TOKEN}\.json|\.(msg|json)-{_TOKEN}\.link"
                    rf"|\.msg-{_TOKEN}\.new)\Z"),
    CORRUPT: re.compile(r"(?P<id>[^-.]+)-(active|hold)\.(msg|json)\Z"),
}

#: Opening an entry only to look at it and fchown() it: never follow a
#: link, never block on a FIFO, never make a terminal ours.
_LOOK = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LOOK_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeSpool(Exception):
    """The spool is not what its layout says, or could be changed under a
    process with privilege; the text says what, in one line."""

    def __init__(self, spool, problem):
        self.spool = spool
        self.problem = problem
        super().__init__(f"unsafe spool {spool}: {problem}")


def temporary_record_name(queue_id, token):
    """``tmp/`` name of a record being written to replace ``queue_id``'s."""
    return f"{queue_id}-{token}.json"


def staging_name(target_name, token):
    """``tmp/`` name a file is linked to before being renamed onto ``target_name``."""
    return f"{target_name}-{token}.link"


def rewrite_name(target_name, token):
    """``tmp/`` name of a message written afresh (a filter's header
    changes) before it is renamed onto ``target_name``."""
    return f"{target_name}-{token}.new"


_REWRITE = re.compile(rf"\.msg-{_TOKEN}\.new\Z")


def is_rewrite_name(name, queue_id):
    """Whether ``name`` in ``tmp/`` is :func:`rewrite_name` of ``queue_id``'s body."""
    return name.startswith(queue_id) and _REWRITE.fullmatch(name, len(queue_id)) is not None


#: What mkfs puts at the top of an ext2/3/4 file system: found in a spool
#: that has a file system of its own, and never the relay's.
LOST_AND_FOUND = "lost+found"


def _is_root_directory(directory_fd, name):
    info = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == 0


def expected_kind(directory, name):
    """What ``name`` must be in ``directory`` (None for the spool
    directory itself): ``"a directory"``, ``"a regular file"``, ``"a
    socket"``, or None when the layout has no such name there."""
    if directory is None:
        return _TOP.get(name)
    if directory == TLS_REPORTS:
        return _FILE if _TLS_REPORT_NAME.match(name) else None
    if directory == RETIRED_SPARE:
        return _FILE if _RETIRED_SPARE_NAME.match(name) else None
    if directory == MTA_STS:
        return _FILE if MTA_STS_NAME.match(name) and ".." not in name else None
    stem, suffix = os.path.splitext(name)
    if suffix in (".msg", ".json") and is_queue_id(stem):
        return _FILE
    pattern = _EXTRA_NAMES.get(directory)
    if pattern is not None:
        match = pattern.match(name)
        if match and is_queue_id(match.group("id")):
            return _FILE
    return None


def kind_of(mode):
    """What an entry of ``st_mode`` ``mode`` is, in words: "a directory",
    "a regular file", "a symbolic link"..."""
    if stat.S_ISDIR(mode):
        return _DIRECTORY
    if stat.S_ISREG(mode):
        return _FILE
    if stat.S_ISSOCK(mode):
        return _SOCKET
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device"


# -- the path to the spool ----------------------------------------------------

def trusted_path(path, spool_stays_root=False):
    """Resolve ``path`` (relative to the current directory) to the real
    spool directory, checking every directory looked in on the way.

    Each one must be owned by root and writable by nobody else, except a
    sticky directory (``/tmp``) whose entry on the way exists and is root's:
    the sticky bit keeps others from renaming it.  The directory holding
    the spool must be root's alone, sticky or not: the spool itself will
    belong to the relay user, who could then rename it away and leave a
    link in its place.  Missing directories are fine (root creates them,
    mode 0700) when the directory they will be made in is root's alone.

    :param spool_stays_root: the relay runs as root (no ``--uid``), so the
        spool stays root's: then an existing spool may sit in a sticky
        directory like any root entry on the way.
    :return: the real path of the spool directory (which may not exist).
    :raise UnsafeSpool: when a directory on the way fails the check.
    """
    pending = list(reversed(os.path.abspath(path).split("/")))
    current = "/"
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            entry = os.lstat(candidate)
        except FileNotFoundError:
            entry = None
        # The spool directory itself, as opposed to a directory or a
        # link on the way to it.
        last = ((entry is None or not stat.S_ISLNK(entry.st_mode))
                and not any(part not in ("", ".") for part in pending))
        # A spool that stays root's is as safe in a sticky directory as
        # any other entry of root's there; one handed to the relay user is
        # not (its owner could rename it away).
        _check_writers(path, current, entry, last and not spool_stays_root)
        if entry is None:
            # Root makes the rest; nobody else can write in ``current``.
            return os.path.join(candidate, *reversed(pending))
        if stat.S_ISLNK(entry.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise UnsafeSpool(path, "too many symbolic links on the way")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(target.split("/")))
            continue
        current = candidate
    return current


def _check_writers(spool, directory, entry, last):
    """Refuse when someone but root could change the entry that
    ``directory`` has on the way (``entry``, its lstat, or None)."""
    info = os.stat(directory)
    if info.st_uid != 0:
        raise UnsafeSpool(spool, f"{directory} is owned by uid {info.st_uid}, not root; "
                                 "whoever owns it could replace the spool")
    if not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    protected = (info.st_mode & stat.S_ISVTX and entry is not None
                 and entry.st_uid == 0 and not last)
    if not protected:
        raise UnsafeSpool(spool, f"{directory} is writable by others than root "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}); "
                                 "they could replace the spool")


def check_root_owned(path):
    """For a relay that stays root (no ``--uid``): refuse a spool that
    belongs to another user, who could lead root anywhere with a link
    (delivery would read and send whatever ``active/ID.msg`` names).

    :raise UnsafeSpool: when the spool directory exists and is not root's.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    spool = os.path.abspath(path)
    if info.st_uid != 0:
        raise UnsafeSpool(spool, f"it belongs to uid {info.st_uid}; run as that user "
                                 f"(twistd --uid {info.st_uid}) or give the spool to root")
    # Nor may anyone else write in it or its directories: they could swap
    # active/ or plant a record whose message file is a link.
    for name in ("", *DIRECTORIES):
        try:
            inner = os.lstat(os.path.join(path, name)) if name else info
        except FileNotFoundError:
            continue
        shown = name or "the spool directory"
        if name and (not stat.S_ISDIR(inner.st_mode) or inner.st_uid != 0):
            raise UnsafeSpool(spool, f"{name} is not a directory of root's")
        if inner.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeSpool(spool, f"{shown} is writable by others than root "
                                     f"(mode {stat.S_IMODE(inner.st_mode):04o})")


# -- opening one file ---------------------------------------------------------

def open_regular(spool, path, flags, owners, mode=0o600):
    """Open the file ``path`` in the spool ``spool`` as the lock is
    opened: never through a symbolic link (``O_NOFOLLOW``), never
    truncated on open, and kept only if it is a regular file with one
    link, owned by one of the uids in ``owners``.

    :param flags: open flags; ``O_NOFOLLOW`` and ``O_CLOEXEC`` are added,
        ``O_TRUNC`` is not allowed (truncate the descriptor once checked).
    :return: the descriptor.
    :raise UnsafeSpool: when the name is a link or the file is not as
        expected (the descriptor is closed, nothing written).
    :raise OSError: as open(2) does otherwise.
    """
    if flags & os.O_TRUNC:
        raise ValueError("open_regular() never truncates on open")
    name = os.path.relpath(path, spool)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError:
        # ELOOP is how O_NOFOLLOW says "a link" (open(2)).
        if os.path.islink(path):
            raise UnsafeSpool(spool, f"{name} is a symbolic link") from None
        raise
    try:
        _check_file(spool, name, os.fstat(fd), owners)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(spool, name, info, owners, links=1):
    kind = kind_of(info.st_mode)
    if kind != _FILE:
        raise UnsafeSpool(spool, f"{name} is {kind}, not a regular file")
    if info.st_nlink != links:
        raise UnsafeSpool(spool, f"{name} has {info.st_nlink} hard links, "
                                 f"{links} of them in the spool")
    if info.st_uid not in owners:
        raise UnsafeSpool(spool, f"{name} is owned by uid {info.st_uid}")


# -- the hand-over ------------------------------------------------------------

def hand_over(path, uid, gid):
    """Give the spool at ``path`` and everything in it to ``uid``:``gid``
    (``gid`` -1: keep the group), as root does before twistd drops to
    that user; or refuse, having changed nothing, when an entry is not
    what the layout says.

    Messages queued while running as root (or by the queue tool as root)
    are handed over too: the relay user must be able to read them, or
    recovery would set them aside.

    :raise UnsafeSpool: for a link, a FIFO or device, an unknown name, a
        file owned by a third user, a file with a hard link outside the
        spool, or an entry that changed while being checked.
    """
    spool = os.path.abspath(path)
    owners = (0, uid)
    opened = []
    try:
        top = _open_directory(spool, spool, None, "", owners)
        opened.append(top)
        found = []      # (directory fd, name in the message, lstat)
        for name in sorted(os.listdir(top)):
            if name == LOST_AND_FOUND and _is_root_directory(top, name):
                # A spool on a file system of its own (the usual guard
                # against a full disk) has mkfs's lost+found: root's, and
                # left alone, neither looked into nor handed over.
                continue
            info = _lstat_expected(spool, top, None, name, owners)
            if stat.S_ISDIR(info.st_mode):
                fd = _open_directory(spool, name, top, name, owners, info)
                opened.append(fd)
                found.append((fd, name, info))
                for inner in sorted(os.listdir(fd)):
                    shown = f"{name}/{inner}"
                    found.append((fd, shown, _lstat_expected(spool, fd, name, inner, owners)))
            else:
                found.append((top, name, info))
        # A file's names all in the spool (an interrupted move between
        # active/ and hold/ legitimately has two) is ours; one with a
        # name elsewhere is not, whatever it is called here.
        names = {}
        for _, _, info in found:
            if stat.S_ISREG(info.st_mode):
                key = (info.st_dev, info.st_ino)
                names[key] = names.get(key, 0) + 1
        for _, shown, info in found:
            if stat.S_ISREG(info.st_mode):
                _check_file(spool, shown, info, owners, names[(info.st_dev, info.st_ino)])
        os.chown(top, uid, gid)
        for fd, shown, info in found:
            if _owned_by(info, uid, gid) or stat.S_ISSOCK(info.st_mode):
                # The socket is not handed over: the relay, as its
                # user, removes a stale one and makes its own.
                continue
            if stat.S_ISDIR(info.st_mode):
                os.chown(fd, uid, gid)
            else:
                _chown_file(spool, fd, shown, info, uid, gid,
                            names[(info.st_dev, info.st_ino)])
    finally:
        for fd in opened:
            os.close(fd)


def _owned_by(info, uid, gid):
    return info.st_uid == uid and (gid == -1 or info.st_gid == gid)


def _open_directory(spool, shown, parent, name, owners, expected=None):
    """Open a directory of the spool without following a link, and check
    that it is the one looked at (``expected``, its lstat) and owned by
    one of ``owners``."""
    try:
        if parent is None:
            fd = os.open(spool, _LOOK_DIRECTORY)
        else:
            fd = os.open(name, _LOOK_DIRECTORY, dir_fd=parent)
    except OSError:
        if os.path.islink(spool if parent is None else os.path.join(spool, name)):
            raise UnsafeSpool(spool, f"{shown} is a symbolic link") from None
        raise
    info = os.fstat(fd)
    if expected is not None and (info.st_dev, info.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise UnsafeSpool(spool, f"{shown} changed while it was being checked")
    if info.st_uid not in owners:
        os.close(fd)
        raise UnsafeSpool(spool, f"{shown or 'the spool directory'} is owned by "
                                 f"uid {info.st_uid}")
    return fd


def _lstat_expected(spool, directory_fd, directory, name, owners):
    """lstat ``name`` in the open directory and refuse it unless the
    layout expects that name, of that type, there."""
    shown = name if directory is None else f"{directory}/{name}"
    info = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    actual = kind_of(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        # Said first, whatever the name: it is what the administrator
        # most needs to know (someone tried).
        raise UnsafeSpool(spool, f"{shown} is a symbolic link")
    expected = expected_kind(directory, name)
    if expected is None:
        raise UnsafeSpool(spool, f"{shown} does not belong in a spool")
    if actual != expected:
        raise UnsafeSpool(spool, f"{shown} is {actual}, not {expected}")
    if info.st_uid not in owners:
        raise UnsafeSpool(spool, f"{shown} is owned by uid {info.st_uid}")
    return info


def _chown_file(spool, directory_fd, shown, info, uid, gid, links):
    """fchown the file looked at as ``info``, through a descriptor that
    is surely that file: the name may have been replaced since."""
    name = os.path.basename(shown)
    try:
        fd = os.open(name, _LOOK, dir_fd=directory_fd)
    except OSError as error:
        raise UnsafeSpool(spool, f"{shown} changed while it was being checked "
                                 f"({error.strerror})") from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise UnsafeSpool(spool, f"{shown} changed while it was being checked")
        _check_file(spool, shown, now, (0, uid), links)
        os.chown(fd, uid, gid)
    finally:
        os.close(fd)
