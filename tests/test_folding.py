"""relaymail.folding: the header fields we write, folded at 78, never past 998."""

import re

import pytest
from hypothesis import example, given, settings, strategies as st

from relaymail.folding import fold, fold_bytes


def unfold(lines):
    return re.sub(r"\r\n(?=[ \t])", "", "\r\n".join(lines))


def test_short_field_is_one_line():
    assert fold("Subject: hello") == ["Subject: hello"]


def test_field_is_broken_at_spaces_within_78_octets():
    field = "Subject: " + " ".join(f"word{n}" for n in range(40))
    lines = fold(field)
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])
    assert unfold(lines) == field


def test_callers_breaks_are_kept_and_each_clause_folded_further():
    field = "Received: from " + "h" * 100 + " ([192.0.2.1])\r\n\tby mx.test (relaymail) with ESMTP id Q1;"
    assert fold(field) == ["Received: from", " " + "h" * 100, " ([192.0.2.1])",
                           "\tby mx.test (relaymail) with ESMTP id Q1;"]


def test_word_longer_than_the_limit_is_cut_and_nothing_else_lost():
    lines = fold("X-Long: " + "z" * 3000)
    assert [len(line) for line in lines] == [7, 998, 998, 998, 10]
    assert unfold(lines).replace(" ", "") == "X-Long:" + "z" * 3000


def test_limits_count_utf8_octets_and_never_split_a_character():
    lines = fold("Subject: " + "é" * 2000, limit=997)
    assert all(len(line.encode("utf-8")) <= 997 for line in lines)
    assert unfold(lines).replace(" ", "") == "Subject:" + "é" * 2000


def test_two_spaces_never_leave_a_line_of_white_space():
    lines = fold("Subject: " + "a" * 70 + "  " + "b" * 20)
    assert all(line.strip() for line in lines)
    assert unfold(lines) == "Subject: " + "a" * 70 + "  " + "b" * 20


def test_fold_bytes_ends_every_line_with_crlf():
    assert fold_bytes("A: b\r\n\tc") == b"A: b\r\n\tc\r\n"


def test_limit_too_small_for_a_character_is_refused():
    with pytest.raises(ValueError):
        fold("A: b", limit=4)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FFF),
                        min_size=1, max_size=1200), min_size=1, max_size=8))
@example(["0" * 18 + "\x80" * 17 + "\xa0" + "\u0800" * 8])     # one word, U+00A0 inside
def test_any_field_unfolds_back_and_keeps_the_limits(words):
    field = "X-Test: " + " ".join(words)
    lines = fold(field)
    assert all(len(line.encode("utf-8")) <= 998 for line in lines)
    for line in lines:
        # Over 78 only when the line is a single word: words are what
        # fold() splits on, spaces only (str.split() would also split at
        # U+00A0, which is not folding white space; hypothesis found it).
        assert len(line.encode("utf-8")) <= 78 or len(line.strip(" ").split(" ")) == 1
    if all(len(word.encode("utf-8")) < 997 for word in words):
        assert unfold(lines) == field


def test_no_line_passes_the_limit_even_when_the_width_is_wider():
    assert max(len(line) for line in fold("Subject: " + "x" * 40, width=78, limit=20)) <= 20
