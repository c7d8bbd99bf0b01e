"""PROXY protocol v1 and v2: the parser, and listeners that expect it."""

import socket
import struct

import pytest

from relaymail.smtp import proxy
from relaymail.smtp.proxy import NEED_MORE, ProxiedAddress, ProxyHeaderError
from tests.support import Session, make_settings


def v2(command=1, family=0x11, addresses=b"", tlvs=b""):
    body = addresses + tlvs
    return proxy.V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_ipv4(source, port, destination="192.0.2.254", dport=25):
    return v2(addresses=socket.inet_aton(source) + socket.inet_aton(destination)
              + struct.pack("!HH", port, dport))


def test_v1_tcp4():
    header = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n"
    assert proxy.parse(header + b"EHLO x\r\n") == (ProxiedAddress("198.51.100.7", 40000), len(header))


def test_v1_tcp6():
    header = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n"
    assert proxy.parse(header) == (ProxiedAddress("2001:db8::7", 40000), len(header))


def test_v1_unknown_keeps_the_real_peer():
    assert proxy.parse(b"PROXY UNKNOWN\r\n") == (None, 15)


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 198.51.100.7 192.0.2.1 40000\r\n",
    b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 25\r\n",
    b"PROXY TCP4 198.51.100.7 192.0.2.1 040000 25\r\n",
    b"PROXY TCP4 198.51.100.7 192.0.2.1 70000 25\r\n",
    b"PROXY UDP4 198.51.100.7 192.0.2.1 1 25\r\n",
    b"PROXY TCP4 not-an-ip 192.0.2.1 1 25\r\n",
    b"EHLO client.test\r\n",
    b"PROXY " + b"9" * 120,
])
def test_v1_malformed(header):
    with pytest.raises(ProxyHeaderError):
        proxy.parse(header)


def test_v1_incomplete_needs_more():
    assert proxy.parse(b"PROXY TCP4 198.51") is NEED_MORE
    assert proxy.parse(b"PRO") is NEED_MORE
    assert proxy.parse(b"") is NEED_MORE


def test_v2_ipv4_with_tlvs():
    header = v2(addresses=socket.inet_aton("198.51.100.9") + socket.inet_aton("192.0.2.1")
                + struct.pack("!HH", 51000, 25), tlvs=b"\x04\x00\x01x")
    assert proxy.parse(header + b"rest") == (ProxiedAddress("198.51.100.9", 51000), len(header))


def test_v2_ipv6():
    header = v2(family=0x21, addresses=socket.inet_pton(socket.AF_INET6, "2001:db8::9")
                + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", 52000, 25))
    assert proxy.parse(header) == (ProxiedAddress("2001:db8::9", 52000), len(header))


def test_v2_local_and_unspec_keep_the_real_peer():
    assert proxy.parse(v2(command=0)) == (None, 16)
    assert proxy.parse(v2(family=0x00)) == (None, 16)


def test_v2_incomplete_and_malformed():
    header = v2_ipv4("198.51.100.9", 1)
    for cut in (1, 11, 15, len(header) - 1):
        assert proxy.parse(header[:cut]) is NEED_MORE
    with pytest.raises(ProxyHeaderError):
        proxy.parse(proxy.V2_SIGNATURE + bytes([0x10 | 1, 0x11]) + b"\x00\x0c" + b"\x00" * 12)
    with pytest.raises(ProxyHeaderError):
        proxy.parse(v2(addresses=b"\x00" * 4))
    with pytest.raises(ProxyHeaderError):
        proxy.parse(b"\r\n\r\nX")


# -- listeners that expect the header ---------------------------------------

@pytest.fixture
def proxied(tmp_path):
    """A session on a PROXY listener, from the proxy at ``peer``."""
    settings = make_settings(tmp_path, server__proxy_trusted="10.0.0.0/8")
    return lambda peer: Session(settings, client_ip=peer, factory_options={"proxy": True})


def test_proxied_client_is_the_one_named_in_the_header(proxied):
    session = proxied("10.1.1.1")
    assert session.banner == b""        # no greeting before the header
    out = session.send(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO client.test\r\n")
    assert out.startswith(b"220 mx.test ESMTP relaymail\r\n250-mx.test Hello client.test\r\n")
    assert session.protocol.context.client_ip == "198.51.100.7"
    assert session.protocol.context.trusted is False
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<b@example.net>") == b"554 5.7.1 Relay access denied\r\n"


def test_v2_header_split_over_reads(proxied):
    session = proxied("10.1.1.1")
    header = v2_ipv4("127.0.0.1", 40000)
    assert session.send(header[:7]) == b""
    assert session.send(header[7:] + b"EHLO client.test\r\n").startswith(b"220 mx.test")
    # Loopback behind the proxy is trusted like any loopback client.
    assert session.protocol.context.trusted is True


def test_header_from_an_untrusted_peer_is_refused(proxied):
    session = proxied("192.0.2.50")
    assert session.closed
    assert session.send(b"PROXY TCP4 127.0.0.1 192.0.2.1 40000 25\r\n") == b""


def test_missing_header_hangs_up(proxied):
    session = proxied("10.1.1.1")
    assert session.send(b"EHLO client.test\r\n") == b""
    assert session.closed
