"""Tests for relaymail.queue.bounce: the DSN parsed back with the email package."""

import email
import email.policy
import io
import os
import quopri
import re
from email.utils import parsedate_to_datetime

import pytest

from relaymail.envelope import Envelope
from relaymail.queue import bounce
from relaymail.queue.bounce import FailedRecipient, build_dsn, read_header_section
from relaymail.queue.record import new_record
from relaymail.smtp import data

QUEUE_ID = "0CZ4Q8V1M2N3P4R5"
ARRIVAL = 1767225600.125        # Thu, 01 Jan 2026 00:00:00 UTC
NOW = ARRIVAL + 5 * 86400 + 60
LAST_ATTEMPT = ARRIVAL + 3600
RETRY_UNTIL = ARRIVAL + 5 * 86400
MTA = "relay.example.net"

HEADERS = (b"Received: from client.example.org ([192.0.2.7])\r\n"
           b"\tby relay.example.net (relaymail) with ESMTP id 0CZ4Q8V1M2N3P4R5;\r\n"
           b"\tThu, 01 Jan 2026 00:00:00 +0000\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: bob@example.com, carol@example.com\r\n"
           b"Subject: quarterly figures\r\n"
           b"Message-ID: <figures.1@example.org>\r\n")
UTF8_HEADERS = HEADERS + "Subject: Grüße aus Köln\r\n".encode("utf-8")
BODY = b"The body, which must never come back.\r\n.\r\n"

UNKNOWN = FailedRecipient(
    address="bob@example.com", action="failed", status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.com>: User unknown",
    remote_mta="mx1.example.com", last_attempt=LAST_ATTEMPT)
UNREACHABLE = FailedRecipient(
    address="carol@example.com", action="failed", status="4.4.1",
    diagnostic=None, remote_mta=None, last_attempt=None)
SLOW = FailedRecipient(
    address="carol@example.com", action="delayed", status="4.2.2",
    diagnostic="452 4.2.2 Mailbox full", remote_mta="mx2.example.com",
    last_attempt=LAST_ATTEMPT)


def make_record(sender="alice@example.org",
                recipients=("bob@example.com", "carol@example.com"), **changes):
    envelope = Envelope(sender=sender, recipients=list(recipients),
                        client_ip="192.0.2.7", helo="client.example.org",
                        received_at=ARRIVAL, **changes)
    return new_record(QUEUE_ID, envelope, 4711, ARRIVAL)


@pytest.fixture
def original(tmp_path):
    """Write an original message file; return its path."""
    def write(headers=HEADERS, body=BODY):
        path = tmp_path / f"{QUEUE_ID}.msg"
        path.write_bytes(headers + b"\r\n" + body)
        return str(path)
    return write


def dsn(original_path, recipients=(UNKNOWN, UNREACHABLE), record=None, **keywords):
    if record is None:
        # The size the spool would have recorded: how much of the file is message.
        record = make_record()
        record["size"] = os.path.getsize(original_path)
    return build_dsn(record, original_path, list(recipients), MTA, NOW, **keywords)


def parse(message):
    """Parse as a mail client would, and insist on no defects anywhere."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    for part in parsed.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)
    return parsed


def raw_parts(message):
    """The three parts as ``(header_lines, body_bytes)``, cut out of the
    raw bytes so that tests see exactly what was written."""
    boundary = parse(message).get_boundary().encode("ascii")
    chunks = message.split(b"\r\n--" + boundary)
    assert chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        parts.append((head.decode("ascii").split("\r\n"), body))
    return parts


def fields(block_text):
    """``Name: value`` lines, unfolded (RFC 5322 2.2.3), as pairs."""
    unfolded = re.sub(r"\r\n(?=[ \t])", "", block_text)
    return [tuple(line.split(": ", 1)) for line in unfolded.split("\r\n") if line]


def status_blocks(message):
    """The delivery-status part's blocks, each a list of field pairs."""
    body = raw_parts(message)[1][1].decode("utf-8")
    assert body.endswith("\r\n") and not body.endswith("\r\n\r\n")
    return [fields(block) for block in body.split("\r\n\r\n")]


def note(message):
    return raw_parts(message)[0][1].decode("utf-8")


# -- envelope and top level -------------------------------------------------

def test_envelope_is_from_null_sender_to_original_sender(original):
    envelope, _ = dsn(original())
    assert envelope.sender == ""
    assert envelope.recipients == ["alice@example.org"]
    assert envelope.smtputf8 is False
    assert envelope.body == "7BIT"
    assert envelope.received_at == NOW


def test_top_level_headers(original):
    _, message = dsn(original())
    parsed = parse(message)
    assert str(parsed["From"]) == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert parsed["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert str(parsed["To"]) == "alice@example.org"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Date"].datetime.timestamp() == int(NOW)
    assert re.fullmatch(r"<[^<>@\s]+@" + re.escape(MTA) + ">", parsed["Message-ID"])
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"


def test_message_ids_differ_between_notifications(original):
    path = original()
    first = parse(dsn(path)[1])["Message-ID"]
    second = parse(dsn(path)[1])["Message-ID"]
    assert first != second


def test_three_parts_in_order(original):
    parsed = parse(dsn(original())[1])
    parts = parsed.get_payload()
    assert [part.get_content_type() for part in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[0].get_content_charset() == "us-ascii"


# -- the machine-readable report --------------------------------------------

def test_delivery_status_fields_exactly(original):
    _, message = dsn(original())
    assert status_blocks(message) == [
        [("Reporting-MTA", f"dns; {MTA}"),
         ("Arrival-Date", "Thu, 01 Jan 2026 00:00:00 +0000")],
        [("Final-Recipient", "rfc822; bob@example.com"),
         ("Action", "failed"),
         ("Status", "5.1.1"),
         ("Remote-MTA", "dns; mx1.example.com"),
         ("Diagnostic-Code", "smtp; 550 5.1.1 <bob@example.com>: User unknown"),
         ("Last-Attempt-Date", "Thu, 01 Jan 2026 01:00:00 +0000")],
        [("Final-Recipient", "rfc822; carol@example.com"),
         ("Action", "failed"),
         ("Status", "4.4.1")],
    ]


def test_email_package_reads_the_same_blocks(original):
    parsed = parse(dsn(original())[1])
    blocks = parsed.get_payload()[1].get_payload()
    assert len(blocks) == 3
    assert blocks[0]["Reporting-MTA"] == f"dns; {MTA}"
    assert parsedate_to_datetime(blocks[0]["Arrival-Date"]).timestamp() == int(ARRIVAL)
    assert [block["Final-Recipient"] for block in blocks[1:]] == [
        "rfc822; bob@example.com", "rfc822; carol@example.com"]
    assert [block["Status"] for block in blocks[1:]] == ["5.1.1", "4.4.1"]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: User unknown"
    assert blocks[2]["Diagnostic-Code"] is None
    assert blocks[2]["Remote-MTA"] is None


def test_delayed_report_has_will_retry_until(original):
    envelope, message = dsn(original(), [SLOW], retry_until=RETRY_UNTIL)
    assert parse(message)["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(message)[1] == [
        ("Final-Recipient", "rfc822; carol@example.com"),
        ("Action", "delayed"),
        ("Status", "4.2.2"),
        ("Remote-MTA", "dns; mx2.example.com"),
        ("Diagnostic-Code", "smtp; 452 4.2.2 Mailbox full"),
        ("Last-Attempt-Date", "Thu, 01 Jan 2026 01:00:00 +0000"),
        ("Will-Retry-Until", "Tue, 06 Jan 2026 00:00:00 +0000"),
    ]
    assert envelope.recipients == ["alice@example.org"]


def test_delayed_without_retry_until_leaves_the_field_out(original):
    _, message = dsn(original(), [SLOW])
    assert "Will-Retry-Until" not in dict(status_blocks(message)[1])


def test_failed_recipient_never_gets_will_retry_until(original):
    _, message = dsn(original(), [UNKNOWN], retry_until=RETRY_UNTIL)
    assert "Will-Retry-Until" not in dict(status_blocks(message)[1])


def test_any_failed_recipient_gives_the_failed_subject(original):
    _, message = dsn(original(), [SLOW, UNKNOWN], retry_until=RETRY_UNTIL)
    assert parse(message)["Subject"] == "Undelivered Mail Returned to Sender"
    actions = [dict(block)["Action"] for block in status_blocks(message)[1:]]
    assert actions == ["delayed", "failed"]


def test_long_diagnostic_is_folded_and_unfolds_to_the_reply(original):
    reply = "550 5.7.1 " + " ".join(f"word{n}" for n in range(400))
    entry = FailedRecipient("bob@example.com", "failed", "5.7.1", reply,
                            "mx1.example.com", None)
    _, message = dsn(original(), [entry])
    body = raw_parts(message)[1][1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 78
    assert dict(status_blocks(message)[1])["Diagnostic-Code"] == "smtp; " + reply


def test_multiline_reply_becomes_one_field(original):
    reply = "550-5.1.1 The account does not exist.\r\n550 5.1.1 Please check the address."
    entry = FailedRecipient("bob@example.com", "failed", "5.1.1", reply, None, None)
    _, message = dsn(original(), [entry])
    assert dict(status_blocks(message)[1])["Diagnostic-Code"] == (
        "smtp; 550-5.1.1 The account does not exist. 550 5.1.1 Please check the address.")


def test_control_characters_in_a_reply_are_escaped(original):
    entry = FailedRecipient("bob@example.com", "failed", "5.0.0",
                            "550 bad\x00\x1b[31m", None, None)
    _, message = dsn(original(), [entry])
    assert dict(status_blocks(message)[1])["Diagnostic-Code"] == (
        "smtp; 550 bad\\x{0}\\x{1B}[31m")


# -- the note for people ----------------------------------------------------

def test_note_names_each_recipient_and_the_reply(original):
    text = note(dsn(original())[1])
    assert "<bob@example.com>" in text
    assert "<carol@example.com>" in text
    # Wrapped for reading: compare with line breaks undone.
    flat = " ".join(text.split())
    assert "mx1.example.com answered: 550 5.1.1 <bob@example.com>: User unknown" in flat
    assert "mailbox does not exist" in flat
    assert "What you can do" in text
    assert QUEUE_ID in text


def test_note_for_delayed_mail_says_until_when(original):
    text = " ".join(note(dsn(original(), [SLOW], retry_until=RETRY_UNTIL)[1]).split())
    assert "not yet been delivered" in text
    assert "Tue, 06 Jan 2026 00:00:00 +0000" in text
    assert "no need to send the message again" in text
    assert "What you can do" not in text


# -- the returned header section --------------------------------------------

def test_original_header_section_returned_byte_for_byte(original):
    _, message = dsn(original())
    head, body = raw_parts(message)[2]
    assert "Content-Transfer-Encoding: 7bit" in head
    assert body == HEADERS
    parsed = parse(message).get_payload()[2]
    assert parsed.get_content().replace("\r\n", "\n") == (
        HEADERS.decode("ascii").replace("\r\n", "\n"))


def test_body_of_the_original_never_comes_back(original):
    _, message = dsn(original())
    assert b"must never come back" not in message


def test_only_the_header_section_is_read(original, monkeypatch):
    path = original(body=b"x" * 998 + b"\r\n" * 10_000)
    read = []

    class CountingFile(io.BufferedReader):
        def readline(self, size=-1):
            line = super().readline(size)
            read.append(len(line))
            return line

    monkeypatch.setattr(bounce, "open_message",
                        lambda name, length=None: CountingFile(io.FileIO(name, "rb")))
    section, cut = read_header_section(path)
    assert (section, cut) == (HEADERS, False)
    assert sum(read) == len(HEADERS) + 2


def test_huge_header_section_is_capped_at_a_whole_field(original):
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"f" * 100) for n in range(2000))
    _, message = dsn(original(HEADERS + filler))
    body = raw_parts(message)[2][1]
    assert len(body) <= bounce.HEADER_SECTION_LIMIT
    assert len(body) > bounce.HEADER_SECTION_LIMIT - 200
    assert (HEADERS + filler).startswith(body)
    assert body.endswith(b"\r\n")
    assert "too long to return in full" in " ".join(note(message).split())


def test_cap_drops_a_folded_field_that_does_not_fit(tmp_path):
    path = tmp_path / "m.msg"
    path.write_bytes(b"A: 1\r\nB: 2\r\n  more\r\n  and more\r\nC: 3\r\n\r\nbody\r\n")
    assert read_header_section(str(path), limit=18) == (b"A: 1\r\n", True)
    assert read_header_section(str(path), limit=34) == (
        b"A: 1\r\nB: 2\r\n  more\r\n  and more\r\n", True)
    assert read_header_section(str(path), limit=40) == (
        b"A: 1\r\nB: 2\r\n  more\r\n  and more\r\nC: 3\r\n", False)


def test_header_section_ending_exactly_at_the_cap_is_whole(tmp_path):
    path = tmp_path / "m.msg"
    path.write_bytes(b"A: 1\r\nB: 2\r\n\r\nbody\r\n")
    assert read_header_section(str(path), limit=12) == (b"A: 1\r\nB: 2\r\n", False)


def test_header_limit_keyword_is_used(original):
    before_from = HEADERS.index(b"From:")
    _, message = dsn(original(), header_limit=before_from + 10)
    assert raw_parts(message)[2][1] == HEADERS[:before_from]


def test_bare_lf_line_ends_in_the_original_come_back_as_crlf(original):
    path = original(HEADERS.replace(b"\r\n", b"\n"), b"body\n")
    assert raw_parts(dsn(path)[1])[2][1] == HEADERS


def test_eight_bit_headers_without_smtputf8_are_quoted_printable(original):
    odd = HEADERS + b"X-Note: caf\xc3\xa9 \xff\r\n"
    _, message = dsn(original(odd))
    assert message.isascii()
    head, body = raw_parts(message)[2]
    assert "Content-Type: text/rfc822-headers" in head
    assert "Content-Transfer-Encoding: quoted-printable" in head
    assert quopri.decodestring(body) == odd
    assert parse(message).get_payload()[2].get_payload(decode=True) == odd


@pytest.mark.parametrize("smtputf8", [False, True])
def test_overlong_original_header_line_is_quoted_printable(original, smtputf8):
    long_line = b"X-Long: " + b"y" * 3000 + b"\r\n"
    _, message = dsn(original(HEADERS + long_line), record=make_record(smtputf8=smtputf8))
    head, body = raw_parts(message)[2]
    assert any(line.startswith("Content-Type: text/rfc822-headers") for line in head)
    assert "Content-Transfer-Encoding: quoted-printable" in head
    assert quopri.decodestring(body) == HEADERS + long_line
    returned = parse(message).get_payload()[2]
    assert returned.get_payload(decode=True) == HEADERS + long_line


def test_undecodable_headers_of_an_smtputf8_message_are_quoted_printable(original):
    odd = UTF8_HEADERS + b"X-Odd: \xff\xfe\r\n"
    _, message = dsn(original(odd), record=make_record(smtputf8=True))
    returned = parse(message).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned.get_payload(decode=True) == odd


# -- SMTPUTF8 ----------------------------------------------------------------


def test_smtputf8_original_gets_the_global_types(original):
    record = make_record(sender="jürgen@example.de",
                         recipients=["用户@example.net"], smtputf8=True)
    entry = FailedRecipient("用户@example.net", "failed", "5.1.1",
                            "550 5.1.1 用户不存在", "mx.example.net", None)
    envelope, message = dsn(original(UTF8_HEADERS), [entry], record=record)
    assert envelope.sender == ""
    assert envelope.recipients == ["jürgen@example.de"]
    assert envelope.smtputf8 is True
    assert envelope.body == "8BITMIME"
    parsed = parse(message)
    assert str(parsed["To"]) == "jürgen@example.de"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "global-delivery-status"
    assert [part.get_content_type() for part in parsed.get_payload()] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    assert parsed.get_payload()[0].get_content_charset() == "utf-8"
    assert status_blocks(message)[1] == [
        ("Final-Recipient", "utf-8; 用户@example.net"),
        ("Action", "failed"),
        ("Status", "5.1.1"),
        ("Remote-MTA", "dns; mx.example.net"),
        ("Diagnostic-Code", "smtp; 550 5.1.1 用户不存在"),
    ]
    head, body = raw_parts(message)[2]
    assert "Content-Transfer-Encoding: 8bit" in head
    assert body == UTF8_HEADERS
    assert "<用户@example.net>" in note(message)


def test_smtputf8_with_ascii_addresses_keeps_rfc822_type(original):
    record = make_record(smtputf8=True)
    _, message = dsn(original(), record=record)
    assert parse(message).get_payload()[1].get_content_type() == (
        "message/global-delivery-status")
    assert dict(status_blocks(message)[1])["Final-Recipient"] == "rfc822; bob@example.com"


def test_without_smtputf8_everything_is_ascii(original):
    entry = FailedRecipient("bob@example.com", "failed", "5.1.1",
                            "550 5.1.1 Benutzer unbekannt – prüfen", "mx1.example.com", None)
    _, message = dsn(original(), [entry])
    assert message.isascii()
    assert dict(status_blocks(message)[1])["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 Benutzer unbekannt \\x{2013} pr\\x{FC}fen")


def test_non_ascii_address_forces_the_global_form(original):
    # Cannot come from our SMTP server without SMTPUTF8, but if it did the
    # address could not be written in ASCII.
    record = make_record(recipients=["josé@example.com"])
    entry = FailedRecipient("josé@example.com", "failed", "5.1.1", None, None, None)
    envelope, message = dsn(original(), [entry], record=record)
    assert envelope.smtputf8 is True
    assert parse(message).get_param("report-type") == "global-delivery-status"


# -- refusals ------------------------------------------------------------------

def test_null_sender_original_is_value_error(original):
    with pytest.raises(ValueError):
        dsn(original(), record=make_record(sender=""))


def test_double_bounce_goes_to_the_postmaster_and_is_marked(original):
    envelope, message = dsn(original(), recipients=[UNKNOWN], record=make_record(sender=""),
                            postmaster="postmaster@example.net")
    assert (envelope.sender, envelope.recipients, envelope.double_bounce) == (
        "", ["postmaster@example.net"], True)
    assert new_record("X", envelope, 1, NOW)["envelope"]["double_bounce"] is True
    parsed = parse(message)
    assert parsed["To"] == "postmaster@example.net"
    assert parsed["Subject"] == "Undeliverable Mail Notification (Postmaster Copy)"
    note = " ".join(parsed.get_payload()[0].get_content().split())
    assert "from the null sender <> " in note and "comes to you, the postmaster, once" in note
    assert "<bob@example.com>" in note
    # The header says so too, for the relays it passes through.
    header = message.split(b"\r\n\r\n", 1)[0]
    assert parsed["X-Relaymail-Double-Bounce"] == MTA
    assert bounce.is_double_bounce(header)
    # An ordinary bounce is not marked.
    plain_envelope, plain = dsn(original())
    assert plain_envelope.double_bounce is False
    assert not bounce.is_double_bounce(plain.split(b"\r\n\r\n", 1)[0])


@pytest.mark.parametrize("entry", [
    FailedRecipient("bob@example.com", "sent", "2.0.0", None, None, None),
    FailedRecipient("bob@example.com\r\nBcc: eve@example.org", "failed", "5.1.1",
                    None, None, None),
])
def test_unreportable_recipient_is_value_error(original, entry):
    with pytest.raises(ValueError):
        dsn(original(), [entry])


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x9b", "\t"])
def test_recipient_with_a_line_breaking_or_c1_character_is_value_error(original, char):
    entry = FailedRecipient(f"b{char}ob@example.com", "failed", "5.1.1", None, None, None)
    with pytest.raises(ValueError, match="^control character in address "):
        dsn(original(), [entry])


@pytest.mark.parametrize("action, status, reported", [
    ("failed", "5.1", "5.0.0"),
    ("failed", "2.0.0", "5.0.0"),
    ("failed", "5.1.1000", "5.0.0"),
    ("delayed", "", "4.0.0"),
    ("delayed", "4.4.1 ", "4.0.0"),
])
def test_malformed_status_is_reported_as_undefined(original, action, status, reported):
    entry = FailedRecipient("bob@example.com", action, status, None, None, None)
    _, message = dsn(original(), [entry])
    assert dict(status_blocks(message)[1])["Status"] == reported


def test_bad_reporting_mta_is_value_error(original):
    with pytest.raises(ValueError):
        build_dsn(make_record(), original(), [UNKNOWN], "relay.example.net\r\nBcc: x", NOW)


def test_no_recipients_is_value_error(original):
    with pytest.raises(ValueError):
        dsn(original(), [])


# -- folding and loops ---------------------------------------------------------

LONG_MTA = ".".join(["m" * 62] * 4)                 # 251 octets, a legal host name
LONG_SENDER = "s" * 64 + "@" + ".".join(["d" * 60] * 3) + ".example.org"


def header_lines(message):
    """Every header line: the top level, each part's, each report field."""
    top = message.split(b"\r\n\r\n", 1)[0].decode("utf-8").split("\r\n")
    lines = list(top)
    for head, _ in raw_parts(message):
        lines += head
    body = raw_parts(message)[1][1].decode("utf-8")
    return lines + [line for line in body.split("\r\n") if line]


def test_every_header_line_is_folded_at_78_unless_one_word_is_longer(original):
    record = make_record(sender=LONG_SENDER, recipients=[LONG_SENDER])
    entry = FailedRecipient(LONG_SENDER, "failed", "5.1.1",
                            "550 5.1.1 " + " ".join(["unknown"] * 40), LONG_MTA, LAST_ATTEMPT)
    _, message = build_dsn(record, original(), [entry], LONG_MTA, NOW)
    for line in header_lines(message):
        words = line.split()
        assert len(line.encode()) <= 78 or len(words) == 1, line
        assert len(line.encode()) < 998
    parsed = parse(message)
    assert str(parsed["From"]) == f"Mail Delivery System <MAILER-DAEMON@{LONG_MTA}>"
    assert str(parsed["To"]) == LONG_SENDER
    assert parsed["Message-ID"].endswith(f"@{LONG_MTA}>")
    report = dict(status_blocks(message)[0])
    assert report["Reporting-MTA"] == f"dns; {LONG_MTA}"
    assert dict(status_blocks(message)[1])["Final-Recipient"] == f"rfc822; {LONG_SENDER}"


def test_dsn_of_a_looping_message_starts_again_with_no_received_field(original):
    # A DSN is a new message: the original's Received fields go back in the
    # third part, never in its own header section, so the next relay's hop
    # count starts from zero; a DSN about a DSN is never sent.
    looping = b"".join(b"Received: from h%d by h%d\r\n" % (n, n + 1) for n in range(60))
    _, message = dsn(original(looping + HEADERS))
    top = message.split(b"\r\n\r\n", 1)[0]
    assert b"received:" not in top.lower()
    assert looping in raw_parts(message)[2][1]
    reader = data.DataReader(lambda block: None, 10**6, 1000, 102400, max_received=49)
    stuffed = message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert reader.feed(stuffed) == len(stuffed)
    assert (reader.outcome, reader.received) == (data.OK, 0)
    with pytest.raises(ValueError):
        dsn(original(), record=make_record(sender=""))


# -- wire format ---------------------------------------------------------------

def many_notifications(original):
    huge_word = FailedRecipient("bob@example.com", "failed", "5.0.0",
                                "550 " + "z" * 5000, "mx1.example.com", LAST_ATTEMPT)
    wide = FailedRecipient("bob@example.com", "failed", "5.0.0",
                           "550 " + "é" * 3000, "mx1.example.com", LAST_ATTEMPT)
    utf8 = make_record(smtputf8=True)
    long_header = HEADERS + b"X-Long: " + b"y" * 3000 + b"\r\n"
    return [
        dsn(original())[1],
        dsn(original(), [SLOW], retry_until=RETRY_UNTIL)[1],
        dsn(original(), [huge_word])[1],
        dsn(original(), [wide], record=utf8)[1],
        dsn(original(long_header), record=utf8)[1],
        dsn(original(HEADERS + b"\r\n"), [UNKNOWN, SLOW])[1],
    ]


def test_every_line_is_crlf_terminated_and_under_998_octets(original):
    for message in many_notifications(original):
        parse(message)
        assert message.endswith(b"\r\n")
        assert message.count(b"\n") == message.count(b"\r\n")
        assert message.count(b"\r") == message.count(b"\r\n")
        lines = message.split(b"\r\n")[:-1]
        assert max(len(line) for line in lines) < 998


def test_huge_word_in_a_reply_is_cut_not_lost(original):
    entry = FailedRecipient("bob@example.com", "failed", "5.0.0",
                            "550 " + "z" * 5000, None, None)
    value = dict(status_blocks(dsn(original(), [entry])[1])[1])["Diagnostic-Code"]
    assert value.replace(" ", "") == "smtp;550" + "z" * 5000


def test_boundary_never_occurs_inside_a_part(original, monkeypatch):
    tokens = iter(["0" * 32, "1" * 32, "2" * 12])
    monkeypatch.setattr(bounce.secrets, "token_hex", lambda size: next(tokens))
    planted = HEADERS + b"X-Trap: --relaymail." + b"0" * 32 + b"\r\n"
    _, message = dsn(original(planted))
    assert parse(message).get_boundary() == "relaymail." + "1" * 32
    assert raw_parts(message)[2][1] == planted


def test_a_notice_about_requiretls_mail_keeps_requiretls_and_returns_no_body(original):
    # RFC 8689 4.3: RET=FULL asked, but the body stays out; the notice
    # itself is sent only under REQUIRETLS.
    record = make_record(requiretls=True, dsn_ret="FULL")
    envelope, message = dsn(original(), [UNKNOWN], record=record)
    assert envelope.requiretls is True
    assert b"must never come back" not in message
    head, body = raw_parts(message)[2]
    assert "Content-Description: Header section of the original message" in head
    assert body == HEADERS
    plain, returned = dsn(original(), [UNKNOWN], record=make_record(dsn_ret="FULL"))
    assert plain.requiretls is False
    assert b"must never come back" in returned      # what RET=FULL returns otherwise
