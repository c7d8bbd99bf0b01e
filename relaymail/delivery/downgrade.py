"""Fitting a message to a next hop without 8BITMIME or SMTPUTF8.

RFC 6152 3 forbids sending an octet above 127 to a server that did not
offer 8BITMIME, whether the client declared ``BODY=8BITMIME`` or not (msmtp
and Exim never do), and permits converting the content to 7 bits instead
of refusing it.  Postfix does that conversion (its smtp client's
MIME_OPT_DOWNGRADE, mime_state.c); so does this module.  RFC 6531 3.4
likewise forbids a message that needs SMTPUTF8 at a server without it, but
3.2 asks a client not to claim SMTPUTF8 for a message that does not need
it: a message that carries the flag but is all ASCII goes on as plain mail.

:func:`fit` is the one entry point.  It costs nothing when the next hop
offers what the message was declared with; otherwise it first scans the
spool file with C-speed bytes methods (``isascii`` over a read-only memory
map), because the flags say what the client declared, not what the message
holds.  The scan runs at delivery time rather than at accept time so that
the hot DATA path and the queue format stay as they are; it is paid only for
the rare next hop without 8BITMIME (or without SMTPUTF8 for flagged mail),
and the client runs it in a worker thread, off the reactor.

The conversion walks the MIME structure over the bytes, using the boundary
parameters, and records edits instead of re-serialising with
``email.generator`` (which can rewrite header fields): every byte outside an
edit goes out exactly as it was received.  Only a leaf part whose body holds
8-bit octets changes: its body becomes quoted-printable (text, as Postfix
does) or base64 (anything else, and text of over 1 KiB more than a sixth
8-bit octets: RFC 2045 6.8 meant QP for mostly-ASCII text, and it would
make Cyrillic or Greek nearly three times its size), and its
``Content-Transfer-Encoding`` says so.  A multipart or
message/rfc822 entity that claimed 8bit or binary around converted content
now says 7bit, as Postfix writes it.  The stdlib ``email`` package is used
only to read a Content-Type field (type, subtype, boundary -- RFC 2231
continuations included), where it is faithful.

Refused, with a reason for the bounce (:class:`CannotSend`):

* 8-bit content inside multipart/signed or multipart/encrypted (RFC 1847):
  converting it would break the signature, and Postfix breaks it silently.
* 8-bit octets where no transfer encoding can be applied: message/partial
  and message/external-body (RFC 2046 5.2.2.1, 5.2.3.1: 7bit only), other
  message types, a multipart without a boundary, a preamble or epilogue, a
  part already labelled quoted-printable or base64 (mislabelled), and
  nesting deeper than ``nesting_limit`` (Postfix mime_nesting_limit).
  All 5.6.3, "conversion required but not supported" (RFC 3463).
* 8-bit octets in header fields: they cannot be encoded without rewriting
  the fields (RFC 2047 would, Postfix does not) and need SMTPUTF8 (RFC
  6532).  5.6.7, as Postfix says "SMTPUTF8 is required".

Postfix converts only content that claims to be 8-bit (a
Content-Transfer-Encoding of 8bit or binary) and sends unlabelled 8-bit
text as it is, which is exactly what RFC 6152 3 forbids; here any part
with an identity encoding (none, 7bit, 8bit, binary) and 8-bit octets is
converted.  So a message without MIME-Version gets ``MIME-Version: 1.0``,
and a converted text leaf without Content-Type gets ``text/plain`` with
``charset=utf-8`` when its body is valid UTF-8, else
``charset=unknown-8bit`` (RFC 1428, the label sendmail's DefaultCharSet
uses for the same job), since the RFC 2045 5.2 default of us-ascii would
be false.

The converted message goes to an unnamed temporary file (the spool holds
only the original, so a retry to a hop with 8BITMIME sends it unchanged).
The spool stores CRLF line ends only (the DATA reader rejects bare CR and
LF), so lines end at CRLF here; a stray CR or LF inside a line would still
be encoded (``=0D``, ``=0A``), not lost.
"""

import base64
import email.message
import email.policy
import functools
import io
import mmap
import re
import tempfile
from dataclasses import dataclass

from relaymail import quoted_printable

# Postfix mime_nesting_limit: 100 levels of multipart and message/rfc822.
DEFAULT_NESTING_LIMIT = 100

# Chunks for the scan and for encoding: big enough to keep Python out of
# the loop, small enough to keep memory flat.
_CHUNK = 1 << 20
# A multiple of 57 octets, which base64 turns into one 76-character line.
_BASE64_CHUNK = 57 * 16384

# Identity encodings (RFC 2045 6.2): the octets are the content, so the
# part can be re-encoded without changing what it means.
_IDENTITY = (None, "7bit", "8bit", "binary")

# RFC 1847: the content of these must reach the recipient octet for octet.
_PROTECTED = ("multipart/signed", "multipart/encrypted")

# RFC 6532 3.5 and 3.7: message/global may (and sent to a 7-bit system
# must) take a transfer encoding; RFC 6533's global-* report types are
# UTF-8 text registered the same way.
_ENCODABLE_MESSAGE = ("message/global", "message/global-headers",
                      "message/global-delivery-status",
                      "message/global-disposition-notification")


class CannotSend(Exception):
    """The next hop cannot be given this message; a permanent failure.

    :ivar enhanced: the RFC 3463 code (5.6.3 or 5.6.7).
    :ivar reason: what is wrong with the message, without the next hop's
        name (the caller adds it).
    """

    def __init__(self, enhanced, reason):
        super().__init__(reason)
        self.enhanced = enhanced
        self.reason = reason


@dataclass
class Fitted:
    """What to send: the file (the original or the converted one), its size
    and the MAIL parameters that now describe it."""

    file: object
    size: int
    body: str
    smtputf8: bool
    converted: bool = False


def fits(extensions, smtputf8):
    """True when a server with ``extensions`` takes the message as it is,
    whatever it holds: :func:`fit` would change nothing."""
    return "8BITMIME" in extensions and ("SMTPUTF8" in extensions or not smtputf8)


def fit(file, size, *, body, smtputf8, addresses, extensions,
        nesting_limit=DEFAULT_NESTING_LIMIT):
    """Make the message fit a next hop with ``extensions``.

    :param file: the spool file, open for binary reading at offset 0.
    :param addresses: the envelope sender and recipients.
    :return: a :class:`Fitted`; when ``converted`` the caller closes its
        ``file`` (a temporary file) as well as the original.
    :raise CannotSend: for a message that cannot go to this hop.
    :raise OSError: when a file cannot be read or written.
    """
    if fits(extensions, smtputf8):
        return Fitted(file, size, body, smtputf8)
    has_8bitmime = "8BITMIME" in extensions
    has_smtputf8 = "SMTPUTF8" in extensions
    if smtputf8 and not has_smtputf8:
        for address in addresses:
            if not address.isascii():
                raise CannotSend("5.6.7", f"address <{address}> needs SMTPUTF8")
    with _Map(file, size) as buf:
        if buf is None or not _has_8bit(buf, 0, size):
            # All ASCII: 7-bit mail whatever was declared (RFC 6152 2 and
            # RFC 6531 3.2 describe content, and this content needs neither).
            return Fitted(file, size, "7BIT", smtputf8 and has_smtputf8)
        walk = _Walk(buf, nesting_limit, edit=not has_8bitmime)
        walk.message()
        utf8_headers = smtputf8 and has_smtputf8
        if walk.header_8bit and not utf8_headers:
            if has_8bitmime:
                # Only SMTPUTF8 is missing, and the header needs it.
                raise CannotSend("5.6.7", "message has non-ASCII header fields, "
                                          "which need SMTPUTF8")
            raise CannotSend("5.6.7", "message has 8-bit octets in header fields, which "
                                      "cannot be converted to 7 bits and need SMTPUTF8")
        if has_8bitmime:
            # The flag goes, the 8-bit body stays, now declared as such.
            return Fitted(file, size, "8BITMIME", False)
        if walk.problem is not None:
            raise walk.problem
        if not walk.edits:
            # 8-bit octets in header fields only, which SMTPUTF8 carries.
            return Fitted(file, size, "7BIT", utf8_headers)
        converted = tempfile.TemporaryFile(prefix="relaymail-downgrade-")
        try:
            new_size = _write(buf, walk.edits, converted)
            converted.seek(0)
        except BaseException:
            converted.close()
            raise
    return Fitted(converted, new_size, "7BIT", utf8_headers, converted=True)


def downgrade(message, nesting_limit=DEFAULT_NESTING_LIMIT):
    """The 7-bit form of ``message`` (bytes, CRLF line ends), for tests,
    tools and the dkim plugin (which signs that form, RFC 6376 5.3);
    :func:`fit` does the same from a file.

    :raise CannotSend: as :func:`fit` would for a next hop without 8BITMIME
        and SMTPUTF8.
    """
    walk = _Walk(message, nesting_limit, edit=True)
    if not message.isascii():
        walk.message()
    if walk.header_8bit:
        raise CannotSend("5.6.7", "message has 8-bit octets in header fields, which "
                                  "cannot be converted to 7 bits and need SMTPUTF8")
    if walk.problem is not None:
        raise walk.problem
    out = io.BytesIO()
    _write(message, walk.edits, out)
    return out.getvalue()


class _Map:
    """A read-only memory map of the message, the file's first ``size``
    bytes (None when it is empty, which mmap refuses)."""

    def __init__(self, file, size):
        self._file = file
        self._size = size
        self._map = None

    def __enter__(self):
        if self._size == 0:
            return None
        self._map = mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_READ)
        return self._map

    def __exit__(self, *exc):
        if self._map is not None:
            self._map.close()
        return False


# -- the walk --------------------------------------------------------------

@dataclass
class _Edit:
    """Replace ``buf[start:end]`` with ``text`` (bytes), or with the body
    encoded as ``encoding`` ('quoted-printable' or 'base64')."""

    start: int
    end: int
    order: int
    text: bytes = b""
    encoding: str | None = None


@dataclass
class _Field:
    name: str           # lower case
    value: str          # unfolded, octets above 127 kept as surrogates
    start: int
    end: int            # after the field's last CRLF


class _Walk:
    """Finds what must change (``edits``), the first reason the message
    cannot be converted (``problem``) and whether any header field holds an
    8-bit octet (``header_8bit``), in one pass over ``buf``."""

    def __init__(self, buf, nesting_limit, edit):
        self.buf = buf
        self.limit = nesting_limit
        self.edit = edit
        self.edits = []
        self.problem = None
        self.header_8bit = False
        self._scanned_from = self._first_8bit = -1

    def message(self):
        top = self._entity(0, len(self.buf), "text/plain", 0, protected=None)
        if top is not None and top.changed and "mime-version" not in top.names:
            # order -1: before any field the leaf itself added there.
            self.edits.append(_Edit(top.header_end, top.header_end, -1, b"MIME-Version: 1.0\r\n"))
        self.edits.sort(key=lambda e: (e.start, e.order))

    def _refuse(self, enhanced, reason):
        if self.problem is None:
            self.problem = CannotSend(enhanced, reason)

    def _has_8bit(self, start, end):
        # The walk asks about ranges in increasing order of start, nested
        # ranges sharing their beginning: remembering the last answer (no
        # 8-bit octet in [scanned_from, first_8bit)) keeps the scans close
        # to one pass over the message however deep the nesting.
        if not self._scanned_from <= start <= self._first_8bit:
            self._scanned_from = start
            self._first_8bit = _first_8bit(self.buf, start)
        return self._first_8bit < end

    def _entity(self, start, end, default_type, depth, protected):
        """Walk one entity (header block and body) in ``buf[start:end]``.

        :return: the parsed header (with ``changed``), or None when the
            entity is all ASCII and so needs nothing.
        """
        if not self._has_8bit(start, end):
            return None
        header = _Header(self.buf, start, end, default_type)
        if header.has_8bit:
            self.header_8bit = True
        if depth > self.limit:
            self._refuse("5.6.3", f"message has MIME nesting deeper than {self.limit} levels")
            return header
        kind = header.content_type
        body_start, body_end = header.body_start, end
        if kind in _PROTECTED:
            protected = kind
        if kind.startswith("multipart/"):
            changed = self._multipart(header, body_start, body_end, depth, protected)
        elif kind == "message/rfc822":
            inner = self._entity(body_start, body_end, "text/plain", depth + 1, protected)
            changed = inner is not None and inner.changed
        elif not self._has_8bit(body_start, body_end):
            changed = False
        elif protected is not None:
            self._refuse("5.6.3", f"message has 8-bit content inside a signed part ({protected})"
                         if protected == "multipart/signed" else
                         f"message has 8-bit content inside an encrypted part ({protected})")
            changed = False
        else:
            changed = self._leaf(header, body_start, body_end, kind)
        composite = kind == "message/rfc822" or kind.startswith("multipart/")
        if changed and composite and header.encoding in ("8bit", "binary"):
            # RFC 2045 6.4: a composite entity carries an identity encoding;
            # after the conversion inside it, 7bit is the true one.
            self._set_encoding(header, "7bit")
        header.changed = changed
        return header

    def _multipart(self, header, body_start, body_end, depth, protected):
        boundary = header.boundary
        kind = header.content_type
        if boundary is None:
            self._refuse("5.6.3", f"message has 8-bit octets in a {kind} part without a boundary")
            return False
        default = "message/rfc822" if kind == "multipart/digest" else "text/plain"
        changed = False
        position = body_start
        part_start = None       # None while in the preamble
        closed = False
        while True:
            found = _delimiter(self.buf, boundary, position, body_end)
            if found is None:
                break
            line_start, next_line, closing = found
            # RFC 2046 5.1.1: the CRLF before a delimiter belongs to it.
            content_end = max(line_start - 2, position)
            if part_start is None:
                self._outside_parts(position, line_start, kind)
            else:
                changed |= self._part(part_start, content_end, default, depth, protected)
            position = next_line
            if closing:
                closed = True
                break
            part_start = position
        if part_start is None:
            self._outside_parts(body_start, body_end, kind)
        elif closed:
            self._outside_parts(position, body_end, kind)
        else:
            # No close delimiter: the last part runs to the end, as readers take it.
            changed |= self._part(part_start, body_end, default, depth, protected)
        return changed

    def _part(self, start, end, default, depth, protected):
        inner = self._entity(start, end, default, depth + 1, protected)
        return inner is not None and inner.changed

    def _outside_parts(self, start, end, kind):
        if self._has_8bit(start, end):
            self._refuse("5.6.3", f"message has 8-bit octets in the preamble or epilogue "
                                  f"of a {kind} part")

    def _leaf(self, header, body_start, body_end, kind):
        if header.encoding not in _IDENTITY:
            self._refuse("5.6.3", f"message has 8-bit octets in a {kind} part labelled "
                                  f"{header.encoding}")
            return False
        if kind.startswith("message/") and kind not in _ENCODABLE_MESSAGE:
            self._refuse("5.6.3", f"message has 8-bit octets in a {kind} part, "
                                  "which cannot take a transfer encoding")
            return False
        if not self.edit:
            return False
        text = kind.startswith("text/") or kind in _ENCODABLE_MESSAGE
        encoding = ("quoted-printable" if text and _mostly_ascii(self.buf, body_start, body_end)
                    else "base64")
        if "content-type" not in header.names:
            charset = "utf-8" if quoted_printable.is_utf8(self.buf[body_start:body_end]) else "unknown-8bit"
            self.edits.append(_Edit(header.header_end, header.header_end, 0,
                                    b"Content-Type: text/plain; charset=%s\r\n" % charset.encode()))
        self._set_encoding(header, encoding)
        self.edits.append(_Edit(body_start, body_end, 0, encoding=encoding))
        return True

    def _set_encoding(self, header, encoding):
        """Replace every Content-Transfer-Encoding field with one saying
        ``encoding``, or add one at the end of the header fields."""
        field = b"Content-Transfer-Encoding: %s\r\n" % encoding.encode()
        existing = [f for f in header.fields if f.name == "content-transfer-encoding"]
        for index, old in enumerate(existing):
            self.edits.append(_Edit(old.start, old.end, 1, field if index == 0 else b""))
        if not existing:
            self.edits.append(_Edit(header.header_end, header.header_end, 1, field))


def _mostly_ascii(buf, start, end):
    """Whether quoted-printable suits the text ``buf[start:end]``: RFC 2045
    6.8 meant it for mostly-ASCII text, where it keeps the text readable.
    It costs three octets for each 8-bit one, base64 four for every three:
    past a sixth of 8-bit octets base64 is smaller, and Cyrillic or Greek
    UTF-8, half 8-bit, would come out nearly three times its size (1.37 in
    base64).  Under :data:`_SMALL_TEXT` the difference is a few hundred
    octets and quoted-printable stays, as Postfix always writes it."""
    if end - start < _SMALL_TEXT:
        return True
    eight_bit = 0
    for chunk_start in range(start, end, _CHUNK):
        chunk = buf[chunk_start:min(chunk_start + _CHUNK, end)]
        # What is left once the ASCII octets are deleted, counted in C.
        eight_bit += len(chunk.translate(None, _ASCII))
    return 6 * eight_bit <= end - start


_SMALL_TEXT = 1024
_ASCII = bytes(range(128))


def _has_8bit(buf, start, end):
    """True when ``buf[start:end]`` holds an octet above 127."""
    # Slices and isascii() are a memcpy and a word-at-a-time test, some
    # twenty times faster than a regular expression's character class.
    for chunk_start in range(start, end, _CHUNK):
        if not buf[chunk_start:min(chunk_start + _CHUNK, end)].isascii():
            return True
    return False


def _first_8bit(buf, start):
    """The offset of the first octet above 127 at or after ``start``, or
    ``len(buf)``."""
    size = len(buf)
    for chunk_start in range(start, size, _CHUNK):
        chunk = buf[chunk_start:min(chunk_start + _CHUNK, size)]
        if not chunk.isascii():
            # Narrow down in C as well: the regex runs on one chunk only.
            return chunk_start + _EIGHT_BIT.search(chunk).start()
    return size


# After "--boundary": "--" for the close delimiter, then transport padding
# (RFC 2046 5.1.1), then the end of the line.
_DELIMITER_END = rb"(--)?[ \t]*(?=\r\n|\Z)"
_DELIMITER_REST = re.compile(_DELIMITER_END)
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


@functools.lru_cache(maxsize=256)
def _delimiter_pattern(boundary):
    # A literal prefix lets the regular expression engine skip through the
    # text at C speed, false candidates ("--boundary-more") included.
    return re.compile(b"\r\n--" + re.escape(boundary) + _DELIMITER_END)


def _delimiter(buf, boundary, start, end):
    """The first boundary delimiter line in ``buf[start:end]``, where
    ``start`` is a line start.

    :return: (where the line starts, where the next line starts, whether
        it is the close delimiter), or None.
    """
    dashed = b"--" + boundary
    found = None
    if buf[start:start + len(dashed)] == dashed:
        found = _DELIMITER_REST.match(buf, start + len(dashed), end)
        line_start = start
    if found is None:
        found = _delimiter_pattern(boundary).search(buf, start, end)
        if found is None:
            return None
        line_start = found.start() + 2
    next_line = min(found.end() + 2, end)
    return line_start, next_line, found.group(1) is not None


class _Header:
    """The header block of one entity: its fields, where the body starts
    and the two fields the walk needs."""

    def __init__(self, buf, start, end, default_type):
        if end - start >= 2 and buf[start:start + 2] == b"\r\n":
            self.header_end, self.body_start = start, start + 2
        else:
            blank = buf.find(b"\r\n\r\n", start, end)
            if blank < 0:
                self.header_end = self.body_start = end
            else:
                self.header_end, self.body_start = blank + 2, blank + 4
        block = buf[start:self.header_end]
        self.has_8bit = not block.isascii()
        self.fields = _fields(block, start)
        self.names = {field.name for field in self.fields}
        self.changed = False
        value = next((f.value for f in self.fields if f.name == "content-type"), None)
        self.content_type, self.boundary = _content_type(value, default_type)
        self.encoding = None
        for field in self.fields:
            if field.name == "content-transfer-encoding":
                words = field.value.split()
                self.encoding = words[0].lower() if words else ""
                break


@functools.lru_cache(maxsize=256)
def _content_type(value, default_type):
    """(type/subtype, boundary bytes or None) of a Content-Type value, read
    by the email package (quoting and RFC 2231 continuations included).
    Cached: a message with many parts repeats a few values."""
    parsed = email.message.Message()
    parsed.set_default_type(default_type)
    if value is not None:
        parsed["Content-Type"] = value
    kind = parsed.get_content_type()
    if "(" in kind:
        # Message keeps an RFC 5322 comment in the type ("multipart/signed
        # (pgp)"), which would slip past the checks by name below; the
        # header registry's parser drops comments.
        kind = email.policy.default.header_factory("Content-Type", value).content_type
    boundary = parsed.get_boundary() if kind.startswith("multipart/") else None
    return kind, boundary.encode("ascii", "surrogateescape") if boundary else None


def _fields(block, offset):
    """Header fields of ``block`` (bytes ending in CRLF or empty), with
    their offsets in the message.  A line that starts with white space
    continues the field before it (RFC 5322 2.2.3)."""
    fields = []
    position = 0
    for line in block.split(b"\r\n")[:-1] if block.endswith(b"\r\n") else block.split(b"\r\n"):
        line_end = position + len(line) + 2
        if line[:1] in (b" ", b"\t") and fields:
            field = fields[-1]
            field.value += line.decode("ascii", "surrogateescape")
            field.end = offset + line_end
        else:
            name, colon, value = line.partition(b":")
            if colon:
                fields.append(_Field(name.strip().lower().decode("ascii", "surrogateescape"),
                                     value.decode("ascii", "surrogateescape"),
                                     offset + position, offset + line_end))
        position = line_end
    return fields


# -- writing ---------------------------------------------------------------

def _write(buf, edits, out):
    """Write ``buf`` with ``edits`` applied to ``out``; return the size."""
    size = 0
    position = 0
    for edit in edits:
        size += _copy(buf, position, edit.start, out)
        if edit.encoding is None:
            out.write(edit.text)
            size += len(edit.text)
        elif edit.encoding == "base64":
            size += _base64(buf, edit.start, edit.end, out)
        else:
            size += _quoted_printable(buf, edit.start, edit.end, out)
        position = edit.end
    size += _copy(buf, position, len(buf), out)
    return size


def _copy(buf, start, end, out):
    for chunk_start in range(start, end, _CHUNK):
        out.write(buf[chunk_start:min(chunk_start + _CHUNK, end)])
    return max(end - start, 0)


def _quoted_printable(buf, start, end, out):
    """RFC 2045 6.7 for text: each CRLF line on its own, CRLF between lines
    (hard line breaks), so the part decodes to the original octets."""
    size = 0
    while start < end:
        stop = min(start + _CHUNK, end)
        if stop < end:
            # Whole lines only; a line longer than a chunk is taken whole.
            cut = buf.rfind(b"\r\n", start, stop)
            if cut < 0:
                cut = buf.find(b"\r\n", stop, end)
            stop = end if cut < 0 else cut + 2
        lines = buf[start:stop].split(b"\r\n")
        encoded = b"\r\n".join(quoted_printable.encode_line(line) for line in lines)
        out.write(encoded)
        size += len(encoded)
        start = stop
    return size


def _base64(buf, start, end, out):
    """RFC 2045 6.8, 76-character lines with CRLF; the body's last CRLF is
    left off so that whatever follows (a delimiter's CRLF) follows at once."""
    size = 0
    for chunk_start in range(start, end, _BASE64_CHUNK):
        data = buf[chunk_start:min(chunk_start + _BASE64_CHUNK, end)]
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
        if chunk_start + _BASE64_CHUNK >= end:
            encoded = encoded[:-2]
        out.write(encoded)
        size += len(encoded)
    return size

