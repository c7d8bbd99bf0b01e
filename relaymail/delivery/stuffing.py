"""Dot-stuffing for DATA (RFC 5321 4.5.2), one chunk at a time.

A '.' that starts a line is doubled so the server never mistakes message
text for the end of the data.  A line starts at the beginning of the message
and after CRLF -- only there: the spool stores CRLF line ends, and treating a
bare LF as a line end is what SMTP smuggling (CVE-2023-51764) feeds on.  The
stuffer keeps just enough state to find line starts split across chunks
(``...\\r`` | ``\\n.`` or ``...\\r\\n`` | ``.``).
"""

# Where the previous chunk left us.
_MID_LINE = 0      # inside a line
_AFTER_CR = 1      # just after a CR (a following LF ends the line)
_LINE_START = 2    # at the start of a line (or of the message)


class DotStuffer:
    """Turns message bytes into DATA bytes, chunk by chunk."""

    def __init__(self):
        self._state = _LINE_START

    def feed(self, chunk):
        """Return ``chunk`` with a '.' added before every '.' at a line start."""
        if not chunk:
            return chunk
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._state == _LINE_START and chunk[:1] == b".":
            out = b"." + out
        elif self._state == _AFTER_CR and chunk[:2] == b"\n.":
            # out[1:] still starts with the line's own '.'.
            out = b"\n." + out[1:]
        self._state = self._state_after(chunk)
        return out

    def finish(self):
        """The end of data: ``.CRLF``, with a CRLF first when the message did
        not end with one (RFC 5321 4.1.1.4)."""
        if self._state == _LINE_START:
            return b".\r\n"
        return b"\r\n.\r\n"

    def _state_after(self, chunk):
        if chunk.endswith(b"\r\n") or (chunk == b"\n" and self._state == _AFTER_CR):
            return _LINE_START
        if chunk.endswith(b"\r"):
            return _AFTER_CR
        return _MID_LINE
