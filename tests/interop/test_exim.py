"""Exim as relaymail's downstream (its smarthost), relaying on to a capture
server: SMTPUTF8 and 8-bit mail pass through it, a pipelined
multi-recipient transaction, STARTTLS with Exim's certificate verified, and
a recipient Exim refuses bounced by relaymail, and mail sent to it by BDAT
(Exim offers CHUNKING).  The contents below go by BDAT too."""

import re
import smtplib
import time

import pytest

from relaymail.auth import passwords
from tests.certs import CertificateAuthority
from tests.interop.exim import Exim
from tests.interop.contents import CONTENTS
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess, free_port


@pytest.fixture(scope="module")
def capture():
    server = NextHop()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exim(capture):
    ca = CertificateAuthority()
    server = Exim(capture.port, certificate=ca.issue("exim.test", "127.0.0.1"))
    server.ca = ca
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, exim):
    workdir = tmp_path_factory.mktemp("exim")
    (workdir / "ca.pem").write_bytes(exim.ca.cert_pem)
    process = RelayProcess(workdir, {
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{exim.port}", "smarthost_tls": "verify",
                     "tls_ca_file": str(workdir / "ca.pem"), "connect_timeout": "2",
                     "command_timeout": "10", "data_timeout": "10"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    })
    process.start()
    yield process
    process.stop()


def send(relay, sender, recipients, content, options=()):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        refused = client.sendmail(sender, recipients, content, mail_options=list(options))
        assert refused == {}
        return client


def arrived(capture, marker, sender=None, timeout=30):
    """The one message with ``marker`` in its data (and from ``sender``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in list(capture.messages)
                 if marker in m["data"] and sender in (None, m["sender"])]
        if found:
            [message] = found
            return message
        time.sleep(0.05)
    raise AssertionError(f"no message with {marker!r} reached the capture server")


def fields(data, count):
    """``data`` split after its first ``count`` header fields."""
    head, position = [], 0
    for _ in range(count):
        end = data.index(b"\r\n", position)
        while data[end + 2:end + 3] in (b" ", b"\t"):
            end = data.index(b"\r\n", end + 2)
        head.append(data[position:end + 2])
        position = end + 2
    return head, data[position:]


def test_smtputf8_mail_through_exim_arrives_whole(relay, exim, capture):
    content = ("From: rené@exämple.org\r\nTo: jürgen@example.net\r\nX-Case: exim utf8\r\n"
               "Subject: grüße\r\n\r\nGrüße aus Köln\r\n").encode()
    send(relay, "rené@exämple.org", ["jürgen@example.net", "zoë@example.com"], content,
         ["SMTPUTF8", "BODY=8BITMIME"])
    message = arrived(capture, b"X-Case: exim utf8\r\n")
    # Exim took it as an SMTPUTF8 transaction over TLS (utf8esmtps), and
    # passed SMTPUTF8 on.
    log = exim.wait_for_log("<= rené@exämple.org")
    assert re.search(r"<= rené@exämple\.org H=\(relay\.test\) \[127\.0\.0\.1\] .*P=utf8esmtps ", log)
    assert "SMTPUTF8" in message["mail"].split()
    assert sorted(message["recipients"]) == ["jürgen@example.net", "zoë@example.com"]
    (exims, ours), rest = fields(message["data"], 2)
    assert exims.startswith(b"Received: from [127.0.0.1] (helo=relay.test)\r\n\tby exim.test "
                            b"with utf8esmtps")
    assert ours.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (relaymail)")
    assert rest == content


def test_pipelined_transaction_with_many_recipients(relay, exim, capture):
    recipients = [f"user{i}@d{i % 3}.example" for i in range(30)]
    content = b"From: a@example.org\r\nX-Case: exim many\r\nSubject: many\r\n\r\n.dot\r\nbody\r\n"
    send(relay, "many@example.org", recipients, content)
    message = arrived(capture, b"X-Case: exim many\r\n")
    assert sorted(message["recipients"]) == sorted(recipients)
    assert fields(message["data"], 2)[1] == content
    # L. on Exim's <= line: the client pipelined its commands (RFC 2920).
    log = exim.wait_for_log("<= many@example.org")
    [line] = [line for line in log.splitlines() if "<= many@example.org" in line]
    assert " L. " in line, line
    assert re.search(r" X=TLS1\.3:", line), line


def test_a_recipient_exim_refuses_bounces_to_the_sender(relay, exim, capture):
    content = b"From: a@example.org\r\nX-Case: exim refused\r\nSubject: refused\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.sendmail("bounced@example.org", ["refuse-me@example.net", "fine@example.net"], content)
    message = arrived(capture, b"X-Case: exim refused\r\n", sender="bounced@example.org")
    assert message["recipients"] == ["fine@example.net"]
    bounce = arrived(capture, b"X-Case: exim refused\r\n", sender="")
    assert bounce["sender"] == ""
    assert bounce["recipients"] == ["bounced@example.org"]
    assert b"Status: 5.1.1" in bounce["data"]
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <refuse-me@example.net>: no such user here" \
        in bounce["data"]


def test_exim_upstream_logs_in_to_the_submission_port(tmp_path):
    """Exim as relaymail's upstream, authenticating on the submission
    port: its smtp transport sends MAIL with AUTH=sender (RFC 4954 5),
    which relaymail once refused with 555, and Exim bounced the mail."""
    ca = CertificateAuthority()
    pair = ca.issue("relay.test", "127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    passwords.set_password(str(tmp_path / "passwd"), "exim", "its password")
    submission = free_port()
    relay = RelayProcess(tmp_path, {
        # Loopback is an outsider: only a login lets Exim relay.
        "server": {"trusted_networks": "192.0.2.0/24",
                   "submission_listen": f"tcp:{submission}:interface=127.0.0.1"},
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(tmp_path / "cert.pem"), "private_key": str(tmp_path / "key.pem")},
        "auth": {"passwords": str(tmp_path / "passwd"), "failure_delay": "0.05"},
    }).start()
    upstream = Exim(submission, client_auth=("exim", "its password"), client_ca=ca.cert_pem)
    try:
        upstream.start()
        content = b"From: app@example.org\r\nX-Case: exim upstream\r\nSubject: up\r\n\r\nhi\r\n"
        with smtplib.SMTP("127.0.0.1", upstream.port, local_hostname="app.test") as client:
            assert client.sendmail("app@example.org", ["someone@example.net"], content) == {}
        log = upstream.wait_for_log("=> someone@example.net")
        [line] = [line for line in log.splitlines() if "=> someone@example.net" in line]
        assert re.search(r" X=TLS1\.3:\S+ CV=yes A=plain_client ", line), line
        [queue_id] = re.findall(r'C="250 2\.0\.0 Ok: queued as ([0-9A-Z]+)"', line)
        stored = relay.message(queue_id)
        international = ("From: rené@exämple.org\r\nX-Case: exim upstream utf8\r\n"
                         "Subject: grüße\r\n\r\nGrüße\r\n").encode()
        with smtplib.SMTP("127.0.0.1", upstream.port, local_hostname="app.test") as client:
            assert client.sendmail("rené@exämple.org", ["jürgen@example.net"], international,
                                   mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
        log = upstream.wait_for_log("=> jürgen@example.net")
        [line] = [line for line in log.splitlines() if "=> jürgen@example.net" in line]
        [utf8_id] = re.findall(r'C="250 2\.0\.0 Ok: queued as ([0-9A-Z]+)"', line)
        utf8_stored = relay.message(utf8_id)
        relay_log = relay.log()
        # Exim waits for the server to close after QUIT's 221 (RFC 5321
        # 4.1.1.10); relaymail once sent no close_notify and did not close,
        # and Exim logged "TLS error on connection (recv)" for each message.
        assert "TLS error" not in upstream.mainlog(), upstream.mainlog()
    finally:
        upstream.remove()
        relay.stop()
    assert re.search(queue_id + r": queued from=<app@example\.org> to=<someone@example\.net> .* auth=exim ",
                     relay_log), relay_log
    assert b"(relaymail) with ESMTPSA id " + queue_id.encode() in stored
    assert stored.endswith(b"\r\n\r\nhi\r\n")
    # Exim passed SMTPUTF8 on; relaymail took it as an SMTPUTF8 transaction.
    assert b"(relaymail) with UTF8SMTPSA id " + utf8_id.encode() in utf8_stored
    assert utf8_stored.endswith(international)


@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_contents_through_exim_byte_for_byte(relay, exim, capture, name):
    content = CONTENTS[name].replace(b"Subject: ", f"X-Case: exim {name}\r\nSubject: ".encode(), 1)
    send(relay, "bytes@example.org", ["b@example.net"], content,
         ["BODY=8BITMIME"] if name == "utf8_body" else [])
    message = arrived(capture, f"X-Case: exim {name}\r\n".encode(), sender="bytes@example.org")
    # Exim's Received, ours, then the content as the client sent it; Exim
    # ends a header section that had no body with the empty line.
    expected = content + b"\r\n" if name == "headers_only" else content
    assert fields(message["data"], 2)[1] == expected


def test_mail_reaches_exim_by_bdat(relay, exim, capture):
    # Exim offers CHUNKING, so relaymail sends the message in BDAT chunks
    # (a 2.5 MB one in three).  Exim's "<=" line says K for a message that
    # came by BDAT.
    line = b"." + b"k" * 97 + b"\r\n"
    content = b"Subject: chunked to exim\r\nMessage-ID: <bdat@exim.test>\r\n\r\n" + line * 25_000
    send(relay, "alice@example.org", ["bob@example.net"], content)
    message = arrived(capture, b"<bdat@exim.test>")
    assert message["data"].endswith(b"\r\n\r\n" + line * 25_000)
    log = exim.wait_for_log("id=bdat@exim.test")
    assert re.search(r"<= alice@example\.org H=\(relay\.test\) .* K S=\d+ id=bdat@exim\.test ", log), log
