"""The DATA reader: finds the end of a message, dot-unstuffs, enforces limits.

Works on whole buffers with bytes methods (find, count, replace, split run
in C), never line by line in Python: the DATA path is the hot path.

Only CRLF "." CRLF ends a message, and only when the CRLF before the dot
ends a line (SMTP-NOTES attack class 1, SMTP smuggling): a bare LF or bare
CR anywhere in the message makes it rejected once the real end arrives, so
``\\n.\\n`` or ``\\r\\n.\\n`` can neither end a message nor start a second one.
A problem never ends reading early: the reader goes on to the real end so
the session stays in step with the client.
"""

# Outcomes, in the order they are reported when several apply.
OK = "ok"
BARE_NEWLINE = "bare-newline"
LINE_TOO_LONG = "line-too-long"
TOO_BIG = "too-big"
HEADER_TOO_BIG = "header-too-big"
WRITE_FAILED = "write-failed"

_END = b"\r\n.\r\n"


class DataReader:
    """Feed it what the client sends after ``354``; it writes the message
    (unstuffed, CRLF line ends) to ``write`` as it goes.

    :param write: called with each block of message bytes; an OSError from
        it stops writing and makes the outcome ``WRITE_FAILED``.
    :param max_size: most message bytes accepted (``[limits] message_size``).
    :param line_length: most octets in a line, CRLF included
        (``[limits] line_length``; RFC 5321 4.5.3.1.6 says 1000).
    :param header_limit: most octets in the header section, up to the first
        empty line (``[limits] header_size``), or None for no limit.
    """

    def __init__(self, write, max_size, line_length, header_limit=None):
        self._write = write
        self._max_size = max_size
        self._line_length = line_length
        self._header_limit = header_limit
        self._header_bytes = 0
        self._in_header = header_limit is not None
        # The start of a line not yet ended by CRLF; always begins a line,
        # except after an over-long line was dropped (_at_line_start False).
        self._pending = b""
        self._at_line_start = True
        self.size = 0
        self.outcome = OK

    def feed(self, data):
        """Take the next bytes from the client.

        :return: None while the message goes on (all of ``data`` consumed),
            or the offset in ``data`` just past the terminating ``.\\r\\n``;
            what follows it is the client's next command.
        """
        pending_len = len(self._pending)
        buf = self._pending + data if pending_len else data
        if self._at_line_start and buf.startswith(b".\r\n"):
            end = 0
        else:
            found = buf.find(_END)
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self._take(buf[:end])
            self._pending = b""
            return end + 3 - pending_len
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._take(buf[:cut + 2])
            buf = buf[cut + 2:]
            self._at_line_start = True
        self._pending = buf
        if len(buf) > self._line_length:
            # A line that has not ended is already too long: drop it (keeping
            # a final CR that may pair with the next LF) rather than buffer it.
            self._problem(LINE_TOO_LONG)
            self._pending = b"\r" if buf.endswith(b"\r") else b""
            self._at_line_start = False
        return None

    def _take(self, block):
        """Check and write a run of whole lines (it ends with CRLF)."""
        if not self._at_line_start:
            # The tail of an over-long line already reported: not data.
            cut = block.find(b"\r\n")
            block = block[cut + 2:]
            self._at_line_start = True
        if self.outcome != OK or not block:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            self._problem(BARE_NEWLINE)
            return
        if len(block) > self._line_length and max(map(len, block.split(b"\r\n"))) > self._line_length - 2:
            self._problem(LINE_TOO_LONG)
            return
        if self._in_header and not self._count_header(block):
            return
        # RFC 5321 4.5.2: drop the first character of a line that starts
        # with a period.
        if block[:1] == b".":
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n")
        self.size += len(block)
        if self.size > self._max_size:
            self._problem(TOO_BIG)
            return
        try:
            self._write(block)
        except OSError:
            self._problem(WRITE_FAILED)

    def _count_header(self, block):
        """Add the header part of ``block`` (whole lines) to the header
        size; False once it is over the limit."""
        # The block starts a line, so the empty line ending the header is
        # either at its very start or after a CRLF inside it.
        end = 0 if block[:2] == b"\r\n" else block.find(b"\r\n\r\n")
        if end < 0:
            self._header_bytes += len(block)
        else:
            self._header_bytes += end + 2 if end else 0
            self._in_header = False
        if self._header_bytes > self._header_limit:
            self._problem(HEADER_TOO_BIG)
            return False
        return True

    def _problem(self, outcome):
        if self.outcome == OK:
            self.outcome = outcome
