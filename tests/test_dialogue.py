"""The SMTP dialogue driven with bytes: every command's success and error replies."""

import re

import pytest

from relaymail.interfaces import Decision
from relaymail.policy.loader import build_plugins
from tests.support import ScriptedExpander, ScriptedValidator, Session, make_settings


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture
def scripted():
    return ScriptedValidator()


def session_for(settings, scripted=None, client_ip="127.0.0.1", lists=None, **kw):
    validators, _ = build_plugins(settings)
    if scripted is not None:
        validators = [scripted] + validators
    expanders = [ScriptedExpander(lists)] if lists else []
    return Session(settings, validators, expanders, client_ip=client_ip, **kw)


@pytest.fixture
def session(settings, scripted):
    return session_for(settings, scripted)


@pytest.fixture
def outsider(settings, scripted):
    """A client outside trusted_networks."""
    return session_for(settings, scripted, client_ip="192.0.2.7")


def ehlo(s):
    s.command(b"EHLO client.test")
    return s


# -- greeting, HELO, EHLO ------------------------------------------------

def test_greeting_names_the_host(session):
    assert session.banner == b"220 mx.test ESMTP relaymail\r\n"


def test_ehlo_lists_the_extensions(session):
    assert session.command(b"EHLO client.test") == (
        b"250-mx.test Hello client.test\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 10485760\r\n"
        b"250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-SMTPUTF8\r\n"
        b"250-CHUNKING\r\n"
        b"250-BINARYMIME\r\n"
        b"250-DSN\r\n"
        b"250 HELP\r\n")


def test_helo_has_no_enhanced_codes_afterwards(session):
    assert session.command(b"HELO client.test") == b"250 mx.test\r\n"
    assert session.command(b"NOOP") == b"250 Ok\r\n"


def test_helo_and_ehlo_need_a_domain(session):
    assert session.command(b"HELO") == b"501 Syntax: HELO hostname\r\n"
    assert session.command(b"EHLO") == b"501 Syntax: EHLO hostname\r\n"
    assert session.command(b"EHLO two words") == b"501 Error: invalid host name\r\n"


def test_helo_and_ehlo_names_longer_than_a_domain_are_501(session):
    # RFC 5321 4.5.3.1.2: 255 octets at most, counted in UTF-8 octets.
    assert session.command(b"EHLO " + b"a" * 256) == b"501 Error: host name longer than 255 octets\r\n"
    assert session.command(b"HELO " + b"a" * 1990) == b"501 Error: host name longer than 255 octets\r\n"
    assert session.command(b"EHLO " + "é".encode() * 128) == (
        b"501 Error: host name longer than 255 octets\r\n")
    assert session.command(b"MAIL FROM:<a@example.org>") == b"503 Error: send HELO/EHLO first\r\n"
    assert session.command(b"HELO " + b"a" * 255) == b"250 mx.test\r\n"
    assert session.command(b"EHLO " + b"a" * 255).startswith(b"250-mx.test Hello " + b"a" * 255 + b"\r\n")
    assert session.command(b"EHLO " + b"b" * 256) == (
        b"501 5.5.4 Error: host name longer than 255 octets\r\n")


def test_received_field_for_a_long_helo_is_folded(session):
    helo = b"h" * 251 + b".org"
    recipient = b"r" * 64 + b"@" + b"d" * 60 + b"." + b"e" * 60 + b".example.com"
    assert session.command(b"EHLO " + helo).startswith(b"250-")
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<" + recipient + b">") == b"250 2.1.5 Ok\r\n"
    session.command(b"DATA")
    assert session.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
    header = session.queue.messages["Q0001"][1].split(b"Subject: hi\r\n")[0]
    assert header == (
        b"Received: from\r\n"
        b" " + helo + b"\r\n"
        b" ([127.0.0.1])\r\n"
        b"\tby mx.test (relaymail) with ESMTP id Q0001\r\n"
        b"\tfor\r\n"
        b" <" + recipient + b">;\r\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n")


@pytest.mark.parametrize("helo, smtputf8, written", [
    ("bücher.example", False, b"xn--bcher-kva.example"),
    ("bü_cher", False, b"b\\x{FC}_cher"),
    ("bücher.example", True, "bücher.example".encode()),
])
def test_a_non_ascii_helo_is_written_in_ascii_unless_the_message_is_utf8smtp(
        session, helo, smtputf8, written):
    # Raw UTF-8 in the header of a message without SMTPUTF8 would make it
    # need SMTPUTF8 at the next hop (RFC 6531, RFC 6532).
    assert session.command(("EHLO " + helo).encode()).startswith(b"250-")
    session.command(b"MAIL FROM:<a@example.org>" + (b" SMTPUTF8" if smtputf8 else b""))
    session.command(b"RCPT TO:<b@example.com>")
    session.command(b"DATA")
    assert session.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
    assert session.queue.messages["Q0001"][1].startswith(b"Received: from " + written + b" (")


def test_ehlo_resets_the_transaction(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    ehlo(session)
    assert session.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"


# -- MAIL ------------------------------------------------------------------

def test_mail_before_helo_is_503(session):
    assert session.command(b"MAIL FROM:<a@example.org>") == b"503 Error: send HELO/EHLO first\r\n"


def test_mail_accepts_sender(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"


def test_mail_accepts_null_sender(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<>") == b"250 2.1.0 Ok\r\n"


def test_mail_tolerates_space_after_colon(session):
    ehlo(session)
    assert session.command(b"mail from: <a@example.org>") == b"250 2.1.0 Ok\r\n"


def test_nested_mail_is_503(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"MAIL FROM:<a@example.org>") == b"503 5.5.1 Error: nested MAIL command\r\n"


def test_mail_syntax_errors_are_501(session):
    ehlo(session)
    assert session.command(b"MAIL") == b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
    assert session.command(b"MAIL TO:<a@example.org>") == b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
    assert session.command(b"MAIL FROM:a@example.org").startswith(b"501 5.1.7 Bad sender address syntax")
    assert session.command(b"MAIL FROM:<a@@example.org>").startswith(b"501 5.1.7 ")
    assert session.command(b"MAIL FROM:<a@-bad-.example>").startswith(b"501 5.1.7 ")


def test_mail_unknown_parameter_is_555(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<a@example.org> MT-PRIORITY=3") == (
        b"555 5.5.4 Unsupported parameter MT-PRIORITY\r\n")


def test_mail_parameters_need_ehlo(session):
    session.command(b"HELO client.test")
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=10") == b"555 Unsupported parameter SIZE\r\n"


def test_mail_size_parameter(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=10485761") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=ten") == (
        b"501 5.5.4 Syntax error in parameters: SIZE takes a number of octets\r\n")
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=10485760") == b"250 2.1.0 Ok\r\n"


def test_mail_body_parameter(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<a@example.org> BODY=QUANTUM") == (
        b"501 5.5.4 Syntax error in parameters: BODY takes 7BIT, 8BITMIME or BINARYMIME\r\n")
    assert session.command(b"MAIL FROM:<a@example.org> BODY=8bitmime") == b"250 2.1.0 Ok\r\n"


def test_non_ascii_sender_needs_smtputf8(session):
    ehlo(session)
    assert session.command("MAIL FROM:<jörg@example.org>".encode()) == (
        b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter\r\n")
    assert session.command("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode()) == b"250 2.1.0 Ok\r\n"


def test_smtputf8_takes_no_value(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<a@example.org> SMTPUTF8=yes") == (
        b"501 5.5.4 Syntax error in parameters: SMTPUTF8 takes no value\r\n")


def test_invalid_utf8_and_control_characters_are_501(session):
    ehlo(session)
    assert session.command(b"MAIL FROM:<\xff@example.org>") == (
        b"501 5.5.2 Error: control characters or invalid UTF-8 in command\r\n")
    assert session.command(b"MAIL FROM:<a\x00b@example.org>") == (
        b"501 5.5.2 Error: control characters or invalid UTF-8 in command\r\n")


@pytest.mark.parametrize("name", [b"a\xe2\x80\xa8b", b"a\xe2\x80\xa9b", b"a\xc2\x85b",
                                  b"a\xc2\x9bb", b"a\xc2\x80b", b"a\xc2\x9fb"])
def test_helo_with_c1_or_unicode_line_separators_is_501(session, name):
    # UTF-8 for U+2028, U+2029, NEL, CSI and the ends of the C1 range:
    # each would break a log line or drive a terminal once in a Received
    # header or a log line.
    for verb in (b"EHLO ", b"HELO "):
        assert session.command(verb + name) == (
            b"501 Error: control characters or invalid UTF-8 in command\r\n")
    assert session.command(b"EHLO client.test").startswith(b"250-mx.test Hello client.test\r\n")


def test_c1_or_unicode_line_separators_in_an_smtputf8_address_are_501(session):
    ehlo(session)
    for char in ("\u2028", "\u0085", "\u009b"):
        assert session.command(f"MAIL FROM:<j\u00f6{char}rg@example.org> SMTPUTF8".encode()) == (
            b"501 5.5.2 Error: control characters or invalid UTF-8 in command\r\n")
    assert session.command("MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8".encode()) == b"250 2.1.0 Ok\r\n"


def test_commands_refuse_exactly_the_unsafe_characters_and_tab():
    # The dialogue keeps its own pattern (it must stay cheap and local);
    # it must not drift from the one definition in relaymail.sanitize.
    from relaymail import sanitize
    from relaymail.smtp import dialogue
    for code in range(0x3000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        refused = bool(dialogue._has_control_characters(char))
        assert refused == (char == "\t" or bool(sanitize.has_unsafe(char))), hex(code)


# -- RCPT ------------------------------------------------------------------

def test_rcpt_before_mail_is_503(session):
    ehlo(session)
    assert session.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_rcpt_in_relay_domain_is_accepted_from_anyone(outsider):
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    assert outsider.command(b"RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
    assert outsider.command(b"RCPT TO:<b@EXAMPLE.COM>") == b"250 2.1.5 Ok\r\n"


def test_rcpt_elsewhere_from_untrusted_client_is_relay_denied(outsider):
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    assert outsider.command(b"RCPT TO:<b@example.net>") == b"554 5.7.1 Relay access denied\r\n"


def test_rcpt_elsewhere_from_trusted_client_is_accepted(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<b@example.net>") == b"250 2.1.5 Ok\r\n"


@pytest.mark.parametrize("recipient", [
    b"<b%example.net@example.com>", b'<"b@example.net"@example.com>', b"<example.net!b@example.com>",
])
def test_sender_routing_in_our_domain_is_relay_denied_for_outsiders(outsider, recipient):
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    assert outsider.command(b"RCPT TO:" + recipient) == b"554 5.7.1 Relay access denied\r\n"


def test_source_route_is_ignored_and_the_final_domain_decides(outsider):
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    assert outsider.command(b"RCPT TO:<@example.com:b@example.net>") == b"554 5.7.1 Relay access denied\r\n"
    assert outsider.command(b"RCPT TO:<@example.net:b@example.com>") == b"250 2.1.5 Ok\r\n"


def test_rcpt_syntax_errors(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT") == b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
    assert session.command(b"RCPT TO:<>").startswith(b"501 5.1.3 Bad recipient address syntax")
    assert session.command(b"RCPT TO:<b@example.com> RRVS=2026-01-01T00:00:00Z") == (
        b"555 5.5.4 Unsupported parameter RRVS\r\n")


def test_rcpt_postmaster_without_domain_is_accepted_from_trusted(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<Postmaster>") == b"250 2.1.5 Ok\r\n"


def test_plugin_rejection_is_passed_on(session, scripted):
    scripted.answers["nobody"] = Decision.reject(550, "5.1.1", "User unknown")
    scripted.answers["busy"] = Decision.defer("Mailbox busy, try later")
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<nobody@example.com>") == b"550 5.1.1 User unknown\r\n"
    assert session.command(b"RCPT TO:<busy@example.com>") == b"450 4.2.0 Mailbox busy, try later\r\n"


def test_plugin_text_cannot_forge_a_reply_or_a_log_line(session, scripted):
    scripted.answers["nobody"] = Decision.reject(550, "5.1.1", "User unknown\r\n250 2.1.5 Ok")
    scripted.answers["odd"] = Decision.accept("Ok\u2028status=sent\x85\x1b[2J")
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<nobody@example.com>") == (
        b"550 5.1.1 User unknown\\x{D}\\x{A}250 2.1.5 Ok\r\n")
    assert session.command(b"RCPT TO:<odd@example.com>") == (
        b"250 2.1.5 Ok\\x{2028}status=sent\\x{85}\\x{1B}[2J\r\n")
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_plugin_that_raises_gives_451_and_session_goes_on(session, scripted):
    scripted.answers["boom"] = RuntimeError("plugin bug")
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<boom@example.com>") == (
        b"451 4.3.0 Temporary failure checking recipient, try again later\r\n")
    assert session.command(b"RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"


def test_too_many_recipients_is_452(tmp_path):
    s = session_for(make_settings(tmp_path, limits__recipients="2"))
    ehlo(s)
    s.command(b"MAIL FROM:<a@example.org>")
    assert s.command(b"RCPT TO:<b1@example.com>") == b"250 2.1.5 Ok\r\n"
    assert s.command(b"RCPT TO:<b2@example.com>") == b"250 2.1.5 Ok\r\n"
    assert s.command(b"RCPT TO:<b3@example.com>") == b"452 4.5.3 Error: too many recipients\r\n"


# -- DATA ------------------------------------------------------------------

def transaction(s, rcpt=b"b@example.com"):
    ehlo(s)
    s.command(b"MAIL FROM:<a@example.org>")
    assert s.command(b"RCPT TO:<" + rcpt + b">") == b"250 2.1.5 Ok\r\n"


def test_data_before_mail_is_503(session):
    ehlo(session)
    assert session.command(b"DATA") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_data_without_accepted_recipient_is_554(outsider):
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    outsider.command(b"RCPT TO:<b@example.net>")
    assert outsider.command(b"DATA") == b"554 5.5.1 Error: no valid recipients\r\n"


def test_data_with_argument_is_501(session):
    transaction(session)
    assert session.command(b"DATA now") == b"501 5.5.4 Syntax error: this command takes no arguments\r\n"


def test_message_is_queued_with_received_header(session):
    transaction(session)
    assert session.command(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert session.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
    envelope, message = session.queue.messages["Q0001"]
    assert message == (
        b"Received: from client.test ([127.0.0.1])\r\n"
        b"\tby mx.test (relaymail) with ESMTP id Q0001\r\n"
        b"\tfor <b@example.com>;\r\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Subject: hi\r\n\r\n.dot\r\nbody\r\n")
    assert (envelope.sender, envelope.recipients, envelope.body, envelope.client_ip, envelope.helo) == (
        "a@example.org", ["b@example.com"], "7BIT", "127.0.0.1", "client.test")


def test_received_header_escapes_what_would_start_a_forged_field():
    # The dialogue never lets such a HELO through; the header is safe even
    # if another caller (a plugin, a future path) passes one.
    from relaymail.smtp.received import received_header
    assert received_header("a\r\nX-Forged: 1\u2028b\x85c\x9bd", "192.0.2.1", "mx.test", "ESMTP",
                           "Q0001", recipient="b\u2029@example.com", when=1700000000) == (
        b"Received: from a\\x{D}\\x{A}X-Forged: 1\\x{2028}b\\x{85}c\\x{9B}d ([192.0.2.1])\r\n"
        b"\tby mx.test (relaymail) with ESMTP id Q0001\r\n"
        b"\tfor <b\\x{2029}@example.com>;\r\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n")


def test_received_headers_of_successive_seconds_and_clients_each_get_their_own():
    # The date of a second and a client's address literal are remembered;
    # each header still says its own.
    from relaymail.smtp.received import received_header
    headers = [received_header("c.test", ip, "mx.test", "ESMTP", "Q0001", when=when)
               for ip, when in [("192.0.2.1", 1700000000.9), ("2001:db8::1", 1700000001.0),
                                ("192.0.2.1", 1700000000.0), ("::ffff:192.0.2.9", 1700000059.5)]]
    assert [header.splitlines()[0] for header in headers] == [
        b"Received: from c.test ([192.0.2.1])", b"Received: from c.test ([IPv6:2001:db8::1])",
        b"Received: from c.test ([192.0.2.1])", b"Received: from c.test ([192.0.2.9])"]
    assert [header.splitlines()[-1] for header in headers] == [
        b"\tTue, 14 Nov 2023 22:13:20 +0000", b"\tTue, 14 Nov 2023 22:13:21 +0000",
        b"\tTue, 14 Nov 2023 22:13:20 +0000", b"\tTue, 14 Nov 2023 22:14:19 +0000"]


def test_transaction_is_cleared_after_data(session):
    transaction(session)
    session.command(b"DATA")
    session.send(b"x\r\n.\r\n")
    assert session.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_oversize_message_is_552_after_the_dot_and_session_in_sync(tmp_path):
    s = session_for(make_settings(tmp_path, limits__message_size="100"))
    transaction(s)
    s.command(b"DATA")
    assert s.send(b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n") == b""
    assert s.send(b".\r\nNOOP\r\n") == b"552 5.3.4 Error: message too big\r\n250 2.0.0 Ok\r\n"
    assert s.queue.messages == {} and s.queue.writers[0].aborted


def test_long_line_in_data_is_refused_and_session_in_sync(session):
    transaction(session)
    session.command(b"DATA")
    # A content error (554 5.6.0), not a command syntax error (500).
    assert session.send(b"a" * 5000 + b"\r\nRSET\r\n.\r\nNOOP\r\n") == (
        b"554 5.6.0 Error: message has a line longer than the limit\r\n250 2.0.0 Ok\r\n")
    assert session.queue.messages == {} and session.queue.writers[0].aborted


def test_998_octet_line_starting_with_a_dot_is_accepted(session):
    # RFC 5321 4.5.3.1.6: the dot added for transparency is not counted.
    line = b"." + b"x" * 997
    transaction(session)
    session.command(b"DATA")
    assert session.send(b"Subject: dots\r\n\r\n." + line + b"\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q0001\r\n")
    assert session.queue.messages["Q0001"][1].endswith(b"\r\n\r\n" + line + b"\r\n")
    transaction(session)
    session.command(b"DATA")
    assert session.send(b"." + line + b"x\r\n.\r\n") == (
        b"554 5.6.0 Error: message has a line longer than the limit\r\n")


def test_long_lines_split_cuts_instead_of_refusing(tmp_path):
    s = session_for(make_settings(tmp_path, limits__long_lines="split"))
    transaction(s)
    s.command(b"DATA")
    assert s.send(b"Subject: " + b"s" * 1000 + b"\r\n\r\n" + b"b" * 1500 + b"\r\n.\r\nNOOP\r\n") == (
        b"250 2.0.0 Ok: queued as Q0001\r\n250 2.0.0 Ok\r\n")
    stored = s.queue.messages["Q0001"][1].split(b"\r\n", 4)[4]     # after our Received field
    assert stored == (b"Subject: " + b"s" * 989 + b"\r\n " + b"s" * 11 + b"\r\n\r\n"
                      + b"b" * 998 + b"\r\n " + b"b" * 502 + b"\r\n")


def received_fields(count):
    return b"".join(b"Received: from h%d.example by h%d.example; "
                    b"Tue, 14 Nov 2023 22:13:20 +0000\r\n" % (n, n + 1) for n in range(count))


def test_message_with_too_many_received_fields_is_554_5_4_6(session):
    # 50 Received fields of its own and ours makes 51, over [limits] hops.
    transaction(session)
    session.command(b"DATA")
    assert session.send(received_fields(50) + b"Subject: loop\r\n\r\nx\r\n.\r\nNOOP\r\n") == (
        b"554 5.4.6 Too many hops\r\n250 2.0.0 Ok\r\n")
    assert session.queue.messages == {} and session.queue.writers[0].aborted
    # 49 and ours makes 50: accepted.
    transaction(session)
    session.command(b"DATA")
    assert session.send(received_fields(49) + b"\r\nx\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q0002\r\n")
    assert session.queue.messages["Q0002"][1].lower().count(b"\nreceived:") == 50 - 1


def test_hops_limit_is_configurable(tmp_path):
    s = session_for(make_settings(tmp_path, limits__hops="3"))
    transaction(s)
    s.command(b"DATA")
    assert s.send(received_fields(3) + b"\r\n.\r\n") == b"554 5.4.6 Too many hops\r\n"
    transaction(s)
    s.command(b"DATA")
    assert s.send(received_fields(2) + b"\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued")


def test_nul_in_data_is_554_and_session_in_sync(session):
    transaction(session)
    session.command(b"DATA")
    assert session.send(b"Subject: x\r\n\r\na\r\n\x00.\r\nRSET\r\nb\r\n.\r\nNOOP\r\n") == (
        b"554 5.6.0 Error: NUL character in message\r\n250 2.0.0 Ok\r\n")
    assert session.queue.messages == {} and session.queue.writers[0].aborted


def test_nul_in_data_passes_when_allowed(tmp_path):
    s = session_for(make_settings(tmp_path, limits__allow_nul="yes"))
    transaction(s)
    s.command(b"DATA")
    assert s.send(b"Subject: x\r\n\r\na\r\n\x00.\r\nb\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q0001\r\n")
    assert s.queue.messages["Q0001"][1].endswith(b"\r\n\r\na\r\n\x00.\r\nb\r\n")


def test_bare_lf_in_data_is_refused(session):
    transaction(session)
    session.command(b"DATA")
    assert session.send(b"a\n.\nMAIL FROM:<x@example.org>\r\n.\r\n") == (
        b"554 5.6.0 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>\r\n")
    assert session.queue.messages == {}


def test_queue_write_error_is_451(session):
    transaction(session)
    session.command(b"DATA")
    session.queue.fail_writes = True
    assert session.send(b"a\r\n.\r\n") == b"451 4.3.0 Error: local error in processing, try again later\r\n"


def test_queue_commit_error_is_451(session):
    transaction(session)
    session.command(b"DATA")
    session.queue.fail_commits = True
    assert session.send(b"a\r\n.\r\n") == b"451 4.3.0 Error: local error in processing, try again later\r\n"
    assert session.queue.writers[0].aborted


def test_lists_are_expanded_when_queued(settings):
    s = session_for(settings, lists={"staff@example.com": ["alice@example.com", "bob@example.org"]})
    transaction(s, b"staff@example.com")
    s.command(b"DATA")
    s.send(b"x\r\n.\r\n")
    envelope, _ = s.queue.messages["Q0001"]
    assert envelope.recipients == ["alice@example.com", "bob@example.org"]


# -- PIPELINING with plugins that answer later -----------------------------

def test_replies_leave_in_order_when_a_plugin_answers_later(session, scripted):
    ehlo(session)
    out = session.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<later1@example.net>\r\n"
                       b"RCPT TO:<b@example.com>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n")
    assert out == b"250 2.1.0 Ok\r\n"
    scripted.pending["later1"].callback(Decision.accept())
    assert session.take() == (
        b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as Q0001\r\n221 2.0.0 mx.test Bye\r\n")
    assert session.queue.messages["Q0001"][0].recipients == ["later1@example.net", "b@example.com"]


def test_data_after_late_rejections_is_554(session, scripted):
    ehlo(session)
    out = session.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<later2@example.com>\r\nDATA\r\nQUIT\r\n")
    assert out == b"250 2.1.0 Ok\r\n"
    scripted.pending["later2"].callback(Decision.reject(550, "5.1.1", "User unknown"))
    assert session.take() == (
        b"550 5.1.1 User unknown\r\n554 5.5.1 Error: no valid recipients\r\n221 2.0.0 mx.test Bye\r\n")


def test_plugin_timeout_gives_451(tmp_path, scripted):
    s = session_for(make_settings(tmp_path, plugins__timeout="2"), scripted)
    ehlo(s)
    assert s.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<later3@example.com>\r\nNOOP\r\n") == b"250 2.1.0 Ok\r\n"
    s.clock.advance(2.5)
    assert s.take() == (
        b"451 4.3.0 Temporary failure checking recipient, try again later\r\n250 2.0.0 Ok\r\n")


# -- RSET, NOOP, QUIT, VRFY, EXPN, HELP, unknown ---------------------------

def test_rset(session):
    ehlo(session)
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RSET") == b"250 2.0.0 Ok\r\n"
    assert session.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
    assert session.command(b"RSET now") == b"501 5.5.4 Syntax error: this command takes no arguments\r\n"


def test_noop_with_and_without_argument(session):
    ehlo(session)
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert session.command(b"NOOP hello") == b"250 2.0.0 Ok\r\n"


def test_quit_closes(session):
    ehlo(session)
    assert session.command(b"QUIT") == b"221 2.0.0 mx.test Bye\r\n"
    assert session.closed


def test_vrfy(session):
    ehlo(session)
    assert session.command(b"VRFY known@example.com") == b"250 2.1.5 <known@example.com>\r\n"
    assert session.command(b"VRFY someone") == (
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n")
    assert session.command(b"VRFY") == b"501 5.5.4 Syntax: VRFY address\r\n"


def test_vrfy_and_expn_take_the_smtputf8_parameter(settings):
    # RFC 6531 3.7.4.2; curl sends "EXPN name SMTPUTF8".
    s = session_for(settings, ScriptedValidator(),
                    lists={"staff": ["alice@example.com"], "ünï": ["bob@example.com"]})
    ehlo(s)
    assert s.command(b"EXPN staff SMTPUTF8") == b"250 2.1.5 <alice@example.com>\r\n"
    assert s.command(b"EXPN <staff> smtputf8") == b"250 2.1.5 <alice@example.com>\r\n"
    assert s.command("EXPN ünï SMTPUTF8".encode()) == b"250 2.1.5 <bob@example.com>\r\n"
    assert s.command(b"VRFY known@example.com SMTPUTF8") == b"250 2.1.5 <known@example.com>\r\n"
    # A quoted string with a space is one name (RFC 5321 4.1.2 String).
    assert s.command(b'VRFY "some one" SMTPUTF8') == (
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n")
    assert s.command("VRFY known.jürgen@example.com SMTPUTF8".encode()) == (
        "250 2.1.5 <known.jürgen@example.com>\r\n".encode())


def test_vrfy_and_expn_refuse_other_parameters_and_utf8_without_smtputf8(settings):
    s = session_for(settings, ScriptedValidator(), lists={"staff": ["alice@example.com"]})
    ehlo(s)
    # RFC 5321 4.3.2: 555 is for MAIL and RCPT; VRFY and EXPN get 504.
    assert s.command(b"EXPN staff FOO=1") == b"504 5.5.4 Unsupported parameter FOO=1\r\n"
    assert s.command(b"VRFY known SMTPUTF8 BODY=8BITMIME") == (
        b"504 5.5.4 Unsupported parameter BODY=8BITMIME\r\n")
    assert s.command("VRFY jürgen".encode()) == (
        b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter\r\n")
    assert s.command("EXPN ünï".encode()) == (
        b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter\r\n")
    # SMTPUTF8 is only advertised after EHLO (RFC 5321 4.1.1.11).
    s.command(b"HELO client.test")
    assert s.command(b"EXPN staff SMTPUTF8") == b"504 Unsupported parameter SMTPUTF8\r\n"
    assert s.command(b"EXPN staff") == b"250 <alice@example.com>\r\n"


def test_expn(settings):
    s = session_for(settings, lists={"staff": ["alice@example.com", "bob@example.com"]})
    ehlo(s)
    assert s.command(b"EXPN staff") == b"250-2.1.5 <alice@example.com>\r\n250 2.1.5 <bob@example.com>\r\n"
    assert s.command(b"EXPN nobody") == b"550 5.1.1 Not a mailing list I know\r\n"
    assert s.command(b"EXPN") == b"501 5.5.4 Syntax: EXPN list\r\n"


def test_help(session):
    ehlo(session)
    assert session.command(b"HELP") == (
        b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH\r\n"
        b"214 2.0.0 See RFC 5321; HELP command gives its syntax\r\n")
    assert session.command(b"HELP rcpt") == (
        b"214 2.0.0 RCPT TO:<address> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] [ORCPT=type;xtext]\r\n")
    assert session.command(b"HELP FOO") == b"504 5.5.1 HELP topic unknown\r\n"


def test_unknown_and_empty_commands_are_500(session):
    ehlo(session)
    assert session.command(b"TURN 10") == b"500 5.5.2 Error: command not recognized\r\n"
    assert session.command(b"") == b"500 5.5.2 Error: empty command\r\n"


def test_overlong_command_line_is_500_and_session_in_sync(session):
    ehlo(session)
    assert session.send(b"NOOP " + b"x" * 3000) == b"500 5.5.2 Error: line too long\r\n"
    assert session.send(b"y" * 100 + b"\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_http_request_hangs_up(session):
    assert session.command(b"GET / HTTP/1.1") == b"421 mx.test Error: HTTP request on the SMTP port\r\n"
    assert session.closed


def test_too_many_errors_closes(tmp_path):
    s = session_for(make_settings(tmp_path, limits__errors="3"))
    ehlo(s)
    assert s.command(b"FOO") == b"500 5.5.2 Error: command not recognized\r\n"
    assert s.command(b"FOO") == b"500 5.5.2 Error: command not recognized\r\n"
    assert s.command(b"FOO") == (
        b"500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.test Error: too many errors\r\n")
    assert s.closed
    assert s.command(b"NOOP") == b""


def test_data_timeout_closes(tmp_path):
    s = session_for(make_settings(tmp_path, limits__data_timeout="3", limits__command_timeout="100"))
    transaction(s)
    s.command(b"DATA")
    s.send(b"some data\r\n")
    s.clock.advance(2.9)
    s.send(b"more\r\n")
    s.clock.advance(2.9)
    assert s.take() == b""
    s.clock.advance(0.2)
    assert s.take() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert s.closed
    assert s.queue.writers[0].aborted


def test_command_timeout_closes(tmp_path):
    s = session_for(make_settings(tmp_path, limits__command_timeout="5"))
    s.clock.advance(4.9)
    assert s.take() == b""
    s.clock.advance(0.2)
    assert s.take() == b"421 mx.test Error: timeout exceeded\r\n"
    assert s.closed


def test_no_timeout_while_the_server_is_the_one_busy(tmp_path, scripted):
    s = session_for(make_settings(tmp_path, limits__command_timeout="5", plugins__timeout="1000"), scripted)
    ehlo(s)
    s.command(b"MAIL FROM:<a@example.org>")
    assert s.command(b"RCPT TO:<later9@example.com>") == b""
    s.clock.advance(60)            # a slow plugin, not a slow client
    assert s.take() == b"" and not s.closed
    scripted.pending["later9"].callback(Decision.accept())
    assert s.take() == b"250 2.1.5 Ok\r\n"
    s.clock.advance(5.1)           # now the client's clock runs again
    assert s.take() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"


def test_bare_postmaster_is_accepted_from_anyone(outsider):
    # RFC 5321 4.5.1; it stands for the postmaster of our first relay domain.
    ehlo(outsider)
    outsider.command(b"MAIL FROM:<a@example.org>")
    assert outsider.command(b"RCPT TO:<Postmaster>") == b"250 2.1.5 Ok\r\n"
    outsider.command(b"DATA")
    outsider.send(b"x\r\n.\r\n")
    assert outsider.queue.messages["Q0001"][0].recipients == ["postmaster@example.com"]


# -- who may VRFY and EXPN ([server] vrfy, expn) ------------------------------

CANNOT_VRFY = b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
LISTS = {"staff": ["alice@example.com", "bob@example.com"], "everyone": ["staff", "carol@example.com"]}
STAFF = b"250-2.1.5 <alice@example.com>\r\n250 2.1.5 <bob@example.com>\r\n"


def logged_in(s, user="alice"):
    # What a successful AUTH leaves behind (tests/test_auth.py drives AUTH itself).
    s.protocol.context.authenticated_user = user
    return s


def test_vrfy_from_an_outsider_is_252_whether_or_not_the_user_exists(outsider):
    ehlo(outsider)
    assert outsider.command(b"VRFY known@example.com") == CANNOT_VRFY
    assert outsider.command(b"VRFY <known>") == CANNOT_VRFY
    assert outsider.command(b"VRFY someone@example.com") == CANNOT_VRFY
    assert outsider.command(b"VRFY") == b"501 5.5.4 Syntax: VRFY address\r\n"


def test_vrfy_from_an_authenticated_outsider_is_answered(outsider):
    logged_in(ehlo(outsider))
    assert outsider.command(b"VRFY known@example.com") == b"250 2.1.5 <known@example.com>\r\n"


def test_vrfy_trusted_only_is_502_5_7_0_for_outsiders(tmp_path, scripted):
    settings = make_settings(tmp_path, server__vrfy="trusted")
    outsider = ehlo(session_for(settings, scripted, client_ip="192.0.2.7"))
    assert outsider.command(b"VRFY known@example.com") == (
        b"502 5.7.0 Error: VRFY is only for trusted or authenticated clients\r\n")
    assert outsider.command(b"VRFY") == (
        b"502 5.7.0 Error: VRFY is only for trusted or authenticated clients\r\n")
    assert logged_in(outsider).command(b"VRFY known@example.com") == b"250 2.1.5 <known@example.com>\r\n"
    insider = ehlo(session_for(settings, scripted))
    assert insider.command(b"VRFY known@example.com") == b"250 2.1.5 <known@example.com>\r\n"


def test_vrfy_off_is_502_5_5_1_for_everyone(tmp_path, scripted):
    settings = make_settings(tmp_path, server__vrfy="off")
    for s in (session_for(settings, scripted), session_for(settings, scripted, client_ip="192.0.2.7")):
        ehlo(s)
        assert s.command(b"VRFY known@example.com") == b"502 5.5.1 Error: VRFY command is disabled\r\n"
        assert s.command(b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_expn_from_an_outsider_is_502_5_7_0(settings):
    s = ehlo(session_for(settings, client_ip="192.0.2.7", lists=LISTS))
    for command in (b"EXPN staff", b"EXPN everyone", b"EXPN <staff>", b"EXPN nobody", b"EXPN"):
        assert s.command(command) == b"502 5.7.0 Error: EXPN is only for trusted or authenticated clients\r\n"
    assert s.command(b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_expn_from_trusted_or_authenticated_clients_lists_members(settings):
    assert ehlo(session_for(settings, lists=LISTS)).command(b"EXPN staff") == STAFF
    outsider = logged_in(ehlo(session_for(settings, client_ip="192.0.2.7", lists=LISTS)))
    assert outsider.command(b"EXPN staff") == STAFF


def test_expn_probes_from_an_outsider_count_as_errors(tmp_path):
    s = ehlo(session_for(make_settings(tmp_path, limits__errors="3"), client_ip="192.0.2.7", lists=LISTS))
    refused = b"502 5.7.0 Error: EXPN is only for trusted or authenticated clients\r\n"
    assert s.command(b"EXPN staff") == refused
    assert s.command(b"EXPN everyone") == refused
    assert s.command(b"EXPN all") == refused + b"421 4.7.0 mx.test Error: too many errors\r\n"
    assert s.closed


def test_expn_anyone_lists_members_to_outsiders(tmp_path):
    settings = make_settings(tmp_path, server__expn="anyone")
    assert ehlo(session_for(settings, client_ip="192.0.2.7", lists=LISTS)).command(b"EXPN staff") == STAFF


def test_expn_off_is_502_5_5_1_but_lists_are_still_expanded_when_queued(tmp_path):
    settings = make_settings(tmp_path, server__expn="off")
    for client_ip in ("127.0.0.1", "192.0.2.7"):
        s = ehlo(session_for(settings, client_ip=client_ip, lists={"staff@example.com": LISTS["staff"]}))
        assert s.command(b"EXPN staff@example.com") == b"502 5.5.1 Error: EXPN command is disabled\r\n"
        transaction(s, b"staff@example.com")
        s.command(b"DATA")
        assert s.send(b"x\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q0001\r\n"
        envelope, _ = s.queue.messages["Q0001"]
        assert envelope.recipients == ["alice@example.com", "bob@example.com"]


# -- no room in the queue ([queue] min_free) ----------------------------------

STORAGE = b"452 4.3.1 Insufficient system storage\r\n"


@pytest.fixture
def events(monkeypatch):
    """What the dialogue logs, as formatted lines and raw events."""
    from twisted.logger import Logger
    from relaymail.smtp import dialogue
    captured = []
    monkeypatch.setattr(dialogue, "log", Logger(namespace="relaymail.smtp", observer=captured.append))
    return captured


def label(session):
    """The session's tag on its log lines: its id and Postfix's unknown[ip]:port."""
    context = session.protocol.context
    assert re.fullmatch(r"[A-Z2-7]{8}", context.session_id)
    assert context.label == f"{context.session_id} unknown[127.0.0.1]:40000"
    return context.label


def formatted(events):
    from twisted.logger import formatEvent
    return [formatEvent(event) for event in events]


def test_mail_is_452_4_3_1_when_the_queue_has_no_room(session, events):
    ehlo(session)
    session.queue.room = -1          # below the reserve already
    assert session.command(b"MAIL FROM:<a@example.org>") == STORAGE
    assert session.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert formatted(events) == [
        f"{label(session)}: mail from=<a@example.org> size=0: 452 4.3.1 Insufficient system "
        "storage: the queue's file system has less than [queue] min_free=15728640 bytes to spare"]
    assert "log_failure" not in events[0]
    session.queue.room = None        # space freed: mail is taken again
    assert session.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"


def test_a_declared_size_must_fit_beside_the_reserve(session):
    ehlo(session)
    session.queue.room = 5000
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=5001") == STORAGE
    assert session.command(b"MAIL FROM:<> SIZE=5000") == b"250 2.1.0 Ok\r\n"
    assert session.queue.room_asked == [5001, 5000]


def test_a_malformed_mail_is_told_its_error_before_the_lack_of_room(session):
    ehlo(session)
    session.queue.room = -1
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=x") == (
        b"501 5.5.4 Syntax error in parameters: SIZE takes a number of octets\r\n")
    assert session.command(b"MAIL FROM:<a@example.org> SIZE=20000000") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert session.queue.room_asked == []


def test_a_commit_the_disk_refuses_is_451_and_one_line_without_traceback(session, events):
    transaction(session)
    session.command(b"DATA")
    session.queue.fail_commits = True
    assert session.send(b"a\r\n.\r\n") == b"451 4.3.0 Error: local error in processing, try again later\r\n"
    lines = [line for line in formatted(events) if "rcpt from=" not in line]
    assert lines == [f"{label(session)}: message Q0001 not queued: [Errno 5] Input/output "
                     "error: 451 4.3.0 Error: local error in processing, try again later"]
    assert not any("log_failure" in event for event in events)


def test_a_queue_file_the_disk_cannot_start_is_451_and_one_line(session, events, monkeypatch):
    transaction(session)

    def no_space():
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(session.queue, "new_message", no_space)
    assert session.command(b"DATA") == b"451 4.3.0 Error: local error in processing, try again later\r\n"
    assert formatted(events)[-1] == (
        f"{label(session)}: cannot start a queue file: [Errno 28] No space left on device")
    assert not any("log_failure" in event for event in events)
