"""Quoted-printable (RFC 2045 6.7) for the text relaymail re-encodes.

Two places write it: the 8-bit to 7-bit conversion for a next hop without
8BITMIME (:mod:`relaymail.delivery.downgrade`) and the returned header
section of a DSN whose original headers cannot travel as they are
(:mod:`relaymail.queue.bounce`).  Both encode line by line with hard line
breaks (CRLF) between lines, so the part decodes to the original octets.
"""

import binascii

#: RFC 2045 6.7 rule 5: encoded lines are at most 76 characters.
LINE_LIMIT = 76


def encode_line(line):
    """One line (without its CRLF), quoted-printable, with soft line
    breaks (``=`` CRLF) where it is longer than :data:`LINE_LIMIT`.

    binascii escapes in C what must be escaped (octets above 126, ``=``,
    controls, CR and LF, white space at the end of the line); the line is
    then cut without splitting an ``=XX``.
    """
    escaped = binascii.b2a_qp(line, istext=False)
    if len(escaped) <= LINE_LIMIT:
        return escaped
    # binascii's own soft breaks are "=\n" (a real LF is =0A here).
    escaped = escaped.replace(b"=\n", b"")
    pieces = []
    while len(escaped) > LINE_LIMIT:
        # 75 characters and the "=" of a soft line break.
        cut = LINE_LIMIT - 1
        if escaped[cut - 1] == 0x3D:        # the cut would split "=X|X"
            cut -= 1
        elif escaped[cut - 2] == 0x3D:      # ... or "=XX" after its "="
            cut -= 2
        pieces.append(escaped[:cut] + b"=")
        escaped = escaped[cut:]
        if escaped[:1] == b"-":
            # A new line starting "--" could read as a boundary delimiter
            # of an enclosing multipart; "=2D" cannot.
            escaped = b"=2D" + escaped[1:]
    pieces.append(escaped)
    return b"\r\n".join(pieces)


def is_utf8(data):
    """True when the bytes ``data`` are valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
