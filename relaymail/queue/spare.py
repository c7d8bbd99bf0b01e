"""Files of delivered messages, kept so that new messages are written into
them instead of into newly made files.

Why: a relay makes two files per message (body and record) and deletes
them minutes or milliseconds later.  On ext4 without a journal (the
benchmark machine here), the kernel finds each new inode by walking past
every inode freed in the last ``dirty_expire_centisecs`` (30 s), reading
its inode-table block from the buffer cache each time
(``recently_deleted()``).  The faster the relay goes the longer that walk:
at about 850 messages a second ``__ext4_new_inode`` was 12.7% of all the
machine's CPU, more than the SMTP dialogue.  With the files of delivered
messages written again, ``openat`` fell from 15% to 2.3% of the CPU, and in
five alternating runs of 6,000 messages (20 sessions, 4 KiB, delivered to
smtp-sink) the relay went from 829-934 (mean 871) to 922-938 (mean 929)
messages a second, using 6% less CPU per message.  Each of those runs
began by deleting the last one's 12,000 files, as a relay under sustained
load always has files freed in the last 30 s; a short benchmark round on a
fresh spool (compare.py's 4 s) frees few, and showed no change.  Postfix
makes one file per message and does not reuse them.

How, and who may do what:

* The owner of a delivered message (its delivery worker) calls
  :meth:`SpareFiles.retire` on the record, then the body, in place of
  unlink(2).  A rename into ``spare/`` takes the file out of ``active/``
  as atomically as the unlink did, so a crash leaves what an unlink would
  have left.  Files over :data:`MAX_SIZE` are unlinked: their blocks are
  worth giving back, and they are few.
* Each process names what it retires ``PID.N``, N counting round
  :data:`SLOTS`.  A rename onto a name still taken replaces (frees) the
  old file, so ``spare/`` never holds more than :data:`SLOTS` files per
  process that ever retired one: at most ``SLOTS * MAX_SIZE`` of disk.
* A writer of a new message (:meth:`SpareFiles.claim`) renames a spare
  onto its own fresh name in ``tmp/``.  rename(2) is atomic, so of two
  processes that try the same spare exactly one gets it; the other gets
  ENOENT and tries the next name.  Inbound workers each take their own
  share of the names (N modulo their number), since with all of them
  reaching for every name 1.7 renames failed per claim.  The writer
  overwrites the file from its start and, when it wrote less than the file
  held, must cut it to the length it wrote (ftruncate) before anyone reads
  it: the tail of the old message is still there until then.
  Overwriting rather than truncating first keeps the file's blocks, and
  avoids ext4's forced writeback when a file truncated to nothing is
  closed (``auto_da_alloc``), which cost more than the walk it saved.

A spare holds the bytes of a delivered message until it is written again,
as the blocks of an unlinked file do until they are reused; ``spare/`` is
the relay user's, mode 0700, like the rest of the spool, and nothing in it
is ever listed, delivered or recovered.  An administrator's delete
(``relaymail-queue delete``) still unlinks.
"""

import collections
import itertools
import os
import random
import re
import stat
import threading
import time

#: Spare names each process cycles through.  Delivery hands back two files
#: per message and intake takes two, so the pool only has to cover the
#: difference between the two rates for a moment: 1,024 files is 512
#: messages of slack.
SLOTS = 1024

#: Bytes up to which a retired file is kept.  Most mail is a few KiB;
#: at this size the most ``spare/`` can hold is 32 MiB per process.
MAX_SIZE = 32 * 1024

#: Seconds a claimer that found ``spare/`` empty waits before listing it
#: again (unless it retired a file itself meanwhile): while delivery is
#: idle, intake must not pay a scandir per message.
RESCAN_INTERVAL = 0.1

#: What :meth:`SpareFiles.retire` names a file: ``PID.N``.
NAME = re.compile(r"[0-9]{1,10}\.[0-9]{1,5}\Z")

_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class SpareFiles:
    """The ``spare/`` directory of one spool, as seen by one process.

    :param directory: the ``spare/`` directory (made by the spool's layout).
    :param share: ``(index, count)``: claim only names whose N is
        ``index`` modulo ``count`` (inbound worker ``index`` of ``count``);
        None for every name.
    :param clock: a monotonic clock, for :data:`RESCAN_INTERVAL`.

    Safe to use from several threads: intake claims in the reactor thread
    (bodies) and the commit thread (records).
    """

    def __init__(self, directory, share=None, clock=time.monotonic):
        self.directory = directory
        self._share = share
        self._clock = clock
        self._names = collections.deque()
        self._listing = threading.Lock()
        self._quiet_until = 0.0
        self._pid = os.getpid()
        self._counter = itertools.count()

    def claim(self, target):
        """Rename a spare file onto ``target`` (a name nobody else uses,
        which must not exist) and open it for writing at its start.

        :return: ``(fd, size)``: the file descriptor and the bytes the file
            holds (cut what is left of them once written), or None when
            there is no spare: then make ``target`` afresh.
        """
        while True:
            name = self._next_name()
            if name is None:
                return None
            try:
                os.rename(os.path.join(self.directory, name), target)
            except FileNotFoundError:
                continue            # another writer took it first
            claimed = self._open_claimed(target)
            if claimed is not None:
                return claimed

    def retire(self, path):
        """Take the file at ``path`` out of the queue: into ``spare/`` when
        it is small enough, else unlink it.

        :return: True if there was a file at ``path``.
        """
        try:
            keep = os.lstat(path).st_size <= MAX_SIZE
        except FileNotFoundError:
            return False
        if keep:
            slot = next(self._counter) % SLOTS
            try:
                os.rename(path, os.path.join(self.directory, f"{self._pid}.{slot}"))
                self._quiet_until = 0.0     # one process doing both: look again
                return True
            except FileNotFoundError:
                # The file went meanwhile, or there is no spare/ (a spool
                # laid out by an older release): the unlink below says which.
                pass
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def _next_name(self):
        """The next spare to try, or None when there is none."""
        while True:
            try:
                return self._names.popleft()
            except IndexError:
                pass
            with self._listing:
                if self._names:
                    continue        # another thread listed meanwhile
                if self._clock() < self._quiet_until:
                    return None
                found = self._list()
                if not found:
                    self._quiet_until = self._clock() + RESCAN_INTERVAL
                    return None
                # A process claiming from every name (a delivery worker
                # writing a DSN) lists an inbound worker's names too: in
                # another order, the two rarely reach for the same one.
                random.shuffle(found)
                self._names.extend(found)

    def _list(self):
        try:
            with os.scandir(self.directory) as entries:
                names = [entry.name for entry in entries if NAME.match(entry.name)]
        except FileNotFoundError:
            return []
        if self._share is None:
            return names
        index, count = self._share
        return [name for name in names if int(name.rpartition(".")[2]) % count == index]

    @staticmethod
    def _open_claimed(target):
        """Open a claimed spare for writing: ``(fd, size)``, or None (and
        the name removed) when it is anything but a plain file of one link."""
        try:
            fd = os.open(target, _WRITE_FLAGS)
        except OSError:
            # A link (ELOOP), a directory...: not ours to write through.
            _unlink_quietly(target)
            return None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            return fd, info.st_size
        os.close(fd)
        _unlink_quietly(target)
        return None


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
