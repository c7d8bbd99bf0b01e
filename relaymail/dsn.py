"""What a sender asked for in delivery status notifications (RFC 3461).

The DSN extension adds four parameters: on MAIL, ``RET=FULL|HDRS`` (return
the whole message or its header section in a failure notice) and
``ENVID=`` (the sender's own id for the transaction, echoed in every
notice); on RCPT, ``NOTIFY=`` (``NEVER``, or any of ``SUCCESS``,
``FAILURE``, ``DELAY``) and ``ORCPT=`` (the recipient as the sender first
wrote it, ``addr-type;xtext``).  The server checks them here
(:func:`parse_mail` and :func:`parse_rcpt`), the queue keeps them in the
record (the envelope's ``dsn_ret`` and ``dsn_envid``, each recipient
entry's ``notify`` and ``orcpt``), the SMTP client passes them on to a
next hop that offers DSN (:func:`mail_parameters`,
:func:`rcpt_parameters`), and the scheduler decides with :func:`wants`
which notices are owed.

Values stay in their xtext form as the client sent them, so that they pass
on unchanged; only the notices decode them (:func:`decode_xtext`).
"""

import re

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
NEVER = "NEVER"
FULL = "FULL"
HDRS = "HDRS"

#: RFC 3461 4.4: "The ENVID ... MUST NOT exceed 100 characters" (decoded).
MAX_ENVID = 100
#: RFC 3461 4.2: an ORCPT's address is at most 500 characters decoded.
MAX_ORCPT = 500

# RFC 3461 4: xtext is xchar (33-126 but "+" and "=") or "+" and two
# upper-case hex digits; lower case is taken too (Exim writes it), and,
# under SMTPUTF8, non-ASCII characters as RFC 6533 3 lets utf-8-addr-unitext
# carry them.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})+")
_XTEXT_UTF8 = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2}|[^\x00-\x7f])+")
_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
# RFC 3461 4.2: addr-type is an atom (RFC 5322 atext).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


class DSNParameterError(ValueError):
    """A DSN parameter the client sent malformed; the text says how
    (it goes into the 501 5.5.4 reply)."""


def is_xtext(value, utf8=False):
    return bool((_XTEXT_UTF8 if utf8 else _XTEXT).fullmatch(value or ""))


def decode_xtext(value):
    """``a+2Bb`` -> ``a+b``; hex escapes are octets, read as UTF-8."""
    data = bytearray()
    position = 0
    for match in _HEX.finditer(value):
        data += value[position:match.start()].encode("utf-8")
        data.append(int(match.group(1), 16))
        position = match.end()
    data += value[position:].encode("utf-8")
    return data.decode("utf-8", errors="replace")


def encode_xtext(text):
    """The xtext of ``text``: ``+``, ``=``, controls, space and every
    non-ASCII octet as ``+HH``."""
    out = []
    for octet in text.encode("utf-8"):
        if 33 <= octet <= 126 and octet not in (ord("+"), ord("=")):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def parse_mail(params, smtputf8=False):
    """RET and ENVID from MAIL's parameters (upper-cased keywords):
    ``(ret or None, envid or None)``.

    :raise DSNParameterError: for a malformed value."""
    ret = params.get("RET", ...)
    if ret is ...:
        ret = None
    elif ret is None or ret.upper() not in (FULL, HDRS):
        raise DSNParameterError("RET takes FULL or HDRS")
    else:
        ret = ret.upper()
    envid = params.get("ENVID", ...)
    if envid is ...:
        envid = None
    elif not is_xtext(envid, smtputf8):
        raise DSNParameterError("ENVID takes xtext")
    elif len(decode_xtext(envid)) > MAX_ENVID:
        raise DSNParameterError(f"ENVID is longer than {MAX_ENVID} characters")
    return ret, envid


def parse_rcpt(params, smtputf8=False):
    """NOTIFY and ORCPT from RCPT's parameters: ``(notify, orcpt)``, each
    None when not given; ``notify`` a list (``["NEVER"]``, or SUCCESS,
    FAILURE and DELAY in the order given), ``orcpt`` ``addr-type;xtext``
    with the addr-type as sent.

    :raise DSNParameterError: for a malformed value."""
    notify = params.get("NOTIFY", ...)
    if notify is ...:
        notify = None
    else:
        notify = _notify(notify)
    orcpt = params.get("ORCPT", ...)
    if orcpt is ...:
        orcpt = None
    else:
        orcpt = _orcpt(orcpt, smtputf8)
    return notify, orcpt


def _notify(value):
    words = [] if value is None else [word.upper() for word in value.split(",")]
    if not words or any(word not in (NEVER, SUCCESS, FAILURE, DELAY) for word in words):
        raise DSNParameterError("NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY "
                                "separated by commas")
    if len(set(words)) != len(words):
        raise DSNParameterError("NOTIFY names a value twice")
    if NEVER in words and len(words) > 1:
        # RFC 3461 4.1: NEVER "MUST NOT" be combined with the others.
        raise DSNParameterError("NOTIFY=NEVER goes alone")
    return words


def _orcpt(value, smtputf8):
    addr_type, separator, original = (value or "").partition(";")
    if not separator or not _ADDR_TYPE.fullmatch(addr_type) or not is_xtext(original, smtputf8):
        raise DSNParameterError("ORCPT takes addr-type;xtext, e.g. rfc822;alice@example.com")
    if len(decode_xtext(original)) > MAX_ORCPT:
        raise DSNParameterError(f"ORCPT's address is longer than {MAX_ORCPT} characters")
    return f"{addr_type};{original}"


def wants(notify, kind):
    """Whether a recipient whose NOTIFY was ``notify`` (None: not given)
    gets a notice of ``kind`` (SUCCESS, FAILURE or DELAY).  Without NOTIFY
    it is what an MTA sends anyway: failures and delays, never success
    (RFC 3461 4.1)."""
    if notify is None:
        return kind != SUCCESS
    return kind in notify


def without_success(notify):
    """The NOTIFY a list's members inherit when the list itself gets the
    "expanded" notice for SUCCESS (RFC 3461 6.2.7.3): the same without
    SUCCESS, NEVER when nothing is left."""
    if notify is None:
        return None
    rest = [word for word in notify if word != SUCCESS]
    return rest or [NEVER]


def orcpt_of(address, orcpt):
    """The ORCPT to send on for ``address``: the one the client gave,
    else ``rfc822;`` and the address (as Postfix does), or None for an
    address that is not ASCII and had none (its ``utf-8`` form is the
    next hop's to make from the address itself)."""
    if orcpt is not None:
        return orcpt
    if not address.isascii():
        return None
    return f"rfc822;{encode_xtext(address)}"


def mail_parameters(envelope):
    """`` RET=... ENVID=...`` for MAIL to a next hop that offers DSN, from
    the record's envelope (a dict); empty when none were given."""
    words = []
    if envelope.get("dsn_ret"):
        words.append(f"RET={envelope['dsn_ret']}")
    if envelope.get("dsn_envid"):
        words.append(f"ENVID={envelope['dsn_envid']}")
    return "".join(" " + word for word in words)


def rcpt_parameters(address, request):
    """`` NOTIFY=... ORCPT=...`` for RCPT to a next hop that offers DSN;
    ``request`` is ``(notify, orcpt)`` from the record, or None."""
    notify, orcpt = request or (None, None)
    words = []
    if notify is not None:
        words.append("NOTIFY=" + ",".join(notify))
    orcpt = orcpt_of(address, orcpt)
    if orcpt is not None:
        words.append(f"ORCPT={orcpt}")
    return "".join(" " + word for word in words)


def original_recipient(orcpt):
    """The RFC 3464 2.3.1 Original-Recipient value of an ORCPT:
    ``rfc822; alice@example.com`` (xtext decoded)."""
    addr_type, _, original = orcpt.partition(";")
    return f"{addr_type}; {decode_xtext(original)}"


def inherit(recipients, expansions, requests):
    """What the queue keeps once lists and aliases are expanded (RFC 3461
    6.2.7): ``(addresses, requests, expanded)``.

    An address that stays itself, or an alias of one other address,
    passes its NOTIFY and ORCPT on (6.2.7.2).  A list or an alias of
    several is delivered here as far as its sender is concerned: it is
    owed the "expanded" notice if it asked SUCCESS, and its members get
    its NOTIFY without SUCCESS and its ORCPT (6.2.7.3).

    :param recipients: the addresses RCPT accepted, in order.
    :param expansions: for each, the list of addresses it expands to.
    :param requests: ``{address: [notify, orcpt]}`` from RCPT.
    :return: the addresses to queue (each once, in the order first met),
        their requests (``{address: [notify, orcpt]}`` or None), and
        ``[[address, orcpt], ...]`` owed an "expanded" notice (or None).
    """
    queued, kept, expanded, seen = [], {}, [], set()
    for original, members in zip(recipients, expansions, strict=True):
        notify, orcpt = requests.get(original, (None, None))
        if len(members) == 1:
            inherited = (notify, orcpt if members[0] == original
                         else orcpt or orcpt_of(original, None))
        else:
            if wants(notify, SUCCESS) and notify is not None:
                expanded.append([original, orcpt])
            inherited = (without_success(notify), orcpt or orcpt_of(original, None))
        for member in members:
            local, at, domain = member.rpartition("@")
            key = (local, domain.lower()) if at else (member, "")
            if key in seen:
                continue
            seen.add(key)
            queued.append(member)
            if inherited != (None, None):
                kept[member] = list(inherited)
    return queued, kept or None, expanded or None
