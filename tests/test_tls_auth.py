"""STARTTLS, implicit TLS, AUTH, submission and connection limits on the
real relay over real sockets."""

import re
import os
import shutil
import smtplib
import socket
import ssl
import warnings

import pytest

from relaymail.auth import passwords
from tests.certs import CertificateAuthority
from tests.relay_process import TWISTD, RelayProcess, free_port, twistd


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca):
    workdir = tmp_path_factory.mktemp("tls")
    pair = ca.issue("relay.test", "127.0.0.1")
    (workdir / "cert.pem").write_bytes(pair.cert_pem)
    (workdir / "key.pem").write_bytes(pair.key_pem)
    passwords.set_password(str(workdir / "passwd"), "alice", "correct horse")
    implicit_port, submission_port = free_port(), free_port()
    process = RelayProcess(workdir, {
        "server": {
            # Loopback is an outsider here: relaying needs AUTH.
            "trusted_networks": "10.9.9.0/24",
            "submission_listen": f"tcp:{submission_port}:interface=127.0.0.1",
        },
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(workdir / "cert.pem"), "private_key": str(workdir / "key.pem")},
        "auth": {"passwords": str(workdir / "passwd"), "failure_delay": "0.05"},
    })
    # An implicit-TLS listener next to the plain one (port 465 style).
    with open(process.config) as f:
        text = f.read()
    text = text.replace(
        f"listen = tcp:{process.port}:interface=127.0.0.1",
        f"listen = tcp:{process.port}:interface=127.0.0.1\n"
        f"    ssl:{implicit_port}:interface=127.0.0.1:privateKey={workdir / 'key.pem'}"
        f":certKey={workdir / 'cert.pem'}")
    with open(process.config, "w") as f:
        f.write(text)
    process.implicit_port = implicit_port
    process.submission_port = submission_port
    process.start()
    yield process
    process.stop()


def client_context(ca):
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False      # we connect to 127.0.0.1 by number
    return context


def extensions(client):
    return client.esmtp_features


def test_plain_session_offers_starttls_but_not_auth(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        assert "starttls" in extensions(client)
        assert "auth" not in extensions(client)
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")


def test_starttls_then_auth_permits_relaying(relay, ca):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        assert client.rcpt("someone@example.net") == (554, b"5.7.1 Relay access denied")
        client.rset()
        assert client.starttls(context=client_context(ca))[0] == 220
        client.ehlo("client.test")
        assert "starttls" not in extensions(client)
        assert extensions(client)["auth"].strip() == "PLAIN LOGIN"
        assert client.login("alice", "correct horse") == (235, b"2.7.0 Authentication successful")
        client.mail("a@example.org")
        assert client.rcpt("someone@example.net") == (250, b"2.1.5 Ok")
        code, text = client.data(b"Subject: authenticated\r\n\r\nhi\r\n")
        assert code == 250
    queue_id = text.split()[-1].decode()
    assert b"with ESMTPSA id " + queue_id.encode() in relay.message(queue_id)


def test_wrong_password_is_535_and_the_session_goes_on(relay, ca):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.starttls(context=client_context(ca))
        client.ehlo("client.test")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n") == (535, b"5.7.8 Error: authentication failed")
        assert client.docmd("AUTH", "PLAIN AGJvYgB3cm9uZw==") == (535, b"5.7.8 Error: authentication failed")
        # LOGIN, step by step.
        assert client.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert client.docmd("YWxpY2U=") == (334, b"UGFzc3dvcmQ6")
        assert client.docmd("Y29ycmVjdCBob3JzZQ==") == (235, b"2.7.0 Authentication successful")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=") == (
            503, b"5.5.1 Error: already authenticated")
    assert "correct horse" not in relay.log() and "Y29ycmVjdCBob3JzZQ" not in relay.log()


def test_starttls_injection_is_discarded(relay, ca):
    raw = socket.create_connection(("127.0.0.1", relay.port), 10)
    stream = raw.makefile("rb")
    assert stream.readline().startswith(b"220 ")
    raw.sendall(b"EHLO client.test\r\n")
    while not stream.readline().startswith(b"250 "):
        pass
    # The injected RSET rides in the same packet as STARTTLS, in clear text.
    raw.sendall(b"STARTTLS\r\nRSET\r\n")
    assert stream.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    tls = client_context(ca).wrap_socket(raw, server_hostname="relay.test")
    tls_stream = tls.makefile("rb")
    # State is back to before EHLO: NOOP answers without enhanced codes,
    # and no reply to the injected RSET comes first.
    tls.sendall(b"NOOP\r\n")
    assert tls_stream.readline() == b"250 Ok\r\n"
    tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
    assert tls_stream.readline() == b"503 Error: send HELO/EHLO first\r\n"
    tls.close()


def test_implicit_tls_listener(relay, ca):
    with smtplib.SMTP_SSL("127.0.0.1", relay.implicit_port, context=client_context(ca)) as client:
        client.ehlo("client.test")
        assert "starttls" not in extensions(client)
        assert extensions(client)["auth"].strip() == "PLAIN LOGIN"
        assert client.login("alice", "correct horse")[0] == 235


def test_submission_listener_requires_auth(relay, ca):
    with smtplib.SMTP("127.0.0.1", relay.submission_port) as client:
        client.ehlo("client.test")
        assert client.docmd("MAIL", "FROM:<a@example.org>") == (530, b"5.7.0 Authentication required")
        client.starttls(context=client_context(ca))
        client.ehlo("client.test")
        client.login("alice", "correct horse")
        assert client.docmd("MAIL", "FROM:<a@example.org>") == (250, b"2.1.0 Ok")


def test_tls_below_1_2_is_refused(relay):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # that is the point
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.minimum_version = ssl.TLSVersion.TLSv1
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        with pytest.raises((ssl.SSLError, OSError)):
            client.starttls(context=context)


def test_connections_per_ip_limit(tmp_path):
    relay = RelayProcess(tmp_path, {
        "server": {"trusted_networks": "10.9.9.0/24"},
        "limits": {"connections_per_ip": "2"},
    }).start()
    try:
        first = socket.create_connection(("127.0.0.1", relay.port))
        second = socket.create_connection(("127.0.0.1", relay.port))
        assert first.recv(100).startswith(b"220 ") and second.recv(100).startswith(b"220 ")
        third = socket.create_connection(("127.0.0.1", relay.port))
        assert third.recv(200) == b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n"
        assert third.recv(10) == b""
        first.close()
        second.close()
    finally:
        relay.stop()


def test_proxy_listener_uses_the_client_named_in_the_header(tmp_path):
    proxy_port = free_port()
    relay = RelayProcess(tmp_path, {
        "server": {"proxy_listen": f"tcp:{proxy_port}:interface=127.0.0.1",
                   "proxy_trusted": "127.0.0.1/32"},
        "relay": {"domains": "example.com"},
    }).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), 10) as s:
            s.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n"
                      b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
    finally:
        relay.stop()
    # Loopback would be trusted; the client behind the proxy is not.
    assert b"\r\n554 5.7.1 Relay access denied\r\n" in out
    assert re.search(r"\] [A-Z2-7]{8} unknown\[198\.51\.100\.7\]:40000: connect trusted=no\n",
                     relay.log()), relay.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="binding port 25 and dropping privileges needs root")
def test_binds_port_25_as_root_then_runs_as_an_unprivileged_user(tmp_path):
    import pwd
    import pathlib
    import shutil
    import tempfile
    user = pwd.getpwnam("nobody")
    # Somewhere the unprivileged user can reach (pytest's tmp_path is 0700).
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="relaymail-uid-"))
    os.chmod(workdir, 0o755)
    spool = workdir / "spool"
    # One process: this machine's interpreter lives under /root (0700),
    # where nobody cannot run a worker (the test below).
    relay = RelayProcess(workdir, {"server": {"listen": "tcp:25:interface=127.0.0.2",
                                              "workers": "0"},
                                   "queue": {"path": str(spool)}})
    relay.port = 25
    relay.extra_args = ["--uid", str(user.pw_uid), "--gid", str(user.pw_gid)]
    relay.host = "127.0.0.2"
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.2", 25) as client:
            client.ehlo("client.test")
            client.mail("a@example.org")
            client.rcpt("b@example.com")
            assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
        with open(f"/proc/{relay.process.pid}/status") as f:
            uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
        assert set(uids) == {str(user.pw_uid)}
        assert os.stat(spool / "active").st_uid == user.pw_uid
        assert os.stat(spool / "lock").st_uid == user.pw_uid
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_workers_that_could_not_start_as_the_relay_user_are_refused_in_one_line(tmp_path):
    import pwd
    import tempfile
    user = pwd.getpwnam("nobody")
    workdir = tempfile.mkdtemp(prefix="relaymail-uid-")
    os.chmod(workdir, 0o755)
    try:
        config = os.path.join(workdir, "relaymail.ini")
        with open(config, "w") as f:
            f.write(f"[server]\nworkers = 2\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
                    f"[queue]\npath = {workdir}/spool\n")
        done = twistd("--config", config, options=["--uid", str(user.pw_uid),
                                                    "--gid", str(user.pw_gid)])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # This machine's interpreter is under /root (0700): the check cannot
    # even run it as nobody, and says so, naming the interpreter twistd
    # runs on (its script's first line: not ours when .venv is a link to
    # another checkout's).
    with open(TWISTD) as script:
        interpreter = script.readline()[2:].strip()
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"relaymail: workers cannot start as uid {user.pw_uid}: {interpreter}: "
        "Permission denied; the workers run as that user: let it read what they need, "
        "or set [server] workers = 0 (one process)")


def test_failed_auth_counts_towards_the_error_limit(tmp_path):
    passwords.set_password(str(tmp_path / "passwd"), "alice", "correct horse")
    relay = RelayProcess(tmp_path, {
        "auth": {"passwords": str(tmp_path / "passwd"), "allow_plaintext": "yes",
                 "failure_delay": "0.2"},
        "limits": {"errors": "3"},
    }).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), 10) as s:
            stream = s.makefile("rb")
            stream.readline()
            s.sendall(b"EHLO client.test\r\n")
            while not stream.readline().startswith(b"250 "):
                pass
            replies = []
            for _ in range(3):
                s.sendall(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
                replies.append(stream.readline())
            replies.append(stream.readline())
            assert stream.readline() == b""      # closed
    finally:
        relay.stop()
    assert replies == [b"535 5.7.8 Error: authentication failed\r\n"] * 3 + [
        b"421 4.7.0 relay.test Error: too many errors\r\n"]
