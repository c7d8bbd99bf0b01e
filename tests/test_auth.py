"""Tests for relaymail.auth: the SASL exchanges, the password file and its
hashes, and the twisted.cred checker through a real Portal.

scrypt runs with cheap parameters here (``passwords.PARAMETERS`` is
patched, as its comment allows) so the suite stays fast; one test pins the
production strength.
"""

import base64
import os
import re
import stat
import tempfile
import threading

import pytest
from hypothesis import given, settings, strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from relaymail.auth import passwords, sasl
from relaymail.auth.checker import (
    IRelayUser, PasswordFileChecker, RelayRealm, make_portal)
from relaymail.auth.passwords import (
    HashFormatError, PasswordFileError, ScryptParameters, delete_user,
    hash_password, load_password_file, needs_rehash, parse_hash,
    set_password, verify_password)

#: What the module ships with.
PRODUCTION = passwords.PARAMETERS

#: Cheap enough for hundreds of hashes a second; never for production.
FAST = ScryptParameters(ln=4, r=8, p=1)

SECRET = "correct horse battery staple"


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(passwords, "PARAMETERS", FAST)


def b64(data):
    return base64.b64encode(data).decode("ascii")


def assert_sasl_error(info, code, enhanced):
    assert (info.value.reply_code, info.value.enhanced) == (code, enhanced)


# ---------------------------------------------------------------------------
# SASL PLAIN (RFC 4616) and LOGIN over SMTP AUTH (RFC 4954)

def test_plain_with_initial_response_gives_credentials_at_once():
    exchange = sasl.start("PLAIN", b64(b"\0alice\0s3cret"))
    kind, creds = exchange.next()
    assert kind == "credentials"
    assert (creds.username, creds.password) == ("alice", "s3cret")
    assert IUsernamePassword.providedBy(creds)


def test_plain_without_initial_response_sends_an_empty_334_challenge():
    exchange = sasl.start("PLAIN", None)
    assert exchange.next() == ("challenge", "")
    exchange.respond(b64(b"\0alice\0s3cret"))
    kind, creds = exchange.next()
    assert kind == "credentials"
    assert (creds.username, creds.password) == ("alice", "s3cret")


def test_mechanism_names_are_taken_in_any_case():
    assert sasl.start("plain", b64(b"\0a\0b")).next()[0] == "credentials"
    assert sasl.start("Login", None).next() == ("challenge", b64(b"Username:"))


def test_plain_equals_initial_response_is_empty_and_so_bad_syntax():
    # RFC 4954 4: "=" is a zero-length initial response; PLAIN needs two NULs.
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", "=")
    assert_sasl_error(info, 501, "5.5.2")
    assert info.value.text == "Bad SASL syntax"


def test_login_equals_initial_response_is_an_empty_user_name():
    exchange = sasl.start("LOGIN", "=")
    assert exchange.next() == ("challenge", b64(b"Password:"))
    exchange.respond(b64(b"pw"))
    assert exchange.next()[1].username == ""


def test_plain_authzid_equal_to_authcid_is_accepted():
    creds = sasl.start("PLAIN", b64(b"alice\0alice\0pw")).next()[1]
    assert (creds.username, creds.password) == ("alice", "pw")


def test_plain_authzid_for_another_user_is_535_5_7_8():
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", b64(b"bob\0alice\0pw"))
    assert_sasl_error(info, 535, "5.7.8")


def test_plain_authzid_mismatch_in_a_response_is_535_5_7_8():
    exchange = sasl.start("PLAIN", None)
    exchange.next()
    with pytest.raises(sasl.SASLError) as info:
        exchange.respond(b64(b"bob\0alice\0pw"))
    assert_sasl_error(info, 535, "5.7.8")


@pytest.mark.parametrize("message", [
    b"alice\0pw",            # one NUL
    b"\0alice\0pw\0",        # three
    b"\0\0pw",               # empty authcid
    b"\0alice\0",            # empty password
    b"",
])
def test_plain_malformed_message_is_501_5_5_2(message):
    exchange = sasl.start("PLAIN", None)
    exchange.next()
    with pytest.raises(sasl.SASLError) as info:
        exchange.respond(b64(message))
    assert_sasl_error(info, 501, "5.5.2")
    assert info.value.text == "Bad SASL syntax"


def test_plain_password_may_hold_anything_but_nul():
    creds = sasl.start("PLAIN", b64("\0jörg\0p a:ss\u00e9".encode())).next()[1]
    assert (creds.username, creds.password) == ("jörg", "p a:ss\u00e9")


def test_login_asks_for_user_name_then_password():
    exchange = sasl.start("LOGIN", None)
    assert exchange.next() == ("challenge", "VXNlcm5hbWU6")   # "Username:"
    exchange.respond(b64(b"alice"))
    assert exchange.next() == ("challenge", "UGFzc3dvcmQ6")   # "Password:"
    exchange.respond(b64(b"s3cret"))
    kind, creds = exchange.next()
    assert kind == "credentials"
    assert (creds.username, creds.password) == ("alice", "s3cret")


def test_login_initial_response_is_the_user_name():
    exchange = sasl.start("LOGIN", b64(b"alice"))
    assert exchange.next() == ("challenge", "UGFzc3dvcmQ6")
    exchange.respond(b64(b"s3cret"))
    assert exchange.next()[1].username == "alice"


def test_star_cancels_plain():
    exchange = sasl.start("PLAIN", None)
    exchange.next()
    with pytest.raises(sasl.Cancelled) as info:
        exchange.respond("*")
    assert_sasl_error(info, 501, "5.0.0")
    assert info.value.text == "Authentication cancelled"


def test_star_cancels_login_at_the_user_name():
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    with pytest.raises(sasl.Cancelled):
        exchange.respond("*")


def test_star_cancels_login_at_the_password():
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    exchange.respond(b64(b"alice"))
    exchange.next()
    with pytest.raises(sasl.Cancelled) as info:
        exchange.respond("*")
    assert isinstance(info.value, sasl.SASLError)
    assert str(info.value) == "501 5.0.0 Authentication cancelled"


def test_star_as_initial_response_is_not_base64():
    # RFC 4954 4: "*" cancels an answer to a challenge; there is none yet.
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", "*")
    assert_sasl_error(info, 501, "5.5.2")
    assert not isinstance(info.value, sasl.Cancelled)


@pytest.mark.parametrize("line", [
    "not base64!",
    "AGFsaWNl AHB3",          # white space inside
    "AGFsaWNlAHB3Z",          # length not a multiple of four
    "AG=FsaWNlAHB3",          # padding in the middle
    "\u00e9AAA",              # not ASCII
])
def test_bad_base64_is_501_5_5_2(line):
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", line)
    assert_sasl_error(info, 501, "5.5.2")
    assert info.value.text == "Cannot decode response"
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    with pytest.raises(sasl.SASLError) as info:
        exchange.respond(line)
    assert_sasl_error(info, 501, "5.5.2")


def test_bad_utf8_in_plain_is_501_5_5_2():
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", b64(b"\0alice\0\xff\xfe"))
    assert_sasl_error(info, 501, "5.5.2")


@pytest.mark.parametrize("step", [0, 1])
def test_bad_utf8_in_login_is_501_5_5_2(step):
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    if step == 1:
        exchange.respond(b64(b"alice"))
        exchange.next()
    with pytest.raises(sasl.SASLError) as info:
        exchange.respond(b64(b"\xc3\x28"))
    assert_sasl_error(info, 501, "5.5.2")


def test_unknown_mechanism_is_504_5_5_4():
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("CRAM-MD5", None)
    assert_sasl_error(info, 504, "5.5.4")
    assert info.value.text == "Unrecognized authentication type"


def test_response_of_the_longest_allowed_length_is_taken():
    password = b"x" * (sasl.MAX_RESPONSE * 3 // 4 - len(b"\0alice\0"))
    line = b64(b"\0alice\0" + password)
    assert len(line) == sasl.MAX_RESPONSE
    assert sasl.start("PLAIN", line).next()[1].password == password.decode()


def test_response_longer_than_the_limit_is_500_5_5_6():
    line = "A" * (sasl.MAX_RESPONSE + 4)
    with pytest.raises(sasl.SASLError) as info:
        sasl.start("PLAIN", line)
    assert_sasl_error(info, 500, "5.5.6")
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    with pytest.raises(sasl.SASLError) as info:
        exchange.respond(line)
    assert_sasl_error(info, 500, "5.5.6")


@pytest.mark.parametrize("line", ["!!!!", "A" * (sasl.MAX_RESPONSE + 4), "*"])
def test_exchange_is_over_after_any_error(line):
    exchange = sasl.start("LOGIN", None)
    exchange.next()
    with pytest.raises(sasl.SASLError):
        exchange.respond(line)
    with pytest.raises(RuntimeError):
        exchange.next()
    with pytest.raises(RuntimeError):
        exchange.respond(b64(b"alice"))


def test_calls_out_of_turn_are_programming_errors():
    exchange = sasl.start("LOGIN", None)
    with pytest.raises(RuntimeError):
        exchange.respond(b64(b"alice"))        # no challenge sent yet
    exchange.next()
    with pytest.raises(RuntimeError):
        exchange.next()                        # the response is awaited
    with pytest.raises(sasl.Cancelled):
        exchange.respond("*")
    with pytest.raises(RuntimeError):
        exchange.next()                        # the exchange is over


def test_mechanisms_are_plain_and_login():
    assert sasl.MECHANISMS == ("PLAIN", "LOGIN")


@settings(max_examples=200, deadline=None)
@given(user=st.text(min_size=1).filter(lambda s: "\0" not in s),
       password=st.text(min_size=1).filter(lambda s: "\0" not in s))
def test_plain_gives_back_any_user_and_password(user, password):
    message = b"\0" + user.encode("utf-8", "surrogatepass") + b"\0" + \
        password.encode("utf-8", "surrogatepass")
    try:
        creds = sasl.start("PLAIN", b64(message)).next()[1]
    except sasl.SASLError as e:
        # Lone surrogates are not UTF-8, and must be told as such.
        assert (e.reply_code, e.enhanced) == (501, "5.5.2")
        assert re.search(r"[\ud800-\udfff]", user + password)
    else:
        assert (creds.username, creds.password) == (user, password)


# ---------------------------------------------------------------------------
# Hashes

HASH_PATTERN = re.compile(
    r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


def test_production_parameters_are_the_real_strength():
    # Captured at import, before any fixture patched it.
    assert PRODUCTION == ScryptParameters(ln=15, r=8, p=1)
    assert PRODUCTION.memory < 64 * 2**20


def test_hash_then_verify_round_trip():
    encoded = hash_password(SECRET)
    assert verify_password(SECRET, encoded)
    assert verify_password(SECRET.encode(), encoded)


def test_wrong_password_does_not_verify():
    encoded = hash_password(SECRET)
    assert not verify_password(SECRET + "!", encoded)
    assert not verify_password("", encoded)
    assert not verify_password(SECRET.upper(), encoded)


def test_hash_string_names_its_parameters_and_holds_no_password():
    encoded = hash_password(SECRET)
    match = HASH_PATTERN.match(encoded)
    assert match, encoded
    assert tuple(int(g) for g in match.groups()[:3]) == tuple(FAST)
    salt, key = (base64.b64decode(g + "=" * (-len(g) % 4)) for g in match.groups()[3:])
    assert (len(salt), len(key)) == (passwords.SALT_BYTES, passwords.KEY_BYTES)
    assert SECRET not in encoded


def test_same_password_gets_a_different_salt_each_time():
    first, second = hash_password(SECRET), hash_password(SECRET)
    assert first != second
    assert first.split("$")[3] != second.split("$")[3]
    assert verify_password(SECRET, first) and verify_password(SECRET, second)


def test_verification_uses_the_parameters_in_the_string(monkeypatch):
    old = hash_password(SECRET)
    monkeypatch.setattr(passwords, "PARAMETERS", ScryptParameters(ln=5, r=4, p=2))
    assert needs_rehash(old)
    assert verify_password(SECRET, old)
    new = hash_password(SECRET)
    assert new.startswith("$scrypt$ln=5,r=4,p=2$")
    assert not needs_rehash(new)


def test_unicode_password_is_hashed_as_utf8():
    encoded = hash_password("pässwörd")
    assert verify_password("pässwörd".encode("utf-8"), encoded)
    assert not verify_password("pässwörd".encode("latin-1"), encoded)


@pytest.mark.parametrize("encoded", [
    "",
    "$2b$12$abcdefghijklmnopqrstuv",                     # bcrypt
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0",             # no hash
    "$scrypt$ln=4,r=8$c2FsdHNhbHRzYWx0$" + "A" * 43,     # no p
    "$scrypt$r=8,ln=4,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,  # order
    "$scrypt$ln=0,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=22,r=64,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,  # 32 GiB
    "$scrypt$ln=4,r=8,p=-1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=4,r=8,p=1$c2Fs!$" + "A" * 43,            # bad base64
    "$scrypt$ln=4,r=8,p=1$c2Fs$" + "A" * 43,             # salt too short
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$AAAA",        # key too short
])
def test_malformed_hash_strings_are_refused_without_quoting_them(encoded):
    with pytest.raises(HashFormatError) as info:
        parse_hash(encoded)
    assert encoded[8:] not in str(info.value) or not encoded[8:]
    with pytest.raises(ValueError):
        verify_password("x", encoded)


# ---------------------------------------------------------------------------
# The password file

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_skips_comments_and_blank_lines(tmp_path):
    alice, bob = hash_password("a"), hash_password("b")
    path = write(tmp_path / "passwd",
                 f"# relaymail users\n\nalice:{alice}\n   # indented comment\n"
                 f"bob:{bob}\r\n\n")
    assert load_password_file(path) == {"alice": alice, "bob": bob}


def test_load_of_an_empty_file_is_no_users(tmp_path):
    assert load_password_file(write(tmp_path / "passwd", "")) == {}


def test_user_names_are_case_sensitive_and_may_be_utf8(tmp_path):
    one, two, three = (hash_password(p) for p in "123")
    path = write(tmp_path / "passwd",
                 f"Alice:{one}\nalice:{two}\njörg@example.org:{three}\n")
    assert load_password_file(path) == {
        "Alice": one, "alice": two, "jörg@example.org": three}


@pytest.mark.parametrize("bad_line, problem", [
    (SECRET, "no ':'"),
    (f":{{hash}}", "empty user name"),
    (f"al ice:{{hash}}", "white space"),
    (f"al\u00a0ice:{{hash}}", "white space"),
    (f"al\x07ice:{{hash}}", "control character"),
    (f"alice:{SECRET}", "not a $scrypt$ hash"),
    (f"alice:$scrypt$ln=4,r=8,p=1${SECRET}", "does not have the form"),
    (f"alice:$scrypt$ln=4,r=8,p=1${SECRET}$x", "salt is not base64"),
    (f"alice:$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0${SECRET}", "not base64"),
])
def test_malformed_line_names_file_and_line_and_never_the_secret(tmp_path, bad_line, problem):
    good = hash_password("a")
    bad_line = bad_line.replace("{hash}", hash_password("b"))
    path = write(tmp_path / "passwd", f"# users\nbob:{good}\n\n{bad_line}\n")
    with pytest.raises(PasswordFileError) as info:
        load_password_file(path)
    error = info.value
    assert error.line_number == 4
    assert str(error).startswith(f"{path}:4: ")
    assert problem in str(error)
    assert "\n" not in str(error)
    assert SECRET not in str(error)
    assert "ln=" not in str(error)
    assert good.split("$")[-1] not in str(error)


def test_duplicate_user_is_an_error_on_its_second_line(tmp_path):
    path = write(tmp_path / "passwd",
                 f"alice:{hash_password('a')}\nalice:{hash_password('b')}\n")
    with pytest.raises(PasswordFileError) as info:
        load_password_file(path)
    assert info.value.line_number == 2
    assert str(info.value) == f"{path}:2: user 'alice' appears twice"


def test_invalid_utf8_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(b"# ok\n\xffalice:" + hash_password("a").encode() + b"\n")
    with pytest.raises(PasswordFileError) as info:
        load_password_file(path)
    assert (info.value.line_number, info.value.problem) == (2, "not valid UTF-8")


def test_missing_file_is_a_password_file_error_without_a_line(tmp_path):
    path = tmp_path / "nonesuch"
    with pytest.raises(PasswordFileError) as info:
        load_password_file(path)
    assert info.value.line_number is None
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_set_password_creates_the_file_mode_0600(tmp_path):
    path = tmp_path / "passwd"
    set_password(path, "alice", SECRET)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = load_password_file(path)
    assert list(entries) == ["alice"]
    assert verify_password(SECRET, entries["alice"])
    assert SECRET not in path.read_text()


def test_set_password_replaces_in_place_keeping_everything_else(tmp_path):
    bob, carol = hash_password("b"), hash_password("c")
    path = write(tmp_path / "passwd",
                 f"# relaymail users\nbob:{bob}\n\nalice:{hash_password('old')}\n"
                 f"# carol is the postmaster\ncarol:{carol}\n")
    os.chmod(path, 0o600)
    set_password(path, "alice", "new")
    lines = path.read_text().split("\n")
    assert lines[:3] == ["# relaymail users", f"bob:{bob}", ""]
    assert lines[3].startswith("alice:$scrypt$")
    assert lines[4:] == ["# carol is the postmaster", f"carol:{carol}", ""]
    entries = load_password_file(path)
    assert verify_password("new", entries["alice"])
    assert not verify_password("old", entries["alice"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_set_password_appends_a_new_user(tmp_path):
    path = write(tmp_path / "passwd", f"# users\nbob:{hash_password('b')}")
    set_password(path, "alice", "a")
    text = path.read_text()
    assert text.startswith(f"# users\nbob:")
    assert list(load_password_file(path)) == ["bob", "alice"]


def test_set_password_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "passwd"
    set_password(path, "alice", "a")
    set_password(path, "alice", "b")
    assert os.listdir(tmp_path) == ["passwd"]


def test_set_password_keeps_group_read_but_drops_other(tmp_path):
    path = write(tmp_path / "passwd", f"bob:{hash_password('b')}\n")
    os.chmod(path, 0o644)
    set_password(path, "alice", "a")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_set_password_replaces_the_file_rather_than_writing_into_it(tmp_path):
    # A reader holding the old file open keeps seeing the old, whole file:
    # the new one arrived by rename.
    path = tmp_path / "passwd"
    set_password(path, "alice", "a")
    with open(path) as reader:
        before = os.fstat(reader.fileno()).st_ino
        set_password(path, "bob", "b")
        assert os.stat(path).st_ino != before
        assert reader.read().startswith("alice:")


def test_set_password_refuses_to_rewrite_a_malformed_file(tmp_path):
    text = f"alice:{hash_password('a')}\nthis line is broken\n"
    path = write(tmp_path / "passwd", text)
    with pytest.raises(PasswordFileError) as info:
        set_password(path, "bob", "b")
    assert info.value.line_number == 2
    assert path.read_text() == text


@pytest.mark.parametrize("user", ["", "a b", "a:b", "#alice", "tab\there"])
def test_set_password_refuses_bad_user_names(tmp_path, user):
    with pytest.raises(ValueError):
        set_password(tmp_path / "passwd", user, "pw")
    assert not (tmp_path / "passwd").exists()


def test_delete_user_removes_only_that_line(tmp_path):
    bob = hash_password("b")
    path = write(tmp_path / "passwd", f"# users\nalice:{hash_password('a')}\nbob:{bob}\n")
    assert delete_user(path, "alice")
    assert path.read_text() == f"# users\nbob:{bob}\n"
    assert not delete_user(path, "alice")


@settings(max_examples=50, deadline=None)
@given(user=st.text(min_size=1, max_size=20).filter(
    lambda s: passwords.user_name_problem(s) is None))
def test_any_valid_user_name_survives_a_round_trip(user):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "passwd")
        set_password(path, user, "pw")
        assert list(load_password_file(path)) == [user]


# ---------------------------------------------------------------------------
# The checker, through a real Portal

class CheckerTests(unittest.TestCase):
    """The checker and realm as the SMTP dialogue will use them."""

    def setUp(self):
        self.patch(passwords, "PARAMETERS", FAST)
        self.path = self.mktemp()
        set_password(self.path, "alice", SECRET)
        set_password(self.path, "bob", "hunter2")
        self.portal = make_portal(self.path)
        self.checker = self.portal.checkers[IUsernamePassword]

    def login(self, user, password):
        return self.portal.login(UsernamePassword(user, password), None, IRelayUser)

    def test_interfaces_are_provided(self):
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertTrue(verifyObject(IRealm, RelayRealm()))

    def test_good_login_gives_the_user_name_as_avatar(self):
        d = self.login("alice", SECRET)

        def check(result):
            interface, avatar, logout = result
            self.assertIs(interface, IRelayUser)
            self.assertEqual(avatar, "alice")
            logout()

        return d.addCallback(check)

    def test_bytes_credentials_as_twisted_protocols_give_them(self):
        d = self.login(b"alice", SECRET.encode())
        return d.addCallback(lambda result: self.assertEqual(result[1], "alice"))

    def test_credentials_from_a_sasl_exchange_log_in(self):
        creds = sasl.start("PLAIN", b64(b"\0bob\0hunter2")).next()[1]
        d = self.portal.login(creds, None, IRelayUser)
        return d.addCallback(lambda result: self.assertEqual(result[1], "bob"))

    def test_wrong_password_is_unauthorized(self):
        return self.assertFailure(self.login("alice", "hunter2"), UnauthorizedLogin)

    def test_user_names_are_case_sensitive(self):
        return self.assertFailure(self.login("Alice", SECRET), UnauthorizedLogin)

    def test_unknown_user_is_unauthorized_after_a_dummy_verification(self):
        calls = []
        real = passwords.verify_password

        def spy(password, encoded):
            calls.append(encoded)
            return real(password, encoded)

        self.patch(passwords, "verify_password", spy)
        d = self.assertFailure(self.login("mallory", SECRET), UnauthorizedLogin)

        def check(_):
            # scrypt ran once, with the parameters real users have.
            self.assertEqual(len(calls), 1)
            self.assertTrue(calls[0].startswith("$scrypt$ln=4,r=8,p=1$"))
            self.assertNotIn(calls[0], load_password_file(self.path).values())

        return d.addCallback(check)

    def test_non_utf8_user_name_is_unauthorized(self):
        return self.assertFailure(self.login(b"\xffalice", SECRET), UnauthorizedLogin)

    def test_verification_runs_off_the_reactor_thread(self):
        threads = []
        real = passwords.verify_password

        def spy(password, encoded):
            threads.append(threading.current_thread())
            return real(password, encoded)

        self.patch(passwords, "verify_password", spy)
        d = self.login("alice", SECRET)

        def check(_):
            self.assertEqual(len(threads), 1)
            self.assertIsNot(threads[0], threading.current_thread())

        return d.addCallback(check)

    def test_a_given_threadpool_is_used(self):
        from twisted.internet import reactor
        pool = ThreadPool(minthreads=1, maxthreads=1, name="auth-test")
        pool.start()
        self.addCleanup(pool.stop)
        names = []
        real = passwords.verify_password

        def spy(password, encoded):
            names.append(threading.current_thread().name)
            return real(password, encoded)

        self.patch(passwords, "verify_password", spy)
        portal = make_portal(self.path, threadpool=pool, reactor=reactor)
        d = portal.login(UsernamePassword("bob", "hunter2"), None, IRelayUser)

        def check(result):
            self.assertEqual(result[1], "bob")
            self.assertIn("auth-test", names[0])

        return d.addCallback(check)

    def test_reload_picks_up_a_new_user(self):
        d = self.assertFailure(self.login("carol", "c"), UnauthorizedLogin)

        def add_carol(_):
            set_password(self.path, "carol", "c")
            self.checker.reload()
            return self.login("carol", "c")

        d.addCallback(add_carol)
        return d.addCallback(lambda result: self.assertEqual(result[1], "carol"))

    def test_reload_drops_a_deleted_user(self):
        delete_user(self.path, "bob")
        self.checker.reload()
        self.assertEqual(self.checker.users, frozenset(["alice"]))
        return self.assertFailure(self.login("bob", "hunter2"), UnauthorizedLogin)

    def test_failed_reload_keeps_the_users_already_loaded(self):
        with open(self.path, "a") as f:
            f.write("broken line\n")
        self.assertRaises(PasswordFileError, self.checker.reload)
        self.assertEqual(self.checker.users, frozenset(["alice", "bob"]))
        d = self.login("alice", SECRET)
        return d.addCallback(lambda result: self.assertEqual(result[1], "alice"))

    def test_realm_gives_no_other_interface(self):
        self.assertRaises(NotImplementedError,
                          RelayRealm().requestAvatar, "alice", None, IRealm)

    def test_missing_file_fails_at_construction(self):
        self.assertRaises(PasswordFileError, PasswordFileChecker, self.mktemp())
