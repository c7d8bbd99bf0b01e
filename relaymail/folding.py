"""Folding the header fields relaymail writes (RFC 5322 2.1.1 and 2.2.3).

RFC 5322 2.1.1: a line MUST be at most 998 octets and SHOULD be at most 78,
CRLF not counted.  A next hop that enforces the first bounces the message;
a 1,930-octet Received line made from a long HELO name did just that.

Folding puts a CRLF before white space that is already in the field, so a
reader that unfolds (removes each CRLF that is followed by white space) gets
the value back exactly.  Lines are broken at spaces to stay within
:data:`WIDTH` octets wherever a space allows it.  A word that does not fit
within :data:`LIMIT` octets even on a line of its own is cut into pieces,
each on its own line: that adds a space to the value, the one change that
folding cannot avoid, and it is better than a line the next hop refuses.
Lengths are counted in octets of UTF-8, so a field that carries SMTPUTF8
text stays within the limits too.

It lives beside :mod:`relaymail.envelope` because both the wire (our
``Received:`` field) and the queue (the DSNs we write) use it, and neither
layer imports the other.
"""

#: RFC 5322 2.1.1: the line length a field should keep to, CRLF excluded.
WIDTH = 78
#: RFC 5322 2.1.1: the line length no line may pass, CRLF excluded.
LIMIT = 998


def fold(field, width=WIDTH, limit=LIMIT):
    """Return ``field`` folded, as a list of lines without line ends.

    :param field: the whole field, ``Name: value``, unfolded; it may hold
        ``CRLF`` followed by white space where the caller wants a line to
        break whatever its length (as in our ``Received:`` field, one
        clause a line).  It must not hold other control characters.
    :param width: break at a space before a line grows past this many
        octets.
    :param limit: no line is ever longer than this many octets.
    """
    if limit < 5:
        # A continuation line must hold its space and a whole character.
        raise ValueError(f"cannot fold to lines of {limit} octets")
    lines = []
    for segment in field.split("\r\n"):
        if len(segment) <= min(width, limit) and (segment.isascii()
                                                  or _octets(segment) <= min(width, limit)):
            # Nearly every line of our Received field: nothing to fold.
            lines.append(segment)
        else:
            lines += _fold_segment(segment, width, limit)
    return lines


def fold_bytes(field, width=WIDTH, limit=LIMIT):
    """:func:`fold`, as UTF-8 bytes with a CRLF after every line."""
    return "".join(line + "\r\n" for line in fold(field, width, limit)).encode("utf-8")


def _fold_segment(segment, width, limit):
    lines = []
    line, used = "", 0
    for index, word in enumerate(segment.split(" ")):
        piece = word if index == 0 else " " + word
        size = _octets(piece)
        # Never break before an empty word (two spaces in a row): that
        # would leave a line of white space alone, which RFC 5322 3.2.2
        # does not allow.
        if index and word and used + size > width:
            lines.append(line)
            line, used = "", 0
        while used + size > limit:
            head = _prefix(piece, limit - used)
            lines.append(line + head)
            piece = " " + piece[len(head):]
            line, used, size = "", 0, _octets(piece)
        line += piece
        used += size
    lines.append(line)
    return lines


def _octets(text):
    return len(text.encode("utf-8"))


def _prefix(text, room):
    """The longest start of ``text`` that is at most ``room`` octets,
    never cutting a character in two."""
    encoded = text.encode("utf-8")[:room]
    return encoded.decode("utf-8", "ignore")
