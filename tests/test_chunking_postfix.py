"""BDAT against a real Postfix (Debian's postfix; its smtpd offers CHUNKING
since 3.4): relaymail's smarthost is a private Postfix on loopback, which
relays on to a NextHop, so the test sees what Postfix received.

The Postfix starter here is minimal on purpose (its own config_directory,
queue_directory and data_directory in a temporary directory, smtpd on a
free 127.0.0.1 port, ``relayhost`` to the NextHop, a log file of its own);
tests/postfix_server.py, written for the DSN tests, is meant to replace it
once both are merged.
"""

import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time

import pytest

from tests.nexthop import NextHop
from tests.relay_process import RelayProcess, free_port

POSTFIX = "/usr/sbin/postfix"

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtpd_relay_restrictions = permit_mynetworks, reject
message_size_limit = {size_limit}
"""

# Only the services a relaying smtpd needs, none chrooted (the private
# queue directory has no chroot set-up).
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
showq     unix  n       -       n       -       -       showq
"""


class Postfix:
    """A private Postfix whose smtpd listens on 127.0.0.1:``port`` and
    relays everything from loopback to 127.0.0.1:``relay_port``."""

    def __init__(self, relay_port, size_limit=50_000_000):
        if not os.path.exists(POSTFIX):
            raise RuntimeError(f"{POSTFIX} is missing: apt-get install -y postfix")
        self.root = tempfile.mkdtemp(prefix="postfix-")
        # Postfix's daemons run as its mail_owner and must reach the
        # queue and data directories inside.
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.config = os.path.join(self.root, "etc")
        os.makedirs(self.config)
        for name in ("queue", "data"):
            os.makedirs(os.path.join(self.root, name))
        shutil.chown(os.path.join(self.root, "data"), "postfix")
        with open(os.path.join(self.config, "main.cf"), "w") as f:
            f.write(_MAIN_CF.format(root=self.root, relay_port=relay_port, size_limit=size_limit))
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(port=self.port))

    def start(self, timeout=20):
        done = subprocess.run([POSTFIX, "-c", self.config, "start"], capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            # Postfix writes its reason to a terminal only: ask again
            # through script(1) for it.
            again = subprocess.run(["script", "-qc", f"{POSTFIX} -c {self.config} check", "/dev/null"],
                                   capture_output=True, text=True, timeout=timeout)
            raise RuntimeError(f"postfix did not start ({done.returncode}): {again.stdout}\n"
                               f"{self.log()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=2) as probe:
                    probe.noop()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen on {self.port}:\n{self.log()}")

    def stop(self):
        try:
            with open(os.path.join(self.root, "queue", "pid", "master.pid")) as f:
                master = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            master = None
        subprocess.run([POSTFIX, "-c", self.config, "stop"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while master is not None and time.monotonic() < deadline:
            try:
                os.kill(master, 0)      # the pid file stays; the process goes
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self):
        try:
            with open(os.path.join(self.root, "maillog"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no maillog)"

    def wait_for_log(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the Postfix log:\n{self.log()}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """relaymail -> Postfix -> NextHop."""
    hop = NextHop()
    postfix = Postfix(hop.port).start()
    relay = RelayProcess(tmp_path_factory.mktemp("relay"), {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{postfix.port}"},
    }).start()
    yield relay, postfix, hop
    relay.stop()
    postfix.stop()
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
    postfix.wait_for_log(r"disconnect from [^\n]*\bmail=1 rcpt=1 bdat=3 ")


def test_a_small_message_is_one_pipelined_bdat(chain):
    relay, postfix, hop = chain
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.sendmail("a@example.org", ["bob@example.com", "carol@example.com"],
                        b"Subject: small\r\nMessage-ID: <bdat-small@client.test>\r\n\r\n.\r\n..\r\n")
    message = hop.wait_for(before + 1)[before]
    assert message["recipients"] == ["bob@example.com", "carol@example.com"]
    assert message["data"].endswith(b"\r\n\r\n.\r\n..\r\n")
    postfix.wait_for_log(r"disconnect from [^\n]*\bmail=1 rcpt=2 bdat=1 ")


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
