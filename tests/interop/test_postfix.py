"""Postfix upstream and downstream of relaymail, both real and private
(tests.postfix_server):

    Postfix sendmail -> upstream Postfix --STARTTLS, verified--> relaymail
      --STARTTLS, verified, AUTH (Dovecot SASL)--> downstream Postfix
      (submission port) -> capture server (tests.nexthop.NextHop)

with pipelined multi-recipient transactions on both legs, the bytes checked
at the capture server, and a recipient the downstream Postfix refuses
bounced by relaymail back to the upstream Postfix, which takes the bounce.
(DSN parameters passed through are the DSN work's, issue 11.)"""

import re
import smtplib
import ssl
import time

import pytest

from tests.certs import CertificateAuthority
from tests.dovecot import Dovecot
from tests.nexthop import NextHop
from tests.postfix_server import Postfix
from tests.relay_process import RelayProcess, free_port

# tests.dovecot gives its users this password.
SASL_USER, SASL_PASSWORD = "alice", "unused"


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority()


@pytest.fixture(scope="module")
def capture():
    server = NextHop()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dovecot():
    server = Dovecot(extra_config=(
        "auth_mechanisms = plain login\n"
        "service auth {\n  unix_listener auth-postfix {\n    mode = 0666\n  }\n}\n"))
    server.start()
    server.auth_socket = f"{server.root}/run/auth-postfix"
    yield server
    server.remove()


def write_pair(directory, name, pair):
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    key.chmod(0o600)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ca):
    directory = tmp_path_factory.mktemp("postfix-files")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "smarthost-password").write_text(SASL_PASSWORD + "\n")
    return directory


@pytest.fixture(scope="module")
def downstream(ca, files, dovecot, capture):
    cert, key = write_pair(files, "downstream", ca.issue("downstream.test", "127.0.0.1"))
    port = free_port()
    server = Postfix(
        main={
            "myhostname": "downstream.test",
            # Loopback is no trusted network here: relaying needs AUTH.
            "mynetworks": "192.0.2.1/32",
            "relayhost": f"[127.0.0.1]:{capture.port}",
            "debug_peer_list": "127.0.0.1",
        },
        services=[[
            f"127.0.0.1:{port} inet n - n - - smtpd",
            "-o syslog_name=postfix/submission",
            "-o smtpd_tls_security_level=encrypt",
            f"-o smtpd_tls_cert_file={cert}",
            f"-o smtpd_tls_key_file={key}",
            "-o smtpd_tls_auth_only=yes",
            # Logs each read of plaintext: shows what came in one write.
            "-o smtpd_tls_loglevel=4",
            "-o smtpd_sasl_auth_enable=yes",
            "-o smtpd_sasl_type=dovecot",
            f"-o smtpd_sasl_path={dovecot.auth_socket}",
            "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
            "-o { smtpd_recipient_restrictions = check_recipient_access "
            "inline:{ { refuse-me@example.net = 550 5.1.1 no such user here } }, permit }",
        ]])
    server.port = port
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca, files, downstream):
    workdir = tmp_path_factory.mktemp("postfix-relay")
    cert, key = write_pair(files, "relay", ca.issue("relay.test", "127.0.0.1"))
    upstream_smtpd = free_port()
    process = RelayProcess(workdir, {
        "relay": {"domains": "example.com"},
        "tls": {"certificate": cert, "private_key": key},
        "delivery": {"smarthost": f"[127.0.0.1]:{downstream.port}", "smarthost_tls": "verify",
                     "tls_ca_file": str(files / "ca.pem"), "smarthost_user": SASL_USER,
                     "smarthost_password_file": str(files / "smarthost-password"),
                     "connect_timeout": "2", "command_timeout": "10", "data_timeout": "10"},
        # Bounces for the upstream's senders go back to the upstream.
        "routes": {"upstream.test": f"[127.0.0.1]:{upstream_smtpd}"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    })
    process.upstream_smtpd = upstream_smtpd
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def upstream(files, relay, capture):
    relay_hop = f"[127.0.0.1]:{relay.port}"
    server = Postfix(
        main={
            "myhostname": "upstream.test",
            "relayhost": relay_hop,
            # Its own domain it takes in (the bounce) and passes to the capture.
            "relay_domains": "upstream.test",
            "transport_maps": f"inline:{{upstream.test=smtp:[127.0.0.1]:{capture.port}}}",
            "smtp_tls_CAfile": str(files / "ca.pem"),
            # Verified STARTTLS to relaymail, the certificate's name checked.
            "smtp_tls_policy_maps": f"inline:{{{relay_hop}=verify,match=relay.test}}",
            "smtp_tls_loglevel": "1",
            "debug_peer_list": "127.0.0.1",
        },
        services=[[f"127.0.0.1:{relay.upstream_smtpd} inet n - n - - smtpd"]])
    server.start()
    yield server
    server.remove()


def arrived(capture, marker, sender, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in list(capture.messages) if marker in m["data"] and m["sender"] == sender]
        if found:
            [message] = found
            return message
        time.sleep(0.05)
    raise AssertionError(f"no message from <{sender}> with {marker!r} reached the capture server")


def header_fields(data):
    """The header fields of ``data`` (each with its continuation lines)
    and the body."""
    head, body = data.split(b"\r\n\r\n", 1)
    return re.split(rb"\r\n(?![ \t])", head), body


def sent_commands(log, peer_port):
    """The commands a Postfix smtp client wrote to 127.0.0.1:``peer_port``
    and the replies it read, in order, from its debug_peer_list lines."""
    return re.findall(rf"postfix/smtp\[\d+\]: ([<>]) 127\.0\.0\.1\[127\.0\.0\.1\]:{peer_port}: (.*)", log)


def test_mail_from_postfix_through_relaymail_to_postfix(upstream, relay, downstream, capture):
    recipients = [f"user{i}@example.net" for i in range(6)] + ["zoe@example.com"]
    message = (b"From: App <app@upstream.test>\nTo: users@example.net\nSubject: through\n"
               b"X-Case: chain\n\nline one\n.dot line\n\xc3\xbcml\xc3\xa4ut\n")
    result = upstream.sendmail(["-f", "app@upstream.test", "-B", "8BITMIME", *recipients], message)
    assert result.returncode == 0, result.stderr
    arrival = arrived(capture, b"X-Case: chain\r\n", "app@upstream.test")
    assert sorted(arrival["recipients"]) == sorted(recipients)

    # Upstream: one pipelined transaction (RFC 2920) over verified TLS.
    log = upstream.wait_for_log(f"relay=127.0.0.1[127.0.0.1]:{relay.port}")
    assert re.search(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port}: "
                     r"TLSv1\.3", log), log
    dialogue = sent_commands(log, relay.port)
    mail = next(i for i, (_, line) in enumerate(dialogue)
                if line.startswith("MAIL FROM:<app@upstream.test> SIZE="))
    # MAIL, every RCPT and DATA (or, once relaymail offers CHUNKING, BDAT)
    # went out before the first reply was read.
    pipelined = dialogue[mail:mail + len(recipients) + 2]
    assert [way for way, _ in pipelined] == [">"] * (len(recipients) + 2), dialogue
    assert pipelined[-1][1] == "DATA" or pipelined[-1][1].startswith("BDAT "), dialogue
    [queue_id] = re.findall(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port}, .*status=sent "
                            r"\(250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\)", log)[:1]

    # Downstream: relaymail logged in through Dovecot over verified TLS.
    relay_log = relay.log()
    assert re.search(queue_id + rf": to=<user0@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{downstream.port}, tls=TLSv1\.3 \S+ verified, .*status=sent", relay_log), relay_log
    down_log = downstream.wait_for_log("sasl_username=alice")
    assert re.search(r"postfix/submission/smtpd\[\d+\]: \w+: client=unknown\[127\.0\.0\.1\], "
                     r"sasl_method=PLAIN, sasl_username=alice", down_log), down_log
    # relaymail pipelined too: MAIL and the seven RCPTs (and DATA) came in
    # one read, and Postfix answered them in one write.
    [mail_command] = re.findall(r"postfix/submission/smtpd\[\d+\]: < unknown\[127\.0\.0\.1\]: "
                                r"(MAIL FROM:<app@upstream\.test> .*)", down_log)[:1]
    commands = [mail_command] + [f"RCPT TO:<{r}>" for r in recipients]
    [read] = re.findall(r"Read (\d+) chars: MAIL FROM:<app@upstream\.test>", down_log)[:1]
    assert int(read) >= sum(len(command) + 2 for command in commands)
    replies = ["250 2.1.0 Ok"] + ["250 2.1.5 Ok"] * len(recipients)
    [written] = re.findall(r"Write (\d+) chars: 250 2\.1\.0 Ok\?\?250 2\.1\.5 Ok", down_log)[:1]
    assert int(written) >= sum(len(reply) + 2 for reply in replies)

    # At the far end: the downstream's Received, ours, the upstream's,
    # then what sendmail was given, in CRLF and with the fields Postfix's
    # cleanup added (Message-Id, Date).
    fields, body = header_fields(arrival["data"])
    assert fields[0].startswith(b"Received: from relay.test (unknown [127.0.0.1])\r\n\tby downstream.test "
                                b"(Postfix) with ESMTPSA id ")
    assert fields[1].startswith(b"Received: from upstream.test ([127.0.0.1])\r\n\tby relay.test "
                                b"(relaymail) with ESMTPS id " + queue_id.encode())
    assert fields[2].startswith(b"Received: by upstream.test (Postfix, from userid 0)")
    assert fields[3:7] == [b"From: App <app@upstream.test>", b"To: users@example.net",
                           b"Subject: through", b"X-Case: chain"]
    assert body == b"line one\r\n.dot line\r\n\xc3\xbcml\xc3\xa4ut\r\n"


def test_submission_port_of_the_downstream_requires_auth(downstream, ca, files):
    context = ssl.create_default_context(cafile=str(files / "ca.pem"))
    with smtplib.SMTP("127.0.0.1", downstream.port) as client:
        client.ehlo("probe.test")
        assert client.mail("a@example.org") == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=context)
        client.ehlo("probe.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.mail("a@example.org")
        assert client.rcpt("b@example.net") == (554, b"5.7.1 <b@example.net>: Recipient address rejected: Access denied")


def test_a_refused_recipient_bounces_back_to_the_upstream_postfix(upstream, relay, downstream, capture):
    message = b"From: app@upstream.test\nSubject: partly refused\nX-Case: refused\n\nhello\n"
    result = upstream.sendmail(["-f", "app@upstream.test", "refuse-me@example.net",
                                "fine@example.net"], message)
    assert result.returncode == 0, result.stderr
    delivered = arrived(capture, b"X-Case: refused\r\n", "app@upstream.test")
    assert delivered["recipients"] == ["fine@example.net"]
    # relaymail's bounce, taken in by the upstream Postfix's smtpd and
    # passed on to the capture server.
    bounce = arrived(capture, b"X-Case: refused\r\n", "")
    assert bounce["recipients"] == ["app@upstream.test"]
    assert b"Status: 5.1.1" in bounce["data"]
    assert b"Final-Recipient: rfc822; refuse-me@example.net" in bounce["data"]
    assert b"no such user here" in bounce["data"]
    log = upstream.log()
    assert re.search(r"postfix/smtpd\[\d+\]: \w+: client=unknown\[127\.0\.0\.1\]", log)
    assert re.search(r"postfix/qmgr\[\d+\]: (\w+): from=<>, size=\d+, nrcpt=1", log), log



def test_smtputf8_mail_through_the_postfix_chain(upstream, relay, downstream, capture):
    message = ("From: René <rené@upstream.test>\nTo: jürgen@example.net\nSubject: grüße\n"
               "X-Case: utf8 chain\n\nGrüße\n").encode()
    # Postfix detects the UTF-8 itself (smtputf8_autodetect_classes = sendmail).
    result = upstream.sendmail(["-f", "rené@upstream.test", "jürgen@example.net", "zoë@example.com"],
                               message)
    assert result.returncode == 0, result.stderr
    arrival = arrived(capture, b"X-Case: utf8 chain\r\n", "rené@upstream.test")
    assert sorted(arrival["recipients"]) == ["jürgen@example.net", "zoë@example.com"]
    assert "SMTPUTF8" in arrival["mail"].split()
    log = upstream.wait_for_log("to=<jürgen@example.net>, relay=127.0.0.1")
    assert re.search(rf"> 127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port}: MAIL FROM:<rené@upstream\.test> "
                     r"SIZE=\d+ SMTPUTF8", log)
    fields, body = header_fields(arrival["data"])
    # RFC 6531 3.7.3: the with-protocols of an SMTPUTF8 transaction.
    assert b"\tby downstream.test (Postfix) with UTF8SMTPSA id " in fields[0]
    assert b"\tby relay.test (relaymail) with UTF8SMTPS id " in fields[1]
    assert fields[3:7] == ["From: René <rené@upstream.test>".encode(), "To: jürgen@example.net".encode(),
                           "Subject: grüße".encode(), b"X-Case: utf8 chain"]
    assert body == "Grüße\r\n".encode()


def test_a_wrong_smarthost_password_defers_and_bounces_nothing(tmp_path, ca, files, downstream, capture):
    (tmp_path / "wrong-password").write_text("not the password\n")
    relay = RelayProcess(tmp_path, {
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{downstream.port}", "smarthost_tls": "verify",
                     "tls_ca_file": str(files / "ca.pem"), "smarthost_user": SASL_USER,
                     "smarthost_password_file": str(tmp_path / "wrong-password"),
                     "connect_timeout": "2", "command_timeout": "10", "data_timeout": "10"},
        "queue": {"min_backoff": "60", "max_backoff": "60"},
    }).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
            client.sendmail("app@example.org", ["x@example.net"], b"X-Case: wrong password\r\n\r\nx\r\n")
        deadline = time.monotonic() + 20
        while "status=deferred" not in relay.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = relay.log()
        queued = relay.queued_ids()
    finally:
        relay.stop()
    # Our side's problem (Postfix's smtp_sasl_auth_soft_bounce): retried,
    # never returned to the sender.
    assert re.search(r": to=<x@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=deferred "
                     r"\(.*535 5\.7\.8 Error: authentication failed", log), log
    assert len(queued) == 1
    assert not [m for m in capture.messages if b"X-Case: wrong password" in m["data"]]
    assert "SASL PLAIN authentication failed" in downstream.log()


def test_a_message_over_the_downstream_size_limit_bounces_to_the_upstream(upstream, relay, downstream,
                                                                          capture):
    # relaymail takes up to 10485760 octets, Postfix's message_size_limit
    # is 10240000, and its EHLO says so (SIZE, RFC 1870): relaymail bounces
    # without sending the message, as Postfix's smtp client does.
    content = b"X-Case: too big\r\nSubject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 10300
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        assert client.sendmail("big@upstream.test", ["x@example.net"], content) == {}
    bounce = arrived(capture, b"X-Case: too big\r\n", "")
    assert bounce["recipients"] == ["big@upstream.test"]
    assert b"Status: 5.3.4" in bounce["data"]
    assert b"Reason: the message is too big for the receiving system (status\r\n    5.3.4)." \
        in bounce["data"]
    assert not [m for m in capture.messages if m["sender"] == "big@upstream.test"]
    assert "MAIL FROM:<big@upstream.test>" not in downstream.log()
