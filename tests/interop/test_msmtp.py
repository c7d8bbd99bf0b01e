"""msmtp against the real relay: plain, and submission with STARTTLS and
AUTH (the certificate verified against the test CA)."""

import subprocess

from tests.interop.peers import PASSWORD, USER, tool

MESSAGE = b"From: a@example.org\nTo: bob@example.com\nSubject: from msmtp\n\nhello from msmtp\n"


def msmtp(relay, *args, recipient="bob@example.com"):
    before = set(relay.queued_ids())
    result = subprocess.run([tool("msmtp"), "--host=127.0.0.1", "--domain=msmtp.test",
                             "--from=a@example.org", *args, recipient],
                            input=MESSAGE, capture_output=True, timeout=30)
    new = sorted(set(relay.queued_ids()) - before)
    return result, new


def test_msmtp_sends_a_message(relay):
    result, new = msmtp(relay, f"--port={relay.port}", "--auth=off", "--tls=off")
    assert result.returncode == 0, result.stderr
    assert len(new) == 1
    stored = relay.message(new[0])
    assert stored.startswith(b"Received: from msmtp.test ([127.0.0.1])\r\n")
    assert stored.endswith(b"Subject: from msmtp\r\n\r\nhello from msmtp\r\n")


def test_msmtp_submission_with_starttls_and_auth(relay, ca_file):
    result, new = msmtp(relay, f"--port={relay.submission_port}", "--tls=on",
                        "--tls-starttls=on", f"--tls-trust-file={ca_file}", "--auth=plain",
                        f"--user={USER}", f"--passwordeval=echo {PASSWORD}",
                        recipient="someone@example.net")
    assert result.returncode == 0, result.stderr
    assert len(new) == 1
    stored = relay.message(new[0])
    assert b"\tby relay.test (relaymail) with ESMTPSA id " in stored
    assert stored.endswith(b"Subject: from msmtp\r\n\r\nhello from msmtp\r\n")


def test_msmtp_with_a_wrong_password_gets_535(relay, ca_file):
    result, new = msmtp(relay, f"--port={relay.submission_port}", "--tls=on",
                        "--tls-starttls=on", f"--tls-trust-file={ca_file}", "--auth=login",
                        f"--user={USER}", "--passwordeval=echo wrong",
                        recipient="someone@example.net")
    # msmtp's EX_NOPERM: the server refused the credentials.
    assert result.returncode == 77, result.stderr
    assert b"535 5.7.8 Error: authentication failed" in result.stderr
    assert new == []
