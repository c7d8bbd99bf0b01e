"""The relay as users run it: twistd, a real socket, smtplib and raw pipelined writes."""

import os
import re
import resource
import smtplib
import socket
import subprocess
import textwrap
import time

import pytest

from relaymail.smtp.endpoint_string import with_backlog
from tests.relay_process import RelayProcess, converse, twistd

SITE_PLUGIN = textwrap.dedent('''\
    """A site plugin as a site would write it: answers later, or fails."""
    from twisted.internet import reactor, task
    from twisted.plugin import IPlugin
    from zope.interface import implementer, provider

    from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator


    @implementer(IRecipientValidator)
    class Slow:
        def check_recipient(self, recipient, context):
            name = recipient.local_text
            if name.startswith("slow"):
                return task.deferLater(reactor, 0.2, lambda: Decision.accept())
            if name.startswith("unknown"):
                return task.deferLater(reactor, 0.1, lambda: Decision.reject(550, "5.1.1", "User unknown"))
            if name.startswith("crash"):
                raise RuntimeError("site plugin bug")
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION


    @provider(IPlugin, IPluginFactory)
    class slowpoke:
        name = "slowpoke"

        @staticmethod
        def build(context):
            return Slow()
''')

QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("relay")
    plugins = workdir / "plugins"
    plugins.mkdir()
    (plugins / "slowpoke.py").write_text(SITE_PLUGIN)
    (workdir / "aliases").write_text("staff: alice@example.com, bob@example.com\n")
    process = RelayProcess(workdir, {
        "server": {"trusted_networks": "10.9.9.0/24"},   # loopback is an outsider here
        "relay": {"domains": "example.com"},
        "limits": {"message_size": "2000"},
        "plugins": {"recipients": "slowpoke, aliases, domains", "expanders": "aliases",
                    "path": str(plugins)},
        "plugin:aliases": {"file": str(workdir / "aliases")},
    }).start()
    yield process
    process.stop()


def test_smtplib_transaction_lands_in_the_queue(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        code, lines = client.ehlo()
        assert code == 250
        assert lines.split(b"\n")[1:] == [b"PIPELINING", b"SIZE 2000", b"8BITMIME",
                                          b"ENHANCEDSTATUSCODES", b"SMTPUTF8", b"CHUNKING",
                                          b"BINARYMIME", b"DSN", b"HELP"]
        assert client.mail("sender@example.org") == (250, b"2.1.0 Ok")
        assert client.rcpt("bob@example.com") == (250, b"2.1.5 Ok")
        code, text = client.data(b"Subject: test\r\n\r\n.leading dot\r\nbody\r\n")
    assert code == 250
    queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()
    message = relay.message(queue_id)
    header, body = message.split(b"Subject: test\r\n", 1)
    assert re.fullmatch(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby relay\.test \(relaymail\) with ESMTP id " + queue_id.encode() + rb"\r\n"
        rb"\tfor <bob@example\.com>;\r\n"
        rb"\t\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n", header)
    # smtplib stuffed the dot; the queue holds it unstuffed.
    assert body == b"\r\n.leading dot\r\nbody\r\n"
    record = relay.record(queue_id)
    assert record["envelope"]["sender"] == "sender@example.org"
    assert [r["address"] for r in record["recipients"]] == ["bob@example.com"]
    assert f"{queue_id}: queued from=<sender@example.org> to=<bob@example.com>" in relay.log()


def test_smtplib_sees_relay_denied_and_unknown_users(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        assert client.rcpt("someone@example.net") == (554, b"5.7.1 Relay access denied")
        assert client.rcpt("unknown1@example.com") == (550, b"5.1.1 User unknown")
        assert client.rcpt("crash@example.com") == (
            451, b"4.3.0 Temporary failure checking recipient, try again later")
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.data(b"x\r\n")
        assert (caught.value.smtp_code, caught.value.smtp_error) == (554, b"5.5.1 Error: no valid recipients")
        assert client.noop() == (250, b"2.0.0 Ok")
    assert "site plugin bug" in relay.log()


def test_smtplib_size_limit(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            client.sendmail("a@example.org", ["bob@example.com"], b"x" * 3000)
        assert caught.value.smtp_code == 552
        client.rset()
        client.mail("a@example.org")
        client.rcpt("bob@example.com")
        assert client.data(b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n" + b"w" * 900 + b"\r\n") == (
            552, b"5.3.4 Error: message too big")
        assert client.noop() == (250, b"2.0.0 Ok")


def test_whole_transaction_in_one_write_with_a_late_plugin(relay):
    out = converse(relay.port, (
        b"EHLO client.test\r\n"
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<slow1@example.com>\r\n"
        b"RCPT TO:<far@example.net>\r\n"
        b"RCPT TO:<unknown2@example.com>\r\n"
        b"RCPT TO:<staff@example.com>\r\n"
        b"DATA\r\n"
        b"Subject: pipelined\r\n\r\nhello\r\n.\r\n"
        b"QUIT\r\n"))
    replies = out.split(b"\r\n")
    assert replies[0] == b"220 relay.test ESMTP relaymail"
    assert replies[1:11] == [b"250-relay.test Hello client.test", b"250-PIPELINING", b"250-SIZE 2000",
                             b"250-8BITMIME", b"250-ENHANCEDSTATUSCODES", b"250-SMTPUTF8", b"250-CHUNKING",
                             b"250-BINARYMIME", b"250-DSN", b"250 HELP"]
    assert replies[11:17] == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"554 5.7.1 Relay access denied",
        b"550 5.1.1 User unknown",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    queue_id = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)", replies[17]).group(1).decode()
    assert replies[18:] == [b"221 2.0.0 relay.test Bye", b""]
    record = relay.record(queue_id)
    # The list was expanded when queued.
    assert record["envelope"]["recipients"] == ["slow1@example.com", "alice@example.com", "bob@example.com"]


def test_two_messages_pipelined_in_one_write(relay):
    message = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<slow2@example.com>\r\nDATA\r\nbody\r\n.\r\n"
    out = converse(relay.port, b"EHLO client.test\r\n" + message + message + b"QUIT\r\n")
    ids = QUEUED.findall(out)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert out.endswith(b"\r\n221 2.0.0 relay.test Bye\r\n")


def test_data_after_pipelined_rejections_is_554_and_the_body_is_not_run(relay):
    out = converse(relay.port, (
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<unknown3@example.com>\r\n"
        b"DATA\r\nQUIT\r\n"))
    assert out.split(b"\r\n")[-5:] == [
        b"250 2.1.0 Ok", b"550 5.1.1 User unknown", b"554 5.5.1 Error: no valid recipients",
        b"221 2.0.0 relay.test Bye", b""]


def test_smuggled_end_of_data_starts_no_second_message(relay):
    before = relay.queued_ids()
    out = converse(relay.port, (
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
        b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\nQUIT\r\n"))
    assert out.split(b"\r\n")[-4:] == [
        b"354 End data with <CR><LF>.<CR><LF>",
        b"554 5.6.0 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>",
        b"221 2.0.0 relay.test Bye", b""]
    assert relay.queued_ids() == before


def test_untrusted_client_learns_nothing_from_vrfy_and_expn(relay):
    # Loopback is outside trusted_networks here; the aliases plugin knows
    # staff, and the domains plugin would accept bob@example.com.
    out = converse(relay.port, (
        b"EHLO client.test\r\nEXPN staff\r\nEXPN staff@example.com\r\nVRFY bob@example.com\r\n"
        b"VRFY nobody@example.net\r\nVRFY\r\nQUIT\r\n"))
    assert out.split(b"\r\n")[11:] == [
        b"502 5.7.0 Error: EXPN is only for trusted or authenticated clients",
        b"502 5.7.0 Error: EXPN is only for trusted or authenticated clients",
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        b"501 5.5.4 Syntax: VRFY address",
        b"221 2.0.0 relay.test Bye", b""]


def test_http_on_the_smtp_port_is_hung_up_on(relay):
    out = converse(relay.port, b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    assert out == b"220 relay.test ESMTP relaymail\r\n421 relay.test Error: HTTP request on the SMTP port\r\n"


def test_twistd_help_documents_every_option():
    result = twistd("--help")
    assert result.returncode == 0
    for option in ("--config=", "--listen=", "--hostname=", "--spool=", "--smarthost="):
        assert option in result.stdout


def test_bad_config_stops_start_up_with_one_line(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text("[limits]\nmessage_size = ten\n")
    result = twistd("--config", str(config), timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"relaymail: {config}: [limits] message_size: expected a size in bytes "
        "(e.g. 10485760 or 10M), got 'ten'")
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_key_and_bad_endpoint_are_named(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text("[server]\nlisten = tcp:notaport\n")
    result = twistd("--config", str(config))
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"relaymail: {config}: [server] listen: ")
    config.write_text("[server]\nhostnme = x.test\n")
    result = twistd("--config", str(config))
    assert result.stderr.startswith(f"relaymail: {config}: [server] hostnme: unknown key")


def test_command_line_overrides_the_file(tmp_path):
    result = twistd("--listen", "tcp:bogus")
    assert result.returncode != 0
    assert result.stderr.startswith("relaymail: command line: [server] listen: ")


# -- message content: hops, NUL, line length, HELO length ----------------------

def received_fields(count):
    return b"".join(b"Received: from h%d.example (h%d.example [192.0.2.1])\r\n"
                    b"\tby h%d.example with ESMTP; Tue, 1 Dec 2026 00:00:00 +0000\r\n"
                    % (n, n, n + 1) for n in range(count))


def transaction(body, helo=b"client.test"):
    return (b"EHLO " + helo + b"\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
            b"DATA\r\n" + body + b".\r\n")


@pytest.fixture
def fresh_relay(tmp_path):
    """A relay with default limits and an empty spool."""
    process = RelayProcess(tmp_path, {"relay": {"domains": "example.com"}}).start()
    yield process
    process.stop()


def spool_files(relay):
    return {name: sorted(os.listdir(os.path.join(relay.spool, name))) for name in ("active", "tmp")}


def test_looping_message_is_554_5_4_6_and_never_queued(fresh_relay):
    # [limits] hops 50 counts our own Received field: 50 of the message's
    # own and ours is 51.  60 is the case.
    out = converse(fresh_relay.port, (
        transaction(received_fields(50) + b"Subject: loop\r\n\r\nbody\r\n")
        + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
        + received_fields(60) + b"\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n"))
    assert out.split(b"\r\n")[-8:] == [
        b"554 5.4.6 Too many hops",
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
        b"554 5.4.6 Too many hops",
        b"250 2.0.0 Ok", b"221 2.0.0 relay.test Bye", b""]
    assert spool_files(fresh_relay) == {"active": [], "tmp": []}
    # 49 and ours is 50, the most allowed: queued with all 50.
    out = converse(fresh_relay.port, transaction(received_fields(49) + b"\r\nbody\r\n") + b"QUIT\r\n")
    [queue_id] = QUEUED.findall(out)
    message = fresh_relay.message(queue_id.decode())
    assert message.split(b"\r\n\r\n")[0].count(b"\r\nReceived: ") + message.startswith(b"Received: ") == 50
    assert spool_files(fresh_relay)["active"] == [queue_id.decode() + ".msg"]


def test_nul_in_data_is_554_5_6_0_and_the_session_stays_in_sync(relay):
    before = relay.queued_ids()
    out = converse(relay.port, (
        transaction(b"Subject: nul\r\n\r\nfirst\r\n\x00.\r\nMAIL FROM:<evil@example.org>\r\n"
                    b"RCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n")
        + b"NOOP\r\nQUIT\r\n"))
    assert out.split(b"\r\n")[-5:] == [
        b"354 End data with <CR><LF>.<CR><LF>",
        b"554 5.6.0 Error: NUL character in message",
        b"250 2.0.0 Ok", b"221 2.0.0 relay.test Bye", b""]
    assert relay.queued_ids() == before


@pytest.fixture(scope="module")
def nul_relay(tmp_path_factory):
    process = RelayProcess(tmp_path_factory.mktemp("nul-relay"), {
        "relay": {"domains": "example.com"}, "limits": {"allow_nul": "yes"}}).start()
    yield process
    process.stop()


def test_nul_in_data_passes_unchanged_when_allowed(nul_relay):
    body = b"Subject: nul\r\n\r\nfirst\r\n\x00.\r\nMAIL FROM:<evil@example.org>\r\nsecond\x00\r\n"
    out = converse(nul_relay.port, transaction(body) + b"NOOP\r\nQUIT\r\n")
    [queue_id] = QUEUED.findall(out)
    assert out.endswith(b"250 2.0.0 Ok\r\n221 2.0.0 relay.test Bye\r\n")
    assert nul_relay.message(queue_id.decode()).endswith(b"\r\n" + body)


def test_998_octet_line_that_starts_with_a_dot_is_queued_unstuffed(relay):
    line = b"." + b"x" * 997                         # 998 octets; 999 on the wire
    out = converse(relay.port, transaction(b"Subject: dot\r\n\r\n." + line + b"\r\n") + b"QUIT\r\n")
    [queue_id] = QUEUED.findall(out)
    assert relay.message(queue_id.decode()).endswith(b"\r\n\r\n" + line + b"\r\n")


def test_line_over_998_octets_is_554_5_6_0_not_500(relay):
    before = relay.queued_ids()
    out = converse(relay.port, transaction(b"Subject: long\r\n\r\n.." + b"x" * 998 + b"\r\n")
                   + b"NOOP\r\nQUIT\r\n")
    assert out.split(b"\r\n")[-5:] == [
        b"354 End data with <CR><LF>.<CR><LF>",
        b"554 5.6.0 Error: message has a line longer than the limit",
        b"250 2.0.0 Ok", b"221 2.0.0 relay.test Bye", b""]
    assert relay.queued_ids() == before


def test_ehlo_over_255_octets_is_501_and_received_lines_stay_short(relay):
    name = b".".join([b"a" * 63] * 4)                      # 255 octets
    long_name = name + b"b"
    out = converse(relay.port, b"EHLO " + long_name + b"\r\n"
                   + transaction(b"Subject: helo\r\n\r\nx\r\n", name) + b"QUIT\r\n")
    assert out.split(b"\r\n")[1] == b"501 Error: host name longer than 255 octets"
    assert out.split(b"\r\n")[2] == b"250-relay.test Hello " + name
    [queue_id] = QUEUED.findall(out)
    header = relay.message(queue_id.decode()).split(b"Subject: helo\r\n")[0]
    lines = header.split(b"\r\n")[:-1]
    assert lines[0] == b"Received: from" and lines[1] == b" " + name
    for line in lines:
        assert len(line) <= 78 or (len(line) <= 998 and len(line.split()) == 1), line
    assert re.sub(rb"\r\n(?=[ \t])", b"", header).startswith(
        b"Received: from " + name + b" ([127.0.0.1])\tby relay.test (relaymail) with ESMTP id ")


# -- connection limits, file limits, backlog -------------------------------------------

def test_repeated_ehlo_counts_as_junk_and_ends_the_session(relay):
    # Default limits: 100 junk commands, then 20 errors.  EHLO 1 is the
    # session's, 2-101 are junk, 102-121 are errors and 121 is the last.
    out = converse(relay.port, b"EHLO client.test\r\n" * 122 + b"QUIT\r\n")
    assert out.count(b"250-relay.test Hello client.test\r\n") == 121
    assert out.endswith(b"250 HELP\r\n421 4.7.0 relay.test Error: too many errors\r\n")
    assert b"221 " not in out


def read_line(sock):
    """One reply line, read a byte at a time so nothing after it is taken."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def read_to_end(sock):
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_outsiders_filling_the_table_leave_room_for_trusted_clients(tmp_path):
    relay = RelayProcess(tmp_path, {
        "server": {"trusted_networks": "127.0.0.2/32"},
        "limits": {"connections": "4", "trusted_reserve": "1", "connections_per_ip": "0",
                   "connection_rate_per_ip": "0", "command_timeout": "300",
                   "stress_threshold": "3", "stress_timeout": "3"},
    }).start()
    try:
        outsiders = [socket.create_connection(("127.0.0.1", relay.port), 30) for _ in range(3)]
        assert [read_line(s) for s in outsiders] == [b"220 relay.test ESMTP relaymail\r\n"] * 3
        stressed_at = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), 10) as late:
            assert read_to_end(late) == b"421 4.7.0 relay.test Error: too many connections\r\n"
        trusted = socket.create_connection(("127.0.0.1", relay.port), 30,
                                           source_address=("127.0.0.2", 0))
        assert read_line(trusted) == b"220 relay.test ESMTP relaymail\r\n"
        trusted.sendall(b"NOOP\r\n")
        assert read_line(trusted) == b"250 Ok\r\n"      # no EHLO: no enhanced codes
        # Stressed: the idle outsiders are cut after stress_timeout, not
        # after command_timeout's 300 s.
        for outsider in outsiders:
            assert read_to_end(outsider) == b"421 relay.test Error: timeout exceeded\r\n"
            outsider.close()
        assert 2.5 < time.monotonic() - stressed_at < 60
        # The trusted client kept its normal timeout meanwhile.
        trusted.sendall(b"NOOP\r\nQUIT\r\n")
        assert read_to_end(trusted) == b"250 Ok\r\n221 relay.test Bye\r\n"
        trusted.close()
        log = relay.log()
        assert "stress: 3 of 4 connections open; outsiders get the stress timeout" in log
        assert "stress over: 2 of 4 connections open" in log
    finally:
        relay.stop()


def _file_limit(soft, hard):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return set_limit


def test_start_up_is_refused_when_the_file_limit_cannot_hold_the_connections(tmp_path):
    relay = RelayProcess(tmp_path, {"limits": {"connections": "50"},
                                    "delivery": {"max_connections": "10"}})
    result = twistd("--config", relay.config, preexec_fn=_file_limit(100, 100))
    assert result.returncode != 0
    # 2 x 50 + 3 x 10 + 64 + one listener = 195.
    assert result.stderr == (
        f"relaymail: {relay.config}: [limits] connections: 50 connections need up to 195 open "
        "files (2 each, 3 for each of [delivery] max_connections 10, 65 for the queue and "
        "listeners) but the open file limit (RLIMIT_NOFILE) is 100; lower connections or "
        "raise the limit (ulimit -n, systemd LimitNOFILE=)\n")
    assert not os.path.exists(relay.spool)


def max_open_files(pid):
    """(soft, hard) from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_the_soft_file_limit_is_raised_to_the_hard_one(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    relay = RelayProcess(tmp_path, {"limits": {"connections": "20"},
                                    "delivery": {"max_connections": "5"}})
    relay.preexec_fn = _file_limit(64, hard)        # 64 < the 120 needed
    relay.start()
    try:
        assert max_open_files(relay.process.pid) == (hard, hard)
    finally:
        relay.stop()
    # And it says so once, at start.
    [line] = [line for line in relay.log().splitlines() if "open files:" in line]
    assert line.endswith(f"open files: limit {hard} (was 64, hard limit {hard}); "
                         "the configured limits need up to 120"), line


def test_listeners_get_the_default_backlog(relay):
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{relay.port}"], capture_output=True,
                             text=True, check=True).stdout.split()
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    # ss shows a listening socket's backlog as its Send-Q.
    assert listing[0] == "LISTEN"
    assert int(listing[2]) == min(1024, somaxconn)


@pytest.mark.parametrize("description, expected", [
    ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=1024"),
    ("TCP:25", "TCP:25:backlog=1024"),
    ("tcp6:25:interface=\\:\\:1", "tcp6:25:interface=\\:\\:1:backlog=1024"),
    ("ssl:465:privateKey=k.pem:certKey=c.pem", "ssl:465:privateKey=k.pem:certKey=c.pem:backlog=1024"),
    ("unix:/run/relaymail.sock", "unix:/run/relaymail.sock:backlog=1024"),
    ("tcp:2525:backlog=7", "tcp:2525:backlog=7"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_with_backlog_adds_one_only_where_none_is_named(description, expected):
    assert with_backlog(description, 1024) == expected
