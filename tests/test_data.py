"""The DATA reader: end detection, dot-unstuffing, limits, smuggling."""

import pytest
from hypothesis import given, settings, strategies as st

from relaymail.smtp import data


def read(chunks, max_size=10_000, line_length=1000, **options):
    """Feed chunks; return (message bytes, outcome, what followed the end)."""
    out = []
    reader = data.DataReader(out.append, max_size, line_length, **options)
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


def test_nul_bytes_do_not_end_a_message_when_allowed():
    message, outcome, rest = read([b"a\x00\r\n\x00.\x00\r\nb\r\n.\r\n"], allow_nul=True)
    assert (message, outcome, rest) == (b"a\x00\r\n\x00.\x00\r\nb\r\n", data.OK, b"")


@pytest.mark.parametrize("split", range(1, 12))
def test_nul_is_refused_by_default_and_reading_goes_on_to_the_real_end(split):
    stream = b"a\r\n\x00.\r\nRSET\r\nb\r\n.\r\nNOOP\r\n"
    assert read([stream[:split], stream[split:]])[1:] == (data.NUL, b"NOOP\r\n")


def test_nul_late_in_a_message_is_refused():
    assert read([b"a\r\n" * 500, b"b\x00\r\n.\r\n"])[1:] == (data.NUL, b"")


def test_bare_lf_is_rejected_even_when_split_over_chunks():
    assert read([b"abc\r", b"def\r\n.\r\n"])[1] == data.BARE_NEWLINE
    assert read([b"abc\r", b"\ndef\r\n.\r\n"]) == (b"abc\r\ndef\r\n", data.OK, b"")


def test_line_of_exactly_the_limit_is_accepted():
    line = b"x" * 998 + b"\r\n"
    assert read([line + b".\r\n"]) == (line, data.OK, b"")


@pytest.mark.parametrize("chunked", [False, True])
def test_line_of_the_limit_after_unstuffing_is_accepted(chunked):
    # RFC 5321 4.5.3.1.6: the dot added for transparency does not count.
    line = b"." + b"x" * 997 + b"\r\n"
    stream = b"a\r\n." + line + b"." + line + b".\r\n"
    chunks = [bytes([b]) for b in stream] if chunked else [stream]
    assert read(chunks) == (b"a\r\n" + line + line, data.OK, b"")


def test_stuffed_line_one_over_the_limit_is_refused():
    assert read([b".." + b"x" * 998 + b"\r\n.\r\n"])[1] == data.LINE_TOO_LONG


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


def hops(count, name=b"Received"):
    return b"".join(name + b": from h%d by h%d\r\n" % (n, n + 1) for n in range(count))


@pytest.mark.parametrize("name", [b"Received", b"received", b"RECEIVED", b"ReCeIvEd",
                                  # RFC 5322 4.5's obsolete form, which Postfix reads too.
                                  b"Received ", b"Received\t \t"])
def test_received_fields_over_the_limit_are_too_many_hops(name):
    stream = hops(50, name) + b"Subject: loop\r\n\r\nbody\r\n.\r\nNOOP\r\n"
    assert read([stream], max_received=49) == (b"", data.TOO_MANY_HOPS, b"NOOP\r\n")


def test_received_fields_up_to_the_limit_pass_and_are_counted():
    out = []
    reader = data.DataReader(out.append, 10_000, 1000, max_received=49)
    stream = hops(49) + b"\r\nbody\r\n.\r\n"
    assert reader.feed(stream) == len(stream)
    assert (reader.outcome, reader.received, b"".join(out)) == (data.OK, 49, stream[:-3])


@pytest.mark.parametrize("size", [1, 7, 100])
def test_received_fields_are_counted_across_any_chunking(size):
    stream = hops(3) + b"X-A: b\r\n" + hops(3) + b"\r\n.\r\n"
    chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    assert read(chunks, max_received=5)[1] == data.TOO_MANY_HOPS
    assert read(chunks, max_received=6)[1] == data.OK


def test_only_received_field_names_in_the_header_section_count():
    # Not in the body, not inside another field or its continuation, not
    # X-Received or "Received" without a colon, and a dot-stuffed line is
    # unstuffed first (".Received:" arrives as "..Received:").
    stream = (b"Received: from a\r\nX-Received: from b\r\nSubject: Received: c\r\n"
              b" Received: d\r\nReceived e\r\n..Received: f\r\n\r\n" + hops(10) + b".\r\n")
    reader = data.DataReader(lambda block: None, 10_000, 1000, max_received=1)
    assert reader.feed(stream) == len(stream)
    assert (reader.outcome, reader.received) == (data.OK, 1)


def test_header_that_starts_with_an_empty_line_has_no_received_fields():
    assert read([b"\r\n" + hops(5) + b".\r\n"], max_received=0)[1] == data.OK


# -- [limits] long_lines = split -------------------------------------------------

def split_read(stream, size, **options):
    chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    return read(chunks, max_size=10**6, split_long_lines=True, **options)


CHUNK_SIZES = [1, 2, 3, 7, 500, 997, 998, 999, 1000, 1001, 4096]


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_split_cuts_a_long_body_line_into_lines_of_the_limit_with_crlf_space(size):
    stream = b"Subject: s\r\n\r\n" + b"x" * 2500 + b"\r\nend\r\n.\r\nNOOP\r\n"
    assert split_read(stream, size, header_limit=1000) == (
        b"Subject: s\r\n\r\n" + b"x" * 998 + b"\r\n " + b"x" * 997 + b"\r\n " + b"x" * 505
        + b"\r\nend\r\n", data.OK, b"NOOP\r\n")


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_split_folds_a_long_header_line_and_keeps_the_header_whole(size):
    stream = b"X-Long: " + b"y" * 2000 + b"\r\nReceived: a\r\n\r\nbody\r\n.\r\n"
    message, outcome, rest = split_read(stream, size, header_limit=10_000, max_received=1)
    first = b"X-Long: " + b"y" * 990
    assert (message, outcome, rest) == (
        first + b"\r\n " + b"y" * 997 + b"\r\n " + b"y" * 13 + b"\r\nReceived: a\r\n\r\nbody\r\n",
        data.OK, b"")


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_split_unstuffs_only_at_the_start_of_a_line(size):
    # The line begins "..." on the wire (a stuffed ".."); the dots after the
    # cut are in the middle of the line: data, kept.
    stream = b"..." + b"x" * 996 + b"..y\r\n.\r\n"
    assert split_read(stream, size) == (b".." + b"x" * 996 + b"\r\n ..y\r\n", data.OK, b"")


def test_split_keeps_the_size_limit():
    out = []
    reader = data.DataReader(out.append, 5000, 1000, split_long_lines=True)
    assert reader.feed(b"z" * 20_000) is None
    assert reader.feed(b"\r\n.\r\n") == 5
    assert reader.outcome == data.TOO_BIG and sum(map(len, out)) <= 5000


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"a" * 700, b"b", b".", b"\r\n", b"\r\n\r\n", b"\r\n.."]), max_size=12),
       st.lists(st.integers(1, 3000), min_size=1, max_size=6))
def test_split_does_not_depend_on_how_the_stream_is_chunked(pieces, cuts):
    stream = b"H: v\r\n" + b"".join(pieces) + b"\r\n.\r\n"
    whole = read([stream], max_size=10**6, header_limit=10**6, split_long_lines=True)
    chunks, start = [], 0
    for cut in sorted(cuts):
        chunks.append(stream[start:cut])
        start = max(start, cut)
    chunks.append(stream[start:])
    assert read(chunks, max_size=10**6, header_limit=10**6, split_long_lines=True) == whole
    assert whole[1] == data.OK
    assert max(map(len, whole[0].split(b"\r\n"))) <= 998
