"""swaks against the real relay: plain, pipelined, STARTTLS, AUTH PLAIN and
LOGIN, implicit TLS, and a refused relay."""

import subprocess

import pytest

from tests.interop.peers import PASSWORD, USER, queued_ids, tool
from tests.relay_process import RelayProcess


def swaks(*args):
    result = subprocess.run([tool("swaks"), "--helo", "swaks.test", *args],
                            capture_output=True, text=True, timeout=30)
    return result


def queued(relay, result):
    assert result.returncode == 0, result.stdout + result.stderr
    [queue_id] = queued_ids(result.stdout)
    return relay.message(queue_id)


def test_swaks_with_pipelining(relay):
    result = swaks("--server", f"127.0.0.1:{relay.port}", "--pipeline",
                   "--from", "sender@example.org", "--to", "alice@example.com,bob@example.net",
                   "--header", "Subject: from swaks", "--body", "line one\n.dotted line\n")
    # swaks sends MAIL, both RCPTs and DATA in one write, as RFC 2920 allows.
    assert "-> MAIL FROM:<sender@example.org>\n -> RCPT TO:<alice@example.com>\n" \
           " -> RCPT TO:<bob@example.net>\n -> DATA\n" in result.stdout
    message = queued(relay, result)
    assert b"\r\nSubject: from swaks\r\n" in message
    # swaks ends its body with an empty line of its own.
    assert message.endswith(b"\r\n\r\nline one\r\n.dotted line\r\n\r\n\r\n")
    assert message.startswith(b"Received: from swaks.test ([127.0.0.1])\r\n")
    assert b"with ESMTP id " in message


def test_swaks_plain_without_pipelining(relay):
    result = swaks("--server", f"127.0.0.1:{relay.port}", "--from", "sender@example.org",
                   "--to", "bob@example.com", "--body", "plain\n")
    assert "<-  250 2.1.0 Ok" in result.stdout
    assert "<-  250 2.1.5 Ok" in result.stdout
    assert "<-  354 End data with <CR><LF>.<CR><LF>" in result.stdout
    message = queued(relay, result)
    assert message.endswith(b"\r\n\r\nplain\r\n\r\n\r\n")


def test_swaks_starttls_verifies_the_certificate(relay, ca_file):
    result = swaks("--server", f"127.0.0.1:{relay.port}", "--tls", "--tls-verify",
                   "--tls-ca-path", ca_file, "--from", "sender@example.org",
                   "--to", "bob@example.com", "--body", "over tls\n")
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "=== TLS started with cipher TLSv1.3" in result.stdout
    message = queued(relay, result)
    assert b"with ESMTPS id " in message


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_on_the_submission_port(relay, ca_file, mechanism):
    result = swaks("--server", f"127.0.0.1:{relay.submission_port}", "--tls", "--tls-verify",
                   "--tls-ca-path", ca_file, "--auth", mechanism, "--auth-user", USER,
                   "--auth-password", PASSWORD, "--from", "alice@example.org",
                   "--to", "someone@example.net", "--body", f"auth {mechanism}\n")
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    message = queued(relay, result)
    assert b"with ESMTPSA id " in message
    assert PASSWORD not in relay.log()


def test_swaks_submission_port_refuses_mail_before_auth(relay, ca_file):
    result = swaks("--server", f"127.0.0.1:{relay.submission_port}", "--tls",
                   "--tls-ca-path", ca_file, "--from", "alice@example.org",
                   "--to", "someone@example.net")
    # swaks exits 23 when MAIL is refused.
    assert result.returncode == 23, result.stdout
    assert "<~* 530 5.7.0 Authentication required" in result.stdout


def test_swaks_wrong_password_is_535(relay, ca_file):
    result = swaks("--server", f"127.0.0.1:{relay.submission_port}", "--tls",
                   "--tls-ca-path", ca_file, "--auth", "PLAIN", "--auth-user", USER,
                   "--auth-password", "wrong", "--from", "alice@example.org",
                   "--to", "someone@example.net")
    # swaks exits 28 when AUTH fails.
    assert result.returncode == 28, result.stdout
    assert "<~* 535 5.7.8 Error: authentication failed" in result.stdout


def test_swaks_tls_on_connect(relay, ca_file):
    result = swaks("--server", f"127.0.0.1:{relay.implicit_port}", "--tls-on-connect",
                   "--tls-verify", "--tls-ca-path", ca_file, "--auth", "LOGIN",
                   "--auth-user", USER, "--auth-password", PASSWORD, "--from", "alice@example.org",
                   "--to", "someone@example.net", "--body", "implicit tls\n")
    assert "=== TLS started with cipher TLSv1.3" in result.stdout
    # No STARTTLS on a session that is TLS from the first byte.
    assert "STARTTLS" not in result.stdout
    message = queued(relay, result)
    assert b"with ESMTPSA id " in message
    assert message.endswith(b"\r\n\r\nimplicit tls\r\n\r\n\r\n")


def test_swaks_sees_relay_denied_from_outside_trusted_networks(tmp_path):
    relay = RelayProcess(tmp_path, {
        "server": {"trusted_networks": "192.0.2.0/24"},
        "relay": {"domains": "example.com"},
    }).start()
    try:
        result = swaks("--server", f"127.0.0.1:{relay.port}", "--from", "a@example.org",
                       "--to", "victim@example.net")
    finally:
        relay.stop()
    # swaks exits 24 when the recipient is refused.
    assert result.returncode == 24
    assert "<** 554 5.7.1 Relay access denied" in result.stdout
