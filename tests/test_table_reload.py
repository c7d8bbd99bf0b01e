"""Table files read again when they change: the unit, and the relay over a
socket with an aliases file edited under it."""

import os
import smtplib
import time

import pytest

from relaymail.plugins.table_file import TableFile
from tests.relay_process import RelayProcess


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def parse_words(lines):
    if any(line.strip() == "bad" for line in lines):
        raise ValueError("line 1: bad entry")
    return [line.strip() for line in lines if line.strip()]


def rewrite(path, text):
    """Write ``text`` so the file's signature surely changes (size or mtime)."""
    before = os.stat(path).st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_change_is_loaded_once_it_has_held_still_for_two_looks(tmp_path):
    path = tmp_path / "table"
    path.write_text("alice\n")
    clock = Clock()
    table = TableFile(str(path), parse_words, "[plugin:test] file", clock=clock)
    assert table.value == ["alice"]
    rewrite(path, "alice\nbob\n")
    assert not table.refresh()             # under a second since the last look
    clock.now += 1
    assert not table.refresh()             # changed: seen once, perhaps half written
    assert table.value == ["alice"]
    clock.now += 1
    assert table.refresh()
    assert table.value == ["alice", "bob"]
    clock.now += 1
    assert not table.refresh()             # unchanged since


def test_a_change_written_a_while_ago_is_loaded_at_the_first_look(tmp_path):
    # Found in review: on a quiet relay the first message after an edit
    # still met the old table (a removed alias went on being accepted).
    path = tmp_path / "table"
    path.write_text("alice\n")
    clock = Clock()
    table = TableFile(str(path), parse_words, "[plugin:test] file", clock=clock)
    path.write_text("bob\n")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    clock.now += 3600
    assert table.refresh()
    assert table.value == ["bob"]


def test_a_bad_new_text_or_a_missing_file_keeps_the_last_good_table(tmp_path):
    path = tmp_path / "table"
    path.write_text("alice\n")
    clock = Clock()
    table = TableFile(str(path), parse_words, "[plugin:test] file", clock=clock)
    rewrite(path, "bad\n")
    for _ in range(3):
        clock.now += 1
        assert not table.refresh()
    assert table.value == ["alice"]
    path.unlink()
    clock.now += 1
    assert not table.refresh()
    assert table.value == ["alice"]
    path.write_text("carol\n")
    for _ in range(2):
        clock.now += 1
        table.refresh()
    assert table.value == ["carol"]


@pytest.fixture
def relay(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("staff: alice@example.net\n")
    process = RelayProcess(tmp_path, {
        # One inbound worker: a second one still starting when the file is
        # edited would read the new text at its start, not notice a change.
        "server": {"trusted_networks": "10.9.9.0/24", "workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "aliases", "expanders": "aliases"},
        "plugin:aliases": {"file": str(aliases)},
    }).start()
    process.aliases = aliases
    yield process
    process.stop()


def rcpt(relay, address):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        return client.rcpt(address)


def test_an_edited_aliases_file_reaches_the_running_relay_without_a_signal(relay):
    assert rcpt(relay, "sales@example.com") == (554, b"5.7.1 Relay access denied")
    # An editor that writes a temporary file and renames it, as vi and
    # sed -i do.
    new = relay.aliases.with_name("aliases.new")
    new.write_text("staff: alice@example.net\nsales: bob@example.net\n")
    os.rename(new, relay.aliases)
    deadline = time.monotonic() + 15
    while rcpt(relay, "sales@example.com") != (250, b"2.1.5 Ok"):
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.2)
    assert "[plugin:aliases] file " + str(relay.aliases) + " changed: read again" in relay.log()
    # A broken edit is refused; the names read before still work.
    relay.aliases.write_text("staff alice@example.net\n")
    deadline = time.monotonic() + 15
    while "changed but is refused" not in relay.log():
        assert time.monotonic() < deadline, relay.log()
        rcpt(relay, "staff@example.com")
        time.sleep(0.2)
    assert rcpt(relay, "sales@example.com") == (250, b"2.1.5 Ok")
