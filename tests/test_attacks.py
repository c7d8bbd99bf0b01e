"""The attack classes of SMTP-NOTES, each against the protocol driven with
bytes.  (STARTTLS injection needs real TLS: tests/test_tls_auth.py.)"""

import pytest
from twisted.internet.task import Clock

from relaymail.policy.loader import build_plugins
from relaymail.smtp.limits import ConnectionGate
from tests.support import Session, make_settings


def session_for(tmp_path, client_ip="192.0.2.7", **keys):
    settings = make_settings(tmp_path, **keys)
    return Session(settings, build_plugins(settings)[0], client_ip=client_ip)


def in_data(session):
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
    assert session.command(b"DATA").startswith(b"354 ")


# -- 1. SMTP smuggling -------------------------------------------------------

@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\x00.\x00\r\n"])
def test_smuggled_end_neither_ends_the_message_nor_starts_another(tmp_path, ending):
    session = session_for(tmp_path)
    in_data(session)
    out = session.send(b"Subject: a\r\n\r\ntext" + ending
                       + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
                       + b"forged\r\n")
    assert out == b""                       # still inside the first message
    final = session.send(b".\r\nNOOP\r\n").split(b"\r\n")[:-1]
    assert len(final) == 2 and final[1] == b"250 2.0.0 Ok"
    if ending.startswith(b"\x00"):
        # NUL is not a line end, and by default not passed on either
        # ([limits] allow_nul): refused once the real end arrives.
        assert final[0] == b"554 5.6.0 Error: NUL character in message"
        assert session.queue.messages == {}
    else:
        assert final[0] == b"554 5.6.0 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>"
        assert session.queue.messages == {}


# -- 3. Open relay -------------------------------------------------------------

@pytest.mark.parametrize("recipient", [
    b"<victim@example.net>",                    # a foreign domain
    b"<victim%example.net@example.com>",        # the percent hack
    b"<example.net!victim@example.com>",        # a bang path
    b'<"victim@example.net"@example.com>',      # an @ in a quoted local part
    b"<@example.com:victim@example.net>",       # a source route through us
    b"<victim@[192.0.2.1]>",                    # an address literal
    b"<victim@[IPv6:2001:db8::1]>",
    b"<victim@example.com.example.net>",        # our domain as a prefix
])
def test_open_relay_attempts_are_refused(tmp_path, recipient):
    session = session_for(tmp_path)
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:" + recipient) == b"554 5.7.1 Relay access denied\r\n"


# -- 7. HTTP on the SMTP port --------------------------------------------------

@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /form HTTP/1.0", b"CONNECT mx:25 HTTP/1.1",
                                  b"Host: relay.example", b"User-Agent: curl/8"])
def test_http_requests_are_hung_up_on(tmp_path, line):
    session = session_for(tmp_path)
    assert session.command(line) == b"421 mx.test Error: HTTP request on the SMTP port\r\n"
    assert session.closed


# -- 4. Oversize input ---------------------------------------------------------

def test_oversize_header_is_refused_after_the_dot(tmp_path):
    session = session_for(tmp_path, limits__header_size="1000")
    in_data(session)
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 60) for n in range(20))
    assert session.send(headers + b"\r\nbody\r\n.\r\nNOOP\r\n") == (
        b"552 5.3.4 Error: message header size exceeds limit\r\n250 2.0.0 Ok\r\n")


def test_header_limit_counts_only_the_header(tmp_path):
    session = session_for(tmp_path, limits__header_size="1000")
    in_data(session)
    body = b"".join(b"%s\r\n" % (b"z" * 70) for _ in range(100))
    assert session.send(b"Subject: small\r\n\r\n" + body + b".\r\n").startswith(b"250 2.0.0 Ok: queued")


def test_oversize_message_and_lines(tmp_path):
    session = session_for(tmp_path, limits__message_size="1000")
    in_data(session)
    assert session.send(b"a" * 900 + b"\r\n" + b"b" * 900 + b"\r\n.\r\n") == (
        b"552 5.3.4 Error: message too big\r\n")
    session.command(b"MAIL FROM:<a@example.org>")
    session.command(b"RCPT TO:<b@example.com>")
    session.command(b"DATA")
    assert session.send(b"c" * 5000 + b"\r\n.\r\n") == (
        b"554 5.6.0 Error: message has a line longer than the limit\r\n")
    assert session.send(b"NOOP " + b"d" * 5000 + b"\r\nNOOP\r\n") == (
        b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n")


# -- 5. Slow clients -------------------------------------------------------------

def test_slowloris_on_commands_gets_no_extra_time(tmp_path):
    session = session_for(tmp_path, limits__command_timeout="10")
    session.command(b"EHLO client.test")
    for _ in range(3):
        session.clock.advance(3)
        assert session.send(b"N") == b""       # a byte now and then
    assert session.take() == b""
    session.clock.advance(1.5)
    assert session.take() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert session.closed


def test_data_trickle_is_cut_at_the_minimum_rate(tmp_path):
    session = session_for(tmp_path, limits__data_timeout="10", limits__min_data_rate="100")
    in_data(session)
    # 10 bytes every 9 seconds: each block is in time, the rate is not.
    # DATA may last data_timeout + bytes / min_data_rate = 10.2 s here.
    session.clock.advance(9)
    assert session.send(b"0123456789") == b""
    session.clock.advance(9)
    assert session.send(b"0123456789") == b"421 4.4.2 mx.test Error: data rate too low\r\n"
    assert session.closed
    assert session.queue.writers[0].aborted


def test_a_fast_enough_sender_is_not_cut(tmp_path):
    session = session_for(tmp_path, limits__data_timeout="10", limits__min_data_rate="100")
    in_data(session)
    for _ in range(5):
        session.clock.advance(9)
        assert session.send(b"x" * 998 + b"\r\n") == b""
    assert session.send(b".\r\n").startswith(b"250 2.0.0 Ok: queued as ")


# -- 6. Floods -------------------------------------------------------------------

def test_recipient_flood_hits_the_recipient_and_error_limits(tmp_path):
    session = session_for(tmp_path, limits__recipients="3", limits__errors="5")
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    out = session.send(b"".join(b"RCPT TO:<u%d@example.com>\r\n" % n for n in range(20)))
    lines = out.split(b"\r\n")[:-1]
    assert lines[:3] == [b"250 2.1.5 Ok"] * 3
    assert lines[3:8] == [b"452 4.5.3 Error: too many recipients"] * 5
    assert lines[8:] == [b"421 4.7.0 mx.test Error: too many errors"]
    assert session.closed


def test_repeated_ehlo_is_junk(tmp_path):
    session = session_for(tmp_path, limits__junk_commands="2", limits__errors="2")
    ehlo = session.command(b"EHLO client.test")
    assert ehlo.startswith(b"250-mx.test Hello client.test\r\n")
    assert session.command(b"HELO client.test") == b"250 mx.test\r\n"        # junk 1
    assert session.command(b"EHLO client.test") == ehlo                       # junk 2
    assert session.command(b"EHLO client.test") == ehlo                       # error 1
    # After HELO, no enhanced codes (RFC 2034).
    assert session.command(b"HELO client.test") == (
        b"250 mx.test\r\n421 mx.test Error: too many errors\r\n")             # error 2
    assert session.closed


def test_a_helo_retried_after_an_error_is_not_junk(tmp_path):
    # A failed HELO gives the session no name: trying again is not junk.
    session = session_for(tmp_path, limits__junk_commands="0", limits__errors="2")
    assert session.command(b"HELO").startswith(b"501 ")                        # error 1
    assert session.command(b"HELO client.test") == b"250 mx.test\r\n"
    assert not session.closed
    assert session.command(b"EHLO client.test").endswith(
        b"250 HELP\r\n421 4.7.0 mx.test Error: too many errors\r\n")


class Crowd:
    """Sessions sharing one connection gate, as all listeners share it;
    ``threshold`` open connections make the gate stressed."""

    def __init__(self, tmp_path, threshold, **keys):
        keys = {"limits__connections": "10", "limits__stress_threshold": str(threshold),
                "limits__command_timeout": "300", "limits__data_timeout": "180",
                "limits__stress_timeout": "10", **keys}
        self.settings = make_settings(tmp_path, **keys)
        self.gate = ConnectionGate(self.settings, Clock())
        self.plugins = build_plugins(self.settings)[0]

    def session(self, client_ip="192.0.2.7"):
        return Session(self.settings, self.plugins, client_ip=client_ip,
                       factory_options={"gate": self.gate})


TIMEOUT = b"421 4.4.2 mx.test Error: timeout exceeded\r\n"


def test_under_stress_a_new_session_idles_out_after_the_stress_timeout(tmp_path):
    crowd = Crowd(tmp_path, threshold=2)
    crowd.session(client_ip="192.0.2.8")
    session = crowd.session()
    assert crowd.gate.stressed
    session.command(b"EHLO client.test")
    session.clock.advance(9.9)
    assert session.take() == b"" and not session.closed
    session.clock.advance(0.1)
    assert session.take() == TIMEOUT
    assert session.closed


def test_stress_shortens_the_wait_of_sessions_already_open(tmp_path):
    crowd = Crowd(tmp_path, threshold=3)
    idle = crowd.session()
    idle.command(b"EHLO client.test")
    idle.clock.advance(200)
    assert idle.take() == b""
    crowd.session(client_ip="192.0.2.8")
    crowd.session(client_ip="192.0.2.9")          # the third: stress
    idle.clock.advance(9.9)
    assert idle.take() == b""
    idle.clock.advance(0.1)
    assert idle.take() == TIMEOUT


def test_stress_shortens_the_data_timeout_too(tmp_path):
    crowd = Crowd(tmp_path, threshold=2)
    session = crowd.session()
    in_data(session)
    crowd.session(client_ip="192.0.2.8")
    session.clock.advance(10)
    assert session.take() == TIMEOUT
    assert session.queue.writers[0].aborted


def test_when_stress_ends_the_normal_timeout_is_back(tmp_path):
    crowd = Crowd(tmp_path, threshold=2)
    session = crowd.session()
    session.command(b"EHLO client.test")
    other = crowd.session(client_ip="192.0.2.8")
    assert crowd.gate.stressed
    other.command(b"QUIT")
    other.protocol.connectionLost(None)
    assert not crowd.gate.stressed
    session.clock.advance(299)
    assert session.take() == b""
    session.clock.advance(1)
    assert session.take() == TIMEOUT


def test_stress_coming_and_going_never_lengthens_an_idle_wait(tmp_path):
    # A client that can push the count in and out of stress (every 9 s,
    # inside the 10 s stress timeout) must not restart the others' waits:
    # an idle session still ends 300 s after its last command.
    crowd = Crowd(tmp_path, threshold=2)
    idle = crowd.session()
    idle.command(b"EHLO client.test")
    for _ in range(33):
        other = crowd.session(client_ip="192.0.2.8")
        assert crowd.gate.stressed
        idle.clock.advance(5)
        other.command(b"QUIT")
        other.protocol.connectionLost(None)
        assert not crowd.gate.stressed
        idle.clock.advance(4)
    assert idle.take() == b"" and not idle.closed          # 297 s
    crowd.session(client_ip="192.0.2.8")                    # stress once more
    idle.clock.advance(2.9)
    assert idle.take() == b""
    idle.clock.advance(0.1)
    assert idle.take() == TIMEOUT and idle.closed


def test_a_stress_cuts_a_wait_short_but_never_past_its_normal_end(tmp_path):
    # 295 s idle when the stress starts: 5 s are left, not the 10 s of
    # stress_timeout.
    crowd = Crowd(tmp_path, threshold=2)
    idle = crowd.session()
    idle.command(b"EHLO client.test")
    idle.clock.advance(295)
    crowd.session(client_ip="192.0.2.8")
    idle.clock.advance(4.9)
    assert idle.take() == b""
    idle.clock.advance(0.1)
    assert idle.take() == TIMEOUT


def test_after_a_bdat_chunk_the_client_has_the_command_timeout(tmp_path):
    # The chunk is answered at once: what the client owes next is a
    # command, so the wait is command_timeout (300 s), not data_timeout.
    session = session_for(tmp_path, limits__command_timeout="300", limits__data_timeout="180")
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(b"RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
    assert session.send(b"BDAT 5\r\nhello") == b"250 2.0.0 Ok: 5 bytes\r\n"
    session.clock.advance(299)
    assert session.take() == b"" and not session.closed
    session.clock.advance(1)
    assert session.take() == TIMEOUT


def test_trusted_clients_keep_the_normal_limits_under_stress(tmp_path):
    crowd = Crowd(tmp_path, threshold=1)
    trusted = crowd.session(client_ip="127.0.0.1")
    assert crowd.gate.stressed
    trusted.command(b"EHLO client.test")
    trusted.clock.advance(299)
    assert trusted.command(b"RCPT TO:<b@example.com>") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert trusted.command(b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_under_stress_one_error_ends_the_session(tmp_path):
    crowd = Crowd(tmp_path, threshold=1)
    session = crowd.session()
    session.command(b"EHLO client.test")
    assert session.command(b"RCPT TO:<b@example.com>") == (
        b"503 5.5.1 Error: need MAIL command\r\n421 4.7.0 mx.test Error: too many errors\r\n")
    assert session.closed


def test_under_stress_the_second_junk_command_ends_the_session(tmp_path):
    crowd = Crowd(tmp_path, threshold=1)
    session = crowd.session()
    session.command(b"EHLO client.test")
    assert session.command(b"EHLO client.test").endswith(b"250 HELP\r\n")      # junk 1
    assert session.command(b"NOOP") == (
        b"250 2.0.0 Ok\r\n421 4.7.0 mx.test Error: too many errors\r\n")
    assert session.closed


# -- 8. Control characters and invalid UTF-8 -----------------------------------

@pytest.mark.parametrize("line", [
    b"EHLO cli\x00ent", b"EHLO \xff\xfe", b"HELO a\x1bb",
    b"MAIL FROM:<a\x7f@example.org>", b"MAIL FROM:<a@example.org> SIZE=1\x0b",
    b"RCPT TO:<b\tc@example.com>", b"MAIL FROM:<\xc3(@example.org>",
    # C1 and the Unicode line separators, as UTF-8 (SMTP-NOTES: forged log lines).
    b"EHLO a\xe2\x80\xa8b", b"HELO a\xc2\x85b", b"EHLO \xc2\x9b2J",
    b"MAIL FROM:<j\xc3\xb6\xe2\x80\xa9rg@example.org> SMTPUTF8",
])
def test_control_characters_and_bad_utf8_are_501(tmp_path, line):
    session = session_for(tmp_path)
    if not line.startswith((b"EHLO", b"HELO")):
        session.command(b"EHLO client.test")
    if line.startswith(b"RCPT"):
        session.command(b"MAIL FROM:<a@example.org>")
    assert session.command(line) == (
        b"501 5.5.2 Error: control characters or invalid UTF-8 in command\r\n"
        if not line.startswith((b"EHLO", b"HELO")) else
        b"501 Error: control characters or invalid UTF-8 in command\r\n")
    assert session.command(b"NOOP").startswith(b"250 ")


def test_a_client_that_does_not_read_its_replies_is_not_answered(tmp_path):
    session = session_for(tmp_path, limits__junk_commands="1000000")
    session.command(b"EHLO client.test")
    # The transport says its output buffer is full (the client reads nothing).
    session.protocol.pauseProducing()
    assert session.send(b"HELP\r\n" * 100_000) == b""
    # Input piled up too: the socket is no longer read.
    assert session.transport.producerState == "paused"
    session.protocol.resumeProducing()
    assert session.take().count(b"214 2.0.0 See RFC 5321") == 100_000
    assert session.transport.producerState == "producing"


def test_junk_commands_past_the_limit_count_as_errors(tmp_path):
    session = session_for(tmp_path, limits__junk_commands="3", limits__errors="2")
    session.command(b"EHLO client.test")
    for _ in range(3):
        assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"       # first excess: one error
    assert session.command(b"RSET") == b"250 2.0.0 Ok\r\n421 4.7.0 mx.test Error: too many errors\r\n"
    assert session.closed


def test_a_queued_message_resets_the_junk_count(tmp_path):
    session = session_for(tmp_path, limits__junk_commands="2", limits__errors="1")
    session.command(b"EHLO client.test")
    for _ in range(3):
        session.command(b"NOOP")
        session.command(b"NOOP")
        session.command(b"MAIL FROM:<a@example.org>")
        session.command(b"RCPT TO:<b@example.com>")
        session.command(b"DATA")
        assert session.send(b"x\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued")
    assert not session.closed
