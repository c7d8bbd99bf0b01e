"""Cipher suites per listener on the real relay: the broad list on port 25,
forward-secret AEAD suites only where passwords travel (submission and
implicit TLS), AUTH only under such a suite, and no session resumption
(relaymail.smtp.tls)."""

import smtplib
import socket
import ssl

import pytest

from relaymail.auth import passwords
from relaymail.smtp.tls import implicit_tls_endpoint
from tests.certs import CertificateAuthority
from tests.relay_process import RelayProcess, free_port

# A static-RSA key exchange with CBC, one with GCM, and ECDHE with CBC:
# testssl's findings on the submission and implicit-TLS listeners.
WEAK_SUITES = ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA"]
GOOD_SUITE = "ECDHE-RSA-AES128-GCM-SHA256"
PLAIN_ALICE = "AGFsaWNlAGNvcnJlY3QgaG9yc2U="


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca):
    workdir = tmp_path_factory.mktemp("ciphers")
    # RSA: static-RSA suites cannot even be tried with an ECDSA key.
    pair = ca.issue("relay.test", "127.0.0.1", rsa=True)
    (workdir / "cert.pem").write_bytes(pair.cert_pem)
    (workdir / "key.pem").write_bytes(pair.key_pem)
    passwords.set_password(str(workdir / "passwd"), "alice", "correct horse")
    implicit_port, submission_port, port = free_port(), free_port(), free_port()
    process = RelayProcess(workdir, {
        "server": {
            "listen": f"tcp:{port}:interface=127.0.0.1\n"
                      f"    ssl:{implicit_port}:interface=127.0.0.1:privateKey={workdir / 'key.pem'}"
                      f":certKey={workdir / 'cert.pem'}",
            "trusted_networks": "10.9.9.0/24",
            "submission_listen": f"tcp:{submission_port}:interface=127.0.0.1",
        },
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(workdir / "cert.pem"), "private_key": str(workdir / "key.pem")},
        "auth": {"passwords": str(workdir / "passwd"), "failure_delay": "0.05"},
    })
    process.port = port
    process.implicit_port = implicit_port
    process.submission_port = submission_port
    process.start()
    yield process
    process.stop()


def tls12_context(ca, suite):
    """A client offering only ``suite``, TLS 1.2 at most."""
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    return context


def starttls(port, context):
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.test")
    try:
        client.starttls(context=context)
    except BaseException:
        client.close()
        raise
    client.ehlo("client.test")
    return client


def implicit(port, context):
    return smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10)


@pytest.mark.parametrize("suite", WEAK_SUITES)
def test_weak_suites_get_no_handshake_on_submission(relay, ca, suite):
    with pytest.raises(ssl.SSLError):
        starttls(relay.submission_port, tls12_context(ca, suite))


@pytest.mark.parametrize("suite", WEAK_SUITES)
def test_weak_suites_get_no_handshake_on_implicit_tls(relay, ca, suite):
    with pytest.raises(ssl.SSLError):
        implicit(relay.implicit_port, tls12_context(ca, suite))


@pytest.mark.parametrize("suite", WEAK_SUITES)
def test_weak_suites_still_work_on_port_25_but_get_no_auth(relay, ca, suite):
    with starttls(relay.port, tls12_context(ca, suite)) as client:
        assert client.sock.cipher()[0] == suite
        # An old MTA still gets encryption for its mail ...
        assert "auth" not in client.esmtp_features
        assert client.docmd("AUTH", f"PLAIN {PLAIN_ALICE}") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        assert client.docmd("MAIL", "FROM:<a@example.org>") == (250, b"2.1.0 Ok")
        assert client.docmd("RCPT", "TO:<b@example.com>") == (250, b"2.1.5 Ok")


def test_ecdhe_aesgcm_tls_1_2_works_everywhere_with_auth(relay, ca):
    context = tls12_context(ca, GOOD_SUITE)
    for port in (relay.port, relay.submission_port):
        with starttls(port, context) as client:
            assert client.sock.cipher()[0] == GOOD_SUITE
            assert client.esmtp_features["auth"].strip() == "PLAIN LOGIN"
            assert client.login("alice", "correct horse") == (235, b"2.7.0 Authentication successful")
    with implicit(relay.implicit_port, context) as client:
        client.ehlo("client.test")
        assert client.sock.cipher()[0] == GOOD_SUITE
        assert client.login("alice", "correct horse") == (235, b"2.7.0 Authentication successful")


def test_tls_1_3_works_where_passwords_travel(relay, ca):
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with starttls(relay.submission_port, context) as client:
        assert client.sock.version() == "TLSv1.3"
        assert client.login("alice", "correct horse")[0] == 235
    with implicit(relay.implicit_port, context) as client:
        assert client.sock.version() == "TLSv1.3"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_session_is_resumed(relay, ca, version):
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False
    context.minimum_version = context.maximum_version = version

    def session(previous=None):
        with socket.create_connection(("127.0.0.1", relay.implicit_port), 10) as raw:
            with context.wrap_socket(raw, session=previous) as tls:
                # Read the greeting: TLS 1.3 tickets come after the handshake.
                assert tls.recv(512).startswith(b"220 ")
                return tls.session, tls.session_reused

    first, _ = session()
    if version == ssl.TLSVersion.TLSv1_2:
        assert not first.has_ticket
    _, reused = session(first)
    assert reused is False


@pytest.mark.parametrize("option, reason", [
    ("sslmethod=TLSv1_2_METHOD", "relaymail chooses the TLS versions itself"),
    ("extraCertChain=chain.pem", "put the intermediate certificates in the certKey file"),
    ("dhParameters=dh.pem", "implicit-TLS listeners use ECDHE only"),
])
def test_ssl_options_relaymail_does_not_take_are_refused_with_the_reason(option, reason):
    with pytest.raises(ValueError) as info:
        implicit_tls_endpoint(None, f"ssl:465:privateKey=key.pem:{option}")
    assert str(info.value).startswith(f"ssl: option {option.split('=')[0]} is not supported: {reason}")


def test_an_ssl_listener_with_a_refused_option_stops_start_up(tmp_path, ca):
    pair = ca.issue("relay.test")
    (tmp_path / "cert.pem").write_bytes(pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    relay = RelayProcess(tmp_path, {"server": {
        "listen": f"ssl:{free_port()}:privateKey={tmp_path / 'key.pem'}"
                  f":certKey={tmp_path / 'cert.pem'}:sslmethod=TLSv1_2_METHOD"}})
    with pytest.raises(RuntimeError) as info:
        relay.start()
    # Refused by config validation, so relaymail-check and a reload refuse it too.
    assert "[server] listen: not a valid Twisted server endpoint 'ssl:" in str(info.value)
    assert ("ssl: option sslmethod is not supported: relaymail chooses the TLS versions itself"
            in str(info.value))
