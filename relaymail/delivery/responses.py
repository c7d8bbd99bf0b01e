"""The server's replies as the client reads them: bytes in, whole replies out.

No sockets here.  :class:`ReplyReader` buffers what the connection delivers
and hands out complete (possibly multi-line) replies one at a time, so the
caller can stop between two replies -- the STARTTLS switch needs exactly
that, to discard whatever followed the ``220`` in the same read.
"""

import re
from dataclasses import dataclass

from relaymail import sanitize
from relaymail.delivery.outcomes import derived_enhanced, is_enhanced_code

# RFC 5321 4.5.3.1.5 allows reply lines of 512 octets and extensions may
# lengthen them; a whole reply (EHLO lists can run long) is capped well
# above that so a hostile server cannot make us buffer without end.
MAX_REPLY_BYTES = 64 * 1024

# RFC 5321 4.2: three digits, the first 2 to 5, then a space, a hyphen
# (more lines follow) or the end of the line.
_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)(.*)\Z", re.DOTALL)


class MalformedReply(Exception):
    """The server sent something that is not an SMTP reply."""


@dataclass(frozen=True)
class ServerReply:
    """One complete reply: its code and the text of each line (without the
    code and separator)."""

    code: int
    lines: tuple

    @property
    def enhanced(self):
        """The RFC 3463 code at the start of the first line, or None.

        RFC 2034 says the class digit matches the reply's first digit; a code
        that disagrees is not taken as an enhanced code.
        """
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        if is_enhanced_code(first) and first[0] == str(self.code)[0]:
            return first
        return None

    @property
    def enhanced_or_derived(self):
        """The server's enhanced code, or the generic one for the reply code."""
        return self.enhanced or derived_enhanced(self.code)

    @property
    def text(self):
        """All lines joined with a space, the enhanced code taken off each
        line that repeats it (RFC 2034 puts it on every line)."""
        enhanced = self.enhanced
        parts = []
        for line in self.lines:
            if enhanced and (line == enhanced or line.startswith(enhanced + " ")):
                line = line[len(enhanced):].lstrip(" ")
            parts.append(line)
        return " ".join(part for part in parts if part)

    @property
    def positive(self):
        """2xx: the command succeeded."""
        return 200 <= self.code < 300

    @property
    def transient(self):
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def permanent(self):
        """5xx: do not try again."""
        return 500 <= self.code < 600

    def __str__(self):
        return f"{self.code} {self.text}".rstrip()


class ReplyReader:
    """Buffers received bytes and parses them into :class:`ServerReply`.

    Lines end in CRLF; a bare LF is accepted too, as many clients do,
    because being lenient in what we read cannot be abused here.
    """

    def __init__(self, max_reply_bytes=MAX_REPLY_BYTES):
        self._buffer = bytearray()
        self._max = max_reply_bytes

    def feed(self, data):
        """Add bytes read from the connection."""
        self._buffer += data

    def reset(self):
        """Forget everything buffered (used at the STARTTLS switch)."""
        del self._buffer[:]

    def next_reply(self):
        """Return the next complete reply, or None when more bytes are needed.

        :raise MalformedReply: on a line that is not a reply line, a
            continuation with another code, or a reply over the size cap.
        """
        code = None
        lines = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                # Everything buffered belongs to the reply in progress.
                if len(self._buffer) > self._max:
                    raise MalformedReply(f"reply longer than {self._max} bytes")
                return None
            if end + 1 > self._max:
                raise MalformedReply(f"reply longer than {self._max} bytes")
            raw = bytes(self._buffer[start:end])
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            match = _LINE.match(raw)
            if not match:
                raise MalformedReply(f"not a reply line: {_printable(raw)!r}")
            line_code = int(match.group(1))
            if code is None:
                code = line_code
            elif line_code != code:
                raise MalformedReply(f"reply code changed from {code} to {line_code} "
                                     "within a multi-line reply")
            lines.append(_printable(match.group(3)))
            start = end + 1
            if match.group(2) != b"-":
                del self._buffer[:start]
                return ServerReply(code, tuple(lines))


def _printable(raw):
    """Reply bytes as safe text: UTF-8 where valid, and the characters that
    must not pass (C0 but TAB, DEL, C1, U+2028/U+2029) escaped as
    ``\\x{HEX}``.  The text goes to log lines, the queue record and DSN
    header fields; a hostile next hop's U+2028 or NEL would forge a line in
    each (relaymail.sanitize)."""
    return sanitize.escape(raw.decode("utf-8", "replace"))


def parse_ehlo(reply):
    """The EHLO keywords of a 250 reply: upper-case keyword -> parameters.

    The first line is the server's name and greeting (RFC 5321 4.1.1.1);
    each further line is a keyword with optional parameters.  The old
    ``AUTH=PLAIN LOGIN`` form some servers still send is read as ``AUTH``.
    """
    extensions = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword.startswith("AUTH="):
            params = f"{keyword[5:]} {params}".strip()
            keyword = "AUTH"
            if "AUTH" in extensions:
                continue
        extensions[keyword] = params.strip()
    return extensions


def size_limit(extensions):
    """The server's SIZE limit in bytes, or None when it announced none.

    RFC 1870 4: ``SIZE`` without a number, or ``SIZE 0``, means no fixed
    maximum.
    """
    if "SIZE" not in extensions:
        return None
    try:
        limit = int(extensions["SIZE"].split()[0])
    except (IndexError, ValueError):
        return None
    return limit if limit > 0 else None
