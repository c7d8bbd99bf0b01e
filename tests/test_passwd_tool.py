"""Tests for relaymail-passwd: in process for the details, and as a
separate process, fed on standard input, the way an administrator runs it."""

import io
import os
import stat
import subprocess
import sys

import pytest

from relaymail.auth import passwords
from relaymail.auth.passwords import (
    ScryptParameters, hash_password, load_password_file, verify_password)
from relaymail.tools import passwd
from relaymail.tools.passwd import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECRET = "  correct horse battery staple  "


@pytest.fixture
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(passwords, "PARAMETERS", ScryptParameters(ln=4, r=8, p=1))


@pytest.fixture
def pwfile(tmp_path):
    return str(tmp_path / "passwd")


def stdin_of(data):
    return io.TextIOWrapper(io.BytesIO(data), encoding="ascii")


class FakeTerminal:
    """Standard input that claims to be a terminal."""

    def isatty(self):
        return True

    def readline(self):
        raise AssertionError("a terminal is prompted, not read")


def run(args, password_input):
    """The tool as its own process (production scrypt strength)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "relaymail.tools.passwd", *args],
        input=password_input, capture_output=True, env=env, timeout=30)


# ---------------------------------------------------------------------------
# As a separate process

def test_sets_a_password_from_stdin_silently(pwfile):
    result = run(["--file", pwfile, "alice"], SECRET.encode() + b"\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    entries = load_password_file(pwfile)
    assert list(entries) == ["alice"]
    assert entries["alice"].startswith("$scrypt$ln=15,r=8,p=1$")
    assert verify_password(SECRET, entries["alice"])
    assert stat.S_IMODE(os.stat(pwfile).st_mode) == 0o600
    with open(pwfile, "rb") as f:
        assert SECRET.strip().encode() not in f.read()


def test_deletes_a_user_and_fails_for_an_absent_one(pwfile, fast_scrypt):
    passwords.set_password(pwfile, "alice", "a")
    passwords.set_password(pwfile, "bob", "b")
    result = run(["--file", pwfile, "--delete", "alice"], b"")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert list(load_password_file(pwfile)) == ["bob"]
    result = run(["--file", pwfile, "--delete", "alice"], b"")
    assert result.returncode == 1
    assert result.stderr == f"relaymail-passwd: {pwfile}: no user 'alice'\n".encode()


def test_empty_password_is_refused_and_nothing_written(pwfile):
    result = run(["--file", pwfile, "alice"], b"\n")
    assert result.returncode == 1
    assert result.stderr == b"relaymail-passwd: empty password refused\n"
    assert not os.path.exists(pwfile)


def test_missing_file_option_is_a_usage_error():
    result = run(["alice"], SECRET.encode())
    assert result.returncode == 2
    assert b"--file" in result.stderr
    assert SECRET.encode() not in result.stdout + result.stderr


# ---------------------------------------------------------------------------
# In process

def test_only_the_first_line_is_the_password_without_its_line_ending(pwfile, fast_scrypt):
    err = io.StringIO()
    assert main(["--file", pwfile, "alice"], stdin_of(b"p w\r\nsecond line\n"), err) == 0
    assert err.getvalue() == ""
    assert verify_password("p w", load_password_file(pwfile)["alice"])


def test_last_line_needs_no_newline(pwfile, fast_scrypt):
    assert main(["--file", pwfile, "alice"], stdin_of(SECRET.encode()), io.StringIO()) == 0
    assert verify_password(SECRET, load_password_file(pwfile)["alice"])


def test_password_is_read_as_utf8_whatever_the_locale(pwfile, fast_scrypt):
    assert main(["--file", pwfile, "jörg"], stdin_of("pässwörd\n".encode()),
                io.StringIO()) == 0
    assert verify_password("pässwörd", load_password_file(pwfile)["jörg"])


def test_non_utf8_password_is_refused(pwfile, fast_scrypt):
    err = io.StringIO()
    assert main(["--file", pwfile, "alice"], stdin_of(b"p\xe4ss\n"), err) == 1
    assert err.getvalue() == "relaymail-passwd: password on standard input is not UTF-8\n"
    assert not os.path.exists(pwfile)


def test_no_input_at_all_is_refused(pwfile, fast_scrypt):
    err = io.StringIO()
    assert main(["--file", pwfile, "alice"], stdin_of(b""), err) == 1
    assert err.getvalue() == "relaymail-passwd: no password on standard input\n"


def test_replacing_a_password_keeps_the_other_users(pwfile, fast_scrypt):
    passwords.set_password(pwfile, "bob", "b")
    with open(pwfile, "a") as f:
        f.write("# a comment\n")
    assert main(["--file", pwfile, "alice"], stdin_of(b"a\n"), io.StringIO()) == 0
    assert main(["--file", pwfile, "alice"], stdin_of(b"a2\n"), io.StringIO()) == 0
    entries = load_password_file(pwfile)
    assert list(entries) == ["bob", "alice"]
    assert verify_password("a2", entries["alice"])
    with open(pwfile) as f:
        assert "# a comment\n" in f.read()


@pytest.mark.parametrize("user", ["a b", "a:b", "#x", ""])
def test_bad_user_name_is_a_usage_error(pwfile, user, fast_scrypt):
    err = io.StringIO()
    assert main(["--file", pwfile, user], stdin_of(b"pw\n"), err) == 2
    assert err.getvalue().startswith("relaymail-passwd: ")
    assert err.getvalue().count("\n") == 1
    assert not os.path.exists(pwfile)


def test_malformed_file_is_reported_by_line_and_left_alone(pwfile, fast_scrypt):
    text = f"alice:{hash_password('a')}\noops\n"
    with open(pwfile, "w") as f:
        f.write(text)
    err = io.StringIO()
    assert main(["--file", pwfile, "bob"], stdin_of(b"pw\n"), err) == 1
    assert err.getvalue() == (
        f"relaymail-passwd: {pwfile}:2: no ':' between user name and hash\n")
    with open(pwfile) as f:
        assert f.read() == text


def test_unwritable_place_is_one_line_and_status_1(tmp_path, fast_scrypt):
    path = str(tmp_path / "no-such-directory" / "passwd")
    err = io.StringIO()
    assert main(["--file", path, "alice"], stdin_of(b"pw\n"), err) == 1
    assert err.getvalue() == f"relaymail-passwd: {path}: No such file or directory\n"


def test_delete_from_a_missing_file_is_status_1(pwfile):
    err = io.StringIO()
    assert main(["--file", pwfile, "--delete", "alice"], stdin_of(b""), err) == 1
    assert err.getvalue() == (
        f"relaymail-passwd: {pwfile}: cannot read: No such file or directory\n")


def test_terminal_is_prompted_twice(pwfile, fast_scrypt, monkeypatch):
    prompts = []
    answers = iter(["tty secret", "tty secret"])

    def fake_getpass(prompt):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(passwd.getpass, "getpass", fake_getpass)
    assert main(["--file", pwfile, "alice"], FakeTerminal(), io.StringIO()) == 0
    assert prompts == ["New password: ", "Retype new password: "]
    assert verify_password("tty secret", load_password_file(pwfile)["alice"])


@pytest.mark.parametrize("answers, message", [
    (["one", "two"], "passwords do not match"),
    ([""], "empty password refused"),
])
def test_terminal_mismatch_or_empty_is_refused(pwfile, monkeypatch, answers, message):
    typed = iter(answers)
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt: next(typed))
    err = io.StringIO()
    assert main(["--file", pwfile, "alice"], FakeTerminal(), err) == 1
    assert err.getvalue() == f"relaymail-passwd: {message}\n"
    assert not os.path.exists(pwfile)


def test_end_of_input_at_the_prompt_is_refused(pwfile, monkeypatch):
    def eof(prompt):
        raise EOFError

    monkeypatch.setattr(passwd.getpass, "getpass", eof)
    err = io.StringIO()
    assert main(["--file", pwfile, "alice"], FakeTerminal(), err) == 1
    assert err.getvalue() == "relaymail-passwd: no password given\n"
