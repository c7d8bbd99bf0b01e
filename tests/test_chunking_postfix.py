"""BDAT against a real Postfix (Debian's postfix; its smtpd offers CHUNKING
since 3.4): relaymail's smarthost is a private Postfix on loopback, which
relays on to a NextHop, so the test sees what Postfix received.

The private Postfix is tests/postfix_server.py's (its own directories and
log, nothing of the machine's Postfix touched), with an smtpd on a free
127.0.0.1 port and ``relayhost`` to the NextHop.
"""

import re
import smtplib
import time

import pytest

from tests.nexthop import NextHop
from tests.postfix_server import Postfix
from tests.relay_process import RelayProcess, free_port


def wait_for_log(postfix, pattern, timeout=20):
    """Wait until the Postfix log matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, postfix.log())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the Postfix log:\n{postfix.log()}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """relaymail -> Postfix -> NextHop."""
    hop = NextHop()
    port = free_port()
    postfix = Postfix(main={"relayhost": f"[127.0.0.1]:{hop.port}",
                            "smtpd_relay_restrictions": "permit_mynetworks, reject"},
                      services=[[f"127.0.0.1:{port} inet n - n - - smtpd"]])
    postfix.port = port
    postfix.start()
    relay = RelayProcess(tmp_path_factory.mktemp("relay"), {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{postfix.port}"},
    }).start()
    yield relay, postfix, hop
    relay.stop()
    postfix.remove()
    hop.stop()


def test_postfix_offers_chunking(chain):
    _, postfix, _ = chain
    with smtplib.SMTP("127.0.0.1", postfix.port) as client:
        client.ehlo("client.test")
        assert client.has_extn("chunking") and not client.has_extn("binarymime")


def test_mail_reaches_postfix_by_bdat_in_chunks_byte_for_byte(chain):
    relay, postfix, hop = chain
    line = b"." + b"x" * 97 + b"\r\n"          # leading dots: nothing to stuff in BDAT
    body = b"Subject: chunked\r\nMessage-ID: <bdat-big@client.test>\r\n\r\n" + line * 25_000
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.sendmail("a@example.org", ["bob@example.com"], body)
    message = hop.wait_for(before + 1)[before]
    # Postfix put its Received field on top of ours; the rest is the message.
    data = message["data"]
    assert data.startswith(b"Received: from relay.test")
    assert data.endswith(b"\r\n\r\n" + line * 25_000)
    assert b"Message-ID: <bdat-big@client.test>" in data
    # smtpd's disconnect line counts the BDAT commands: 2.5 MB is 3 chunks.
    wait_for_log(postfix, r"disconnect from [^\n]*\bmail=1 rcpt=1 bdat=3 ")


def test_a_small_message_is_one_pipelined_bdat(chain):
    relay, postfix, hop = chain
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.sendmail("a@example.org", ["bob@example.com", "carol@example.com"],
                        b"Subject: small\r\nMessage-ID: <bdat-small@client.test>\r\n\r\n.\r\n..\r\n")
    message = hop.wait_for(before + 1)[before]
    assert message["recipients"] == ["bob@example.com", "carol@example.com"]
    assert message["data"].endswith(b"\r\n\r\n.\r\n..\r\n")
    wait_for_log(postfix, r"disconnect from [^\n]*\bmail=1 rcpt=2 bdat=1 ")


def test_binarymime_to_postfix_bounces_with_5_6_3(chain):
    # Postfix offers CHUNKING but not BINARYMIME: the message cannot go on,
    # and the sender gets a bounce, through Postfix, saying why.
    relay, postfix, hop = chain
    content = b"Subject: binary\r\nMessage-ID: <binary@client.test>\r\n\r\n\x00\x01\n\r\xff\r\n"
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.docmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")[0] == 250
        assert client.docmd("RCPT TO:<bob@example.com>")[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(content) + content)
        code, text = client.getreply()
        assert code == 250, text
    bounce = hop.wait_for(before + 1)[before]
    assert bounce["sender"] == "" and bounce["recipients"] == ["a@example.org"]
    text = b" ".join(bounce["data"].split())
    assert b"Status: 5.6.3" in text
    assert (b"Reason: the next mail server cannot take the message's 8-bit or binary content, "
            b"and the message could not be converted (status 5.6.3).") in text
    assert b"Message-ID: <binary@client.test>" in text
    assert re.search(r"to=<bob@example\.com>, .*dsn=5\.6\.3, status=bounced \(binary message "
                     r"\(BODY=BINARYMIME\), but 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ does not "
                     r"offer BINARYMIME: conversion required but not supported\)", relay.log())
