"""A message's header section as fields: read, changed by filters, written.

The message filters (``[plugins] filters``) see the header section parsed
and may remove fields and add new ones at the top.  Fields that are kept
are kept byte for byte as they arrived, folding included: a DKIM signature
made upstream with ``simple`` header canonicalization covers those bytes
exactly (RFC 6376 3.4.1), so they are never re-encoded or refolded.

The section is what comes before the first empty line; a line that is
neither a field (``name:``) nor the continuation of one (it starts with
white space) ends it too, because a client that sent no header at all is
sending body text, and that text must not be taken for fields.

Fields a filter adds are checked here.  A name is RFC 5322 2.2 ``ftext``
(printable US-ASCII but the colon).  A value may hold no control
character, and CR or LF only as folding: CRLF followed by a space or a
tab, which the filter chose (the ``DKIM-Signature`` that dkimpy folds,
whose ``simple`` header form must not change).  Any other CR or LF would
start a field of the filter's text, or end the header section early (a
forged body); NUL is what some downstream programs stop at.  A value
without folding is folded here (:mod:`relaymail.folding`); one folded by
the filter must keep every line within RFC 5322's 998 octets.  Non-ASCII
only in a message sent with SMTPUTF8 (RFC 6532 3.2); in any other, header
fields are US-ASCII (RFC 5322 2.2).

This module lives beside :mod:`relaymail.folding` because the policy layer
(which combines the filters' changes) and the queue (which writes them)
both use it, and neither imports the other.
"""

import re

from relaymail import folding, sanitize

# RFC 5322 2.2: field-name = 1*ftext, ftext = %d33-57 / %d59-126.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_FIELD_NAME_TEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")

# Folding that a filter may put in a value: CRLF, then white space.
_FOLD = re.compile(r"\r\n(?=[ \t])")


class BadField(ValueError):
    """A field a filter gave cannot be written; the text says why."""


class Field:
    """One header field: ``name`` as written, ``value`` unfolded (str,
    leading white space removed, bytes that are not UTF-8 replaced) and
    ``raw``, the whole field as bytes, each line with its CRLF."""

    __slots__ = ("name", "value", "raw")

    def __init__(self, name, value, raw):
        self.name = name
        self.value = value
        self.raw = raw

    def __repr__(self):
        return f"Field({self.name!r}, {self.value!r})"


def parse(data, complete=False):
    """Split the start of a message into its header fields.

    :param data: bytes from the first byte of the message.
    :param complete: ``data`` is the whole message, not just its start.
    :return: ``(fields, end)``: a list of :class:`Field` in order, and the
        offset in ``data`` where the last field ends (where the empty line,
        or the body, starts); ``end`` is None when ``data`` is not
        complete and ended inside the header section (read more).
    """
    fields = []
    start = None        # where the field being read began
    position = 0
    while True:
        newline = data.find(b"\n", position)
        if newline < 0:
            if not complete:
                return fields, None
            if start is not None:
                fields.append(_field(data[start:position]))
            return fields, position
        line = data[position:newline + 1]
        if start is not None and line[:1] in (b" ", b"\t"):
            position = newline + 1
            continue
        if start is not None:
            fields.append(_field(data[start:position]))
            start = None
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name.rstrip(b" \t")):
            return fields, position         # the empty line, or body text
        start = position
        position = newline + 1


def _field(raw):
    name, _, value = raw.partition(b":")
    text = value.decode("utf-8", "replace")
    return Field(name.rstrip(b" \t").decode("ascii"), _unfold(text).strip(" \t\r\n"), raw)


def _unfold(text):
    return text.replace("\r\n", "").replace("\n", "")


def new_field(name, value, smtputf8=False):
    """The :class:`Field` a filter asked to add.

    :raise BadField: when ``name`` or ``value`` cannot be written as they
        are (see the module's text).
    """
    if not isinstance(name, str) or not _FIELD_NAME_TEXT.match(name):
        raise BadField(f"header name {name!r} is not a field name (RFC 5322 2.2)")
    if not isinstance(value, str):
        raise BadField(f"header {name}: value {value!r} is not a str")
    unfolded = _FOLD.sub("", value)
    if sanitize.has_unsafe(unfolded):
        raise BadField(f"header {name}: value {value!r} holds CR, LF, NUL or another "
                       f"control character")
    if not smtputf8 and not value.isascii():
        raise BadField(f"header {name}: non-ASCII value in a message sent without SMTPUTF8")
    if unfolded == value:
        raw = folding.fold_bytes(f"{name}: {value}")
    else:
        raw = f"{name}: {value}\r\n".encode("utf-8")
    # A word too long to fold stays too long: RFC 5322 2.1.1's 998 octets
    # hold for our lines as for the client's (a next hop would refuse it).
    if any(len(line) > folding.LIMIT for line in raw.split(b"\r\n")):
        raise BadField(f"header {name}: a line longer than {folding.LIMIT} octets")
    if unfolded != value:
        if any(not line.strip(b" \t") for line in raw.split(b"\r\n")[1:-1]):
            # RFC 5322 3.2.2: no line of white space only.
            raise BadField(f"header {name}: a folded line of white space only")
    return Field(name, unfolded.strip(" \t"), raw)


def changed(fields, remove=(), add=()):
    """``fields`` with every field named in ``remove`` (any case) taken
    out, then the fields of ``add`` (a list of :class:`Field`) on top, in
    the order given."""
    gone = {name.lower() for name in remove}
    kept = [field for field in fields if field.name.lower() not in gone]
    return list(add) + kept


def check_names(names):
    """:raise BadField: unless ``names`` (fields to remove) are field names."""
    for name in names:
        if not isinstance(name, str) or not _FIELD_NAME_TEXT.match(name):
            raise BadField(f"header name {name!r} to remove is not a field name")


def to_bytes(fields):
    """The fields as they go into the message."""
    return b"".join(field.raw for field in fields)
