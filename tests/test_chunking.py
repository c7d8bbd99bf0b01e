"""BDAT inbound (RFC 3030 CHUNKING and BINARYMIME), over a real socket to
the relay under twistd: exact replies, the session in step after every
refusal, the bytes in the spool."""

import re
import socket
import time

import pytest

from tests import test_filters
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess

QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)")
ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.com>\r\n"
MESSAGE_SIZE = 3000


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    process = RelayProcess(tmp_path_factory.mktemp("chunking"), {
        "relay": {"domains": "example.com"},
        "limits": {"message_size": str(MESSAGE_SIZE), "data_timeout": "1",
                   "header_size": "1000"},
    }).start()
    yield process
    process.stop()


class Wire:
    """One client connection; replies are read whole (multi-line ones as
    their lines joined by CRLF)."""

    def __init__(self, port, ehlo=True):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        assert self.replies(1)[0].startswith(b"220 ")
        if ehlo:
            self.send(b"EHLO client.test\r\n")
            self.ehlo = self.replies(1)[0]

    def send(self, data):
        self.sock.sendall(data)

    def replies(self, count):
        out, lines = [], []
        while len(out) < count:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                more = self.sock.recv(65536)
                if not more:
                    raise AssertionError(f"closed after {out + lines}")
                self._buffer += more
                continue
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            lines.append(line)
            if line[3:4] != b"-":
                out.append(b"\r\n".join(lines))
                lines = []
        return out

    def exchange(self, data, count):
        self.send(data)
        return self.replies(count)

    def closed(self):
        """True when the server hangs up with nothing more to say."""
        return self._buffer == b"" and self.sock.recv(100) == b""

    def close(self):
        self.sock.close()


@pytest.fixture
def wire(relay):
    connection = Wire(relay.port)
    yield connection
    connection.close()


def queued_id(reply):
    found = QUEUED.fullmatch(reply)
    assert found, reply
    return found.group(1).decode()


def body_of(relay, queue_id):
    """The spooled message after our Received field (its first 4 lines)."""
    message = relay.message(queue_id)
    assert message.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test "
                              b"(relaymail) with ESMTP id " + queue_id.encode())
    return message.split(b"\r\n", 4)[4]


def record_of(relay, queue_id):
    return relay.record(queue_id)


def test_ehlo_offers_chunking_and_binarymime(wire):
    keywords = [line[4:] for line in wire.ehlo.split(b"\r\n")]
    assert b"CHUNKING" in keywords and b"BINARYMIME" in keywords


def test_pipelined_chunks_and_commands_in_one_packet_are_answered_in_order(relay, wire):
    # The chunks hold what DATA would take as its end and as commands:
    # length framing makes them message text, and no dot is removed.
    first = b"Subject: chunks\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
    second = b"DATA\r\nlast line\r\n"
    replies = wire.exchange(
        ENVELOPE + b"BDAT %d\r\n" % len(first) + first + b"NOOP\r\n"
        + b"BDAT %d LAST\r\n" % len(second) + second + b"NOOP\r\n", 6)
    assert replies[:4] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok: %d bytes" % len(first),
                           b"250 2.0.0 Ok"]
    assert replies[5] == b"250 2.0.0 Ok"
    queue_id = queued_id(replies[4])
    assert body_of(relay, queue_id) == first + second
    assert record_of(relay, queue_id)["envelope"]["body"] == "7BIT"


def test_a_chunk_split_over_many_segments(relay, wire):
    message = b"Subject: trickle\r\n\r\n" + b"".join(b"line %d\r\n" % n for n in range(40))
    wire.send(ENVELOPE + b"BDAT %d LAST\r\n" % len(message))
    assert wire.replies(2) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    for start in range(0, len(message), 7):
        wire.send(message[start:start + 7])
        time.sleep(0.002)
    queue_id = queued_id(wire.replies(1)[0])
    assert body_of(relay, queue_id) == message


def test_a_last_line_without_crlf_gets_one(relay, wire):
    queue_id = queued_id(wire.exchange(ENVELOPE + b"BDAT 16 LAST\r\nSubject: x\r\n\r\nab", 3)[2])
    assert body_of(relay, queue_id) == b"Subject: x\r\n\r\nab\r\n"


def test_bdat_0_last_queues_an_empty_message(relay, wire):
    queue_id = queued_id(wire.exchange(ENVELOPE + b"BDAT 0 LAST\r\n", 3)[2])
    assert body_of(relay, queue_id) == b""


def test_bdat_without_mail_or_rcpt_is_refused_and_its_chunk_never_runs(relay, wire):
    before = relay.queued_ids()
    # Were the chunks read as commands, QUIT would end the session.
    assert wire.exchange(b"BDAT 6\r\nQUIT\r\nNOOP\r\n", 2) == [
        b"503 5.5.1 Error: need MAIL command", b"250 2.0.0 Ok"]
    assert wire.exchange(b"MAIL FROM:<a@example.org>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n", 3) == [
        b"250 2.1.0 Ok", b"554 5.5.1 Error: no valid recipients", b"250 2.0.0 Ok"]
    # The transaction is still open, as after DATA without recipients.
    assert wire.exchange(b"RCPT TO:<bob@example.com>\r\nBDAT 4 LAST\r\nab\r\n", 2)[0] == (
        b"250 2.1.5 Ok")
    assert len(relay.queued_ids()) == len(before) + 1


def test_a_chunk_past_the_size_limit_is_read_discarded_and_refused(relay, wire):
    before = relay.queued_ids()
    # A chunk alone over the limit: refused from its count, its octets
    # (command lines among them) read and thrown away.
    big = (b"NOOP\r\n" * (MESSAGE_SIZE // 6 + 100))
    assert wire.exchange(ENVELOPE + b"BDAT %d\r\n" % len(big) + big + b"BDAT 3 LAST\r\nabc"
                         + b"MAIL FROM:<a@example.org>\r\nRSET\r\n", 6) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"552 5.3.4 Chunk exceeds message size limit",
        # RFC 3030 2: chunks already sent after a failed one are discarded;
        # LAST ends the transaction, so MAIL starts a new one.
        b"551 5.0.0 Discarded 3 bytes after earlier error", b"250 2.1.0 Ok", b"250 2.0.0 Ok"]
    # Over the limit only together.
    half = b"Subject: s\r\n\r\n" + (b"x" * 98 + b"\r\n") * (MESSAGE_SIZE // 200 + 1)
    assert wire.exchange(ENVELOPE + (b"BDAT %d\r\n" % len(half) + half) * 2 + b"NOOP\r\n", 5) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok: %d bytes" % len(half),
        b"552 5.3.4 Chunk exceeds message size limit", b"250 2.0.0 Ok"]
    assert wire.exchange(b"BDAT 2 LAST\r\nab", 1) == [b"551 5.0.0 Discarded 2 bytes after earlier error"]
    assert relay.queued_ids() == before


def test_a_huge_count_is_refused_without_buffering(relay, wire):
    # Far past the limit: refused at once from the count when its octets
    # have come, as many as it says.  A client that sends fewer and gives
    # up is cut by the data timeout, not answered from a buffer.
    count = 10 ** 15
    wire.send(ENVELOPE + b"BDAT %d\r\n" % count + b"x" * 10000)
    assert wire.replies(2) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    assert wire.replies(1) == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert wire.closed()


def test_data_rcpt_and_mail_after_bdat_are_503_and_the_message_goes_on(relay, wire):
    assert wire.exchange(ENVELOPE + b"BDAT 5\r\nhello", 3)[2] == b"250 2.0.0 Ok: 5 bytes"
    assert wire.exchange(b"DATA\r\n", 1) == [b"503 5.5.1 Error: DATA after BDAT"]
    assert wire.exchange(b"RCPT TO:<carol@example.com>\r\n", 1) == [b"503 5.5.1 Error: RCPT after BDAT"]
    assert wire.exchange(b"MAIL FROM:<a@example.org>\r\n", 1) == [b"503 5.5.1 Error: nested MAIL command"]
    queue_id = queued_id(wire.exchange(b"BDAT 8 LAST\r\n world\r\n", 1)[0])
    assert body_of(relay, queue_id) == b"hello world\r\n"
    assert record_of(relay, queue_id)["envelope"]["recipients"] == ["bob@example.com"]


def test_rset_between_chunks_throws_the_message_away(relay, wire):
    before = relay.queued_ids()
    assert wire.exchange(ENVELOPE + b"BDAT 5\r\nhelloRSET\r\nBDAT 3 LAST\r\nabcNOOP\r\n", 6) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok: 5 bytes", b"250 2.0.0 Ok",
        b"503 5.5.1 Error: need MAIL command", b"250 2.0.0 Ok"]
    assert relay.queued_ids() == before
    # A new transaction after it is whole and only its own.
    queue_id = queued_id(wire.exchange(ENVELOPE + b"BDAT 5 LAST\r\nnew\r\n", 3)[2])
    assert body_of(relay, queue_id) == b"new\r\n"


def test_a_null_chunk_that_is_not_last_fails_the_transaction(relay, wire):
    assert wire.exchange(ENVELOPE + b"BDAT 0\r\nBDAT 3 LAST\r\nabcNOOP\r\n", 5) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"551 5.7.1 Null BDAT request",
        b"551 5.0.0 Discarded 3 bytes after earlier error", b"250 2.0.0 Ok"]


def test_chunks_discarded_after_a_failure_are_not_counted_as_new_errors(wire):
    # [limits] errors is 20: one failure and the 30 chunks the client had
    # already sent behind it must not end the session.
    replies = wire.exchange(ENVELOPE + b"BDAT 0\r\n" + b"BDAT 2\r\nab" * 30 + b"NOOP\r\n", 34)
    assert replies[2] == b"551 5.7.1 Null BDAT request"
    assert replies[3:33] == [b"551 5.0.0 Discarded 2 bytes after earlier error"] * 30
    assert replies[33] == b"250 2.0.0 Ok"


@pytest.mark.parametrize("argument", [b"", b" -1", b" 1x", b" +5", b" 1.5", b" 0x10",
                                      b" 1234567890123456789012345678901234567890",
                                      b" 5 X", b" 5 LAST MORE", b" 5  LAST"])
def test_a_count_that_cannot_be_read_is_521_and_the_connection_closes(wire, argument):
    # The chunk's end is unknown, so nothing after it could be told from
    # message octets: Postfix hangs up too.
    assert wire.exchange(ENVELOPE + b"BDAT" + argument + b"\r\nNOOP\r\n", 3) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"521 5.5.4 Syntax: BDAT count [LAST]"]
    assert wire.closed()


def test_last_in_any_case(relay, wire):
    queue_id = queued_id(wire.exchange(ENVELOPE + b"BDAT 4 last\r\nab\r\n", 3)[2])
    assert body_of(relay, queue_id) == b"ab\r\n"


# -- the content checks of DATA ------------------------------------------------

@pytest.mark.parametrize("smuggled", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"])
def test_bare_newlines_are_refused_at_the_chunk_that_has_them(relay, wire, smuggled):
    before = relay.queued_ids()
    first = b"Subject: a\r\n\r\ntext" + smuggled + b"MAIL FROM:<evil@example.org>\r\n"
    assert wire.exchange(ENVELOPE + b"BDAT %d\r\n" % len(first) + first
                         + b"BDAT 4 LAST\r\nab\r\nNOOP\r\n", 5) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok",
        b"554 5.6.0 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>",
        b"551 5.0.0 Discarded 4 bytes after earlier error", b"250 2.0.0 Ok"]
    assert relay.queued_ids() == before


def test_nul_long_lines_header_size_and_hops_as_for_data(relay, wire):
    cases = [
        (b"a\x00b\r\n", b"554 5.6.0 Error: NUL character in message"),
        (b"x" * 1001 + b"\r\n", b"554 5.6.0 Error: message has a line longer than the limit"),
        (b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 60) for n in range(20)) + b"\r\nbody\r\n",
         b"552 5.3.4 Error: message header size exceeds limit"),
        (b"Received: from a\r\n" * 50 + b"\r\nbody\r\n", b"554 5.4.6 Too many hops"),
    ]
    for content, reply in cases:
        assert wire.exchange(ENVELOPE + b"BDAT %d LAST\r\n" % len(content) + content, 3)[2] == reply


def test_a_line_of_the_limit_with_a_leading_dot_is_not_unstuffed(relay, wire):
    line = b"." + b"d" * 997 + b"\r\n"
    queue_id = queued_id(wire.exchange(ENVELOPE + b"BDAT %d LAST\r\n" % len(line) + line, 3)[2])
    assert body_of(relay, queue_id) == line


# The message filters' fixture (tests/test_filters.py): a relay with
# scripted filters in front of a NextHop (tests/conftest.py's nexthop).
relay_for = test_filters.relay_for


def test_message_filters_decide_a_bdat_message_as_a_data_one(relay_for, nexthop):
    relay = relay_for("first", first={"add": "X-Filtered: yes"})
    wire = Wire(relay.port)
    content = test_filters.BODY
    reply = wire.exchange(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
                          + b"BDAT 10\r\n" + content[:10]
                          + b"BDAT %d LAST\r\n" % (len(content) - 10) + content[10:], 4)[3]
    wire.close()
    queued_id(reply)
    message, = nexthop.wait_for(1)
    added, rest = test_filters.received_and_rest(message["data"])
    assert (added, rest) == (b"X-Filtered: yes", content)
    relay.stop()                # the next relay takes the same spool
    refusing = relay_for("first", first={"answer": "reject"})
    wire = Wire(refusing.port)
    assert wire.exchange(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
                         + b"BDAT %d LAST\r\n" % len(content) + content, 3)[2] == (
        b"550 5.7.1 Message content rejected")
    wire.close()


# -- BINARYMIME ----------------------------------------------------------------

BINARY_ENVELOPE = b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<bob@example.com>\r\n"


def test_binarymime_body_is_stored_octet_for_octet(relay, wire):
    header = b"Subject: binary\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n" \
             b"Content-Transfer-Encoding: binary\r\n\r\n"
    body = bytes(range(256)) + b"\n.\n\r\n.\r\n\x00" + b"z" * 1500
    first, second = header + body[:100], body[100:]
    replies = wire.exchange(BINARY_ENVELOPE + b"BDAT %d\r\n" % len(first) + first
                            + b"BDAT %d LAST\r\n" % len(second) + second, 4)
    assert replies[:3] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok: %d bytes" % len(first)]
    queue_id = queued_id(replies[3])
    assert body_of(relay, queue_id) == header + body
    assert record_of(relay, queue_id)["envelope"]["body"] == "BINARYMIME"


def test_binarymime_header_section_is_still_checked(relay, wire):
    content = b"Subject: bare\nX: y\r\n\r\n\x00\n"
    assert wire.exchange(BINARY_ENVELOPE + b"BDAT %d LAST\r\n" % len(content) + content, 3)[2] == (
        b"554 5.6.0 Error: bare <CR> or <LF> in message; lines must end with <CR><LF>")


def test_binarymime_with_data_is_503(relay, wire):
    # RFC 3030 3: a binary body cannot be dot-stuffed, so DATA cannot carry it.
    assert wire.exchange(BINARY_ENVELOPE + b"DATA\r\n", 3) == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA"]
    assert wire.exchange(b"BDAT 4 LAST\r\nab\r\n", 1)[0].startswith(b"250 2.0.0 Ok: queued as ")


# -- timeouts ------------------------------------------------------------------

def test_an_idle_chunk_is_cut_by_the_data_timeout(wire):
    assert wire.exchange(ENVELOPE + b"BDAT 100\r\n" + b"x" * 10, 2) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    started = time.monotonic()
    assert wire.replies(1) == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert 0.8 < time.monotonic() - started < 5
    assert wire.closed()


# -- streaming -----------------------------------------------------------------

def _memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_100_mib_message_in_1_mib_chunks_streams_to_the_spool(tmp_path):
    # One process ([server] workers = 0), so its memory is the relay's.
    process = RelayProcess(tmp_path, {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "limits": {"message_size": str(200 * 2 ** 20)},
    }).start()
    try:
        pid = process.process.pid
        wire = Wire(process.port)
        # A first small message, so the code paths are loaded before the peak is read.
        assert wire.exchange(ENVELOPE + b"BDAT 4 LAST\r\nab\r\n", 3)[2].startswith(b"250 2.0.0 Ok: queued")
        before = _memory_kib(pid, "VmRSS")
        peak_before = _memory_kib(pid, "VmHWM")
        line = b"0123456789" * 10 + b"\r\n"
        chunk = line * (2 ** 20 // len(line)) + b"x" * (2 ** 20 % len(line) - 2) + b"\r\n"
        assert len(chunk) == 2 ** 20
        wire.send(ENVELOPE)
        assert wire.replies(2) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
        header = b"Subject: big\r\n\r\n"
        for n in range(1, 101):
            content = header + chunk[len(header):] if n == 1 else chunk
            wire.send(b"BDAT %d%s\r\n" % (len(content), b" LAST" if n == 100 else b"") + content)
            if n % 10 == 0:
                # Replies read now and then: the client pipelines.
                replies = wire.replies(10)
        queue_id = queued_id(replies[-1])
        assert replies[-2] == b"250 2.0.0 Ok: %d bytes" % (99 * 2 ** 20)
        wire.close()
        grown = max(_memory_kib(pid, "VmHWM") - peak_before, _memory_kib(pid, "VmRSS") - before)
        assert grown < 6 * 1024, f"the relay grew by {grown} KiB"
        size = len(process.message(queue_id))
        assert size > 100 * 2 ** 20
        assert record_of(process, queue_id)["size"] == size
    finally:
        process.stop()


def test_binarymime_is_relayed_by_bdat_to_a_hop_that_takes_it(tmp_path):
    # Through the queue and the smtp transport: the body type travels in the
    # record, and the binary octets arrive exactly after our Received field.
    hop = NextHop(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING",
                              "BINARYMIME", "SIZE 100000000"))
    process = RelayProcess(tmp_path, {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{hop.port}", "smarthost_tls": "none"},
    }).start()
    try:
        content = (b"Subject: binary\r\nContent-Type: application/octet-stream\r\n\r\n"
                   + bytes(range(256)) * 10 + b"\n.\n\r\n.\r\nno end")
        wire = Wire(process.port)
        queued_id(wire.exchange(BINARY_ENVELOPE + b"BDAT %d LAST\r\n" % len(content) + content, 3)[2])
        wire.close()
        message, = hop.wait_for(1)
        assert message["mail"] == "MAIL FROM:<a@example.org> SIZE=%d BODY=BINARYMIME" % (
            len(message["data"]))
        assert message["data"].startswith(b"Received: from client.test")
        assert message["data"].endswith(b"\r\n" + content)
        assert message["chunks"] == [len(message["data"])]
    finally:
        process.stop()
        hop.stop()
