"""RFC 5321 paths and mailboxes, as they arrive in MAIL FROM and RCPT TO.

This module is part of the plugin contracts (:mod:`relaymail.interfaces`):
plugins receive :class:`Mailbox` values and parse addresses from their own
tables with the same parser the SMTP server uses, so both import it from
here and neither depends on the other.

A small hand-written scanner over the grammar of RFC 5321 section 4.1.2
(Reverse-path, Forward-path, Path, A-d-l, Mailbox, Local-part, Dot-string,
Quoted-string, Domain) and section 4.1.3 (address-literal), extended by
RFC 6531 section 3.3 (SMTPUTF8: UTF-8 in atext and qtextSMTP, U-labels as
sub-domains, UTF-8 in esmtp-value).

Nothing here is a loose regex: every production is checked in its own small
function, the limits of RFC 5321 section 4.5.3.1 are enforced, and bad input
only ever raises :class:`AddressError` (or its subclass
:class:`NeedsSMTPUTF8`) or :class:`ParameterError`.  Error messages are fixed
texts that never echo the client's input, so they are safe to log and to put
in a reply.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = [
    "AddressError",
    "NeedsSMTPUTF8",
    "ParameterError",
    "Mailbox",
    "parse_reverse_path",
    "parse_forward_path",
    "split_mail_argument",
]


class AddressError(ValueError):
    """Bad address syntax; ``str()`` is a short human reason like
    ``'unbalanced quote in local part'``."""


class NeedsSMTPUTF8(AddressError):
    """The address holds non-ASCII but the transaction did not say SMTPUTF8
    (the server answers 553 5.6.7: RFC 6531, with X.6.7 from RFC 5248)."""


class ParameterError(ValueError):
    """Malformed MAIL/RCPT parameter syntax (the server answers 501 5.5.4)."""


# RFC 5321 section 4.5.3.1: the size limits, in octets.
MAX_LOCAL_PART_OCTETS = 64       # 4.5.3.1.1
MAX_DOMAIN_OCTETS = 255          # 4.5.3.1.2
MAX_PATH_OCTETS = 256            # 4.5.3.1.3, punctuation included
MAX_LABEL_OCTETS = 63            # RFC 1035 section 2.3.4

# C0 controls and DEL are never valid in a path or a parameter (RFC 5321
# 4.1.2 has no production that admits them).  C1 controls are rejected too:
# RFC 5198 section 2 says they MUST NOT be used in network Unicode, and some
# software treats U+0085 as a line break.  U+2028 and U+2029 go for the same
# reason (str.splitlines() breaks at them).  Lone surrogates are what a
# surrogateescape decode makes of invalid UTF-8; they are not characters.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

# RFC 5322 section 3.2.3 atext, plus '.' so one pass finds a whole
# Dot-string; the atoms are checked for emptiness afterwards.  The UTF-8
# variant adds UTF8-non-ascii (RFC 6531 section 3.3); characters that
# _FORBIDDEN rejects never reach these scanners.
_ATEXT_ASCII = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-"
_DOT_STRING_ASCII = re.compile("[" + _ATEXT_ASCII + "]*")
_DOT_STRING_UTF8 = re.compile("[" + _ATEXT_ASCII + r"\u0080-\U0010ffff]*")

# qtextSMTP = %d32-33 / %d35-91 / %d93-126 (RFC 5321 section 4.1.2),
# extended by UTF8-non-ascii (RFC 6531 section 3.3).  Quoted-pairs are
# handled by the scanner, since only they may contain '"' and '\'.
_QTEXT_ASCII = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_QTEXT_UTF8 = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]*")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)

# One LDH label's characters; first/last character rules are checked apart.
_LDH = re.compile(r"[A-Za-z0-9-]+")

# IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT (4.1.3).
_IPV4_LITERAL = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
# General-address-literal = Standardized-tag ":" 1*dcontent, where
# dcontent = %d33-90 / %d94-126 (4.1.3).
_GENERAL_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")
_DCONTENT = re.compile(r"[\x21-\x5a\x5e-\x7e]+")

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
# esmtp-value = 1*(%d33-60 / %d62-126), plus UTF8-non-ascii (RFC 6531 3.3)
# but without what _FORBIDDEN refuses, for the reasons given there.
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(
    r"[\x21-\x3c\x3e-\x7e\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff]+")


@dataclass(frozen=True)
class Mailbox:
    """One mailbox from a path, kept exactly as the client wrote it.

    ``local_part`` is the Dot-string, or the Quoted-string with its quotes.
    ``domain`` is the Domain (U-labels kept) or the address literal with its
    brackets; it is ``''`` only for the bare ``<Postmaster>`` of RFC 5321
    section 4.1.1.3.
    """

    local_part: str
    domain: str

    @property
    def domain_key(self) -> str:
        """The domain for routing and comparisons: lower case, U-labels
        turned into A-labels (``xn--...``); address literals lower-cased
        as they are.

        :raises AddressError: if the domain is invalid, which only a
            Mailbox built by hand rather than by the parsers can be.
        """
        if self.domain == "" or self.is_address_literal:
            return self.domain.lower()
        return _check_domain(self.domain, True)

    @property
    def is_address_literal(self) -> bool:
        """True when the domain is ``[...]`` rather than a name."""
        return self.domain.startswith("[")

    @property
    def local_text(self) -> str:
        """The local part with quoting removed and quoted-pairs resolved:
        ``'"john\\\\ doe"'`` gives ``'john doe'``."""
        if not self.local_part.startswith('"'):
            return self.local_part
        return _QUOTED_PAIR.sub(r"\1", self.local_part[1:-1])

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part or the domain holds non-ASCII."""
        return not (self.local_part.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        if self.domain == "":
            return self.local_part
        return f"{self.local_part}@{self.domain}"


def parse_reverse_path(text: str, smtputf8: bool = False) -> Mailbox | None:
    """Parse the Reverse-path of MAIL FROM.

    :param text: the path with its angle brackets, e.g. ``'<a@b.example>'``.
    :param smtputf8: whether the transaction declared SMTPUTF8.
    :return: None for the null sender ``<>``, else as
        :func:`parse_forward_path`.
    :raises AddressError: for bad syntax (``NeedsSMTPUTF8`` for non-ASCII
        without SMTPUTF8).
    """
    if text == "<>":
        return None
    return parse_forward_path(text, smtputf8)


def parse_forward_path(text: str, smtputf8: bool = False) -> Mailbox:
    """Parse a Forward-path (RCPT TO), angle brackets required.

    A source route (``<@a.example,@b.example:user@c.example>``) is checked
    and discarded, as RFC 5321 section 3.6.1 and Appendix C tell receivers
    to do.  ``<Postmaster>`` without a domain, in any case, is accepted
    (RFC 5321 section 4.5.1) and gives ``Mailbox(<as written>, '')``.

    :param text: the path, e.g. ``'<user@example.com>'``.
    :param smtputf8: whether the transaction declared SMTPUTF8; without it
        any non-ASCII raises :class:`NeedsSMTPUTF8`.
    :raises AddressError: with a short reason for any syntax error.
    """
    # Counting characters first bounds the work done on a huge argument;
    # a character is at least one octet.
    if len(text) > MAX_PATH_OCTETS:
        raise AddressError("path too long")
    _check_characters(text, smtputf8)
    if _octets(text) > MAX_PATH_OCTETS:
        raise AddressError("path too long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path must be enclosed in angle brackets")
    body = text[1:-1]
    if not body:
        raise AddressError("empty path")
    return _parse_path_body(body, smtputf8)


def split_mail_argument(
        arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Split the argument of MAIL or RCPT into its path and parameters.

    ``split_mail_argument('FROM:<a@b.example> SIZE=100', 'FROM')`` gives
    ``('<a@b.example>', {'SIZE': '100'})``.  The path is returned unparsed
    (hand it to :func:`parse_reverse_path` or :func:`parse_forward_path`);
    it is found by scanning, so a quoted local part may hold ``>`` or
    spaces.  Parameter keywords are upper-cased, values kept as given, and
    a keyword without ``=`` maps to None.

    :param arg: everything after the command verb, e.g. ``'FROM:<a@b>'``.
    :param keyword: ``'FROM'`` or ``'TO'``; matched case-insensitively.
    :raises AddressError: when ``FROM:``/``TO:`` or the path is missing or
        unterminated, or the path holds a control character.
    :raises ParameterError: for a malformed or repeated parameter.
    """
    pos = _skip_spaces(arg, 0)
    prefix = keyword + ":"
    given = arg[pos:pos + len(prefix)]
    # isascii() first: 'ı'.upper() is 'I', and no such letter may pass.
    if not given.isascii() or given.upper() != prefix.upper():
        raise AddressError(f"expected '{prefix}'")
    # RFC 5321 has no space here, but many clients send 'MAIL FROM: <a@b>'
    # and refusing them helps nobody.
    start = _skip_spaces(arg, pos + len(prefix))
    if start == len(arg):
        raise AddressError("missing path")
    if arg[start] != "<":
        raise AddressError("path must be enclosed in angle brackets")
    end = _find_path_end(arg, start)
    path = arg[start:end]
    if _FORBIDDEN.search(path):
        raise AddressError("control character in address")
    return path, _parse_parameters(arg[end:])


# -- characters and limits ---------------------------------------------------

def _check_characters(text: str, smtputf8: bool) -> None:
    """Reject controls anywhere, and non-ASCII unless SMTPUTF8 was given."""
    if _FORBIDDEN.search(text):
        raise AddressError("control character in address")
    if not smtputf8 and not text.isascii():
        raise NeedsSMTPUTF8("non-ASCII address needs SMTPUTF8")


def _octets(text: str) -> int:
    """Length on the wire; the limits of RFC 5321 4.5.3.1 count octets."""
    return len(text.encode("utf-8"))


def _skip_spaces(text: str, pos: int) -> int:
    """Index of the first non-space at or after ``pos`` (SP only, not TAB)."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    return pos


# -- Path --------------------------------------------------------------------

def _parse_path_body(body: str, smtputf8: bool) -> Mailbox:
    """Parse ``[ A-d-l ":" ] Mailbox``, the inside of the angle brackets."""
    pos = 0
    if body.startswith("@"):
        pos = _skip_source_route(body, smtputf8)
    local_end = _scan_local_part(body, pos, smtputf8)
    local = body[pos:local_end]
    if local_end == len(body):
        # RFC 5321 4.1.1.3 allows the bare "<Postmaster>", without A-d-l.
        if pos == 0 and local.lower() == "postmaster":
            return Mailbox(local, "")
        raise AddressError("missing domain")
    if body[local_end] != "@":
        raise AddressError("invalid character in local part")
    _check_local_part(local)
    domain = body[local_end + 1:]
    if domain.startswith("["):
        _check_address_literal(domain)
    else:
        _check_domain(domain, smtputf8)
    return Mailbox(local, domain)


def _skip_source_route(body: str, smtputf8: bool) -> int:
    """Check ``A-d-l ":"`` at the start of ``body``; return the index after
    the colon.  A-d-l = At-domain *( "," At-domain ), At-domain = "@" Domain.
    """
    pos = 0
    while True:
        if pos >= len(body) or body[pos] != "@":
            raise AddressError("invalid source route")
        end = pos + 1
        while end < len(body) and body[end] not in ",:":
            end += 1
        if end == len(body):
            raise AddressError("invalid source route")
        _check_domain(body[pos + 1:end], smtputf8)
        if body[end] == ":":
            return end + 1
        pos = end + 1


# -- Local-part --------------------------------------------------------------

def _scan_local_part(body: str, pos: int, smtputf8: bool) -> int:
    """Return the index just past the Local-part that starts at ``pos``."""
    if pos < len(body) and body[pos] == '"':
        return _scan_quoted_string(body, pos, smtputf8)
    return _scan_dot_string(body, pos, smtputf8)


def _scan_dot_string(body: str, pos: int, smtputf8: bool) -> int:
    """Dot-string = Atom *("." Atom), Atom = 1*atext."""
    scanner = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING_ASCII
    end = scanner.match(body, pos).end()
    text = body[pos:end]
    if not text:
        raise AddressError("missing local part")
    if text.startswith(".") or text.endswith(".") or ".." in text:
        raise AddressError("misplaced dot in local part")
    return end


def _scan_quoted_string(body: str, pos: int, smtputf8: bool) -> int:
    """Quoted-string = DQUOTE *QcontentSMTP DQUOTE, where QcontentSMTP is
    qtextSMTP or quoted-pairSMTP = "\\" %d32-126 (RFC 5321 4.1.2; RFC 6531
    widens qtextSMTP but not the quoted-pair)."""
    qtext = _QTEXT_UTF8 if smtputf8 else _QTEXT_ASCII
    i = pos + 1
    while True:
        i = qtext.match(body, i).end()
        if i >= len(body):
            raise AddressError("unbalanced quote in local part")
        char = body[i]
        if char == '"':
            return i + 1
        if char != "\\":
            raise AddressError("invalid character in quoted local part")
        if i + 1 >= len(body) or not " " <= body[i + 1] <= "~":
            raise AddressError("invalid quoted pair in local part")
        i += 2


def _check_local_part(local: str) -> None:
    """Enforce the 64-octet limit of RFC 5321 4.5.3.1.1 (quotes count)."""
    if _octets(local) > MAX_LOCAL_PART_OCTETS:
        raise AddressError("local part too long")


# -- Domain ------------------------------------------------------------------

# Remembered: a relay sees the same few domains again and again, and each
# is checked several times a message (MAIL, RCPT, routing, domain_key):
# 3 us a check, 0.1 us remembered.  Only valid domains are kept (an
# AddressError is not), at most this many, the least recently used going.
@functools.lru_cache(maxsize=4096)
def _check_domain(domain: str, smtputf8: bool) -> str:
    """Check Domain = sub-domain *("." sub-domain) and return its key form:
    lower case with U-labels turned into A-labels."""
    if not domain:
        raise AddressError("missing domain")
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    if domain.endswith("."):
        # A trailing dot names the DNS root; RFC 5321 Domain has none.
        raise AddressError("trailing dot in domain")
    keys = [_check_label(label, smtputf8) for label in domain.split(".")]
    key = ".".join(keys)
    # The A-label form is what goes to DNS, so it must fit as well.
    if len(key) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    return key


def _check_label(label: str, smtputf8: bool) -> str:
    """Check one sub-domain and return it lower-cased, as an A-label."""
    if not label:
        raise AddressError("empty label in domain")
    if not label.isascii():
        return _check_u_label(label, smtputf8)
    if len(label) > MAX_LABEL_OCTETS:
        raise AddressError("domain label too long")
    if not _LDH.fullmatch(label):
        raise AddressError("invalid character in domain")
    # sub-domain = Let-dig [Ldh-str]; Ldh-str ends in Let-dig.
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("hyphen at start or end of domain label")
    key = label.lower()
    if key.startswith("xn--"):
        _check_a_label(key)
    return key


def _check_a_label(label: str) -> None:
    """An 'xn--' label must decode to a valid U-label (RFC 5891 5.3)."""
    try:
        idna.ulabel(label)
    except (UnicodeError, ValueError):
        # idna.IDNAError is a UnicodeError; ValueError covers its
        # unicodedata look-ups.  Neither may leak to the caller.
        raise AddressError("invalid A-label in domain") from None


def _check_u_label(label: str, smtputf8: bool) -> str:
    """A U-label (RFC 6531 3.3 sub-domain =/ U-label) must be valid IDNA
    2008 (RFC 5891), with no UTS 46 mapping; return its A-label."""
    if not smtputf8:
        raise NeedsSMTPUTF8("non-ASCII address needs SMTPUTF8")
    try:
        # strict=True: only '.' separates labels, so a lookalike dot such
        # as U+3002 inside a label is refused rather than split on.
        return idna.encode(label, strict=True, uts46=False).decode("ascii")
    except (UnicodeError, ValueError):
        raise AddressError("invalid internationalized domain") from None


# -- address-literal ---------------------------------------------------------

def _check_address_literal(domain: str) -> None:
    """address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
    General-address-literal ) "]" (RFC 5321 4.1.3)."""
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    if len(domain) < 2 or not domain.endswith("]"):
        raise AddressError("unterminated address literal")
    content = domain[1:-1]
    if not _DCONTENT.fullmatch(content):
        raise AddressError("invalid address literal")
    tag, colon, rest = content.partition(":")
    if not colon:
        _check_ipv4_literal(content)
    elif tag.lower() == "ipv6":
        _check_ipv6_literal(rest)
    elif _GENERAL_TAG.fullmatch(tag) and rest:
        raise AddressError("unsupported address literal")
    else:
        raise AddressError("invalid address literal")


def _check_ipv4_literal(content: str) -> None:
    """Snum 3("." Snum); ipaddress also refuses values over 255 and the
    ambiguous leading zeros ('010')."""
    if not _IPV4_LITERAL.fullmatch(content):
        raise AddressError("invalid IPv4 address literal")
    try:
        ipaddress.IPv4Address(content)
    except ValueError:
        raise AddressError("invalid IPv4 address literal") from None


def _check_ipv6_literal(content: str) -> None:
    """IPv6-addr of RFC 5321 4.1.3, via ipaddress plus the two rules it does
    not share: no '%scope' suffix, and '::' stands for at least two groups
    (at most 6 explicit groups, an IPv4 tail counting as 2)."""
    if not _IPV6_CHARS.fullmatch(content):
        raise AddressError("invalid IPv6 address literal")
    try:
        ipaddress.IPv6Address(content)
    except ValueError:
        raise AddressError("invalid IPv6 address literal") from None
    if "::" in content:
        groups = [group for group in content.split(":") if group]
        count = len(groups) + (1 if "." in content else 0)
        if count > 6:
            raise AddressError("invalid IPv6 address literal")


# -- MAIL/RCPT argument ------------------------------------------------------

def _find_path_end(arg: str, start: int) -> int:
    """Return the index just past the '>' that closes the path opened at
    ``arg[start]``, skipping over quoted strings and their quoted-pairs."""
    in_quote = False
    i = start + 1
    while i < len(arg):
        char = arg[i]
        if in_quote:
            if char == "\\":
                i += 1
            elif char == '"':
                in_quote = False
        elif char == '"':
            in_quote = True
        elif char == ">":
            return i + 1
        i += 1
    raise AddressError("unterminated path")


def _parse_parameters(rest: str) -> dict[str, str | None]:
    """Parse ``*(SP esmtp-param)`` after the path (RFC 5321 4.1.2).  Runs of
    spaces and trailing spaces are tolerated, nothing else is."""
    params: dict[str, str | None] = {}
    if not rest.strip(" "):
        return params
    if not rest.startswith(" "):
        raise ParameterError("expected a space after the path")
    for item in rest.split(" "):
        if item:
            keyword, value = _parse_parameter(item)
            if keyword in params:
                raise ParameterError(f"duplicate parameter {keyword}")
            params[keyword] = value
    return params


def _parse_parameter(item: str) -> tuple[str, str | None]:
    """esmtp-param = esmtp-keyword ["=" esmtp-value]."""
    keyword, equals, value = item.partition("=")
    if not _ESMTP_KEYWORD.fullmatch(keyword):
        raise ParameterError("invalid parameter keyword")
    if not equals:
        return keyword.upper(), None
    if not value:
        raise ParameterError("empty parameter value")
    if not _ESMTP_VALUE.fullmatch(value):
        raise ParameterError("invalid character in parameter value")
    return keyword.upper(), value
