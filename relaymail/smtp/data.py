"""The DATA reader: finds the end of a message, dot-unstuffs, enforces limits.

Works on whole buffers with bytes methods (find, count, replace, split run
in C), never line by line in Python: the DATA path is the hot path.

Only CRLF "." CRLF ends a message, and only when the CRLF before the dot
ends a line (SMTP-NOTES attack class 1, SMTP smuggling): a bare LF or bare
CR anywhere in the message makes it rejected once the real end arrives, so
``\\n.\\n`` or ``\\r\\n.\\n`` can neither end a message nor start a second one.
A problem never ends reading early: the reader goes on to the real end so
the session stays in step with the client.

Content checks, each one bytes operation per block:

* NUL (``b"\\x00" in block``) is refused unless the site allows it: a
  downstream that strips NUL before it looks for the end of data would see
  ``\\r\\n\\x00.\\r\\n`` as ``\\r\\n.\\r\\n`` and split the message there.
* Line length is counted after dot-unstuffing: RFC 5321 4.5.3.1.6 does not
  count the dot added for transparency, so a 998-octet line that starts
  with a dot arrives as 999 octets and is legal.  A longer line makes the
  message refused, or, with ``split``, is cut into lines of the limit, each
  piece after the first starting with a space, as Postfix breaks the lines
  it sends (smtp_line_length_limit: CRLF SPACE, so that a cut header line,
  in the message or in a MIME part, stays one folded field).  Splitting is
  a Python loop, but only over the lines of a block that has an over-long
  one.
* ``Received:`` fields are counted in the header section, the part already
  scanned for ``header_size``, to stop mail loops (RFC 5321 6.3): a field
  name at the start of a line before the first empty line, in any case.

The same checks serve BDAT (RFC 3030, :mod:`relaymail.smtp.chunking`):
there the framing is by length, so :meth:`DataReader.feed_content` takes
the content as it is (``stuffed=False``: no end search, no unstuffing) and
:meth:`DataReader.end_content` ends it, a last line without CRLF
included.  A ``BODY=BINARYMIME`` message (``binary_body``) has its header
section checked as any, but its body is opaque octets: bare CR, LF and NUL
are data there and lines have no limit (RFC 3030 3), so it is written as
it comes.
"""

import re

# Outcomes, in the order they are reported when several apply.
OK = "ok"
BARE_NEWLINE = "bare-newline"
NUL = "nul"
LINE_TOO_LONG = "line-too-long"
HEADER_TOO_BIG = "header-too-big"
TOO_MANY_HOPS = "too-many-hops"
TOO_BIG = "too-big"
WRITE_FAILED = "write-failed"

_END = b"\r\n.\r\n"
# A Received field at the start of a line of the header section.  RFC 5322
# 4.5's obsolete syntax lets white space stand before the colon, and
# Postfix's header parser takes that form too, so it counts as a hop.
_RECEIVED = re.compile(rb"(?:^|\r\n)received[ \t]*:")
# The first line of a Message-ID field's value, for the log.
_MESSAGE_ID = re.compile(rb"(?:^|\r\n)message-id[ \t]*:[ \t]*([^\r\n]{0,200})", re.IGNORECASE)
# RFC 8689 5: "TLS-Required: No" (the only value it defines), case as it
# comes; folding white space around the value is allowed.
_TLS_REQUIRED_NO = re.compile(rb"(?:^|\r\n)tls-required[ \t]*:[ \t]*no[ \t]*(?:\r\n|$)",
                              re.IGNORECASE)


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
    :param max_received: most ``Received:`` fields in the header section,
        or None for no limit; one more makes the outcome ``TOO_MANY_HOPS``.
    :param allow_nul: pass NUL octets on (``[limits] allow_nul``) instead
        of making the outcome ``NUL``.
    :param split_long_lines: cut an over-long line into lines of the limit
        (``[limits] long_lines = split``) instead of making the outcome
        ``LINE_TOO_LONG``.
    :param stuffed: the content is dot-stuffed (DATA); False for BDAT.
    :param binary_body: the body after the header section is not checked
        as lines (``BODY=BINARYMIME``).
    """

    def __init__(self, write, max_size, line_length, header_limit=None, max_received=None,
                 allow_nul=False, split_long_lines=False, stuffed=True, binary_body=False):
        self._write = write
        self._stuffed = stuffed
        self._binary = binary_body
        # Past the header section of a binary body: written as it comes.
        self._raw = False
        self._split = split_long_lines
        self._max_size = max_size
        self._line_length = line_length
        self._header_limit = header_limit
        self._header_bytes = 0
        self._max_received = max_received
        self._allow_nul = allow_nul
        #: ``Received:`` fields seen in the header section so far.
        self.received = 0
        #: The Message-ID field's value (its first line, at most 200
        #: octets, decoded leniently), once seen in the header section.
        self.message_id = None
        #: The header section has "TLS-Required: No" (RFC 8689 5).
        self.tls_optional = False
        # A binary body needs the end of the header section found even
        # without a header limit: the checks stop there.
        self._in_header = binary_body or header_limit is not None or max_received is not None
        # The start of a line not yet ended by CRLF; always begins a line,
        # except after an over-long line was dropped or, when splitting, cut
        # (_at_line_start False).
        self._pending = b""
        self._at_line_start = True
        self.size = 0
        self.outcome = OK
        #: The OSError that made the outcome WRITE_FAILED, for the log.
        self.write_error = None

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
        self._lines(buf)
        return None

    def feed_content(self, data):
        """Take message bytes that need no unframing (a BDAT chunk's)."""
        if self._raw:
            self._take_raw(data)
            return
        buf = self._pending + data if self._pending else data
        if self._binary:
            # The header section is lines; what follows the empty line
            # that ends it is the binary body.
            end = 0 if self._at_line_start and buf[:2] == b"\r\n" else buf.find(b"\r\n\r\n")
            if end >= 0:
                end += 2 if end == 0 else 4
                self._pending = b""
                self._take(buf[:end])
                self._raw = True
                self._take_raw(buf[end:])
                return
        self._lines(buf)

    def end_content(self):
        """The content is complete (BDAT LAST): check and write its last
        line.  A chunk need not end with CRLF; the line gets one, as the
        end of DATA gives it (RFC 5321 4.1.1.4), so the spool keeps only
        whole lines (the 8-bit downgrade and the bounces rely on it)."""
        tail, self._pending = self._pending, b""
        if not tail:
            return
        if not self._at_line_start and not self._split:
            return          # the rest of an over-long line already reported
        self._take(tail + b"\r\n")

    def _take_raw(self, block):
        if self.outcome != OK or not block:
            return
        self.size += len(block)
        if self.size > self._max_size:
            self._problem(TOO_BIG)
            return
        self._write_block(block)

    def _lines(self, buf):
        """Write the whole lines in ``buf``; keep the unended last line."""
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._take(buf[:cut + 2])
            buf = buf[cut + 2:]
            self._at_line_start = True
        self._pending = buf
        if len(buf) > self._line_length:
            if self._split:
                self._cut_pending()
                return None
            # A line that has not ended is already too long: drop it (keeping
            # a final CR that may pair with the next LF) rather than buffer it.
            self._problem(LINE_TOO_LONG)
            self._pending = b"\r" if buf.endswith(b"\r") else b""
            self._at_line_start = False

    def _cut_pending(self):
        """Write the over-long unended line in pieces of the longest line
        allowed, keeping the rest (never its last octet, a CR that may pair
        with the next LF) for the next block."""
        buf = self._pending
        width = self._line_length - 2
        while len(buf) > self._line_length:
            if self._at_line_start:
                # The stuffing dot, if any, is not text (_take drops it).
                count = width + (self._stuffed and buf[:1] == b".")
            else:
                # Room for the space _take puts in front.
                count = width - 1
            self._take(buf[:count] + b"\r\n")
            self._at_line_start = False
            buf = buf[count:]
        self._pending = buf

    def _take(self, block):
        """Check and write a run of whole lines (it ends with CRLF)."""
        continued = not self._at_line_start
        if continued and not self._split:
            # The tail of an over-long line already reported: not data.
            cut = block.find(b"\r\n")
            block = block[cut + 2:]
            continued = False
        self._at_line_start = True
        if self.outcome != OK or not block:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            self._problem(BARE_NEWLINE)
            return
        if not self._allow_nul and b"\x00" in block:
            self._problem(NUL)
            return
        # RFC 5321 4.5.2: drop the first character of a line that starts
        # with a period.  Unstuffing never makes an empty line (a line of
        # one dot is the end), so the header section's end stays where it
        # was.
        if self._stuffed:
            if block[:1] == b"." and not continued:
                block = block[1:]
            block = block.replace(b"\r\n.", b"\r\n")
        if continued and block[:2] != b"\r\n":
            # The rest of a line cut by _cut_pending.
            block = b" " + block
        # RFC 5321 4.5.3.1.6: the limit counts the line without the dot
        # added for transparency, so it is checked after unstuffing.
        if len(block) > self._line_length and max(map(len, block.split(b"\r\n"))) > self._line_length - 2:
            if not self._split:
                self._problem(LINE_TOO_LONG)
                return
            block = self._split_lines(block)
        if self._in_header and not self._count_header(block):
            return
        self.size += len(block)
        if self.size > self._max_size:
            self._problem(TOO_BIG)
            return
        self._write_block(block)

    def _write_block(self, block):
        try:
            self._write(block)
        except OSError as error:
            self.write_error = error
            self._problem(WRITE_FAILED)

    def _split_lines(self, block):
        """``block`` (unstuffed whole lines) with every line over the limit
        cut into lines of the limit, each piece after the first starting
        with a space."""
        width = self._line_length - 2
        out = []
        for line in block.split(b"\r\n")[:-1]:
            while len(line) > width:
                out.append(line[:width])
                line = b" " + line[width:]
            out.append(line)
        out.append(b"")
        return b"\r\n".join(out)

    def _count_header(self, block):
        """Add the header part of ``block`` (whole lines, unstuffed) to the
        header size and the ``Received:`` count; False once either is over
        its limit."""
        # The block starts a line, so the empty line ending the header is
        # either at its very start or after a CRLF inside it.
        end = 0 if block[:2] == b"\r\n" else block.find(b"\r\n\r\n")
        if end < 0:
            header = block
        else:
            header = block[:end + 2] if end else b""
            self._in_header = False
        self._header_bytes += len(header)
        if self.message_id is None and header:
            found = _MESSAGE_ID.search(header)
            if found:
                # Its first word only: the rest of a client's text could
                # pass for other fields of the log line ("auth=ceo").
                words = found.group(1).split()
                self.message_id = words[0].decode("utf-8", "replace") if words else ""
        if header and not self.tls_optional and _TLS_REQUIRED_NO.search(header):
            self.tls_optional = True
        if self._header_limit is not None and self._header_bytes > self._header_limit:
            self._problem(HEADER_TOO_BIG)
            return False
        if self._max_received is not None and header:
            # Field names are case-insensitive (RFC 5322 1.2.2); one lower()
            # copy of a header section that header_size bounds.
            self.received += len(_RECEIVED.findall(header.lower()))
            if self.received > self._max_received:
                self._problem(TOO_MANY_HOPS)
                return False
        return True

    def _problem(self, outcome):
        if self.outcome == OK:
            self.outcome = outcome
