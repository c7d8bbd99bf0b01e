"""What a message looks like at the far end: byte for byte what the client
sent, with only our Received: field added in front, for the contents that
break relays (8-bit text, 998-octet lines, lines with dots, an empty body,
no final CRLF, a 20 MiB attachment, 100 recipients over 5 domains and two
next hops), and the conversions RFC 6152 and RFC 6531 ask for towards a
next hop without 8BITMIME or SMTPUTF8.

The client side is a raw socket where the exact bytes on the wire matter
(smtplib would add its own CRLF), smtplib elsewhere; the far ends are
tests.nexthop.NextHop servers."""

import email
import email.message
import email.policy
import os
import smtplib
import socket
import time

import pytest

from tests.interop.contents import CONTENTS, HEADERS
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess

LEGACY = ("PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 100000000")
DOMAINS = ["d1.example", "d2.example", "d3.example", "d4.example", "d5.example"]


@pytest.fixture(scope="module")
def hops():
    full, second, legacy = NextHop(), NextHop(), NextHop(extensions=LEGACY)
    yield full, second, legacy
    for hop in (full, second, legacy):
        hop.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, hops):
    full, second, legacy = hops
    process = RelayProcess(tmp_path_factory.mktemp("far-end"), {
        "relay": {"domains": "example.com"},
        # Room for a 20 MiB attachment in base64.
        "limits": {"message_size": "64M"},
        "delivery": {"smarthost": f"[127.0.0.1]:{full.port}", "smarthost_tls": "none",
                     "connect_timeout": "2", "command_timeout": "10", "data_timeout": "20"},
        "routes": {"d4.example": f"[127.0.0.1]:{second.port}",
                   "d5.example": f"[127.0.0.1]:{second.port}",
                   "legacy.example": f"[127.0.0.1]:{legacy.port}"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    })
    process.start()
    yield process
    process.stop()


def arrivals(hop, marker, count=1, timeout=30):
    """The transactions ``hop`` took whose data holds ``marker``, once there
    are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in list(hop.messages) if marker in m["data"]]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} messages with {marker!r} arrived")
        time.sleep(0.05)


def without_received(data):
    """``data`` without its first header field, which must be our Received:."""
    assert data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relaymail)")
    end = data.index(b"\r\n")
    while data[end + 2:end + 3] in (b" ", b"\t"):
        end = data.index(b"\r\n", end + 2)
    return data[end + 2:]


def send_raw(relay, sender, recipients, content, mail_parameters=""):
    """One transaction on a socket, ``content`` dot-stuffed and sent as it
    is, then CRLF.CRLF; a ``content`` not ending in CRLF gets the CRLF that
    RFC 5321 4.1.1.4 says the client adds before the final dot."""
    with socket.create_connection(("127.0.0.1", relay.port), 10) as sock:
        stream = sock.makefile("rb")

        def reply():
            lines = [stream.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(stream.readline())
            return lines[-1]

        assert reply().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        assert reply().startswith(b"250 ")
        sock.sendall(f"MAIL FROM:<{sender}>{mail_parameters}\r\n".encode())
        assert reply().startswith(b"250 "), "MAIL"
        for recipient in recipients:
            sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
            assert reply().startswith(b"250 "), recipient
        sock.sendall(b"DATA\r\n")
        assert reply().startswith(b"354 ")
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                               for line in content.split(b"\r\n"))
        if not stuffed.endswith(b"\r\n") and stuffed:
            stuffed += b"\r\n"
        sock.sendall(stuffed + b".\r\n")
        final = reply()
        assert final.startswith(b"250 2.0.0 Ok: queued as "), final
        sock.sendall(b"QUIT\r\n")
        return final.split()[-1].decode()


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_content_arrives_byte_for_byte(relay, hops, name):
    content = CONTENTS[name].replace(b"Subject: ", f"X-Case: {name}\r\nSubject: ".encode(), 1)
    send_raw(relay, "a@example.org", ["b@example.net"], content,
             " BODY=8BITMIME" if name == "utf8_body" else "")
    [message] = arrivals(hops[0], f"X-Case: {name}\r\n".encode())
    assert without_received(message["data"]) == content
    assert message["recipients"] == ["b@example.net"]


def test_no_final_crlf_arrives_with_the_crlf_the_client_added(relay, hops):
    content = HEADERS + b"X-Case: no final crlf\r\n\r\nlast line without CRLF"
    send_raw(relay, "a@example.org", ["b@example.net"], content)
    [message] = arrivals(hops[0], b"X-Case: no final crlf\r\n")
    assert without_received(message["data"]) == content + b"\r\n"


def test_empty_message_arrives_as_just_our_received_field(relay, hops):
    queue_id = send_raw(relay, "empty@example.org", ["b@example.net"], b"")
    [message] = arrivals(hops[0], queue_id.encode())
    assert message["sender"] == "empty@example.org"
    assert without_received(message["data"]) == b""


def test_20_mib_attachment_arrives_byte_for_byte(relay, hops):
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = "a@example.org"
    message["To"] = "b@example.net"
    message["Subject"] = "twenty MiB"
    message["X-Case"] = "attachment"
    message.set_content("See the attachment.\n")
    payload = os.urandom(20 * 1024 * 1024)
    message.add_attachment(payload, maintype="application", subtype="octet-stream",
                           filename="big.bin")
    content = message.as_bytes()
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test", timeout=60) as client:
        assert client.sendmail("a@example.org", ["b@example.net"], content) == {}
    [arrived] = arrivals(hops[0], b"X-Case: attachment\r\n", timeout=50)
    assert without_received(arrived["data"]) == content
    parsed = email.message_from_bytes(arrived["data"], policy=email.policy.default)
    [attachment] = parsed.iter_attachments()
    assert attachment.get_content() == payload


def test_100_recipients_over_5_domains_and_2_next_hops(relay, hops):
    full, second, _ = hops
    recipients = [f"user{i:02d}@{DOMAINS[i % 5]}" for i in range(100)]
    content = HEADERS + b"X-Case: hundred\r\nSubject: 100 recipients\r\n\r\nto many\r\n"
    send_raw(relay, "a@example.org", recipients, content)
    first = arrivals(full, b"X-Case: hundred\r\n")
    deadline = time.monotonic() + 20
    while True:
        got = {hop: [r for m in arrivals(hop, b"X-Case: hundred\r\n") for r in m["recipients"]]
               for hop in (full, second)}
        if sum(len(r) for r in got.values()) >= 100 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # d1-d3 through the smarthost, d4 and d5 through their route.
    assert sorted(got[full]) == sorted(r for r in recipients if r.split("@")[1] in DOMAINS[:3])
    assert sorted(got[second]) == sorted(r for r in recipients if r.split("@")[1] in DOMAINS[3:])
    for message in first + arrivals(second, b"X-Case: hundred\r\n"):
        assert without_received(message["data"]) == content


def test_smtputf8_addresses_to_a_next_hop_with_smtputf8(relay, hops):
    content = "From: rené@exämple.org\r\nTo: jürgen@d1.example\r\nX-Case: utf8 addresses\r\n" \
              "Subject: grüße\r\n\r\nGrüße\r\n".encode()
    send_raw(relay, "rené@exämple.org", ["jürgen@d1.example"], content, " SMTPUTF8 BODY=8BITMIME")
    [message] = arrivals(hops[0], b"X-Case: utf8 addresses\r\n")
    assert message["mail"].startswith("MAIL FROM:<rené@exämple.org> ")
    assert "SMTPUTF8" in message["mail"].split()
    assert message["recipients"] == ["jürgen@d1.example"]
    assert without_received(message["data"]) == content


def test_ascii_mail_in_an_smtputf8_transaction_to_a_next_hop_without_it(relay, hops):
    content = HEADERS + b"X-Case: ascii smtputf8\r\nSubject: plain\r\n\r\nplain\r\n"
    send_raw(relay, "a@example.org", ["b@legacy.example"], content, " SMTPUTF8")
    [message] = arrivals(hops[2], b"X-Case: ascii smtputf8\r\n")
    # Nothing needed SMTPUTF8, so it is dropped (RFC 6531 3.4).
    assert message["mail"] == "MAIL FROM:<a@example.org> SIZE=" + message["mail"].split("SIZE=")[1]
    assert "SMTPUTF8" not in message["mail"]
    assert without_received(message["data"]) == content


def test_utf8_recipient_to_a_next_hop_without_smtputf8_bounces_5_6_7(relay, hops):
    content = HEADERS + b"X-Case: utf8 recipient legacy\r\nSubject: x\r\n\r\nx\r\n"
    queue_id = send_raw(relay, "sender@example.org", ["jürgen@legacy.example"], content,
                        " SMTPUTF8")
    # The bounce goes to the sender, through the smarthost.
    [bounce] = arrivals(hops[0], queue_id.encode())
    assert bounce["sender"] == ""
    assert bounce["recipients"] == ["sender@example.org"]
    assert b"Status: 5.6.7" in bounce["data"]
    assert not arrivals_now(hops[2], b"X-Case: utf8 recipient legacy")


def arrivals_now(hop, marker):
    return [m for m in list(hop.messages) if marker in m["data"]]


def test_8bit_mail_to_a_next_hop_without_8bitmime_is_quoted_printable(relay, hops):
    text = "Grüße aus Köln, ça va? 日本語\r\nzweite Zeile = gleich\r\n"
    content = (b"From: a@example.org\r\nTo: b@legacy.example\r\nX-Case: 8bit legacy\r\n"
               b"Subject: 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.encode())
    send_raw(relay, "a@example.org", ["b@legacy.example"], content, " BODY=8BITMIME")
    [message] = arrivals(hops[2], b"X-Case: 8bit legacy\r\n")
    data = without_received(message["data"])
    # RFC 6152 3: not one 8-bit octet to a server that did not offer 8BITMIME.
    assert max(data) < 0x80
    assert "BODY=" not in message["mail"]
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in data
    assert data.split(b"\r\n\r\n", 1)[1] == (
        b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, =C3=A7a va? =E6=97=A5=E6=9C=AC=E8=AA=9E\r\n"
        b"zweite Zeile =3D gleich\r\n")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n") == text.replace("\r\n", "\n")
    assert parsed["Subject"] == "8bit"
