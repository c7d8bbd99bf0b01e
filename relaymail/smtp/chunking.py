"""BDAT, the CHUNKING extension inbound (RFC 3030): the framing of chunks.

``BDAT n [LAST]`` is followed by exactly ``n`` octets of message: a chunk
is framed by its length, so there is no dot-stuffing and no end-of-data
search, and CR and LF in it are data like any octet.  The content checks
stay those of DATA (:class:`relaymail.smtp.data.DataReader`, fed with
``stuffed=False``): bare CR or LF, NUL, line length, header size and the
``Received:`` count, all enforced while streaming to the spool; a
``BODY=BINARYMIME`` message has only its header section checked so.

The rule that keeps the session in step: the ``n`` octets after a BDAT
line are always the chunk, whatever the reply to it will be (RFC 3030 2:
BDAT without MAIL or RCPT, a chunk past the size limit, a chunk after a
failed one).  A refused chunk is read and thrown away
(:class:`ChunkReader` without content), never buffered, then answered.
Only a BDAT whose length cannot be read leaves us no way to find the next
command; as Postfix does, that one gets ``521`` and the connection closes.

After a chunk has failed, RFC 3030 2 wants the chunks still in the
pipeline read and discarded; each gets ``551 5.0.0``, as Postfix answers
them, and the one marked LAST ends the transaction.

The words of the replies are Postfix's (smtpd.c, as Postfix 3.7 answers),
so operators' log searches carry over.
"""

from relaymail.smtp import data, replies

# A chunk count longer than this is no count of octets anyone sends (2**63
# has 19 digits); refusing it early keeps int() away from huge strings.
_MAX_COUNT_DIGITS = 19


def parse_command(argument):
    """``"n"`` or ``"n LAST"`` (LAST in any case) to ``(n, last)``;
    None when the argument is not that."""
    words = argument.split(" ")
    if not 1 <= len(words) <= 2:
        return None
    count = words[0]
    # isdigit() takes other scripts' digits; only ASCII 0-9 is a count.
    if not count.isascii() or not count.isdigit() or len(count) > _MAX_COUNT_DIGITS:
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(count), len(words) == 2


class ChunkedMessage:
    """A BDAT transaction's message, across its chunks: the queue file
    being written and the content checks, or the failure that ended it."""

    def __init__(self, writer, content):
        self.writer = writer
        #: The DataReader the chunks' octets go through; None once failed.
        self.content = content
        #: Octets of chunks accepted so far (RFC 3030's count).
        self.received = 0

    @property
    def failed(self):
        return self.content is None

    def fail(self):
        """Throw the message away; later chunks are only discarded."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.content = None

    def problem(self):
        """The reply for a content problem found so far, or None."""
        if self.content is None:
            return None
        return content_problem(self.content.outcome)


def content_problem(outcome):
    """The reply to a message whose DataReader outcome is ``outcome``, or
    None when it is fine."""
    return {
        data.BARE_NEWLINE: replies.BARE_NEWLINE,
        data.NUL: replies.NUL_IN_MESSAGE,
        data.LINE_TOO_LONG: replies.DATA_LINE_TOO_LONG,
        data.TOO_MANY_HOPS: replies.TOO_MANY_HOPS,
        data.TOO_BIG: replies.MESSAGE_TOO_BIG,
        data.HEADER_TOO_BIG: replies.HEADER_TOO_BIG,
        data.WRITE_FAILED: replies.LOCAL_ERROR,
    }.get(outcome)


class ChunkReader:
    """The octets of one chunk, as the protocol receives them.

    It has the interface the protocol feeds a DataReader by
    (:meth:`feed` gives the offset where the chunk ended), so the same
    timeouts, data rate and flow control apply.

    :param size: the chunk's octet count.
    :param last: the chunk is marked LAST.
    :param content: the DataReader the octets go to, or None to discard
        them (a refused chunk).
    :param refusal: the reply once a discarded chunk is read.
    :param repeats_error: the refusal only repeats an earlier failure.
    """

    def __init__(self, size, last, content=None, refusal=None, repeats_error=False):
        self.size = size
        self.last = last
        self.content = content
        self.refusal = refusal
        self.repeats_error = repeats_error
        self._left = size

    def feed(self, data):
        """Take bytes from the client.

        :return: None while the chunk goes on (all of ``data`` taken), or
            the offset in ``data`` just past the chunk's last octet.
        """
        take = min(len(data), self._left)
        if self.content is not None and take:
            self.content.feed_content(data if take == len(data) else data[:take])
        self._left -= take
        return take if self._left == 0 else None
