"""MAIL's AUTH parameter (RFC 4954 5), in-memory sessions: taken where AUTH
is available, 555 where it is not, 501 for malformed xtext (RFC 3461 4)."""

import pytest

from relaymail.smtp.mail_auth import xtext_problem
from tests.support import Session, make_settings

OK = b"250 2.1.0 Ok\r\n"


def session(tmp_path, auth=True, **keys):
    # The AUTH= check needs only to know that AUTH exists on the session;
    # tests/test_tls_auth.py and tests/interop run the real login.
    settings = make_settings(tmp_path, **keys)
    s = Session(settings, factory_options={"auth": object()} if auth else None)
    s.command(b"EHLO client.test")
    return s


def logged_in(s, user="alice"):
    s.protocol.context.authenticated_user = user
    return s


@pytest.mark.parametrize("value", [b"<>", b"e+3Dmc2@example.com", b"<alice@example.org>",
                                   b"a+2Bb@example.org", "jürgen@example.com".encode(),
                                   # Exim's lower-case hex for a UTF-8 sender.
                                   b"ren+c3+a9@ex+c3+a4mple.org"])
def test_auth_parameter_is_taken_after_login(tmp_path, value):
    s = logged_in(session(tmp_path))
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=" + value) == OK


def test_auth_parameter_is_taken_where_auth_is_offered(tmp_path):
    s = session(tmp_path, auth__allow_plaintext="yes")
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.command(b"EHLO client.test")
    assert s.command(b"MAIL FROM:<a@example.org> SIZE=10 AUTH=<>") == OK


def test_auth_parameter_without_auth_on_the_session_is_555(tmp_path):
    s = session(tmp_path, auth=False)
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=<>") == (
        b"555 5.5.4 Unsupported parameter AUTH\r\n")


def test_auth_not_offered_before_tls_is_555(tmp_path):
    # AUTH exists, but not on a plain connection (allow_plaintext = no).
    s = session(tmp_path)
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=<>") == (
        b"555 5.5.4 Unsupported parameter AUTH\r\n")


@pytest.mark.parametrize("value, reason", [
    (b"", b"empty parameter value"),
    (b"a+3@example.org", b"AUTH value is not valid xtext"),
    (b"a+@example.org", b"AUTH value is not valid xtext"),
    (b"a+ZZ@example.org", b"AUTH value is not valid xtext"),
])
def test_malformed_auth_value_is_501_and_the_session_goes_on(tmp_path, value, reason):
    s = logged_in(session(tmp_path))
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=" + value) == (
        b"501 5.5.4 Syntax error in parameters: " + reason + b"\r\n")
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=<>") == OK


def test_bare_auth_keyword_is_501(tmp_path):
    s = logged_in(session(tmp_path))
    assert s.command(b"MAIL FROM:<a@example.org> AUTH") == (
        b"501 5.5.4 Syntax error in parameters: AUTH takes a mailbox or <> in xtext\r\n")


def test_repeated_auth_parameter_is_501(tmp_path):
    s = logged_in(session(tmp_path))
    assert s.command(b"MAIL FROM:<a@example.org> AUTH=<> AUTH=<>") == (
        b"501 5.5.4 Syntax error in parameters: duplicate parameter AUTH\r\n")


def test_xtext():
    assert xtext_problem("<>") is None
    assert xtext_problem("e+3Dmc2@example.com") is None
    assert xtext_problem("+2B+3D") is None
    assert xtext_problem("a=b") == "AUTH value is not valid xtext"
    assert xtext_problem("a+b") == "AUTH value is not valid xtext"
    assert xtext_problem("a+2b") is None        # lower case, as Exim writes it
    assert xtext_problem("a+2g") == "AUTH value is not valid xtext"
    assert xtext_problem(None) == "AUTH takes a mailbox or <> in xtext"
