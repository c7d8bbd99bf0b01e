"""A message being received, as the message filters see it (IMessage).

The body stays in its file in ``tmp/``; only the header section is held in
memory (``[limits] header_size`` bounds it).  A filter's header changes
make a new view with the new fields over the same file (a filter that
replaces the whole message, a view over its bytes), so the next filter
reads the message as changed -- :meth:`MessageView.open` gives the current
fields followed by the file from the end of the original fields -- and
nothing is copied until the filters are done.  Then
:meth:`relaymail.queue.spool.SpoolWriter.rewrite` writes the file once,
from the last view.
"""

import io

from zope.interface import implementer

from relaymail import address, header_section
from relaymail.envelope import Envelope
from relaymail.interfaces import IMessage
from relaymail.queue.queue_file import open_message

#: How much of the file is read at a time looking for the end of the header.
_CHUNK = 64 * 1024


@implementer(IMessage)
class MessageView:
    """See :class:`relaymail.interfaces.IMessage`.

    :param path: the message file (a queue file: the message is its
        first ``file_size`` bytes).
    :param fields: the header fields now (:class:`relaymail.header_section.Field`).
    :param body_offset: where in the file the original fields end.
    :param file_size: the message's length in the file.
    """

    def __init__(self, queue_id, envelope, path, fields, body_offset, file_size, whole=False,
                 content=None):
        #: True for a view of the file as it is (read, no fields changed):
        #: the file alone is the message (see :func:`whole_file`).
        self.whole = whole
        #: The whole message as a filter replaced it (bytes), or None: the
        #: body is then ``content[body_offset:]``, not the file's, and
        #: ``file_size`` is its length.
        self.content = content
        self.queue_id = queue_id
        self.envelope = envelope
        self.path = path
        self.fields = list(fields)
        self.body_offset = body_offset
        self._file_size = file_size
        self.sender = mailbox_of(envelope.sender) if envelope.sender else None
        self.recipients = [mailbox_of(r) for r in envelope.recipients]
        self.headers = [(field.name, field.value) for field in self.fields]
        self.header_bytes = header_section.to_bytes(self.fields)
        self.size = len(self.header_bytes) + file_size - body_offset

    @classmethod
    def read(cls, queue_id, envelope, path, length=None):
        """The view of the message at ``path`` as it is (flushed) now.
        Reads only the header section, which the DATA reader bounded.

        :param length: the message's length, for a file still being
            written (which has no record yet to say where it ends).
        """
        with open_message(path, length) as f:
            data = b""
            while True:
                chunk = f.read(_CHUNK)
                data += chunk
                fields, end = header_section.parse(data, complete=not chunk)
                if end is not None:
                    break
            size = f.size
        return cls(queue_id, envelope, path, fields, end, size, whole=True)

    def with_fields(self, fields):
        """This message with other header fields (a filter's changes)."""
        return MessageView(self.queue_id, self.envelope, self.path, fields, self.body_offset,
                           self._file_size, content=self.content)

    def with_content(self, data):
        """This message replaced whole by ``data`` (a filter's
        Decision.with_message, already checked): held in memory, as the
        filter that made it did, until the rewrite writes it."""
        fields, end = header_section.parse(data, complete=True)
        return MessageView(self.queue_id, self.envelope, self.path, fields, end, len(data),
                           content=data)

    def open(self):
        """A binary file reading the message as it is now: the current
        fields, then the rest of the file.  Blocks on the disk."""
        if self.content is not None:
            # One copy: a memoryview slices without one, and BytesIO keeps
            # the bytes it is given.
            return io.BytesIO(self.header_bytes + memoryview(self.content)[self.body_offset:])
        body = open_message(self.path, self._file_size)
        body.seek(self.body_offset)
        return io.BufferedReader(_Joined(self.header_bytes, body))


def whole_file(message):
    """The path of the queue file that holds ``message`` as its first
    ``message.size`` bytes (a queued message as read; open it with
    :func:`relaymail.queue.queue_file.open_message`), or None for any
    other IMessage: a view with changed fields, or a site's own object."""
    if isinstance(message, MessageView) and message.whole:
        return message.path
    return None


def queued_message(job):
    """The IMessage a transport gets for a delivery job
    (relaymail.delivery.transports): the spool's message file with the
    job's envelope.  Reads the header section: call it in a thread."""
    return MessageView.read(job.queue_id, Envelope.from_dict(job.envelope), job.message_path,
                            job.message_size)


class _Joined(io.RawIOBase):
    """Reads ``head`` (bytes), then the open file ``rest`` to its end."""

    def __init__(self, head, rest):
        self._head = memoryview(head)
        self._rest = rest

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return self._rest.readinto(buffer)

    def close(self):
        self._rest.close()
        super().close()


def mailbox_of(text):
    """An address string of the envelope as a Mailbox.  They were parsed
    at MAIL and RCPT (or came from an expander, which is checked); a
    form the parser refuses (a bare ``postmaster``) is split as it is."""
    try:
        return address.parse_forward_path(f"<{text}>", smtputf8=True)
    except address.AddressError:
        local, _, domain = text.rpartition("@")
        return address.Mailbox(local, domain) if local else address.Mailbox(text, "")
