"""The HAProxy PROXY protocol header, versions 1 and 2, sans I/O.

A load balancer in front of the relay opens each connection with one
header naming the real client; relay decisions and logs must use that
address, not the balancer's.  Only listeners in ``[server] proxy_listen``
expect the header, and it is believed only from ``[server] proxy_trusted``
peers: anyone else could claim to be a trusted network.

Facts from the HAProxy specification ("The PROXY protocol", versions 1
and 2): a v1 header is one text line of at most 107 octets with CRLF; a v2
header is a 16-octet binary preamble (12-octet signature, version and
command, family and transport, length) followed by the addresses and
optional TLVs.
"""

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107

#: What ``parse`` returns while the header is still incomplete.
NEED_MORE = object()


class ProxyHeaderError(ValueError):
    """A malformed header: the connection is dropped."""


class ProxiedAddress:
    """The real client, as the header names it."""

    __slots__ = ("host", "port")

    def __init__(self, host, port):
        self.host = host
        self.port = port

    def __eq__(self, other):
        return isinstance(other, ProxiedAddress) and (self.host, self.port) == (other.host, other.port)

    def __repr__(self):
        return f"ProxiedAddress({self.host!r}, {self.port!r})"


def parse(buffer):
    """Read a PROXY header at the start of ``buffer``.

    :return: ``NEED_MORE``, or ``(address, consumed)`` where ``address`` is
        a :class:`ProxiedAddress`, or None when the header says the
        connection is the proxy's own (v1 UNKNOWN, v2 LOCAL or an unknown
        family): then the real peer address stands.
    :raise ProxyHeaderError: when ``buffer`` cannot begin a valid header.
    """
    if buffer[:1] == b"P":
        return _parse_v1(buffer)
    if buffer[:1] == b"\r":
        return _parse_v2(buffer)
    if buffer:
        raise ProxyHeaderError("no PROXY protocol header")
    return NEED_MORE


def _parse_v1(buffer):
    if not V1_PREFIX.startswith(buffer[:len(V1_PREFIX)]):
        raise ProxyHeaderError("no PROXY protocol header")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header too long")
        return NEED_MORE
    fields = buffer[:end].split(b" ")
    consumed = end + 2
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return None, consumed
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        ipaddress.ip_address(fields[3].decode("ascii"))
        port = _v1_port(fields[4])
        _v1_port(fields[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed PROXY v1 header") from None
    if (source.version == 4) != (fields[1] == b"TCP4"):
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return ProxiedAddress(str(source), port), consumed


def _v1_port(text):
    # Decimal 0-65535 without leading zeros or signs, as the spec says.
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ValueError("bad port")
    return int(text)


def _parse_v2(buffer):
    if not V2_SIGNATURE.startswith(buffer[:len(V2_SIGNATURE)]):
        raise ProxyHeaderError("no PROXY protocol header")
    if len(buffer) < 16:
        return NEED_MORE
    version_command, family, length = struct.unpack("!BBH", buffer[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError("unknown PROXY v2 command")
    if len(buffer) < 16 + length:
        return NEED_MORE
    consumed = 16 + length
    body = buffer[16:consumed]
    if command == 0:
        return None, consumed       # LOCAL: a health check from the proxy
    if family == 0x11:              # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("short PROXY v2 IPv4 addresses")
        source = ipaddress.IPv4Address(body[0:4])
        port = struct.unpack("!H", body[8:10])[0]
    elif family == 0x21:            # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("short PROXY v2 IPv6 addresses")
        source = ipaddress.IPv6Address(body[0:16])
        port = struct.unpack("!H", body[32:34])[0]
    else:
        return None, consumed       # UNSPEC, UDP or UNIX: nothing usable
    return ProxiedAddress(str(source), port), consumed
