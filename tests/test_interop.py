"""Real mail clients against the real relay: swaks and msmtp.

Both are Debian packages that .ci/run installs; a missing one fails here
rather than skipping, so a green run means they really ran.
"""

import re
import shutil
import subprocess

import pytest

from tests.relay_process import RelayProcess


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    process = RelayProcess(tmp_path_factory.mktemp("interop"), {
        "relay": {"domains": "example.com"},
    }).start()
    yield process
    process.stop()


def tool(name):
    path = shutil.which(name)
    assert path, f"{name} is not installed: .ci/run installs it with apt-get"
    return path


def queued_ids(output):
    return re.findall(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)", output)


def test_swaks_with_pipelining(relay):
    result = subprocess.run(
        [tool("swaks"), "--server", f"127.0.0.1:{relay.port}", "--pipeline", "--helo", "swaks.test",
         "--from", "sender@example.org", "--to", "alice@example.com,bob@example.net",
         "--header", "Subject: from swaks", "--body", "line one\n.dotted line\n"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    [queue_id] = queued_ids(result.stdout)
    message = relay.message(queue_id)
    assert b"\r\nSubject: from swaks\r\n" in message
    # swaks ends its body with an empty line of its own.
    assert message.endswith(b"\r\n\r\nline one\r\n.dotted line\r\n\r\n\r\n")
    assert message.startswith(b"Received: from swaks.test ([127.0.0.1])\r\n")


def test_swaks_sees_relay_denied_from_outside_trusted_networks(tmp_path):
    relay = RelayProcess(tmp_path, {
        "server": {"trusted_networks": "192.0.2.0/24"},
        "relay": {"domains": "example.com"},
    }).start()
    try:
        result = subprocess.run(
            [tool("swaks"), "--server", f"127.0.0.1:{relay.port}", "--from", "a@example.org",
             "--to", "victim@example.net"], capture_output=True, text=True, timeout=30)
    finally:
        relay.stop()
    # swaks exits 24 when the recipient is refused.
    assert result.returncode == 24
    assert "<** 554 5.7.1 Relay access denied" in result.stdout


def test_msmtp_sends_a_message(relay):
    before = set(relay.active_files())
    message = b"From: a@example.org\nTo: bob@example.com\nSubject: from msmtp\n\nhello from msmtp\n"
    result = subprocess.run(
        [tool("msmtp"), "--host=127.0.0.1", f"--port={relay.port}", "--auth=off", "--tls=off",
         "--domain=msmtp.test", "--from=a@example.org", "bob@example.com"],
        input=message, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    new = sorted(set(relay.active_files()) - before)
    assert len(new) == 2   # one .json and one .msg
    queue_id = new[0].split(".")[0]
    stored = relay.message(queue_id)
    assert stored.startswith(b"Received: from msmtp.test ([127.0.0.1])\r\n")
    assert stored.endswith(b"Subject: from msmtp\r\n\r\nhello from msmtp\r\n")
