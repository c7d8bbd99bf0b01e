"""REQUIRETLS and "TLS-Required: No" (RFC 8689) taken in by the real relay
over real sockets: offered only under TLS, refused without it, and kept in
the queue record for delivery to honour (tests/test_tls_policy.py)."""

import re
import smtplib
import ssl

import pytest

from tests.certs import CertificateAuthority
from tests.relay_process import RelayProcess, free_port
from tests.test_delivery import read_record


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("requiretls")
    ca = CertificateAuthority()
    pair = ca.issue("relay.test", "127.0.0.1")
    (workdir / "cert.pem").write_bytes(pair.cert_pem)
    (workdir / "key.pem").write_bytes(pair.key_pem)
    process = RelayProcess(workdir, {
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(workdir / "cert.pem"), "private_key": str(workdir / "key.pem")},
        # Nobody listens there: the mail stays queued for the test to read.
        "delivery": {"smarthost": f"[127.0.0.1]:{free_port()}", "connect_timeout": "1"},
        "queue": {"min_backoff": "3600", "max_backoff": "3600"},
    }).start()
    process.ca = ca
    yield process
    process.stop()


def tls_client(relay):
    client = smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test")
    context = ssl.create_default_context(cadata=relay.ca.cert_pem.decode())
    context.check_hostname = False
    client.starttls(context=context)
    client.ehlo()
    return client


def queued_id(text):
    return re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()


def test_requiretls_is_offered_only_under_tls(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        assert not client.has_extn("requiretls")
        assert client.has_extn("starttls")
    with tls_client(relay) as client:
        assert client.has_extn("requiretls")
        assert client.esmtp_features["requiretls"] == ""


def test_mail_requiretls_without_tls_is_530_and_the_session_goes_on(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        code, text = client.docmd("MAIL FROM:<a@example.org> REQUIRETLS")
        assert (code, text) == (530, b"5.7.10 Must issue a STARTTLS command first: REQUIRETLS needs TLS")
        assert client.docmd("MAIL FROM:<a@example.org>") == (250, b"2.1.0 Ok")


def test_requiretls_takes_no_value(relay):
    with tls_client(relay) as client:
        code, text = client.docmd("MAIL FROM:<a@example.org> REQUIRETLS=YES")
        assert (code, text) == (501, b"5.5.4 Syntax error in parameters: REQUIRETLS takes no value")


def test_a_requiretls_message_is_queued_with_its_requirement(relay):
    with tls_client(relay) as client:
        client.mail("a@example.org", ["REQUIRETLS"])
        client.rcpt("bob@example.com")
        # RFC 8689 5: the header is ignored when REQUIRETLS was given.
        code, text = client.data(b"TLS-Required: No\r\nSubject: s\r\n\r\nhello\r\n")
    assert code == 250
    record = read_record(relay, queued_id(text))
    assert (record["envelope"]["requiretls"], record["envelope"]["tls_optional"]) == (True, False)


def queued_record(relay, body):
    """The queue record of ``body`` sent without TLS or REQUIRETLS."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("bob@example.com")
        code, text = client.data(body)
    assert code == 250
    return read_record(relay, queued_id(text))


@pytest.mark.parametrize("field", [b"TLS-Required: No", b"tls-required:no",
                                   b"TLS-Required:  No  "])
def test_tls_required_no_is_recorded(relay, field):
    record = queued_record(relay, b"Subject: s\r\n" + field + b"\r\n\r\nhello\r\n")
    assert (record["envelope"]["requiretls"], record["envelope"]["tls_optional"]) == (False, True)


@pytest.mark.parametrize("body", [
    b"Subject: s\r\nTLS-Required: Yes\r\n\r\nhello\r\n",       # not the value RFC 8689 defines
    b"Subject: s\r\n\r\nTLS-Required: No\r\n",                  # in the body, not the header
    b"Subject: s\r\nX-TLS-Required: No\r\n\r\nhello\r\n"])
def test_anything_else_is_not_tls_required_no(relay, body):
    record = queued_record(relay, body)
    assert record["envelope"]["tls_optional"] is False
