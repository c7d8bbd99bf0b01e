"""The Received: trace header we prepend (RFC 5321 4.4).

One clause a line, as most MTAs write it; a clause too long for 78 octets
(a long HELO name or recipient) is folded further by
:func:`relaymail.folding.fold`.  The HELO name is at most 255 octets (the
dialogue refuses longer ones) and an address at most 256, so no word here
comes near the 998-octet line limit.
"""

import functools
import ipaddress
from datetime import datetime, timezone
from email.utils import format_datetime

import idna

from relaymail import sanitize
from relaymail.folding import fold_bytes


def received_header(helo, client_ip, hostname, protocol, queue_id, recipient=None, when=None):
    """Return the header as bytes, folded, CRLF-terminated.

    ``from HELO ([ip])`` names what the client claimed and the address it
    came from; no reverse DNS lookup is done on the accept path.  ``for``
    is given only for a single recipient: naming several would disclose Bcc
    recipients to each other (RFC 5321 7.2).

    The dialogue refuses HELO names and addresses with control characters;
    they are escaped here all the same (:mod:`relaymail.sanitize`), since a
    CR, LF, NEL or U+2028 in a header we write would start a forged one.
    """
    literal = _address_literal(client_ip)
    lines = [
        f"Received: from {_helo_text(helo, protocol)} ({literal})",
        f"\tby {hostname} (relaymail) with {protocol} id {queue_id}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{sanitize.escape(str(recipient))}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{_date(int(when))}")
    return fold_bytes("\r\n".join(lines))


# Both remembered: formatting a date took a third of the header's 20 us,
# parsing the client's address a fifth, and a relay under load writes many
# headers a second, mostly for the same few clients.
@functools.lru_cache(maxsize=2)
def _date(second):
    """The RFC 5322 date-time of a whole second (the field shows no less)."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def _helo_text(helo, protocol):
    """The HELO name as the field may carry it.  Only a UTF8SMTP message
    may have UTF-8 in its header (RFC 6532); in any other a raw octet above
    127 would make the message need SMTPUTF8 at the next hop (RFC 6531),
    so an internationalised name is written as its A-label form, and
    anything else not ASCII as ``\\x{HEX}``."""
    helo = sanitize.escape(helo)
    if helo.isascii() or protocol.startswith("UTF8"):
        return helo
    try:
        return idna.encode(helo, uts46=True).decode("ascii")
    except idna.IDNAError:
        return "".join(char if char.isascii() else f"\\x{{{ord(char):X}}}" for char in helo)


@functools.lru_cache(maxsize=1024)
def _address_literal(ip):
    """RFC 5321 4.1.3 address literal: [192.0.2.1] or [IPv6:2001:db8::1]."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{sanitize.escape(ip)}]" if ip else "unknown"
    if parsed.version == 6:
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"
