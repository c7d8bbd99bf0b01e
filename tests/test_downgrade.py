"""The 8-bit to 7-bit conversion and the SMTPUTF8 decision, without a network:
exact output bytes, and the stdlib ``email`` package reading the converted
message back to the original content."""

import binascii
import email
import email.policy
import io
import os
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from relaymail.delivery.downgrade import CannotSend, downgrade, fit

RECEIVED = b"Received: from client.test by relay.test (relaymail) with ESMTP id 1\r\n"


def parse(message):
    return email.message_from_bytes(message, policy=email.policy.default)


def refusal(message, **kwargs):
    with pytest.raises(CannotSend) as info:
        downgrade(message, **kwargs)
    return info.value.enhanced, info.value.reason


# -- single-part messages ----------------------------------------------------------

def test_non_mime_utf8_text_becomes_quoted_printable_with_mime_headers():
    message = RECEIVED + b"Subject: hello\r\n\r\ncaf\xc3\xa9 = ok \r\n.line\r\n"
    out = downgrade(message)
    assert out == (RECEIVED + b"Subject: hello\r\n"
                   b"MIME-Version: 1.0\r\n"
                   b"Content-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n"
                   b"\r\n"
                   b"caf=C3=A9 =3D ok=20\r\n.line\r\n")
    parsed = parse(out)
    assert parsed.get_payload(decode=True) == b"caf\xc3\xa9 = ok \r\n.line\r\n"
    assert parsed.get_content().replace("\r\n", "\n") == "café = ok \n.line\n"


def test_invalid_utf8_is_labelled_unknown_8bit():
    out = downgrade(b"Subject: x\r\n\r\nLatin-1 \xe9t\xe9\r\n")
    assert out == (b"Subject: x\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: text/plain; charset=unknown-8bit\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"Latin-1 =E9t=E9\r\n")


def test_existing_8bit_transfer_encoding_is_replaced_and_other_headers_kept():
    message = (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding:\r\n 8bit\r\n"
               b"Content-Type: text/plain; charset=iso-8859-1\r\nX-Odd:   spacing  \r\n"
               b"\r\n\xe9\r\n")
    assert downgrade(message) == (
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nX-Odd:   spacing  \r\n"
        b"\r\n=E9\r\n")


def test_seven_bit_message_is_unchanged():
    message = b"Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nonly ascii\r\n"
    assert downgrade(message) == message


def test_long_lines_are_cut_at_76_without_splitting_an_escape():
    body = b"x" * 73 + b"\xc3\xa9" + b"y" * 10
    out = downgrade(b"Subject: x\r\n\r\n" + body + b"\r\n")
    encoded = out.split(b"\r\n\r\n", 1)[1]
    assert encoded == b"x" * 73 + b"=\r\n=C3=A9" + b"y" * 10 + b"\r\n"
    assert parse(out).get_payload(decode=True) == body + b"\r\n"


def test_a_cut_never_starts_a_line_with_a_dash():
    # Without care the second line would start "--b1", a boundary delimiter.
    text = b"a" * 75 + b"--b1 \xc3\xa9"
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text +
               b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--b1--\r\n")
    out = downgrade(message)
    assert b"a=\r\n=2D-b1 =C3=A9\r\n--b1\r\n" in out
    parts = list(parse(out).iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == [text, b"second"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_quoted_printable_decodes_to_the_original_with_short_ascii_lines(lines):
    body = b"\r\n".join(lines) + b"\xff\r\n"
    out = downgrade(b"Subject: x\r\n\r\n" + body)
    encoded = out.split(b"\r\n\r\n", 1)[1]
    assert encoded.isascii()
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76
        assert b"\r" not in line and b"\n" not in line
        assert not line.endswith((b" ", b"\t"))
    assert binascii.a2b_qp(encoded) == body


# -- multipart and nested messages -------------------------------------------------

MULTIPART = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--=_b1\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"seven-bit text,   left exactly   as it was \r\n"
    b"--=_b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"gr\xc3\xbc\xc3\x9fe\r\n"
    b"--=_b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    b"\x00\x80\xff\r\n"
    b"--=_b1--\r\n"
)


def test_multipart_converts_only_the_8bit_parts():
    out = downgrade(MULTIPART)
    assert out == (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"\r\n"
        b"This is a multi-part message in MIME format.\r\n"
        b"--=_b1\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"seven-bit text,   left exactly   as it was \r\n"
        b"--=_b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"gr=C3=BC=C3=9Fe\r\n"
        b"--=_b1\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
        b"AID/\r\n"
        b"--=_b1--\r\n")
    original = [p.get_payload(decode=True) for p in parse(MULTIPART).iter_parts()]
    converted = [p.get_payload(decode=True) for p in parse(out).iter_parts()]
    assert converted == original
    assert list(parse(out).iter_parts())[1].get_content() == "grüße"


def test_nested_message_rfc822_is_converted_inside():
    inner = b"Subject: inner\r\n\r\nna\xc3\xafve\r\n"
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               + inner + b"--b--\r\n")
    out = downgrade(message)
    assert out == (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                   b"--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
                   b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"na=C3=AFve\r\n--b--\r\n")
    [attached] = list(parse(out).iter_parts())
    assert attached.get_content()["Subject"] == "inner"


def test_multipart_digest_parts_default_to_message_rfc822():
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
               b"--d\r\n\r\nSubject: one\r\n\r\n\xc3\xa9\r\n--d--\r\n")
    out = downgrade(message)
    assert out == (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
                   b"--d\r\n\r\nSubject: one\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--d--\r\n")


# -- what cannot be converted ---------------------------------------------------------

def test_8bit_inside_multipart_signed_is_refused_with_5_6_3():
    message = (b"MIME-Version: 1.0\r\n"
               b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\";"
               b" micalg=pgp-sha256; boundary=s\r\n\r\n"
               b"--s\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\nsign\xc3\xa9d\r\n"
               b"--s\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP...\r\n"
               b"--s--\r\n")
    assert refusal(message) == (
        "5.6.3", "message has 8-bit content inside a signed part (multipart/signed)")


def test_seven_bit_signed_part_beside_an_8bit_part_is_left_alone():
    signed = (b"--o\r\nContent-Type: multipart/signed; protocol=\"x\"; boundary=s\r\n\r\n"
              b"--s\r\nContent-Type: text/plain\r\n\r\nascii\r\n--s\r\n"
              b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n"
               + signed + b"--o\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n"
               b"--o--\r\n")
    out = downgrade(message)
    assert signed in out
    assert out.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--o--\r\n")


@pytest.mark.parametrize("part, reason", [
    (b"Content-Type: message/partial; id=x; number=1\r\n\r\n\xe9\r\n",
     "message has 8-bit octets in a message/partial part, which cannot take a transfer "
     "encoding"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\xe9\r\n",
     "message has 8-bit octets in a text/plain part labelled quoted-printable"),
])
def test_parts_that_cannot_be_reencoded_are_refused_with_5_6_3(part, reason):
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\n" + part + b"--b--\r\n")
    assert refusal(message) == ("5.6.3", reason)


def test_8bit_in_the_preamble_is_refused():
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"pr\xc3\xa9amble\r\n--b\r\n\r\nx\r\n--b--\r\n")
    assert refusal(message) == (
        "5.6.3", "message has 8-bit octets in the preamble or epilogue of a multipart/mixed part")


def test_nesting_deeper_than_the_limit_is_refused():
    message = b"MIME-Version: 1.0\r\n"
    for level in range(3):
        message += b"Content-Type: multipart/mixed; boundary=l%d\r\n\r\n--l%d\r\n" % (level, level)
    message += b"Content-Type: text/plain\r\n\r\n\xe9\r\n"
    assert refusal(message, nesting_limit=2) == (
        "5.6.3", "message has MIME nesting deeper than 2 levels")
    assert downgrade(message, nesting_limit=3).endswith(b"\r\n=E9\r\n")


def test_8bit_header_fields_are_refused_with_5_6_7():
    assert refusal(b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nascii\r\n") == (
        "5.6.7", "message has 8-bit octets in header fields, which cannot be converted to "
                 "7 bits and need SMTPUTF8")


# -- fit(): what to send to which server ------------------------------------------------

@pytest.fixture
def spooled():
    files = []

    def make(content):
        handle, path = tempfile.mkstemp()
        os.write(handle, content)
        os.close(handle)
        file = open(path, "rb")
        files.append((file, path))
        return file

    yield make
    for file, path in files:
        file.close()
        os.unlink(path)


def fit_to(file, extensions, body="7BIT", smtputf8=False, addresses=("a@example.org",)):
    return fit(file, os.fstat(file.fileno()).st_size, body=body, smtputf8=smtputf8,
               addresses=list(addresses), extensions=dict.fromkeys(extensions, ""))


def test_fit_sends_the_spool_file_unchanged_when_the_server_can_take_it(spooled):
    file = spooled(b"Subject: x\r\n\r\n\xe9\r\n")
    fitted = fit_to(file, ["8BITMIME", "SMTPUTF8"], body="8BITMIME", smtputf8=True)
    assert (fitted.file, fitted.body, fitted.smtputf8, fitted.converted) == (
        file, "8BITMIME", True, False)


def test_fit_converts_to_a_temporary_file_with_its_own_size(spooled):
    file = spooled(b"Subject: x\r\n\r\n\xe9\r\n")
    fitted = fit_to(file, ["SIZE"], body="8BITMIME")
    with fitted.file:
        content = fitted.file.read()
    assert fitted.converted and fitted.body == "7BIT" and not fitted.smtputf8
    assert content == downgrade(b"Subject: x\r\n\r\n\xe9\r\n")
    assert fitted.size == len(content)


def test_fit_declared_8bitmime_but_ascii_goes_as_7bit(spooled):
    file = spooled(b"Subject: x\r\n\r\nascii\r\n")
    fitted = fit_to(file, [], body="8BITMIME")
    assert (fitted.file, fitted.body, fitted.converted) == (file, "7BIT", False)


def test_fit_drops_smtputf8_for_an_ascii_message(spooled):
    file = spooled(b"Subject: x\r\n\r\nascii\r\n")
    fitted = fit_to(file, ["8BITMIME"], smtputf8=True)
    assert (fitted.file, fitted.smtputf8) == (file, False)


def test_fit_keeps_an_8bit_body_but_drops_smtputf8_for_ascii_headers(spooled):
    file = spooled(b"Subject: x\r\n\r\nna\xc3\xafve\r\n")
    fitted = fit_to(file, ["8BITMIME"], smtputf8=True)
    assert (fitted.file, fitted.body, fitted.smtputf8) == (file, "8BITMIME", False)


def test_fit_refuses_a_non_ascii_address_without_smtputf8(spooled):
    file = spooled(b"Subject: x\r\n\r\nascii\r\n")
    with pytest.raises(CannotSend) as info:
        fit_to(file, ["8BITMIME"], smtputf8=True, addresses=["a@example.org", "jürgen@example.com"])
    assert (info.value.enhanced, info.value.reason) == (
        "5.6.7", "address <jürgen@example.com> needs SMTPUTF8")


def test_fit_refuses_utf8_header_fields_without_smtputf8(spooled):
    file = spooled(b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nascii\r\n")
    with pytest.raises(CannotSend) as info:
        fit_to(file, ["8BITMIME"], smtputf8=True)
    assert (info.value.enhanced, info.value.reason) == (
        "5.6.7", "message has non-ASCII header fields, which need SMTPUTF8")


def test_fit_keeps_utf8_headers_for_smtputf8_without_8bitmime(spooled):
    file = spooled(b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\n\xc3\xa9\r\n")
    fitted = fit_to(file, ["SMTPUTF8"], smtputf8=True)
    with fitted.file:
        assert fitted.file.read() == (
            b"Subject: gr\xc3\xbc\xc3\x9fe\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n")
    assert (fitted.body, fitted.smtputf8) == ("7BIT", True)


def test_fit_empty_file(spooled):
    file = spooled(b"")
    fitted = fit_to(file, [])
    assert (fitted.file, fitted.size, fitted.converted) == (file, 0, False)


def test_downgrade_works_on_bytes_like_objects():
    assert downgrade(bytes(io.BytesIO(b"S: x\r\n\r\n\xe9").getbuffer())).endswith(b"\r\n\r\n=E9")


def test_delimiters_follow_rfc_2046():
    # Transport padding after a delimiter, "--bx" (text, not a delimiter),
    # and a close delimiter at the very end without CRLF.
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b \t\r\nContent-Type: text/plain\r\n\r\n--bx \xc3\xa9\r\n--b--")
    out = downgrade(message)
    assert out == (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                   b"--b \t\r\nContent-Type: text/plain\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n--bx =C3=A9\r\n--b--")
    [part] = parse(out).iter_parts()
    assert part.get_payload(decode=True) == b"--bx \xc3\xa9"


def test_missing_close_delimiter_runs_the_last_part_to_the_end():
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\n\r\n\xe9\r\n")
    assert downgrade(message).endswith(
        b"--b\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n")


def test_mislabelled_7bit_part_is_converted():
    message = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 7bit\r\n\r\n\xc3\xa9\r\n")
    assert downgrade(message) == (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n")


# -- what a hostile or odd message may try ------------------------------------------

def test_a_comment_in_content_type_does_not_hide_a_signed_part():
    # RFC 5322 comments are allowed in Content-Type (RFC 2045 5.1); the
    # type is still multipart/signed and its content is not touched.
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/signed (pgp); "
               b"protocol=\"application/pgp-signature\"; micalg=pgp-sha256; boundary=\"s\"\r\n\r\n"
               b"--s\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
               b"--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
    with pytest.raises(CannotSend) as info:
        downgrade(message)
    assert info.value.enhanced == "5.6.3"


def _nested(depth):
    part = b"Content-Type: text/plain\r\n\r\n\xc3\xa9\r\n"
    for level in range(depth):
        boundary = b"b%d" % level
        part = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--"
                + boundary + b"\r\n" + part + b"--" + boundary + b"--\r\n")
    return b"MIME-Version: 1.0\r\n" + part


def test_the_highest_nesting_limit_the_config_allows_is_walked_without_recursion_error():
    from relaymail.config import load_config
    with pytest.raises(Exception, match="must be at most 250"):
        load_config(None, {("delivery", "mime_nesting_limit"): "251"})
    converted = downgrade(_nested(249), nesting_limit=250)
    assert converted.isascii() and b"=C3=A9" in converted
    with pytest.raises(CannotSend) as info:
        downgrade(_nested(251), nesting_limit=250)
    assert info.value.enhanced == "5.6.3"


def test_a_refusal_quoting_an_undecodable_header_byte_is_escaped():
    # A part header holding the byte 0x9B (CSI): the refusal reason quotes
    # it, and must not carry it on as a lone surrogate that a
    # surrogateescape stream would write back raw.
    from relaymail.delivery.outcomes import DeliveryError
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
               b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-\x9b[2J\r\n\r\n"
               b"\xc3\xa9\r\n--q--\r\n")
    with tempfile.TemporaryFile() as file:
        file.write(message)
        file.seek(0)
        with pytest.raises(CannotSend) as info:
            fit(file, len(message), body="8BITMIME", smtputf8=True, addresses=["a@b.example"],
                extensions={"SMTPUTF8": ()})
    error = DeliveryError(temporary=False, code=None, enhanced=info.value.enhanced,
                          text=info.value.reason)
    assert "\\x{DC9B}[2j" in error.text and error.text.isprintable()


def test_long_text_mostly_8bit_goes_base64_and_mostly_ascii_text_quoted_printable():
    # RFC 2045 6.8: quoted-printable is for mostly-ASCII text.  Russian in
    # UTF-8 is half 8-bit octets: 2.9 times its size in QP, 1.37 in base64.
    russian = "Привет, мир. ".encode() * 200 + b"\r\n"
    french = ("Un café, une crème brûlée et l'addition, s'il vous plaît. " * 30).encode()
    for body, encoding in ((russian, b"base64"), (french + b"\r\n", b"quoted-printable")):
        message = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
        out = downgrade(message)
        assert b"\r\nContent-Transfer-Encoding: " + encoding + b"\r\n\r\n" in out
        parsed = email.message_from_bytes(out, policy=email.policy.default)
        assert parsed.get_payload(decode=True) == body
        assert len(out) < 1.4 * len(message)
