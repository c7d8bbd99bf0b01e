"""The queue file: a message and its record in one file, as Postfix keeps them.

A committed message is one file, ``ID.msg``::

    the message, exactly as received        record["size"] bytes
    the record, one line of JSON            relaymail.queue.record
    the trailer, one line of 44 bytes       #relaymail-record OFFSET CRC32

OFFSET (16 lower-case hex digits) is where the record's line begins,
which is also the message's length; CRC32 (8 hex digits) is the record
line's checksum.  The trailer is written with the record at commit and
never changed, so the file is complete when it is renamed into
``active/``: one file made and one freed per message, not two.  On this
machine's ext4 (no journal), 800 messages a second of two-file churn
cost 541 us of kernel time each and one-file churn 196 us: each inode
allocation there walks past the inodes freed in the last 30 s
(``recently_deleted()``).  benchmarks/inode_churn.py measures it.

A record that changes after commit (a delivery attempt that leaves
recipients to retry, a flush or retry that makes it due, a release from
hold) goes beside the file as
``ID.json``, which then supersedes the embedded one; the embedded record
stays as it was.  So the common life of a message, accepted, delivered,
removed, touches one inode, and a retried one touches two, as before.

Readers that want the message only open it with :func:`open_message`,
which stops at OFFSET: the record and trailer are never part of what is
sent, signed or shown.  A file without a valid trailer (one written by a
version before this format, whose record is always ``ID.json``, or a
copy of a message outside the spool) is all message.  A trailer counts
only at the very end of a file named for the queue id its record
carries, with the checksum right and the record's size where the record
begins: a message cannot fake one in a queue file, as the real trailer
always comes after it, and a file still being written is read with its
length given.  (A two-file-format file's end is the message's own; there
only its unguessable queue id guards it.)  Delivery, DSNs and the queue
tool pass the length from the record in force and do not depend on the
trailer at all.

To read an embedded record by hand: ``tail -n 2 ID.msg | head -n 1 | jq .``
(or ``relaymail-queue show ID``).
"""

import errno
import io
import os
import re
import stat
import zlib

from relaymail.queue import record as records
from relaymail.queue.layout import kind_of
from relaymail.queue.queue_id import is_queue_id

_MAGIC = b"#relaymail-record "
#: ``#relaymail-record `` + 16 hex + space + 8 hex + LF.
TRAILER_LENGTH = len(_MAGIC) + 16 + 1 + 8 + 1
_TRAILER = re.compile(rb"#relaymail-record ([0-9a-f]{16}) ([0-9a-f]{8})\n\Z")

#: Bytes read from a file's end to find its record: the trailer and a
#: typical record in one read(2) (a record is a few hundred bytes).
TAIL_READ = 4096


def record_and_trailer(record_line, offset):
    """The bytes appended to a message of ``offset`` bytes to commit it:
    ``record_line`` (records.encode's one line) and its trailer."""
    crc = zlib.crc32(record_line)
    return b"%s%s%016x %08x\n" % (record_line, _MAGIC, offset, crc)


def embedded_record(fd, size=None):
    """Return ``(offset, record_line)`` of the file open at ``fd``, or None
    when it has no valid trailer (a file of an earlier format, or one being
    written).  Reads the file's end with pread(2): the file offset is left
    alone.

    :param size: the file's size, when the caller has just fstat'd it.
    """
    if size is None:
        size = os.fstat(fd).st_size
    if size < TRAILER_LENGTH:
        return None
    start = max(0, size - TAIL_READ)
    tail = os.pread(fd, size - start, start)
    match = _TRAILER.search(tail, len(tail) - TRAILER_LENGTH)
    if match is None:
        return None
    offset = int(match.group(1), 16)
    end = size - TRAILER_LENGTH
    if offset > end:
        return None
    if offset >= start:
        line = tail[offset - start:end - start]
    else:
        line = os.pread(fd, end - offset, offset)
        if len(line) != end - offset:
            return None
    if zlib.crc32(line) != int(match.group(2), 16) or not line.endswith(b"\n"):
        return None
    return offset, line


def read_embedded(fd, queue_id):
    """The record embedded in the queue file open at ``fd``, checked.

    :raise relaymail.queue.record.CorruptRecord: when there is none, or it
        is bad, or its size is not where the trailer puts the record.
    """
    found = embedded_record(fd)
    if found is None:
        raise records.CorruptRecord("no record: the message file has no valid trailer "
                                    "and there is no ID.json beside it")
    offset, line = found
    record = records.decode(line, queue_id)
    if record["size"] != offset:
        raise records.CorruptRecord(f"records size {record['size']} but its message "
                                    f"ends at {offset}")
    return record


def message_length(fd, queue_id):
    """How many bytes at the start of the file open at ``fd`` are the
    message: up to the record of ``queue_id`` it ends with, or the whole
    file when it has none (or ``queue_id`` is None)."""
    size = os.fstat(fd).st_size
    if queue_id is None:
        return size
    found = embedded_record(fd, size)
    if found is None:
        return size
    offset, line = found
    try:
        record = records.decode(line, queue_id)
    except records.CorruptRecord:
        return size
    return offset if record["size"] == offset else size


def queue_id_of(path):
    """The queue id a queue file at ``path`` is named for, or None."""
    stem, suffix = os.path.splitext(os.path.basename(path))
    return stem if suffix == ".msg" and is_queue_id(stem) else None


class NotRegularFile(OSError):
    """A queue file's name on something relaymail never writes there: a
    symbolic link, a directory, a FIFO, a device.  Set aside, not read."""


def open_no_follow(path):
    """Open the regular file ``path`` for reading.  A symbolic link is
    refused, as the spool's user could have put one there and the queue
    tool may be reading as root (relaymail.queue.layout); so is any other
    kind of file, a FIFO without waiting for a writer (O_NONBLOCK, which
    changes nothing for a regular file).

    :raise NotRegularFile: for a link, a directory, a FIFO or a device.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symbolic link, not a regular file",
                                 path) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, f"{kind_of(mode)}, not a regular file", path)
    return fd


def open_message(path, length=None):
    """Open the message in the queue file at ``path`` for reading: a
    buffered binary file that ends where the message ends, with its
    length as ``size``.  Never follows a symbolic link (the queue tool
    may read as root: relaymail.queue.layout).

    :param length: the message's length when the caller knows it (a file
        still being written has no trailer to say).
    """
    fd = open_no_follow(path)
    try:
        if length is None:
            length = message_length(fd, queue_id_of(path))
        return MessageFile(_Bounded(fd, length))
    except BaseException:
        os.close(fd)
        raise


class MessageFile(io.BufferedReader):
    """A message opened by :func:`open_message`; ``size`` is its length.
    Use ``size``, never fstat(2) of ``fileno()``, which counts the
    record too; ``fileno()`` is there for mmap(2) of ``size`` bytes."""

    @property
    def size(self):
        return self.raw.length


class _Bounded(io.RawIOBase):
    """The first ``length`` bytes of the file open at ``fd``; owns ``fd``."""

    def __init__(self, fd, length):
        self._fd = fd
        self.length = length
        self._position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def fileno(self):
        return self._fd

    def readinto(self, buffer):
        left = self.length - self._position
        if left <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        count = os.preadv(self._fd, [view[:min(len(view), left)]], self._position)
        self._position += count
        return count

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self.length + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if position < 0:
            raise OSError(22, "negative seek position")
        self._position = position
        return position

    def tell(self):
        return self._position

    def close(self):
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()
