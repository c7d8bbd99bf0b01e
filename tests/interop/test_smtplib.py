"""Python's smtplib against the real relay, every method of it: helo, ehlo,
starttls, login (PLAIN and LOGIN), sendmail and send_message with several
recipients, verify, expn, noop, rset, quit, SMTP_SSL, and an SMTPUTF8
message."""

import email.message
import smtplib
import ssl

import pytest

from tests.interop.peers import PASSWORD, USER, logged_queue_id


def context(ca_file):
    # Verifies the relay's certificate: its names include 127.0.0.1.
    return ssl.create_default_context(cafile=ca_file)


def test_helo_and_ehlo(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="smtplib.test") as client:
        assert client.helo() == (250, b"relay.test")
        code, text = client.ehlo()
        assert code == 250
        lines = text.splitlines()
        assert lines[0] == b"relay.test Hello smtplib.test"
        # These at least (DSN and CHUNKING may join them, issue 11).
        assert {b"PIPELINING", b"SIZE 10485760", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8",
                b"STARTTLS", b"HELP"} <= set(lines[1:])
        assert b"AUTH PLAIN LOGIN" not in lines      # not before TLS
        assert client.has_extn("smtputf8") and client.does_esmtp


def test_starttls_login_and_sendmail_to_several_recipients(relay, ca_file):
    with smtplib.SMTP("127.0.0.1", relay.submission_port, local_hostname="smtplib.test") as client:
        client.ehlo()
        assert client.starttls(context=context(ca_file)) == (220, b"2.0.0 Ready to start TLS")
        client.ehlo()
        assert client.esmtp_features["auth"].strip() == "PLAIN LOGIN"
        assert client.login(USER, PASSWORD) == (235, b"2.7.0 Authentication successful")
        refused = client.sendmail("alice@example.org",
                                  ["one@example.net", "two@example.org", "three@example.com"],
                                  b"Subject: sendmail\r\n\r\nthree recipients\r\n")
        assert refused == {}
    queue_id = logged_queue_id(relay, "alice@example.org",
                               ["one@example.net", "two@example.org", "three@example.com"])
    assert relay.message(queue_id).endswith(b"\r\nSubject: sendmail\r\n\r\nthree recipients\r\n")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_login_with_each_mechanism(relay, ca_file, mechanism):
    with smtplib.SMTP("127.0.0.1", relay.submission_port) as client:
        client.starttls(context=context(ca_file))
        client.ehlo()
        client.user, client.password = USER, PASSWORD
        assert client.auth(mechanism, getattr(client, "auth_" + mechanism.lower())) == (
            235, b"2.7.0 Authentication successful")


def test_wrong_password_raises_with_535(relay, ca_file):
    with smtplib.SMTP("127.0.0.1", relay.submission_port) as client:
        client.starttls(context=context(ca_file))
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(USER, "wrong")
        assert refused.value.smtp_code == 535
        # The session goes on.
        assert client.noop() == (250, b"2.0.0 Ok")


def test_send_message_with_a_refused_recipient_among_others(relay):
    message = email.message.EmailMessage()
    message["From"] = "a@example.org"
    message["To"] = "bob@example.com, carol@example.com"
    message["Subject"] = "send_message"
    message.set_content("body\n")
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        refused = client.send_message(message, to_addrs=["bob@example.com", "carol@example.com",
                                                         "bad address@example.com"])
    assert list(refused) == ["bad address@example.com"]
    assert refused["bad address@example.com"][0] == 501
    stored = relay.message(logged_queue_id(relay, "a@example.org", ["bob@example.com", "carol@example.com"]))
    assert b"\r\nSubject: send_message\r\n" in stored
    assert stored.endswith(b"\r\n\r\nbody\r\n")


def test_verify_expn_noop_rset_and_quit(relay):
    client = smtplib.SMTP("127.0.0.1", relay.port)
    client.ehlo("smtplib.test")
    assert client.verify("bob@example.com") == (
        252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
    assert client.expn("staff") == (250, b"2.1.5 <alice@example.com>\n2.1.5 <bob@example.com>")
    assert client.expn("nobody") == (550, b"5.1.1 Not a mailing list I know")
    assert client.noop() == (250, b"2.0.0 Ok")
    client.mail("a@example.org")
    assert client.rset() == (250, b"2.0.0 Ok")
    # RSET ended the transaction: RCPT now needs a MAIL first.
    assert client.rcpt("bob@example.com") == (503, b"5.5.1 Error: need MAIL command")
    assert client.quit() == (221, b"2.0.0 relay.test Bye")


def test_smtp_ssl_login_and_sendmail(relay, ca_file):
    with smtplib.SMTP_SSL("127.0.0.1", relay.implicit_port, context=context(ca_file)) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail("a@example.org", ["x@example.net"], b"Subject: ssl\r\n\r\nssl\r\n") == {}


def test_smtputf8_message_is_queued_whole(relay):
    message = email.message.EmailMessage()
    message["From"] = "rené@exämple.org"
    message["To"] = "jürgen@example.com"
    message["Subject"] = "grüße"
    message.set_content("Grüße aus Köln\n", cte="8bit")
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("smtplib.test")
        # smtplib adds SMTPUTF8 and BODY=8BITMIME itself for these addresses.
        assert client.send_message(message) == {}
    stored = relay.message(logged_queue_id(relay, "rené@exämple.org", ["jürgen@example.com"]))
    assert "Subject: grüße\r\n".encode() in stored
    assert stored.endswith("\r\n\r\nGrüße aus Köln\r\n".encode())
    assert "for <jürgen@example.com>".encode() in stored
