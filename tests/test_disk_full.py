"""The relay (twistd, real sockets) with its spool on a small real file system
that fills up: MAIL is refused with 452 4.3.1 before any upload, a disk that
fills during an upload gets 451 4.3.0 with one log line and nothing left in
tmp/, and mail that got 250 stays queued, whole.

The file system is a tmpfs of a few MiB, mounted by the test: the tests run
as root (here and in CI), so a missing mount is a failure, not a skip.
"""

import errno
import json
import os
import re
import socket
import subprocess

import pytest

from tests.relay_process import RelayProcess

MiB = 1024 * 1024
STORAGE = b"452 4.3.1 Insufficient system storage\r\n"
LOCAL_ERROR = b"451 4.3.0 Error: local error in processing, try again later\r\n"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n")


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail("these tests mount a small tmpfs and need root and mount(8): "
                    f"mount -t tmpfs failed ({mounted.returncode}): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def silent_next_hop():
    """A next hop that takes the connection and never says a word, so
    delivery attempts wait (and write nothing to the spool) for the whole
    test."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def relay(tmp_path, small_disk, silent_next_hop):
    spool = small_disk / "spool"
    # message_size 2 MiB: [queue] min_free is left to its default, 3 MiB.
    process = RelayProcess(tmp_path, {
        "relay": {"domains": "example.com"},
        "queue": {"path": str(spool)},
        "limits": {"message_size": "2M"},
        "delivery": {"smarthost": f"[127.0.0.1]:{silent_next_hop}"},
    })
    process.spool = str(spool)
    process.start()
    yield process
    # Room again before the relay stops, so what it writes then succeeds.
    Filler(small_disk).remove()
    process.stop()


class Filler:
    """One big file beside the spool that leaves a chosen amount free."""

    def __init__(self, mount_point):
        self.mount_point = str(mount_point)
        self.path = os.path.join(self.mount_point, "filler")

    def free(self):
        stats = os.statvfs(self.mount_point)
        return stats.f_bavail * stats.f_frsize

    def leave(self, free):
        """Grow or shrink the filler until ``free`` bytes are left (to the
        file system's page); 0 fills the disk until it refuses."""
        self.remove()
        size = max(self.free() - free, 0)
        # Unbuffered, so the disk's refusal comes from write(), not close().
        with open(self.path, "wb", buffering=0) as f:
            chunk = b"\0" * MiB
            while size > 0:
                size -= f.write(chunk[:min(size, MiB)])
            if free == 0:
                with pytest.raises(OSError) as refused:
                    while True:
                        f.write(chunk[:4096])
                assert refused.value.errno == errno.ENOSPC
        assert abs(self.free() - free) <= 4096, (self.free(), free)

    def remove(self):
        if os.path.exists(self.path):
            os.unlink(self.path)


class Client:
    """One SMTP session, a command and its reply at a time."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), 15)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def reply(self):
        lines = [self.file.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.file.readline())
        return b"".join(lines)

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, data):
        self.sock.sendall(data)
        return self.reply()

    def start_data(self):
        assert self.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
        assert self.command(b"RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
        assert self.command(b"DATA").startswith(b"354 ")

    def close(self):
        assert self.command(b"QUIT").startswith(b"221 ")
        self.sock.close()


def body(size):
    line = b"x" * 78 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line)) + b".\r\n"


def queue_one(client, text):
    client.start_data()
    queue_id = QUEUED.fullmatch(client.send(b"Subject: " + text + b"\r\n\r\n" + text + b"\r\n.\r\n")).group(1)
    return queue_id.decode()


def queued_files(relay):
    """Every file in active/ with its bytes (records parsed)."""
    found = {}
    for name in relay.active_files():
        with open(os.path.join(relay.spool, "active", name), "rb") as f:
            data = f.read()
        found[name] = json.loads(data) if name.endswith(".json") else data
    return found


def log_lines(relay, word):
    return [line for line in relay.log().splitlines() if word in line]


def test_mail_is_refused_before_the_upload_when_the_spool_is_short_of_space(relay, small_disk):
    filler = Filler(small_disk)
    client = Client(relay.port)
    assert client.command(b"EHLO client.test").startswith(b"250-")
    before = [queue_one(client, b"first"), queue_one(client, b"second")]
    kept = queued_files(relay)
    assert sorted(kept) == sorted(f"{i}.msg" for i in before)

    # Under min_free (1.5 x message_size = 3 MiB): refused at MAIL, the
    # session goes on in step.
    filler.leave(2 * MiB)
    assert client.command(b"MAIL FROM:<a@example.org>") == STORAGE
    assert client.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert client.command(b"NOOP") == b"250 2.0.0 Ok\r\n"

    # Above it, but not with room for what the client says it will send.
    filler.leave(4 * MiB + MiB // 2)
    assert client.command(b"MAIL FROM:<a@example.org> SIZE=2000000") == STORAGE
    assert client.command(b"MAIL FROM:<a@example.org> SIZE=1000000") == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RSET") == b"250 2.0.0 Ok\r\n"
    assert client.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RSET") == b"250 2.0.0 Ok\r\n"

    # Space freed: mail is taken at once, nothing cached the refusal.
    filler.leave(2 * MiB)
    assert client.command(b"MAIL FROM:<a@example.org>") == STORAGE
    filler.remove()
    after = queue_one(client, b"third")
    client.close()

    log = relay.log()
    assert "Traceback" not in log and "#critical" not in log
    refusals = log_lines(relay, "Insufficient system storage")
    assert len(refusals) == 3
    assert re.search(
        r"\] [A-Z2-7]{8} unknown\[127\.0\.0\.1\]:\d+: mail from=<a@example\.org> size=0: 452 "
        r"4\.3\.1 Insufficient system storage: the queue's file system has less than \[queue\] "
        r"min_free=3145728 bytes to spare$", refusals[0]), refusals[0]
    assert "size=2000000: 452 4.3.1" in refusals[1]
    # What got 250 is all there, byte for byte.
    now = queued_files(relay)
    assert {name: now[name] for name in kept} == kept
    assert sorted(now) == sorted(list(kept) + [after + ".msg"])


def test_a_disk_that_fills_during_an_upload_is_451_with_one_line_and_nothing_left(relay, small_disk):
    filler = Filler(small_disk)
    client = Client(relay.port)
    assert client.command(b"EHLO client.test").startswith(b"250-")
    kept_id = queue_one(client, b"kept")
    kept = queued_files(relay)

    # MAIL found room; then something else filled the disk during the
    # upload, which runs into ENOSPC half way.
    client.start_data()
    filler.leave(MiB)
    assert client.send(body(int(1.8 * MiB))) == LOCAL_ERROR
    assert client.command(b"NOOP") == b"250 2.0.0 Ok\r\n"

    # Full to the last page: the body fits in the write buffer and the
    # disk refuses it only at commit, when it is flushed.
    filler.remove()
    client.start_data()
    filler.leave(0)
    assert client.send(b"Subject: small\r\n\r\nsmall\r\n.\r\n") == LOCAL_ERROR
    assert client.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    client.close()

    log = relay.log()
    assert "Traceback" not in log and "#critical" not in log
    assert len(log_lines(relay, "451 ")) == 2
    [at_commit] = log_lines(relay, "not queued")
    assert re.search(r"unknown\[127\.0\.0\.1\]:\d+: message ", at_commit) and "No space left on device" in at_commit
    # The one refused during the upload says why, too.
    [midway] = log_lines(relay, "refused: 451 ")
    assert midway.endswith(" refused: 451 4.3.0 Error: local error in processing, "
                           "try again later (No space left on device)"), midway
    assert os.listdir(os.path.join(relay.spool, "tmp")) == []
    assert queued_files(relay) == kept and kept_id + ".msg" in kept
