"""How a TLS session ends on the real relay: after QUIT's 221 the relay
sends its close_notify and closes (RFC 5321 4.1.1.10), on STARTTLS and
implicit-TLS sessions alike, and cuts a client that never answers the
close_notify after a few seconds."""

import socket
import ssl
import time

import pytest

from tests.certs import CertificateAuthority
from tests.relay_process import RelayProcess, free_port


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca):
    workdir = tmp_path_factory.mktemp("tls-close")
    pair = ca.issue("relay.test", "127.0.0.1")
    (workdir / "cert.pem").write_bytes(pair.cert_pem)
    (workdir / "key.pem").write_bytes(pair.key_pem)
    implicit = free_port()
    process = RelayProcess(workdir, {
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(workdir / "cert.pem"), "private_key": str(workdir / "key.pem")},
    })
    with open(process.config) as f:
        text = f.read()
    with open(process.config, "w") as f:
        f.write(text.replace(
            f"listen = tcp:{process.port}:interface=127.0.0.1",
            f"listen = tcp:{process.port}:interface=127.0.0.1\n"
            f"    ssl:{implicit}:interface=127.0.0.1:privateKey={workdir / 'key.pem'}"
            f":certKey={workdir / 'cert.pem'}"))
    process.implicit_port = implicit
    process.start()
    yield process
    process.stop()


def context(ca):
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


def starttls_session(relay, ca):
    raw = socket.create_connection(("127.0.0.1", relay.port), 10)
    stream = raw.makefile("rb")
    assert stream.readline().startswith(b"220 ")
    raw.sendall(b"EHLO client.test\r\n")
    while stream.readline()[3:4] != b" ":
        pass
    raw.sendall(b"STARTTLS\r\n")
    assert stream.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    return context(ca).wrap_socket(raw, server_hostname="127.0.0.1")


def implicit_session(relay, ca):
    sock = context(ca).wrap_socket(socket.create_connection(("127.0.0.1", relay.implicit_port), 10),
                                   server_hostname="127.0.0.1")
    assert sock.recv(4096).startswith(b"220 ")
    return sock


def read_reply(sock):
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.parametrize("open_session", [starttls_session, implicit_session])
def test_quit_over_tls_gets_221_then_close_notify_and_the_close(relay, ca, open_session):
    sock = open_session(relay, ca)
    sock.settimeout(3)
    sock.sendall(b"EHLO client.test\r\n")
    assert read_reply(sock).endswith(b"250 HELP\r\n")
    started = time.monotonic()
    sock.sendall(b"QUIT\r\n")
    assert read_reply(sock) == b"221 2.0.0 relay.test Bye\r\n"
    # The relay's close_notify: an orderly end of the TLS stream...
    assert sock.recv(4096) == b""
    raw = sock.unwrap()
    # ... and once ours went back, the TCP connection closes.
    assert raw.recv(4096) == b""
    assert time.monotonic() - started < 2
    raw.close()


def test_a_client_that_never_answers_the_close_notify_is_cut(relay, ca):
    sock = starttls_session(relay, ca)
    sock.settimeout(10)
    sock.sendall(b"EHLO client.test\r\n")
    assert read_reply(sock).endswith(b"250 HELP\r\n")
    sock.sendall(b"QUIT\r\n")
    assert read_reply(sock) == b"221 2.0.0 relay.test Bye\r\n"
    started = time.monotonic()
    assert sock.recv(4096) == b""           # the close_notify; we send none back
    # Read the raw socket under the TLS layer: the relay closes it itself.
    raw = socket.socket(fileno=socket.dup(sock.fileno()))
    raw.settimeout(10)
    # Cut, not closed politely: a reset.
    with pytest.raises(ConnectionResetError):
        raw.recv(4096)
    assert 4 < time.monotonic() - started < 8
    raw.close()
    sock.close()
