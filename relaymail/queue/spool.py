"""The spool: where accepted mail waits, on stable storage, for delivery.

Layout under the spool directory (created mode 0700 by :meth:`Spool.start`)::

    tmp/      messages being written; emptied by recover() at start-up
    active/   committed messages, ID.msg (and ID.json): what delivery reads
    hold/     messages put aside by an administrator: ID.msg (and
              ID.json), never delivered until released back to active/
    corrupt/  entries recover() could not trust, kept for a person to read

(Every name that may appear, and how a process running as root looks at
them without following a link: :mod:`relaymail.queue.layout`.)

``ID.msg`` is the queue file: the message exactly as received, then its
envelope and delivery state, the record, as Postfix keeps a message in
one file (:mod:`relaymail.queue.queue_file`).  A record written after
commit goes beside it as ``ID.json`` and supersedes the one inside.  The
record's format is documented, and versioned, in
:mod:`relaymail.queue.record`.  A message is committed when its
``ID.msg`` is in ``active/``; ids are described in
:mod:`relaymail.queue.queue_id`.

A message gets in the way Postfix's cleanup writes a queue file: the
message goes to ``tmp/ID.msg`` while it arrives; on commit, in the commit
thread (:mod:`relaymail.queue.batch`), the record is appended, the file
reaches stable storage (one ``syncfs`` for every message committing at
that moment, or an fsync of each file where there is no syncfs), it is
renamed into ``active/``, and ``active/`` is fsync'd.  Only then does the
commit's Deferred fire and the client hear 250.
(:meth:`SpoolWriter.commit_sync`, for tools, fsyncs file by file.)  After a
crash at any step, :meth:`Spool.recover` finds either the whole message in
``active/`` or leftovers in ``tmp/`` that it removes; a record that cannot
be trusted goes to ``corrupt/`` rather than being delivered or deleted.

A message with a record beside it is two files, so changing it takes
an order.  A record beside a queue file is written first and removed
last: a lone ``ID.json`` (a removal or a move a crash cut) is a
leftover, never a message, and recover() removes it.  Moving a message
between ``active/`` and ``hold/`` (:meth:`Spool.hold`,
:meth:`Spool.release`) *links* its files into the destination, record
first, makes that directory durable, and only then unlinks the source,
queue file first.  Whatever step a crash interrupts, the message is
complete in exactly one directory, with at most a lone record (a
leftover) in the other, or complete in both.  For a message complete in
both recover() keeps the ``active/`` copy: a hold that did not finish is
undone, a release that did not finish is completed.  Both are safe,
neither loses mail.
"""

import collections
import errno
import itertools
import os
import secrets
import shutil
import stat
import time

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaymail.interfaces import IMessageQueue, IMessageWriter
from relaymail.queue import queue_file
from relaymail.queue import record as records
from relaymail.queue.batch import CommitBatcher, sync_files
from relaymail.queue.durable import GroupSync, fsync_directory, write_durably
from relaymail.queue.layout import (RETIRED_SPARE, is_rewrite_name, rewrite_name, staging_name,
                                    temporary_record_name)
from relaymail.queue.message_view import MessageView
from relaymail.queue.queue_id import LENGTH, is_queue_id, new_queue_id, slot_of

#: Commit threads when the spool runs its own pool.  fsync latency, not
#: CPU, bounds a commit: one 4 KiB file with fsync and rename went at
#: 1,088/s from one thread and 2,732/s from 16 on the development machine
#: (SMTP-NOTES.md, "Measured").
COMMIT_THREADS = 16

#: Where a message can be, as :meth:`Spool.load_any` says it.
ACTIVE = "active"
HOLD = "hold"

#: Large enough that a typical message is a handful of write(2) calls.
_WRITE_BUFFER = 64 * 1024

#: A record is a few hundred bytes; one read(2) takes most of them whole.
_READ_CHUNK = 64 * 1024

#: Records read_records() has asked the kernel for ahead of the one being
#: parsed.  With the files not in the page cache, reading 100,000 records
#: one after the other took 7.6 s on the development machine (a virtual
#: disk); with 64 ahead 2.2 s, with 256 1.6 s; no difference when cached.
_READ_AHEAD = 128

#: Fresh ids to try if one is taken; a second collision means a bug.
_ID_ATTEMPTS = 3

_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600


@implementer(IMessageQueue)
class Spool(service.Service):
    """The on-disk queue, as an :class:`IMessageQueue` for the SMTP server
    and with read helpers for delivery and the queue tool.

    :param path: the spool directory; created on start if missing.
    :param reactor: the reactor commit results are delivered in (the
        global one when None).
    :param threadpool: a started ThreadPool to commit in.  When None the
        spool runs its own of :data:`COMMIT_THREADS` threads between
        :meth:`start` and :meth:`stop`.
    :param min_free: bytes of free space :meth:`has_room` keeps in reserve
        (``[queue] min_free``); 0 makes it always say yes.
    :param owns: for a delivery worker of several, a predicate saying which
        queue ids are its own (relaymail.queue.partition): :meth:`ids`,
        :meth:`held_ids` and :meth:`recover` see only those, and the ids
        this spool mints (the DSNs it writes) are its own too.  None: all.
    :param beside_writers: other processes write to the spool while this
        one recovers it (a delivery worker's): the service's recovery then
        leaves their work alone (see :meth:`recover`).
    :param commit_delay: seconds the commit thread may wait for more
        messages before a sync (``[queue] commit_delay``), while the
        sessions counted by :meth:`expect_commits_from` are in a
        transaction; see relaymail.queue.batch.

    At start-up call :meth:`recover`, then :meth:`start` (either order
    works; recover() creates the directories it needs).  As a
    twisted.application Service it does both when started, and
    :meth:`stop` when stopped: add it to the MultiService before the
    listeners so the queue is recovered before mail is accepted.

    The read helpers (:meth:`load`, :meth:`update`, :meth:`remove` ...)
    assume one owner per message at a time: the delivery engine, or the
    queue tool, not both at once.
    """

    log = Logger()

    def __init__(self, path, reactor=None, threadpool=None, min_free=0, owns=None,
                 beside_writers=False, commit_delay=0.0):
        self.path = os.path.abspath(path)
        self.min_free = min_free
        self.commit_delay = commit_delay
        self._owns = owns
        self._beside_writers = beside_writers
        self._tmp = os.path.join(self.path, "tmp")
        self._active = os.path.join(self.path, "active")
        self._hold = os.path.join(self.path, "hold")
        self._corrupt = os.path.join(self.path, "corrupt")
        self._reactor = reactor
        self._threadpool = threadpool
        self._owns_threadpool = threadpool is None
        self._active_sync = GroupSync(self._active)
        self._hold_sync = GroupSync(self._hold)
        self._corrupt_sync = GroupSync(self._corrupt)
        self._open_ids = set()      # writers neither aborted nor finished
        # Messages a failed hold or release left in both active/ and hold/
        # (its clean-up failed too): once delivered from active/, the copy
        # in hold/ must go with it, or releasing it would deliver it again.
        # recover() settles the ones a restart finds.
        self._in_both = set()
        self._in_flight = set()     # a Deferred per job in a thread
        self._accepting = False
        self._batcher = None
        self._remover = None
        self._now = time.time
        self._transactions = None   # expect_commits_from()

    # -- life cycle --------------------------------------------------------

    def start(self):
        """Create the spool directories and, if the spool owns one, start
        its thread pool.  Messages may be written from now on."""
        if self._accepting:
            return
        self._make_layout()
        if self._owns_threadpool:
            # A fresh pool each time: a stopped ThreadPool cannot restart.
            self._threadpool = ThreadPool(0, COMMIT_THREADS, "relaymail-spool")
            self._threadpool.start()
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        transactions = self._transactions
        self._batcher = CommitBatcher(
            self._reactor, self._store_batch, linger=self.commit_delay,
            expected=None if transactions is None else lambda: transactions.count)
        self._batcher.start()
        # Removals get a thread of their own rather than a place in the
        # commit thread's batches: they need no sync, and a 250 should not
        # wait behind unlinks, nor an unlink behind a syncfs.  The removals
        # of one reactor turn go over together (gather).
        self._remover = CommitBatcher(self._reactor, self._remove_batch, name="relaymail-unlink",
                                      gather=True)
        self._remover.start()
        self._accepting = True

    def expect_commits_from(self, transactions):
        """Let the commit thread wait for more messages while
        ``transactions.count`` (a relaymail.smtp.sessions.OpenTransactions)
        says sessions are sending one.  Call it before :meth:`start`."""
        self._transactions = transactions

    def stop(self):
        """Refuse new messages, wait for the commits and updates in flight,
        then stop the spool's own thread pool.

        :return: a Deferred that fires when all that is done.
        """
        self._accepting = False
        waiting = defer.DeferredList(list(self._in_flight))
        waiting.addCallback(lambda _: self._stop_threadpool())
        return waiting

    def startService(self):
        self.start()
        queued = self.recover(beside_writers=self._beside_writers)
        self.log.info("Spool {path}: {count} messages in the queue",
                      path=self.path, count=len(queued))
        super().startService()

    def stopService(self):
        super().stopService()
        return self.stop()

    def _stop_threadpool(self):
        for batcher in (self._batcher, self._remover):
            if batcher is not None:
                batcher.stop()
        self._batcher = self._remover = None
        if self._owns_threadpool and self._threadpool is not None:
            self._threadpool.stop()
            self._threadpool = None

    def _make_layout(self):
        """Create missing directories, and make their entries durable so
        that a message committed just after a first start survives."""
        if not os.path.isdir(self.path):
            os.makedirs(self.path, _DIRECTORY_MODE, exist_ok=True)
            fsync_directory(os.path.dirname(self.path))
        created = False
        for directory in (self._tmp, self._active, self._hold, self._corrupt):
            try:
                os.mkdir(directory, _DIRECTORY_MODE)
                created = True
            except FileExistsError:
                pass
        if created:
            fsync_directory(self.path)

    # -- writing (IMessageQueue) --------------------------------------------

    def new_message(self):
        """Start a message: return a :class:`SpoolWriter` whose
        ``queue_id`` is already fixed and whose file is open in ``tmp/``.

        :raise OSError: when the file cannot be created.
        :raise RuntimeError: before :meth:`start` or after :meth:`stop`.
        """
        if not self._accepting:
            raise RuntimeError("the spool is not started")
        for _ in range(_ID_ATTEMPTS):
            queue_id = new_queue_id()
            while self._owns is not None and not self._owns(queue_id):
                queue_id = new_queue_id()
            file = self._create_body(queue_id)
            if file is not None:
                self._open_ids.add(queue_id)
                return SpoolWriter(self, queue_id, file)
        raise OSError(errno.EEXIST, "no free queue id", self._tmp)

    def has_room(self, size=0):
        """True when the spool's file system has ``min_free`` bytes free
        beyond ``size`` (a declared SIZE, or 0): see IMessageQueue.

        Free space is what statvfs(2) gives an unprivileged process
        (``f_bavail``), as Postfix's fsspace() measures it: the blocks
        kept for root are not the queue's to fill, even when we run as
        root.  Asked afresh each time: statvfs took about 3 us on the
        development machine, nothing beside a message's 1-2 ms, and a
        cached answer would go on refusing mail after space is freed.
        """
        if self.min_free <= 0:
            return True
        try:
            stats = os.statvfs(self.path)
        except OSError:
            # Advisory only: the write itself will fail if the disk is
            # the problem, and that is answered with 451.
            return True
        return stats.f_bavail * stats.f_frsize >= self.min_free + size

    def _create_body(self, queue_id):
        """Open ``tmp/ID.msg`` for writing, or return None if the id is
        taken here, in ``active/`` or in ``hold/``."""
        # The rename into active/ would replace an existing message, so an
        # id is refused if it is there already (a clock stepped back); and
        # one on hold, which recover() would drop in favour of the new one.
        for directory in (self._active, self._hold):
            for suffix in (".json", ".msg"):
                if os.path.lexists(self._in(directory, queue_id, suffix)):
                    return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._in(self._tmp, queue_id, ".msg"), flags, _FILE_MODE)
        except FileExistsError:
            return None
        return os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)

    def _store(self, queue_id, file, payload):
        """Make the message durable (runs in a worker thread).

        On any failure, removes every file of the message and re-raises.
        """
        try:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.rename(self._in(self._tmp, queue_id, ".msg"),
                      self._in(self._active, queue_id, ".msg"))
            self._active_sync.sync()
        except BaseException:
            self._discard(queue_id, file)
            raise
        return queue_id

    def _store_batch(self, items):
        """Make a batch of ``(queue_id, file, payload, where)`` durable
        together (runs in the commit thread, see relaymail.queue.batch):
        append the records, flush the file system once, rename every file
        into ``active/`` (or ``hold/``, for ``where`` :data:`HOLD`: a
        message a filter held, which delivery must never see in
        ``active/``), fsync those directories once.

        :return: per item, its queue id or the exception that stopped it
            (whose files are then all removed).
        """
        results = [None] * len(items)
        written = []
        for index, (queue_id, file, payload, where) in enumerate(items):
            try:
                file.write(payload)
                file.flush()
                file.close()
                written.append(index)
            except BaseException as error:
                self._discard(queue_id, file, where)
                results[index] = error
        paths = [self._in(self._tmp, items[i][0], ".msg") for i in written]
        try:
            # Every file whole on stable storage before any is renamed: a
            # queue file in active/ is a committed message.
            sync_files(self._tmp, paths)
        except OSError as error:
            for index in written:
                queue_id, file, _, where = items[index]
                self._discard(queue_id, file, where)
                results[index] = error
            return results
        renamed = []
        for index in written:
            queue_id, file, _, where = items[index]
            target = self._directory(where)
            try:
                os.rename(self._in(self._tmp, queue_id, ".msg"), self._in(target, queue_id, ".msg"))
                renamed.append(index)
            except OSError as error:
                self._discard(queue_id, file, where)
                results[index] = error
        try:
            self._active_sync.sync()
            if any(items[index][3] == HOLD for index in renamed):
                self._hold_sync.sync()
        except OSError as error:
            for index in renamed:
                queue_id, file, _, where = items[index]
                self._discard(queue_id, file, where)
                results[index] = error
            return results
        for index in renamed:
            results[index] = items[index][0]
        return results

    def _discard(self, queue_id, file, where=ACTIVE):
        """Remove whatever exists of a message that was not committed
        (into ``where``, the directory its commit was renaming it to)."""
        _close_quietly(file)
        target = self._hold if where == HOLD else self._active
        # The id was free in both directories when it was minted
        # (_create_body), so a file of it there is this commit's.
        for directory in (target, self._tmp):
            self._unlink_quietly(self._in(directory, queue_id, ".msg"))

    def _rewritten(self, queue_id, file, head, offset, content=None):
        """Write ``tmp/ID.msg`` afresh with ``head`` in place of its first
        ``offset`` bytes (runs in a pool thread: the body is copied), or,
        given ``content`` (a filter's new message), with ``head`` and
        ``content`` from ``offset`` on.

        The new file is written under a staging name and renamed over the
        old one, so a failure at any point leaves the message as it was
        (and a crash a staging file in ``tmp/``, which start-up empties).

        :return: the new file, open for writing at its end; ``file`` is
            closed.
        """
        body = self._in(self._tmp, queue_id, ".msg")
        staging = os.path.join(self._tmp, rewrite_name(queue_id + ".msg", secrets.token_hex(4)))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        new = os.fdopen(os.open(staging, flags, _FILE_MODE), "wb", buffering=_WRITE_BUFFER)
        try:
            new.write(head)
            if content is not None:
                new.write(memoryview(content)[offset:])
            else:
                with open(body, "rb") as source:
                    source.seek(offset)
                    shutil.copyfileobj(source, new, _WRITE_BUFFER)
            new.flush()
            os.rename(staging, body)
        except BaseException:
            _close_quietly(new)
            self._unlink_quietly(staging)
            raise
        _close_quietly(file)
        return new

    def _writer_done(self, queue_id):
        self._open_ids.discard(queue_id)

    def _batched(self, item):
        """Hand a commit to the commit thread; :meth:`stop` waits for it."""
        if self._batcher is None:
            return defer.fail(RuntimeError("the spool is not started"))
        return self._tracked(self._batcher.submit(item))

    def _tracked(self, result):
        """Count ``result`` as work in flight until it fires: :meth:`stop`
        waits for all of it."""
        done = defer.Deferred()
        self._in_flight.add(done)

        def landed(outcome):
            self._in_flight.discard(done)
            done.callback(None)
            return outcome
        return result.addBoth(landed)

    def _in_thread(self, function, *args):
        """Run ``function`` in the pool; return a Deferred of its result.
        :meth:`stop` waits for it."""
        if self._threadpool is None:
            return defer.fail(RuntimeError("the spool is not started"))
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._tracked(threads.deferToThreadPool(
            self._reactor, self._threadpool, function, *args))

    # -- recovery -----------------------------------------------------------

    def prepare_for_writers(self):
        """Lay out the spool and empty ``tmp/``: what the master does at
        start, before any worker writes (relaymail.process).  The work is
        bounded by the messages that were being received, not by the size
        of the queue."""
        self._make_layout()
        self._empty_tmp()
        self._remove_retired_spare()

    def remove_unfinished(self, slot=None, owns=None):
        """Remove from ``tmp/`` what a worker that died left there: queue
        files of messages minted in ``slot`` (an inbound worker's, or a
        delivery worker's DSNs), and record updates of messages for which
        ``owns`` is true (a delivery worker's partition).

        Call it only once that worker has exited and before its successor
        starts: the files of live workers are never matched.

        :return: the number of files removed.
        """
        removed = 0
        with os.scandir(self._tmp) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            queue_id = name[:LENGTH]
            if not is_queue_id(queue_id):
                continue
            minted_here = (name in (queue_id + ".msg", queue_id + ".json")
                           or is_rewrite_name(name, queue_id))
            if minted_here and slot is not None and slot_of(queue_id) == slot:
                pass
            elif not minted_here and owns is not None and owns(queue_id):
                pass
            else:
                continue
            self._unlink_quietly(os.path.join(self._tmp, name))
            removed += 1
        return removed

    def remove_lone_records(self):
        """Remove records in ``active/`` and ``hold/`` that have no queue
        file beside them: the leftovers of a removal or a move a crash
        cut.  The master calls it at start, before any worker runs: only a
        delivery worker or the queue tool writes such a record, and a
        release in progress writes its record before it links the file.

        :return: the number removed.
        """
        removed = 0
        for directory in (self._active, self._hold):
            # listdir and set arithmetic: 0.1 s for 100,000 messages, where
            # _scan's look at each entry takes 0.3 s.
            names = os.listdir(directory)
            files = {name[:-4] for name in names if name.endswith(".msg")}
            lone = {name[:-5] for name in names if name.endswith(".json")} - files
            for queue_id in sorted(filter(is_queue_id, lone)):
                self._remove_lone_record(directory, queue_id)
                removed += 1
        return removed

    def _remove_lone_record(self, directory, queue_id):
        self.log.info("Removing {queue_id}.json from {directory}: its message is not "
                      "there", queue_id=queue_id, directory=directory)
        self._unlink_quietly(self._in(directory, queue_id, ".json"))

    def recover(self, beside_writers=False):
        """Bring the spool to a clean state after a stop or a crash.

        Empties ``tmp/`` (those messages never got a 250), removes records
        in ``active/`` with no queue file beside them (what a removal a
        crash cut leaves), and moves entries whose record is missing,
        unreadable, not valid or of another version, or whose message is
        shorter than the record says, to ``corrupt/`` with a log line.
        Never raises for a bad file.

        Then it does the same in ``hold/``, and finishes moves between
        ``active/`` and ``hold/`` that a crash interrupted: a message
        complete in both keeps its ``active/`` copy (see the module
        docstring for why that is right for both directions).

        Call it before the server accepts mail, or, where other processes
        are already writing (a delivery worker, relaymail.process), with
        ``beside_writers``.  ``tmp/`` is then left alone (the master emptied
        it before any writer started).  Records are then not read either:
        the scheduler checks each message as it loads it (:meth:`load`,
        :meth:`body_problem`), so a queue of 100,000 costs a directory
        listing at start, not 100,000 reads.

        :return: the ids of the good messages in ``active/``, sorted
            (held messages are not among them: see :meth:`held_ids`).
        """
        if self._open_ids:
            raise RuntimeError("recover() while messages are being written")
        self._make_layout()
        if not beside_writers:
            self._empty_tmp()
            self._remove_retired_spare()
        good = self._recover_directory(self._active, beside_writers=beside_writers)
        held = self._recover_directory(self._hold, keep_elsewhere=set(good))
        if held:
            self.log.info("{count} messages are on hold in {directory}",
                          count=len(held), directory=self._hold)
        return good

    def _recover_directory(self, directory, keep_elsewhere=frozenset(), beside_writers=False):
        """Clean one of ``active/`` and ``hold/``; return its good ids.

        :param keep_elsewhere: ids whose good copy is in another directory:
            a complete copy here is a leftover of an interrupted move.
        :param beside_writers: see :meth:`recover`.  A lone record of this
            spool's own messages is still removed: only their owner, this
            process, writes one.
        """
        files, records, strays = self._scan(directory)
        if self._owns is not None:
            files = set(filter(self._owns, files))
            records = set(filter(self._owns, records))
        for queue_id in sorted(records - files):
            self._remove_lone_record(directory, queue_id)
        for name in strays:
            self.log.warn("Ignoring unexpected entry {name!r} in {directory}",
                          name=name, directory=directory)
        for queue_id in sorted(files & keep_elsewhere):
            self.log.info("Removing the copy of {queue_id} in {directory}: a move "
                          "was interrupted and the copy in {kept} wins",
                          queue_id=queue_id, directory=directory, kept=self._active)
            try:
                self._remove_entry(directory, queue_id)
            except OSError as error:
                # Both copies stay, as a failed move leaves them: delivery
                # takes this one too, and the next start settles it.
                self._in_both.add(queue_id)
                self.log.error("Could not remove the copy of {queue_id} in {directory}: "
                               "{error}", queue_id=queue_id, directory=directory, error=error)
        kept = sorted(files - keep_elsewhere)
        if beside_writers:
            # Unchecked, but for a message complete in hold/ too (a move a
            # crash cut): the hold/ copy is dropped only for a good one here.
            held = self._scan(self._hold)[0]
            return self._good_ones(kept, directory, check=held.__contains__)
        return self._good_ones(kept, directory)

    def _good_ones(self, queue_ids, directory, check=None):
        """The ids of ``queue_ids`` whose entries in ``directory`` are good
        (or that ``check`` says need no look); the others go to
        ``corrupt/`` together, with two syncs at most rather than two each
        (after a disk that truncated a thousand messages, two thousand)."""
        good, bad = [], []
        for queue_id in queue_ids:
            problem = None
            if check is None or check(queue_id):
                problem = self._checked_problem(queue_id, directory)
            if problem is None:
                good.append(queue_id)
            else:
                bad.append((queue_id, problem))
        if bad:
            self._quarantine_all(bad, directory)
        return good

    def _empty_tmp(self):
        names = self._unlink_files_in(self._tmp)
        if names:
            self.log.info("Removed {count} unfinished files from {directory}",
                          count=len(names), directory=self._tmp)

    def _remove_retired_spare(self):
        """Remove ``spare/`` and what is in it, left by a version that
        wrote new messages into delivered ones' files: nothing in it is
        a message."""
        spare = os.path.join(self.path, RETIRED_SPARE)
        try:
            names = self._unlink_files_in(spare)
        except FileNotFoundError:
            return
        try:
            os.rmdir(spare)
        except OSError as error:
            self.log.warn("Could not remove {path}: {error}", path=spare, error=error)
            return
        self.log.info("Removed {path} and its {count} files: this version does not "
                      "use it", path=spare, count=len(names))

    def _unlink_files_in(self, directory):
        """Unlink every entry of ``directory`` but its subdirectories;
        :return: their names."""
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)]
        for name in names:
            self._unlink_quietly(os.path.join(directory, name))
        return names

    @staticmethod
    def _scan(directory):
        """Return the ids with a queue file, the ids with a record beside
        it, and the names of anything else, in ``directory``."""
        bodies, records, strays = set(), set(), []
        with os.scandir(directory) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if not is_queue_id(stem) or entry.is_dir(follow_symlinks=False):
                    strays.append(entry.name)
                elif suffix == ".msg":
                    bodies.add(stem)
                elif suffix == ".json":
                    records.add(stem)
                else:
                    strays.append(entry.name)
        return bodies, records, strays

    def _checked_problem(self, queue_id, directory):
        """:meth:`_problem_with`, an unexpected error in the check taken
        for a problem of the entry: whatever it is, it is about this one."""
        try:
            return self._problem_with(queue_id, directory)
        except Exception as error:
            return f"could not be checked: {error!r}"

    def _problem_with(self, queue_id, directory=None):
        """Say what is wrong with an entry in ``directory`` (``active/``
        when None), or return None."""
        directory = directory or self._active
        try:
            record = self._read_record_in(directory, queue_id)
        except FileNotFoundError:
            return "message file missing"
        except OSError as error:
            return f"record unreadable: {error.strerror}"
        except records.CorruptRecord as error:
            return f"bad record: {error}"
        return self.body_problem(queue_id, record, directory)

    def _read_record_in(self, directory, queue_id):
        """The record of a message in ``directory``: the one beside its
        queue file when there is one, else the one inside.

        :raise FileNotFoundError: when neither file is there.
        """
        path = self._in(directory, queue_id, ".msg")
        try:
            data = _read_small_file(self._in(directory, queue_id, ".json"))
        except FileNotFoundError:
            fd = queue_file.open_no_follow(path)
            try:
                return queue_file.read_embedded(fd, queue_id)
            finally:
                os.close(fd)
        if not os.path.lexists(path):
            # A lone record (a removal or a move under way, or cut) is no message.
            raise FileNotFoundError(errno.ENOENT, "no queue file beside the record", path)
        return records.decode(data, queue_id)

    def body_problem(self, queue_id, record, directory=None):
        """Say what is wrong with the queue file of a message whose record
        is ``record`` (missing, not a regular file, shorter than the record
        says), or return None.  One lstat(2)."""
        try:
            body = os.lstat(self._in(directory or self._active, queue_id, ".msg"))
        except FileNotFoundError:
            return "message file missing"
        except OSError as error:
            return f"message file unreadable: {error.strerror}"
        if not stat.S_ISREG(body.st_mode):
            return "message file is not a regular file"
        actual = body.st_size
        if actual < record["size"]:
            return f"message file truncated: {actual} of {record['size']} bytes"
        return None

    def quarantine(self, queue_id, reason):
        """Move a message of ``active/`` whose record cannot be trusted to
        ``corrupt/``, logged with ``reason``; it is never fatal.  Blocks on
        fsync: from the reactor thread, run it with call_in_thread().

        :raise OSError: when it could not be moved (logged); it is still
            in ``active/``, to be looked at again.
        """
        self._checked(queue_id)
        error = self._quarantine(queue_id, reason)
        if error is not None:
            raise error

    def _quarantine(self, queue_id, reason, directory=None):
        """Move the entry to ``corrupt/``; return the OSError that stopped
        the move (logged), or None."""
        return self._quarantine_all([(queue_id, reason)], directory).get(queue_id)

    def _quarantine_all(self, entries, directory=None):
        """Move the entries ``(queue_id, reason)`` of ``directory``
        (``active/`` when None) to ``corrupt/``, each logged with its
        reason.

        :return: ``{queue_id: OSError}`` for those whose move stopped
            (logged): whole where they were, or, their queue file moved,
            a lone record.
        """
        directory = directory or self._active
        errors, moved = {}, []
        # Every queue file first, and those gone from the directory on disk
        # before any record beside them moves (see _remove_entry): a cut
        # leaves a lone record, which the next recover() removes, never the
        # queue file alone, which would pass the check with the record it
        # was committed with.
        for queue_id, reason in entries:
            self.log.warn("Moving queue entry {queue_id} to {directory}: {reason}",
                          queue_id=queue_id, directory=self._corrupt, reason=reason)
            stem = self._corrupt_stem(queue_id, directory)
            error = self._move_to_corrupt(queue_id, ".msg", directory, stem)
            if error is None:
                moved.append((queue_id, stem))
            else:
                errors[queue_id] = error
        beside = [(queue_id, stem) for queue_id, stem in moved
                  if os.path.lexists(self._in(directory, queue_id, ".json"))]
        if beside:
            try:
                self._sync_of(directory).sync()
            except OSError as error:
                for queue_id, _ in beside:
                    self._log_stuck(queue_id, ".json", error)
                    errors[queue_id] = error
                beside = []
        for queue_id, stem in beside:
            error = self._move_to_corrupt(queue_id, ".json", directory, stem)
            if error is not None:
                errors[queue_id] = error
        # What is set aside is kept for a person to read: on stable storage
        # like the rest of the queue, not lost with the next power cut.
        try:
            self._corrupt_sync.sync()
        except OSError as error:
            # Moved out of the queue all the same: nothing to look at again.
            what = entries[0][0] if len(entries) == 1 else f"{len(entries)} entries"
            self.log.error("Could not sync {directory} after moving {queue_id} there: {error}",
                           queue_id=what, directory=self._corrupt, error=error)
        return errors

    def _corrupt_stem(self, queue_id, directory):
        """The name an entry gets in ``corrupt/``: its id, or, for a further
        bad copy of one id (active/ and hold/ after an interrupted move, or
        one set aside by an earlier run), a name of its own rather than
        replacing one a person may want to read: ``ID-active``, then
        ``ID-active-2``..."""
        own = f"{queue_id}-{os.path.basename(directory)}"
        for stem in itertools.chain((queue_id, own), (f"{own}-{n}" for n in itertools.count(2))):
            if not any(os.path.lexists(self._in(self._corrupt, stem, suffix))
                       for suffix in (".msg", ".json")):
                return stem

    def _move_to_corrupt(self, queue_id, suffix, directory, stem):
        """Rename one file of an entry into ``corrupt/``: None when done or
        not there, else the OSError (logged)."""
        source = self._in(directory, queue_id, suffix)
        try:
            os.rename(source, self._in(self._corrupt, stem, suffix))
        except FileNotFoundError as error:
            if not os.path.lexists(source):
                return None
            # corrupt/ itself is gone (removed, or a dangling symlink).
            self._log_stuck(queue_id, suffix, error)
            return error
        except OSError as error:
            self._log_stuck(queue_id, suffix, error)
            return error
        return None

    def _log_stuck(self, queue_id, suffix, error):
        self.log.error("Could not move {queue_id}{suffix} to {directory}: {error}",
                       queue_id=queue_id, suffix=suffix, directory=self._corrupt, error=error)

    # -- reading and changing (delivery and the queue tool) ------------------

    def ids(self):
        """Iterate over the ids of the committed messages in ``active/``, in
        directory order (``sorted()`` them for oldest first).  Reads no
        file, so it stays fast with 100,000 messages."""
        return self._ids_in(self._active)

    def load(self, queue_id):
        """Return the record of a committed message, a dict in the format
        of :mod:`relaymail.queue.record`.

        :raise FileNotFoundError: when there is no such message.
        :raise relaymail.queue.record.CorruptRecord: when its record is bad.
        """
        return self.read_record(queue_id)

    def message_path(self, queue_id, where=ACTIVE):
        """Return the path of a message's queue file (``active/ID.msg``, or
        ``hold/ID.msg`` when ``where`` is :data:`HOLD`).  Read the message
        in it with :func:`relaymail.queue.queue_file.open_message`, which
        stops where the record begins."""
        return self._in(self._directory(where), self._checked(queue_id), ".msg")

    def update(self, queue_id, state):
        """Replace the record of a committed message, atomically and
        durably: readers see the old record or the new one, never a mix.
        Blocks on fsync; from the reactor thread use
        :meth:`update_in_thread`.

        :param state: the whole new record (as :meth:`load` returned it,
            changed); it is checked as :meth:`recover` would check it.
        :raise FileNotFoundError: when the message is not in the queue.
        :raise relaymail.queue.record.CorruptRecord: for a bad record.
        :raise OSError: when it could not be written; the old record stays.
        """
        target = self._in(self._active, self._checked(queue_id), ".json")
        records.check(state, queue_id)
        payload = records.encode(state)
        # Without this, an update racing a removal would leave a record
        # whose message is gone (a leftover until the next start).
        if not os.path.exists(self.message_path(queue_id)):
            raise FileNotFoundError(errno.ENOENT, "no such message in the queue", target)
        # A name of its own, so a commit or another update cannot clash.
        temporary = os.path.join(self._tmp, temporary_record_name(queue_id, secrets.token_hex(4)))
        try:
            write_durably(temporary, payload)
            os.replace(temporary, target)
            self._active_sync.sync()
        except BaseException:
            self._unlink_quietly(temporary)
            raise

    def update_in_thread(self, queue_id, state):
        """Run :meth:`update` in the spool's thread pool.

        :return: a Deferred firing with None once the record is durable.
        """
        return self._in_thread(self.update, queue_id, state)

    def remove(self, queue_id):
        """Delete a message from the queue (after delivery or bounce).

        :return: True if it was there.
        """
        # Not fsync'd (but between the two files of a retried message,
        # _remove_entry): if the removal is lost in a crash the message is
        # delivered again, which the queue's contract allows.
        removed = self._remove_entry(self._active, self._checked(queue_id))
        if self._in_both:
            self._drop_hold_copy(queue_id)
        return removed

    def remove_soon(self, queue_id):
        """:meth:`remove`, in the spool's unlink thread: for the delivery
        engine, whose reactor thread must not wait on the file system (the
        unlink(2) calls per delivered message were 30% of its time, queued
        behind the commit thread's syncs).  The removals asked for in
        one turn of the reactor go to that thread together, at the end of
        the turn, as one batch.

        :return: a Deferred of :meth:`remove`'s result; :meth:`stop` waits
            for it.
        """
        if self._remover is None:
            return defer.fail(RuntimeError("the spool is not started"))
        return self._tracked(self._remover.submit(queue_id))

    def _remove_batch(self, queue_ids):
        results = self._remove_entries(self._active, [self._checked(q) for q in queue_ids])
        if self._in_both:
            for queue_id in queue_ids:
                self._drop_hold_copy(queue_id)
        return results

    def _drop_hold_copy(self, queue_id):
        """Remove what a failed move left of ``queue_id`` in ``hold/``,
        now that it is delivered; nothing when it left none."""
        if queue_id not in self._in_both:
            return
        self._in_both.discard(queue_id)
        try:
            self._remove_entry(self._hold, queue_id)
            self._hold_sync.sync()
        except OSError as error:
            self.log.error("{queue_id}: delivered, but the copy in {directory} a failed move "
                           "left could not be removed: {error}; delete it there, or "
                           "releasing it delivers it again", queue_id=queue_id,
                           directory=self._hold, error=error)

    # -- hold, release and administration (scheduler and queue tool) ---------
    #
    # Like update(), these block on fsync: from the reactor thread, run
    # them with call_in_thread().  Like the read helpers they assume the
    # caller owns the message: the scheduler must not be delivering a
    # message it holds, releases or deletes.

    def is_active(self, queue_id):
        """Whether ``active/`` has the message's queue file.  One lstat(2).

        :raise OSError: when that cannot be told (EIO, EACCES...).
        """
        try:
            os.lstat(self._in(self._active, self._checked(queue_id), ".msg"))
        except FileNotFoundError:
            return False
        return True

    def is_held(self, queue_id):
        """Whether ``hold/`` has the message (whole, or a move under way)."""
        return (os.path.exists(self._in(self._hold, queue_id, ".json"))
                or os.path.exists(self._in(self._hold, queue_id, ".msg")))

    def held_ids(self):
        """Iterate over the ids of the messages in ``hold/``, in directory
        order.  Reads no file."""
        return self._ids_in(self._hold)

    def read_record(self, queue_id, where=ACTIVE):
        """Return the record of a message in ``active/`` (or ``hold/``
        when ``where`` is :data:`HOLD`), checked as :meth:`load` does.

        :raise FileNotFoundError: when there is no such message there.
        :raise relaymail.queue.record.CorruptRecord: when its record is bad.
        """
        return self._read_record_in(self._directory(where), self._checked(queue_id))

    def read_records(self, queue_ids, where=ACTIVE):
        """Read many records, as :meth:`read_record` would one by one, but
        with the files of the next ids already open and being read by the
        kernel: the disk works on many at once instead of waiting for each
        (when the files are cached it costs nothing more).

        A file is read as it was when it was opened, a moment before: a
        message delivered or moved meanwhile may still be read.

        :param queue_ids: an iterable of ids, each checked.
        :return: an iterator of ``(queue_id, record, error)``: the checked
            record and None, or None and the exception :meth:`read_record`
            would have raised (FileNotFoundError when the message has
            gone, CorruptRecord, another OSError).
        """
        directory = self._directory(where)
        queue_ids = iter(queue_ids)
        ahead = collections.deque()

        def open_one():
            for queue_id in queue_ids:
                ahead.append((queue_id, self._open_record_ahead(directory,
                                                                self._checked(queue_id))))
                return

        try:
            for _ in range(_READ_AHEAD):
                open_one()
            while ahead:
                queue_id, opened = ahead.popleft()
                open_one()
                if isinstance(opened, OSError):
                    yield queue_id, None, opened
                    continue
                fd, inside = opened
                try:
                    if inside:
                        record = queue_file.read_embedded(fd, queue_id)
                    else:
                        record = records.decode(_read_all(fd), queue_id)
                except (OSError, records.CorruptRecord) as error:
                    yield queue_id, None, error
                    continue
                finally:
                    os.close(fd)
                yield queue_id, record, None
        finally:
            # Left early: close what is still open.
            for _, opened in ahead:
                if not isinstance(opened, OSError):
                    os.close(opened[0])

    def _open_record_ahead(self, directory, queue_id):
        """Open the file holding a record to be read soon, the one beside
        the queue file or else the queue file, asking the kernel to start
        reading the record now.

        :return: ``(fd, inside)``, ``inside`` true for the queue file, or
            the OSError the open raised.
        """
        try:
            try:
                fd, inside = queue_file.open_no_follow(self._in(directory, queue_id, ".json")), False
            except FileNotFoundError:
                fd, inside = queue_file.open_no_follow(self._in(directory, queue_id, ".msg")), True
        except OSError as error:
            return error
        if _fadvise is not None:
            try:
                # A queue file's record is at its end, after the message.
                start = max(0, os.fstat(fd).st_size - queue_file.TAIL_READ) if inside else 0
                _fadvise(fd, start, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass        # only a hint
        return fd, inside

    def load_any(self, queue_id):
        """Return ``(record, where)`` for a message in ``active/`` or
        ``hold/``; ``where`` is :data:`ACTIVE` or :data:`HOLD`.  A message
        complete in both (an interrupted move) is reported in ``active/``,
        where recover() keeps it.

        :raise FileNotFoundError: when it is in neither.
        :raise relaymail.queue.record.CorruptRecord: when its record is bad.
        """
        self._checked(queue_id)
        # Two rounds: a move running in the daemon while the tool reads can
        # take the message from the directory not yet looked at to the one
        # just looked at, but not twice in a row in the same direction.
        for _ in range(2):
            for where in (ACTIVE, HOLD):
                try:
                    return self.read_record(queue_id, where), where
                except FileNotFoundError:
                    pass
                except records.CorruptRecord:
                    # A message file of the two-file format left in active/
                    # by a cut hold is no message: the one in hold/ is.
                    if where == HOLD or not self._is_message(self._hold, queue_id):
                        raise
        raise FileNotFoundError(errno.ENOENT, "no such message in the queue", queue_id)

    def hold(self, queue_id):
        """Move a message from ``active/`` to ``hold/``, where delivery
        does not look, durably.

        The steps, and what :meth:`recover` makes of a crash after each:

        1. link the record beside the queue file, if there is one, into
           ``hold/``: a lone record there, removed;
        2. link the queue file into ``hold/`` and fsync ``hold/``: complete
           in both, the ``active/`` copy wins, so the hold is undone;
        3. unlink the queue file in ``active/`` (and, if a record is beside
           it, fsync ``active/``): at most a lone record there, removed, so
           the message is held;
        4. unlink the record in ``active/`` and fsync ``active/``: done.

        :return: True when the message is on hold now (moved, or held
            already), False when there is no such message.
        :raise OSError: when the disk refused; the message stays active.
        """
        self._checked(queue_id)
        record = self._in(self._active, queue_id, ".json")
        body = self._in(self._active, queue_id, ".msg")
        held_record = self._in(self._hold, queue_id, ".json")
        held_body = self._in(self._hold, queue_id, ".msg")
        if not self._is_message(self._active, queue_id):
            return self._is_message(self._hold, queue_id)
        if self._is_message(self._hold, queue_id) and self._settle_cut_move(queue_id) == HOLD:
            return True
        try:
            if os.path.exists(record):
                self._link_into(record, held_record)
            else:
                # One left by a cut move would pass for this message's.
                self._unlink_if_present(held_record)
            self._link_into(body, held_body)
            self._hold_sync.sync()
        except BaseException:
            self._undo_copy(self._hold, queue_id)
            raise
        self._leave(self._active, queue_id)
        return True

    def release(self, queue_id, now=None):
        """Move a message from ``hold/`` back to ``active/``, due for
        delivery at ``now`` (the spool's clock when None), durably.

        The steps, and what :meth:`recover` makes of a crash after each:

        1. write its record, due now, into ``active/`` (a new file renamed
           in) and fsync ``active/``: a lone record there, removed, so the
           message stays held;
        2. link the queue file into ``active/`` and fsync ``active/``:
           complete in both, the ``active/`` copy wins, so the message is
           released;
        3. unlink the queue file in ``hold/``: at most a lone record there,
           removed;
        4. unlink the record in ``hold/`` and fsync ``hold/``: done.

        :return: True when the message is in ``active/`` now (moved, or
            not held in the first place), False when there is no such
            message.
        :raise relaymail.queue.record.CorruptRecord: when the held record
            is bad; the message stays held.
        :raise OSError: when the disk refused; the message stays held.
        """
        self._checked(queue_id)
        record = self._in(self._active, queue_id, ".json")
        body = self._in(self._active, queue_id, ".msg")
        if self._is_message(self._active, queue_id):
            if not self.is_held(queue_id) or self._settle_cut_move(queue_id) == ACTIVE:
                return True
        try:
            state = self.read_record(queue_id, HOLD)
        except FileNotFoundError:
            return False
        state["next_attempt_at"] = self._now() if now is None else now
        payload = records.encode(state)
        temporary = os.path.join(self._tmp, temporary_record_name(queue_id, secrets.token_hex(4)))
        try:
            write_durably(temporary, payload)
            os.rename(temporary, record)
            # The record on disk before the file: else a crash could leave
            # the file with the record it was committed with, and that copy
            # would win.
            self._active_sync.sync()
            self._link_into(self._in(self._hold, queue_id, ".msg"), body)
            self._active_sync.sync()
        except BaseException:
            self._unlink_quietly(temporary)
            self._undo_copy(self._active, queue_id)
            raise
        self._leave(self._hold, queue_id)
        return True

    def _leave(self, directory, queue_id):
        """The last steps of a move: remove the message from ``directory``,
        where it came from, and sync that.  If the disk refuses, the copy
        there stays beside the whole one the move made: remembered in
        ``_in_both``, so that delivery takes both, as recover() would."""
        try:
            self._remove_entry(directory, queue_id)
            self._sync_of(directory).sync()
        except BaseException:
            self._in_both.add(queue_id)
            raise

    def _undo_copy(self, directory, queue_id):
        """Remove the copy a failed move made in ``directory``, logging
        rather than raising a failure to: the caller re-raises the error
        that stopped the move, which says what went wrong.  A copy left
        behind is one :meth:`recover` settles."""
        try:
            self._remove_entry(directory, queue_id)
        except OSError as error:
            self._in_both.add(queue_id)
            self.log.error("Could not remove the copy of {queue_id} in {directory} "
                           "after a failed move: {error}", queue_id=queue_id,
                           directory=directory, error=error)

    def _settle_cut_move(self, queue_id):
        """A message in ``active/`` with files of it in ``hold/`` too (a
        move a crash cut): settle it as :meth:`recover` does.  The
        ``active/`` copy wins and the other goes, unless it is bad: then
        it is set aside in ``corrupt/`` and the ``hold/`` copy is all there
        is, never dropped for a copy delivery would quarantine.

        :return: :data:`ACTIVE` or :data:`HOLD`, the copy that stays.
        :raise OSError: when the disk refused.  The copies are as they
            were, or, when the ``active/`` one won, what is left of the
            ``hold/`` one (all of it, or a lone record recovery removes)
            goes with the message when it is delivered (``_in_both``), as
            after a move.
        """
        problem = self._checked_problem(queue_id, self._active)
        if problem is None:
            self._leave(self._hold, queue_id)
            kept = ACTIVE
        else:
            error = self._quarantine(queue_id, problem, self._active)
            if error is not None:
                raise error
            kept = HOLD
        self._in_both.discard(queue_id)
        return kept

    def make_due(self, queue_id, now=None):
        """Make a message in ``active/`` due for delivery at ``now`` (the
        spool's clock when None) by setting its ``next_attempt_at``, with
        the atomic, durable replace of :meth:`update`.  A message already
        due is left alone: flushing a big queue then costs an fsync only
        per message that was waiting.

        :return: True when the message is in ``active/`` and due, False
            when it is not in ``active/`` (no such message, or held).
        :raise relaymail.queue.record.CorruptRecord: when its record is bad.
        """
        now = self._now() if now is None else now
        try:
            state = self.load(queue_id)
            due = state["next_attempt_at"]
            if isinstance(due, (int, float)) and due <= now:
                return True
            state["next_attempt_at"] = now
            self.update(queue_id, state)
        except FileNotFoundError:
            return False
        return True

    def delete(self, queue_id):
        """Delete a message from ``active/`` or ``hold/``, durably: unlike
        :meth:`remove` after a delivery, a message an administrator
        deleted must not come back after a crash.

        :return: True if there was such a message.
        """
        self._checked(queue_id)
        found = False
        for directory, sync in ((self._active, self._active_sync),
                                (self._hold, self._hold_sync)):
            if self._remove_entry(directory, queue_id):
                found = True
                sync.sync()
        return found

    def delete_all(self):
        """Delete every message, active or held, with one directory fsync
        each for ``active/`` and ``hold/`` rather than one per message.

        :return: how many messages were deleted.
        """
        deleted = set()
        for directory, sync in ((self._active, self._active_sync),
                                (self._hold, self._hold_sync)):
            queue_ids = list(self._ids_in(directory))
            results = self._remove_entries(directory, queue_ids)
            deleted.update(q for q, removed in zip(queue_ids, results) if removed is True)
            sync.sync()
        return len(deleted)

    def call_in_thread(self, function, *args):
        """Run ``function(*args)`` (one of the blocking methods above) in
        the spool's thread pool, which :meth:`stop` waits for.

        :return: a Deferred of its result.
        """
        return self._in_thread(function, *args)

    # -- helpers --------------------------------------------------------------

    def _ids_in(self, directory):
        if self._owns is not None:
            return filter(self._owns, self._all_ids_in(directory))
        return self._all_ids_in(directory)

    def _all_ids_in(self, directory):
        # Slices, not splitext: 0.23 to 0.14 s of CPU on 200,000 entries.
        # scandir, not listdir, which would hold every name at once (15 MiB).
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".msg") and is_queue_id(name[:-4]):
                    yield name[:-4]

    def _directory(self, where):
        if where == ACTIVE:
            return self._active
        if where == HOLD:
            return self._hold
        raise ValueError(f"not a queue directory: {where!r}")

    def _link_into(self, source, target):
        """Give the file ``source`` the second name ``target``, replacing
        whatever ``target`` names (a leftover of an interrupted move)."""
        # link(2) refuses an existing target and rename(2) replaces one
        # atomically: so link to a fresh name in tmp/, then rename that.
        staging = os.path.join(
            self._tmp, staging_name(os.path.basename(target), secrets.token_hex(4)))
        os.link(source, staging)
        try:
            os.rename(staging, target)
        finally:
            # When both names already are links to one file, rename(2)
            # succeeds doing nothing and the staging name is still there.
            self._unlink_quietly(staging)

    def _remove_entry(self, directory, queue_id):
        """Unlink a message's files in ``directory``, the queue file first,
        and that on disk before the record beside it goes: a crash in
        between leaves a lone record, which recover() removes, never the
        queue file alone, which would come back with the record it was
        committed with and go to every recipient again.  Without a journal
        a file system keeps no order between two unlinks, hence the
        directory sync; a message with no record beside it (most) needs
        none.

        :return: True if there was a queue file.
        """
        [removed] = self._remove_entries(directory, [queue_id], raise_errors=True)
        return removed

    def _remove_entries(self, directory, queue_ids, raise_errors=False):
        """:meth:`_remove_entry` for many messages, with one directory sync
        between all their queue files and the records beside them.

        :return: per id, True if it had a queue file, False if not, or
            the OSError that stopped its removal (raised instead with
            ``raise_errors``).
        """
        results, beside = [], []
        for index, queue_id in enumerate(queue_ids):
            try:
                results.append(self._unlink_if_present(self._in(directory, queue_id, ".msg")))
                if os.path.lexists(self._in(directory, queue_id, ".json")):
                    beside.append(index)
            except OSError as error:
                if raise_errors:
                    raise
                results.append(error)
        if beside:
            if any(results[index] is True for index in beside):
                self._sync_of(directory).sync()
            for index in beside:
                try:
                    self._unlink_if_present(self._in(directory, queue_ids[index], ".json"))
                except OSError as error:
                    if raise_errors:
                        raise
                    results[index] = error
        return results

    def _sync_of(self, directory):
        """The GroupSync of ``active/`` or ``hold/``."""
        return self._hold_sync if directory == self._hold else self._active_sync

    def _is_message(self, directory, queue_id):
        """Whether ``directory`` holds a message of ``queue_id``: its queue
        file, with a record beside it or inside (not a lone record, nor a
        message file of the two-file format whose record never came)."""
        path = self._in(directory, queue_id, ".msg")
        if os.path.exists(self._in(directory, queue_id, ".json")):
            return os.path.exists(path)
        try:
            fd = queue_file.open_no_follow(path)
        except FileNotFoundError:
            return False
        try:
            return queue_file.embedded_record(fd) is not None
        finally:
            os.close(fd)

    @staticmethod
    def _checked(queue_id):
        # Ids come from the queue tool's command line too; a checked one
        # cannot name a path outside the spool.
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return queue_id

    @staticmethod
    def _in(directory, queue_id, suffix):
        return os.path.join(directory, queue_id + suffix)

    @staticmethod
    def _unlink_if_present(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def _unlink_quietly(self, path):
        """Unlink ``path`` if it exists; log, do not raise, on failure: this
        runs while cleaning up after another error."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            self.log.error("Could not remove {path}: {error}", path=path, error=error)


@implementer(IMessageWriter)
class SpoolWriter:
    """One message on its way into a :class:`Spool`; made by
    :meth:`Spool.new_message`.

    ``write`` runs in the caller's thread: buffered writes land in the page
    cache and cost little.  ``commit`` does the fsyncs in a worker thread.
    """

    _OPEN, _COMMITTING, _DONE = "open", "committing", "done"

    def __init__(self, spool, queue_id, file):
        self.queue_id = queue_id
        self._spool = spool
        self._file = file
        self._state = self._OPEN

    def write(self, data):
        """Append bytes of the message (dot-unstuffed, CRLF line ends).

        :raise OSError: when the file cannot take them; then abort.
        """
        if self._state != self._OPEN:
            raise RuntimeError(f"message {self.queue_id} is already {self._state}")
        self._file.write(data)

    def commit(self, envelope, hold=False):
        """Make the message durable with its final ``envelope``.

        :param hold: commit it into ``hold/`` instead of ``active/`` (a
            message filter held it): it is never in ``active/``, so no
            delivery can start it before an administrator releases it.
        :return: a Deferred firing with the queue id once the message is in
            ``active/`` (``hold/``) and on stable storage, or failing (with
            OSError when the disk refused) after every file of it is
            removed.  A failure is not logged here: the caller says it
            once, with what it knows (the SMTP client, the reply it got).
        """
        if not self._spool._accepting:
            # Still open: the caller aborts it, or recover() clears tmp/.
            return defer.fail(RuntimeError("the spool is stopped"))
        try:
            payload = self._prepare(envelope)
        except Exception:
            return defer.fail()
        result = self._spool._batched((self.queue_id, self._file, payload,
                                       HOLD if hold else ACTIVE))
        return result.addBoth(self._finished)

    def _finished(self, result):
        """Close the books on a commit; pass its result on."""
        self._done()
        return result

    def commit_sync(self, envelope):
        """Like :meth:`commit` but in the caller's thread, blocking on the
        fsyncs: for tools and tests, never for the reactor thread.

        :return: the queue id.
        :raise OSError: when the message could not be stored.
        """
        payload = self._prepare(envelope)
        try:
            return self._spool._store(self.queue_id, self._file, payload)
        except Exception as error:
            self._log_failure(error)
            raise
        finally:
            self._done()

    def view(self, envelope):
        """The message as written so far, as the message filters see it:
        a :class:`relaymail.queue.message_view.MessageView` (IMessage) with
        ``envelope``.  Flushes the file in the caller's thread, as ``write``
        writes, and reads its header section (which the DATA reader
        bounded) in the spool's thread pool: a read that misses the page
        cache must not hold every session of the reactor.

        :return: a Deferred firing with the view.
        """
        if self._state != self._OPEN:
            return defer.fail(RuntimeError(f"message {self.queue_id} is already {self._state}"))
        self._file.flush()
        # Its length given: a file still being written has no record to
        # say where the message ends.
        return self._spool._in_thread(MessageView.read, self.queue_id, envelope,
                                      self._spool._in(self._spool._tmp, self.queue_id, ".msg"),
                                      self._file.tell())

    def rewrite(self, view):
        """Give the file the header fields of ``view`` (a view from
        :meth:`view`, changed by the filters), in the spool's thread pool:
        the body is copied, and a big message must not hold the reactor.

        :return: a Deferred firing when done; on failure (OSError) the file
            is as it was, still open: the caller aborts or commits it.
        """
        if self._state != self._OPEN:
            return defer.fail(RuntimeError(f"message {self.queue_id} is already {self._state}"))
        self._file.flush()
        d = self._spool._in_thread(self._spool._rewritten, self.queue_id, self._file,
                                   view.header_bytes, view.body_offset,
                                   getattr(view, "content", None))

        def swap(new):
            self._file = new
        return d.addCallback(swap)

    def abort(self):
        """Throw the message away.  Once :meth:`commit` has been called
        this does nothing: the commit decides, and a message that is
        already durable is better delivered than lost."""
        if self._state != self._OPEN:
            return
        self._spool._discard(self.queue_id, self._file)
        self._done()

    def _prepare(self, envelope):
        """Freeze the message and serialise its record, in the caller's
        thread so the envelope is read where it is owned.  On an error
        (an envelope JSON cannot hold) the message is thrown away."""
        if self._state != self._OPEN:
            raise RuntimeError(f"message {self.queue_id} is already {self._state}")
        self._state = self._COMMITTING
        try:
            size = self._file.tell()
            record = records.new_record(self.queue_id, envelope, size,
                                        self._spool._now())
            payload = queue_file.record_and_trailer(records.encode(record), size)
            #: The record as committed, so the scheduler need not read back
            #: the file it was just written to.
            self.record = record
            return payload
        except BaseException:
            self._spool._discard(self.queue_id, self._file)
            self._done()
            raise

    def _done(self):
        self._state = self._DONE
        self._spool._writer_done(self.queue_id)

    def _log_failure(self, error):
        self._spool.log.error("Could not queue {queue_id}: {error}",
                              queue_id=self.queue_id, error=error)


def _read_small_file(path):
    """Return the bytes of the file at ``path``.  Plain os.read() rather
    than open(): reading every record of a 100,000-message queue (the
    queue tool's list) spends most of its time per file, not per byte."""
    fd = queue_file.open_no_follow(path)
    try:
        return _read_all(fd)
    finally:
        os.close(fd)



def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, _READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


# Not on every system (macOS has none); reading works without it, slower
# when the files are not cached.
_fadvise = getattr(os, "posix_fadvise", None)


def _close_quietly(file):
    """Close a file whose data no longer matters (it is being removed)."""
    try:
        file.close()
    except OSError:
        pass
