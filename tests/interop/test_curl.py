"""curl's SMTP client against the real relay: smtp:// plain and with
STARTTLS, smtps:// (implicit TLS), AUTH, and its custom commands: EXPN
(which curl always sends with RFC 6531's SMTPUTF8 parameter), VRFY, NOOP
and HELP."""

import subprocess

from tests.interop.peers import PASSWORD, USER, queued_ids, tool

MESSAGE = b"From: a@example.org\r\nTo: bob@example.com\r\nSubject: from curl\r\n\r\nhello from curl\r\n"


def curl(url, *args, message=None):
    return subprocess.run([tool("curl"), "--silent", "--show-error", "--verbose", url, *args],
                          input=message, capture_output=True, timeout=30)


def sent(result):
    """The command lines curl wrote, from its --verbose trace."""
    return [line[2:] for line in result.stderr.decode("utf-8", "replace").splitlines()
            if line.startswith("> ")]


def queued(relay, result):
    assert result.returncode == 0, result.stderr.decode()
    [queue_id] = queued_ids(result.stderr.decode())
    return relay.message(queue_id)


def test_curl_smtp_sends_a_message(relay):
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-from", "a@example.org",
                  "--mail-rcpt", "bob@example.com", "--mail-rcpt", "carol@example.net",
                  "--upload-file", "-", message=MESSAGE)
    assert sent(result)[:4] == ["EHLO curl.test", "MAIL FROM:<a@example.org>",
                                "RCPT TO:<bob@example.com>", "RCPT TO:<carol@example.net>"]
    stored = queued(relay, result)
    assert stored.startswith(b"Received: from curl.test ([127.0.0.1])\r\n\tby relay.test "
                             b"(relaymail) with ESMTP id ")
    assert stored.endswith(b"\r\n" + MESSAGE)


def test_curl_smtp_with_starttls_and_auth(relay, ca_file):
    result = curl(f"smtp://127.0.0.1:{relay.submission_port}/curl.test", "--ssl-reqd",
                  "--cacert", ca_file, "--user", f"{USER}:{PASSWORD}", "--mail-from", "a@example.org",
                  "--mail-rcpt", "someone@example.net", "--upload-file", "-", message=MESSAGE)
    assert sent(result)[:3] == ["EHLO curl.test", "STARTTLS", "EHLO curl.test"]
    # The initial response waits for the 334 (no SASL-IR from curl here).
    assert sent(result)[3] == "AUTH PLAIN"
    stored = queued(relay, result)
    assert b"with ESMTPSA id " in stored
    assert stored.endswith(b"\r\n" + MESSAGE)


def test_curl_smtps_on_the_implicit_tls_listener(relay, ca_file):
    result = curl(f"smtps://127.0.0.1:{relay.implicit_port}/curl.test", "--cacert", ca_file,
                  "--user", f"{USER}:{PASSWORD}", "--login-options", "AUTH=LOGIN",
                  "--mail-from", "a@example.org", "--mail-rcpt", "someone@example.net",
                  "--upload-file", "-", message=MESSAGE)
    assert sent(result)[:2] == ["EHLO curl.test", "AUTH LOGIN"]
    stored = queued(relay, result)
    assert b"with ESMTPSA id " in stored
    assert stored.endswith(b"\r\n" + MESSAGE)


def test_curl_smtps_refuses_a_certificate_it_cannot_verify(relay):
    # No --cacert: the test CA is unknown to curl's trust store.
    result = curl(f"smtps://127.0.0.1:{relay.implicit_port}/", "-X", "NOOP")
    assert result.returncode == 60, result.stderr.decode()


def test_curl_expn_lists_the_members(relay):
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-rcpt", "staff", "-X", "EXPN")
    assert result.returncode == 0, result.stderr.decode()
    # RFC 6531 3.7.4.2: curl offers to take UTF-8 in the reply.
    assert sent(result)[-1] == "EXPN staff SMTPUTF8"
    assert result.stdout == b"250-2.1.5 <alice@example.com>\r\n250 2.1.5 <bob@example.com>\r\n"


def test_curl_expn_of_a_utf8_list(relay):
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-rcpt", "équipe", "-X", "EXPN")
    assert result.returncode == 0, result.stderr.decode()
    assert sent(result)[-1] == "EXPN équipe SMTPUTF8"
    assert result.stdout == "250-2.1.5 <alice@example.com>\r\n250 2.1.5 <rené@example.com>\r\n".encode()


def test_curl_expn_of_no_list_is_550(relay):
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-rcpt", "nobody", "-X", "EXPN")
    # CURLE_WEIRD_SERVER_REPLY (8) is how curl reports a refused command.
    assert result.returncode == 8, result.stderr.decode()
    assert "< 550 5.1.1 Not a mailing list I know" in result.stderr.decode()
    # The session stays in sync: curl's QUIT still gets its 221.
    assert "< 221 2.0.0 relay.test Bye" in result.stderr.decode()


def test_curl_vrfy_noop_and_help(relay):
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-rcpt", "bob@example.com",
                  "-X", "VRFY")
    assert result.stdout == b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "-X", "NOOP")
    assert result.stdout == b"250 2.0.0 Ok\r\n"
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "-X", "HELP")
    assert result.stdout.startswith(b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT")


def test_curl_mail_auth_parameter_after_login(relay, ca_file):
    # RFC 4954 5: the submitter's identity on MAIL (curl --mail-auth).
    result = curl(f"smtp://127.0.0.1:{relay.submission_port}/curl.test", "--ssl-reqd",
                  "--cacert", ca_file, "--user", f"{USER}:{PASSWORD}", "--mail-auth", "alice@example.org",
                  "--mail-from", "a@example.org", "--mail-rcpt", "someone@example.net",
                  "--upload-file", "-", message=MESSAGE)
    assert "MAIL FROM:<a@example.org> AUTH=<alice@example.org>" in sent(result)
    stored = queued(relay, result)
    assert stored.endswith(b"\r\n" + MESSAGE)


def test_curl_vrfy_of_a_utf8_address_without_smtputf8_is_553_5_6_7(relay):
    # curl 7.88 sends SMTPUTF8 on EXPN but not on VRFY.  relaymail asks
    # for the parameter before a UTF-8 name, as it does on MAIL and RCPT
    # (RFC 6531 3.2, 3.7.4.2); Postfix, with its default strict_smtputf8 =
    # no, would answer 252 instead.
    result = curl(f"smtp://127.0.0.1:{relay.port}/curl.test", "--mail-rcpt", "jürgen@example.com",
                  "-X", "VRFY")
    if sent(result)[-1].endswith(" SMTPUTF8"):
        # A curl that sends it gets the answer any VRFY gets.
        assert result.stdout.startswith(b"252 2.5.0 ")
    else:
        assert sent(result)[-1] == "VRFY jürgen@example.com"
        assert result.stdout == b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter\r\n"
