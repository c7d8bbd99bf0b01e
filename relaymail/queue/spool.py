"""The spool: where accepted mail waits, on stable storage, for delivery.

Layout under the spool directory (created mode 0700 by :meth:`Spool.start`)::

    tmp/      messages being written; emptied by recover() at start-up
    active/   committed messages, ID.msg and ID.json: what delivery reads
    hold/     messages put aside by the queue tool (not used here yet)
    corrupt/  entries recover() could not trust, kept for a person to read

``ID.msg`` is the message exactly as received and ``ID.json`` its envelope
and delivery state; the JSON format is documented, and versioned, in
:mod:`relaymail.queue.record`.  A message is committed when its ``ID.json``
is in ``active/``; ids are described in :mod:`relaymail.queue.queue_id`.

A message gets in the way Postfix's cleanup writes a queue file: the body
goes to ``tmp/ID.msg`` while it arrives; on commit, in a worker thread, the
body is fsync'd, ``tmp/ID.json`` is written and fsync'd, the body and then
the record are renamed into ``active/``, and ``active/`` is fsync'd.  Only
then does the commit's Deferred fire and the client hear 250.  After a
crash at any step, :meth:`Spool.recover` finds either the whole message or
leftovers that it removes; a record that cannot be trusted goes to
``corrupt/`` rather than being delivered or deleted.
"""

import errno
import os
import secrets
import time

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaymail.interfaces import IMessageQueue, IMessageWriter
from relaymail.queue import record as records
from relaymail.queue.durable import GroupSync, write_durably, fsync_directory
from relaymail.queue.queue_id import is_queue_id, new_queue_id

#: Commit threads when the spool runs its own pool.  fsync latency, not
#: CPU, bounds a commit: one 4 KiB file with fsync and rename went at
#: 1,088/s from one thread and 2,732/s from 16 on the development machine
#: (SMTP-NOTES.md, "Measured").
COMMIT_THREADS = 16

#: Large enough that a typical message is a handful of write(2) calls.
_WRITE_BUFFER = 64 * 1024

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

    def __init__(self, path, reactor=None, threadpool=None):
        self.path = os.path.abspath(path)
        self._tmp = os.path.join(self.path, "tmp")
        self._active = os.path.join(self.path, "active")
        self._hold = os.path.join(self.path, "hold")
        self._corrupt = os.path.join(self.path, "corrupt")
        self._reactor = reactor
        self._threadpool = threadpool
        self._owns_threadpool = threadpool is None
        self._active_sync = GroupSync(self._active)
        self._open_ids = set()      # writers neither aborted nor finished
        self._in_flight = set()     # a Deferred per job in a thread
        self._accepting = False
        self._now = time.time

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
        self._accepting = True

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
        queued = self.recover()
        self.log.info("Spool {path}: {count} messages in the queue",
                      path=self.path, count=len(queued))
        super().startService()

    def stopService(self):
        super().stopService()
        return self.stop()

    def _stop_threadpool(self):
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
            file = self._create_body(queue_id)
            if file is not None:
                self._open_ids.add(queue_id)
                return SpoolWriter(self, queue_id, file)
        raise OSError(errno.EEXIST, "no free queue id", self._tmp)

    def _create_body(self, queue_id):
        """Open ``tmp/ID.msg`` for writing, or return None if the id is
        taken here or in ``active/``."""
        # The rename into active/ would replace an existing message, so an
        # id is refused if it is there already (a clock stepped back).
        for suffix in (".json", ".msg"):
            if os.path.lexists(self._in(self._active, queue_id, suffix)):
                return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
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
            file.flush()
            os.fsync(file.fileno())
            file.close()
            write_durably(self._in(self._tmp, queue_id, ".json"), payload)
            # Body first: a record in active/ must always have its body.
            os.rename(self._in(self._tmp, queue_id, ".msg"),
                      self._in(self._active, queue_id, ".msg"))
            os.rename(self._in(self._tmp, queue_id, ".json"),
                      self._in(self._active, queue_id, ".json"))
            self._active_sync.sync()
        except BaseException:
            self._discard(queue_id, file)
            raise
        return queue_id

    def _discard(self, queue_id, file):
        """Remove whatever exists of a message that was not committed."""
        _close_quietly(file)
        # The record first: without it the rest is not a message, even if
        # we crash before the other files are gone.
        for directory, suffix in ((self._active, ".json"), (self._active, ".msg"),
                                  (self._tmp, ".json"), (self._tmp, ".msg")):
            self._unlink_quietly(self._in(directory, queue_id, suffix))

    def _writer_done(self, queue_id):
        self._open_ids.discard(queue_id)

    def _in_thread(self, function, *args):
        """Run ``function`` in the pool; return a Deferred of its result.
        :meth:`stop` waits for it."""
        if self._threadpool is None:
            return defer.fail(RuntimeError("the spool is not started"))
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        done = defer.Deferred()
        self._in_flight.add(done)

        def landed(result):
            self._in_flight.discard(done)
            done.callback(None)
            return result

        result = threads.deferToThreadPool(
            self._reactor, self._threadpool, function, *args)
        return result.addBoth(landed)

    # -- recovery -----------------------------------------------------------

    def recover(self):
        """Bring the spool to a clean state after a stop or a crash.

        Empties ``tmp/`` (those messages never got a 250), removes bodies
        in ``active/`` that have no record (never committed), and moves
        entries whose record is unreadable, not valid, of another version,
        or whose body is missing or shorter than the record says, to
        ``corrupt/`` with a log line.  Never raises for a bad file.

        Call it before the server accepts mail: it must not run while
        messages are being written.

        :return: the ids of the good messages in ``active/``, sorted.
        """
        if self._open_ids:
            raise RuntimeError("recover() while messages are being written")
        self._make_layout()
        self._empty_tmp()
        bodies, records, strays = self._scan_active()
        for queue_id in sorted(bodies - records):
            self.log.info("Removing {queue_id}.msg: it was never committed",
                          queue_id=queue_id)
            self._unlink_quietly(self._in(self._active, queue_id, ".msg"))
        for name in strays:
            self.log.warn("Ignoring unexpected entry {name!r} in {directory}",
                          name=name, directory=self._active)
        return [queue_id for queue_id in sorted(records)
                if self._check_or_quarantine(queue_id)]

    def _empty_tmp(self):
        with os.scandir(self._tmp) as entries:
            names = [entry.name for entry in entries
                     if not entry.is_dir(follow_symlinks=False)]
        for name in names:
            self._unlink_quietly(os.path.join(self._tmp, name))
        if names:
            self.log.info("Removed {count} unfinished files from {directory}",
                          count=len(names), directory=self._tmp)

    def _scan_active(self):
        """Return the ids with a body, the ids with a record, and the names
        of anything else, in ``active/``."""
        bodies, records, strays = set(), set(), []
        with os.scandir(self._active) as entries:
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

    def _check_or_quarantine(self, queue_id):
        """Return True if the entry is good; else move it to ``corrupt/``."""
        try:
            problem = self._problem_with(queue_id)
        except Exception as error:
            # Whatever it is, it is about this entry: set it aside and go on.
            problem = f"could not be checked: {error!r}"
        if problem is None:
            return True
        self._quarantine(queue_id, problem)
        return False

    def _problem_with(self, queue_id):
        """Say what is wrong with an entry in ``active/``, or return None."""
        try:
            with open(self._in(self._active, queue_id, ".json"), "rb") as file:
                data = file.read()
        except OSError as error:
            return f"record unreadable: {error.strerror}"
        try:
            record = records.decode(data, queue_id)
        except records.CorruptRecord as error:
            return f"bad record: {error}"
        try:
            actual = os.stat(self._in(self._active, queue_id, ".msg")).st_size
        except FileNotFoundError:
            return "message file missing"
        except OSError as error:
            return f"message file unreadable: {error.strerror}"
        if actual < record["size"]:
            return f"message file truncated: {actual} of {record['size']} bytes"
        return None

    def _quarantine(self, queue_id, reason):
        self.log.warn("Moving queue entry {queue_id} to {directory}: {reason}",
                      queue_id=queue_id, directory=self._corrupt, reason=reason)
        # Body first, as in remove(): a crash in between leaves a record
        # without a body, which the next recover() quarantines too, never
        # a body without a record, which it would delete.
        for suffix in (".msg", ".json"):
            try:
                os.rename(self._in(self._active, queue_id, suffix),
                          self._in(self._corrupt, queue_id, suffix))
            except FileNotFoundError:
                pass
            except OSError as error:
                self.log.error("Could not move {queue_id}{suffix} to {directory}: {error}",
                               queue_id=queue_id, suffix=suffix,
                               directory=self._corrupt, error=error)

    # -- reading and changing (delivery and the queue tool) ------------------

    def ids(self):
        """Iterate over the ids of the committed messages in ``active/``, in
        directory order (``sorted()`` them for oldest first).  Reads no
        file, so it stays fast with 100,000 messages."""
        with os.scandir(self._active) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix == ".json" and is_queue_id(stem):
                    yield stem

    def load(self, queue_id):
        """Return the record of a committed message, a dict in the format
        of :mod:`relaymail.queue.record`.

        :raise FileNotFoundError: when there is no such message.
        :raise relaymail.queue.record.CorruptRecord: when its record is bad.
        """
        with open(self._record_path(queue_id), "rb") as file:
            return records.decode(file.read(), queue_id)

    def message_path(self, queue_id):
        """Return the path of a message's body (``active/ID.msg``)."""
        return self._in(self._active, self._checked(queue_id), ".msg")

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
        target = self._record_path(queue_id)
        records.check(state, queue_id)
        payload = records.encode(state)
        # Without this, an update racing a removal would bring back a
        # record whose body is gone.
        if not os.path.exists(target):
            raise FileNotFoundError(errno.ENOENT, "no such message in the queue", target)
        # A name of its own, so a commit or another update cannot clash.
        temporary = os.path.join(self._tmp, f"{queue_id}-{secrets.token_hex(4)}.json")
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
        # The record first: a crash between the two unlinks leaves a body
        # without a record, which recover() removes.  Not fsync'd: if the
        # removal is lost in a crash the message is delivered again, which
        # the queue's contract allows.
        removed = self._unlink_if_present(self._record_path(queue_id))
        self._unlink_if_present(self.message_path(queue_id))
        return removed

    # -- helpers --------------------------------------------------------------

    def _record_path(self, queue_id):
        return self._in(self._active, self._checked(queue_id), ".json")

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

    def commit(self, envelope):
        """Make the message durable with its final ``envelope``.

        :return: a Deferred firing with the queue id once the message is in
            ``active/`` and on stable storage, or failing (with OSError
            when the disk refused) after every file of it is removed.
        """
        if not self._spool._accepting:
            # Still open: the caller aborts it, or recover() clears tmp/.
            return defer.fail(RuntimeError("the spool is stopped"))
        try:
            payload = self._prepare(envelope)
        except Exception:
            return defer.fail()
        result = self._spool._in_thread(self._spool._store, self.queue_id,
                                        self._file, payload)
        return result.addBoth(self._finished)

    def _finished(self, result):
        """Close the books on a commit; log a failure and pass it on."""
        self._done()
        if isinstance(result, Failure):
            self._log_failure(result.value)
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
            return records.encode(record)
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


def _close_quietly(file):
    """Close a file whose data no longer matters (it is being removed)."""
    try:
        file.close()
    except OSError:
        pass
