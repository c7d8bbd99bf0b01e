"""The DATA reader: end detection, dot-unstuffing, limits, smuggling."""

import pytest
from hypothesis import given, settings, strategies as st

from relaymail.smtp import data


def read(chunks, max_size=10_000, line_length=1000):
    """Feed chunks; return (message bytes, outcome, what followed the end)."""
    out = []
    reader = data.DataReader(out.append, max_size, line_length)
    for i, chunk in enumerate(chunks):
        end = reader.feed(chunk)
        if end is not None:
            rest = chunk[end:] + b"".join(chunks[i + 1:])
            return b"".join(out), reader.outcome, rest
    return b"".join(out), reader.outcome, None


def test_simple_message_ends_at_crlf_dot_crlf():
    assert read([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"]) == (
        b"Subject: x\r\n\r\nhello\r\n", data.OK, b"QUIT\r\n")


def test_empty_message():
    assert read([b".\r\nNOOP\r\n"]) == (b"", data.OK, b"NOOP\r\n")


def test_message_of_one_empty_line():
    assert read([b"\r\n.\r\n"]) == (b"\r\n", data.OK, b"")


def test_dot_unstuffing_removes_one_leading_dot_per_line():
    message, outcome, rest = read([b"..x\r\n...\r\n.y\r\nz.\r\n.\r\n"])
    assert (message, outcome, rest) == (b".x\r\n..\r\ny\r\nz.\r\n", data.OK, b"")


def test_first_line_dot_is_unstuffed():
    assert read([b"..\r\n.\r\n"])[0] == b".\r\n"


@pytest.mark.parametrize("split", range(1, 24))
def test_end_marker_found_across_any_chunk_boundary(split):
    stream = b"a\r\n..b\r\nc\r\n.\r\nRSET\r\n"
    assert read([stream[:split], stream[split:]]) == (b"a\r\n.b\r\nc\r\n", data.OK, b"RSET\r\n")


def test_byte_by_byte_feeding():
    stream = b"line one\r\n.. two\r\n\r\n.\r\nNOOP\r\n"
    assert read([bytes([b]) for b in stream]) == (
        b"line one\r\n. two\r\n\r\n", data.OK, b"NOOP\r\n")


@pytest.mark.parametrize("smuggled", [
    b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n",
])
def test_smuggling_variants_neither_end_the_message_nor_start_another(smuggled):
    stream = (b"Subject: a\r\n\r\nbody" + smuggled +
              b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
              b"forged\r\n.\r\nNOOP\r\n")
    message, outcome, rest = read([stream])
    assert outcome == data.BARE_NEWLINE
    assert rest == b"NOOP\r\n"
    assert message == b""


def test_nul_bytes_do_not_end_a_message():
    message, outcome, rest = read([b"a\x00\r\n\x00.\x00\r\nb\r\n.\r\n"])
    assert (message, outcome, rest) == (b"a\x00\r\n\x00.\x00\r\nb\r\n", data.OK, b"")


def test_bare_lf_is_rejected_even_when_split_over_chunks():
    assert read([b"abc\r", b"def\r\n.\r\n"])[1] == data.BARE_NEWLINE
    assert read([b"abc\r", b"\ndef\r\n.\r\n"]) == (b"abc\r\ndef\r\n", data.OK, b"")


def test_line_of_exactly_the_limit_is_accepted():
    line = b"x" * 998 + b"\r\n"
    assert read([line + b".\r\n"]) == (line, data.OK, b"")


def test_line_one_over_the_limit_is_refused_and_reading_goes_on():
    line = b"x" * 999 + b"\r\n"
    assert read([line + b"ok\r\n.\r\nNOOP\r\n"])[1:] == (data.LINE_TOO_LONG, b"NOOP\r\n")


def test_endless_line_is_not_buffered_and_its_tail_is_never_a_command():
    reader = data.DataReader(lambda b: None, 10**9, 1000)
    for _ in range(1000):
        assert reader.feed(b"y" * 4096) is None
    assert len(reader._pending) <= 1000
    # The dot here is mid-line: not the end.
    assert reader.feed(b".\r\nQUIT\r\n") is None
    assert reader.feed(b".\r\nNOOP\r\n") == 3
    assert reader.outcome == data.LINE_TOO_LONG


def test_size_limit_enforced_while_streaming():
    written = []
    reader = data.DataReader(written.append, 100, 1000)
    for _ in range(50):
        assert reader.feed(b"0123456789" * 5 + b"\r\n") is None
    assert reader.feed(b".\r\n") == 3
    assert reader.outcome == data.TOO_BIG
    assert sum(map(len, written)) <= 100


def test_write_error_is_an_outcome_not_an_exception():
    def broken(block):
        raise OSError(28, "No space left on device")
    reader = data.DataReader(broken, 1000, 1000)
    assert reader.feed(b"a\r\n.\r\n") == 6
    assert reader.outcome == data.WRITE_FAILED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=12), st.integers(1, 7))
def test_a_message_ends_only_at_crlf_dot_crlf(chunks, salt):
    stream = b"".join(chunks)
    message, outcome, rest = read(chunks + [b"\r\n.\r\n"], max_size=10**6)
    # Find the true end by definition: the first "." line that follows a CRLF
    # (or starts the stream).
    framed = b"\r\n" + stream + b"\r\n.\r\n"
    true_end = framed.find(b"\r\n.\r\n")
    consumed = true_end + 5 - 2
    assert rest == (stream + b"\r\n.\r\n")[consumed:]
    body = framed[2:true_end + 2]
    if outcome == data.OK:
        assert b"\r\n" + message == (b"\r\n" + body).replace(b"\r\n.", b"\r\n")
        assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
