"""The message-filter hook ([plugins] filters): site filters loaded from a
directory, the real relay over a real socket, and what the next hop gets."""

import os
import re
import smtplib
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import shutil
import tempfile

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from relaymail import header_section
from relaymail.address import Mailbox
from relaymail.envelope import Envelope
from relaymail.interfaces import Decision
from relaymail.policy import filters as policy_filters
from relaymail.queue import layout
from relaymail.queue.layout import rewrite_name
from relaymail.queue.message_view import MessageView
from relaymail.queue import queue_id as queue_ids
from relaymail.queue.spool import Spool
from tests import queue_files
from tests.relay_process import RelayProcess, _env

# One site plugin file with three filters (three names, so that one
# [plugins] filters list can hold them in an order), each answering what
# its [plugin:NAME] section says.
SCRIPTED = '''
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.interfaces import Decision, IMessageFilter, IPluginFactory


@implementer(IMessageFilter)
class Scripted:
    def __init__(self, name, options):
        self.name = name
        self.options = options

    def check_message(self, message, context):
        options = self.options
        answer = options.get("answer", "none")
        if answer == "raise":
            raise RuntimeError("the filter broke")
        if answer == "hang":
            return defer.Deferred()
        if answer == "garbage":
            return "yes"
        decision = {
            "none": lambda: Decision.NO_OPINION,
            "accept": lambda: Decision.ACCEPT,
            "reject": lambda: Decision.reject(550, "5.7.1", "Message content rejected"),
            "defer": lambda: Decision.defer("Greylisted, try again later", 451, "4.7.1"),
            "hold": lambda: Decision.hold("looks odd"),
            "discard": lambda: Decision.discard("spam score 99"),
            "redirect": lambda: Decision.redirect(options["to"].split(), "quarantine"),
        }[answer]()
        add = []
        if "add" in options:
            name, _, value = options["add"].partition(":")
            add.append((name.strip(), value.strip()))
        if "inject" in options:
            add.append(("X-Bad", "a\\r\\nBcc: mallory@example.net"))
        if "report" in options:
            # What this filter saw: the parsed fields and what open() reads.
            with message.open() as f:
                lines = f.read().split(b"\\r\\n")
            names = ",".join(name for name, _ in message.headers)
            add.append(("X-Seen", f"{names}; first line {lines[0].decode()}; "
                                  f"size {message.size}; sender {message.sender}; "
                                  f"recipients {','.join(map(str, message.recipients))}"))
        if "replace" in options:
            with message.open() as f:
                data = f.read()
            decision = decision.with_message(data.replace(b"hello", options["replace"].encode()))
        if "replace_badly" in options:
            decision = decision.with_message(b"Subject: x\\r\\n\\r\\nno line end")
        remove = options.get("remove", "").split()
        if add or remove:
            decision = decision.with_headers(add=add, remove=remove)
        return decision


@implementer(IPlugin, IPluginFactory)
class Factory:
    def __init__(self, name):
        self.name = name

    def build(self, context):
        return Scripted(self.name, dict(context.options))


first = Factory("first")
second = Factory("second")
third = Factory("third")
'''

BODY = (b"From: Alice <alice@example.org>\r\n"
        b"Subject: filtered\r\n"
        b"X-Spam: maybe\r\n"
        b"\r\n"
        b"hello\r\n")

FAILED = (451, b"4.3.0 Temporary failure checking message, try again later")


@pytest.fixture
def relay_for(tmp_path, nexthop):
    """``relay_for(filters, first={...}, ...)``: a started relay whose
    [plugins] filters are ``filters``, with the options given."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "scripted.py").write_text(textwrap.dedent(SCRIPTED))
    started = []

    def start(filters, timeout="10", sections=(), **options):
        config = {
            "server": {"workers": "0"},
            "relay": {"domains": "example.com"},
            "delivery": {"smarthost": f"[127.0.0.1]:{nexthop.port}", "smarthost_tls": "none"},
            "plugins": {"path": str(plugins), "filters": filters, "timeout": timeout},
        }
        for section, keys in dict(sections).items():
            config.setdefault(section, {}).update(keys)
        for name, keys in options.items():
            config[f"plugin:{name}"] = keys
        relay = RelayProcess(tmp_path, config).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def send(relay, body=BODY, recipients=("bob@example.net",), after=None):
    """Send one message; return the reply to its content, and the reply to
    ``after`` (a command sent next in the same session) when given."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("alice@example.org")
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(body + b".\r\n")
        reply = client.getreply()
        if after is not None:
            return reply, client.docmd(after)
    return reply


def queued_id(reply):
    code, text = reply
    assert code == 250, reply
    return re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()


def listing(spool, directory):
    return sorted(os.listdir(os.path.join(spool.path, directory)))


def spool_files(relay, directory):
    return sorted(os.listdir(os.path.join(relay.spool, directory)))


def received_and_rest(data):
    """What comes before our Received field, and what after it."""
    lines = data.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Received: "))
    end = start + 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\r\n".join(lines[:start]), b"\r\n".join(lines[end:])


# -- answers ---------------------------------------------------------------------

def test_reject_is_the_reply_to_data_and_nothing_is_queued(relay_for, nexthop):
    relay = relay_for("first", first={"answer": "reject"})
    assert send(relay) == (550, b"5.7.1 Message content rejected")
    time.sleep(0.5)
    assert spool_files(relay, "active") == spool_files(relay, "tmp") == []
    assert nexthop.messages == []
    assert re.search(r": filter first refused the message: 550 5\.7\.1 Message content "
                     r"rejected", relay.log())


def test_defer_is_the_reply_to_data(relay_for, nexthop):
    relay = relay_for("first", first={"answer": "defer"})
    assert send(relay) == (451, b"4.7.1 Greylisted, try again later")
    assert spool_files(relay, "active") == spool_files(relay, "tmp") == []


def test_hold_queues_into_hold_and_nothing_is_delivered_until_released(relay_for, nexthop):
    # With workers: the inbound worker commits, a delivery worker must not see it.
    relay = relay_for("first", sections={"server": {"workers": "2"}}, first={"answer": "hold"})
    queue_id = queued_id(send(relay))
    assert spool_files(relay, "hold") == [f"{queue_id}.msg"]
    assert spool_files(relay, "active") == []
    time.sleep(2)
    assert nexthop.messages == []
    assert re.search(rf"{queue_id}: held by first: looks odd", relay.log())
    # A held message is whole: released, it is delivered.
    tool = os.path.join(os.path.dirname(sys.executable), "relaymail-queue")
    done = subprocess.run([tool, "--spool", relay.spool, "release", queue_id], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    [message] = nexthop.wait_for(1)
    assert message["data"].endswith(BODY)


def test_discard_answers_250_with_the_queue_id_and_queues_nothing(relay_for, nexthop):
    relay = relay_for("first", first={"answer": "discard"})
    queue_id = queued_id(send(relay))
    time.sleep(1)
    for directory in ("active", "hold", "tmp"):
        assert spool_files(relay, directory) == []
    assert nexthop.messages == []
    assert re.search(rf"{queue_id}: discarded by first: spam score 99", relay.log())


def test_redirect_replaces_the_recipients_and_expands_them(relay_for, nexthop, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("quarantine: carol@example.net, dave@example.net\n")
    relay = relay_for("first", sections={"plugins": {"expanders": "aliases"},
                                         "plugin:aliases": {"file": str(aliases)}},
                      first={"answer": "redirect", "to": "quarantine@example.com"})
    queue_id = queued_id(send(relay, recipients=("bob@example.net", "erin@example.net")))
    [message] = nexthop.wait_for(1)
    assert message["recipients"] == ["carol@example.net", "dave@example.net"]
    assert re.search(rf"{queue_id}: redirected by first to <carol@example\.net>,"
                     rf"<dave@example\.net>: quarantine", relay.log())


def test_accept_ends_filtering_and_queues(relay_for, nexthop):
    # third would refuse: it is not asked after second's accept.
    relay = relay_for("first, second, third", first={}, second={"answer": "accept"},
                      third={"answer": "reject"})
    queue_id = queued_id(send(relay))
    [message] = nexthop.wait_for(1)
    assert message["data"].endswith(BODY)
    assert re.search(rf"{queue_id}: accepted by filter second", relay.log())


# -- header changes ------------------------------------------------------------------

def test_header_changes_reach_the_next_hop_byte_for_byte(relay_for, nexthop):
    relay = relay_for("first", sections={"server": {"workers": "2"}},
                      first={"add": "X-Filtered: yes", "remove": "x-spam"})
    queue_id = queued_id(send(relay))
    [message] = nexthop.wait_for(1)
    added, rest = received_and_rest(message["data"])
    # Added fields go on top, above our Received field (as trace and
    # Authentication-Results fields do, RFC 5321 4.4, RFC 8601 5).
    assert added == b"X-Filtered: yes"
    assert rest == (b"From: Alice <alice@example.org>\r\nSubject: filtered\r\n\r\nhello\r\n")
    assert re.search(rf"{queue_id}: filter first: removed x-spam; added X-Filtered", relay.log())


def test_long_added_value_is_folded(relay_for, nexthop):
    value = " ".join(["word"] * 40)
    relay = relay_for("first", first={"add": f"X-Long: {value}"})
    queued_id(send(relay))
    [message] = nexthop.wait_for(1)
    added, _ = received_and_rest(message["data"])
    lines = added.split(b"\r\n")
    assert len(lines) == 3 and all(len(line) <= 78 for line in lines)
    assert b"".join(lines) == f"X-Long: {value}".encode()


def test_later_filters_see_earlier_changes_and_first_decisive_answer_wins(relay_for, nexthop):
    relay = relay_for("first, second, third",
                      first={"add": "X-First: 1", "remove": "X-Spam"},
                      second={"answer": "accept", "add": "X-Second: 2", "report": "yes"},
                      third={"answer": "reject"})
    queue_id = queued_id(send(relay))
    [message] = nexthop.wait_for(1)
    data = message["data"]
    fields, _ = header_section.parse(data)
    second, seen, first = fields[:3]
    assert (second.raw, first.raw) == (b"X-Second: 2\r\n", b"X-First: 1\r\n")
    # second saw first's changes in headers and in what open() reads, and
    # the size of the message as it stood then.
    size = len(data) - len(second.raw) - len(seen.raw)
    assert seen.value == (f"X-First,Received,From,Subject; first line X-First: 1; "
                          f"size {size}; sender alice@example.org; recipients bob@example.net")
    assert data.endswith(b"\r\nFrom: Alice <alice@example.org>\r\nSubject: filtered\r\n"
                         b"\r\nhello\r\n")
    assert [field.name for field in fields] == [
        "X-Second", "X-Seen", "X-First", "Received", "From", "Subject"]
    log = relay.log()
    assert f"{queue_id}: filter first: removed X-Spam; added X-First" in log
    assert f"{queue_id}: filter second: added X-Second, X-Seen" in log


def test_a_record_holds_the_size_as_stored_after_changes(relay_for, nexthop):
    relay = relay_for("first", first={"answer": "hold", "add": "X-Held: yes"})
    queue_id = queued_id(send(relay))
    record = relay.record(queue_id, "hold")
    stored = queue_files.message_of(os.path.join(relay.spool, "hold"), queue_id)
    assert stored.startswith(b"X-Held: yes\r\nReceived: ")
    assert stored.endswith(BODY)
    assert record["size"] == len(stored)


def test_a_filter_may_replace_the_whole_message_and_the_next_sees_it(relay_for, nexthop):
    relay = relay_for("first, second", sections={"server": {"workers": "2"}},
                      first={"replace": "bonjour tout le monde", "add": "X-First: 1"},
                      second={"report": "yes"})
    # The record is read while the next hop holds its answer to DATA: once
    # it says 250 the relay removes the queue file.
    records = []  # (queue id, size in the record) of each message queued

    def read_record_then_accept(message):
        records.extend((queued, relay.record(queued)["size"]) for queued in relay.queued_ids())
        return 250, "2.0.0 Ok: queued"
    nexthop.data_reply = read_record_then_accept
    queue_id = queued_id(send(relay))
    [message] = nexthop.wait_for(1)
    data = message["data"]
    # The replacement, then the same answer's header change, then the next
    # filter's, on top of the new message.
    replaced = BODY.replace(b"hello", b"bonjour tout le monde")
    assert data.endswith(b"\r\n" + replaced)
    fields, _ = header_section.parse(data)
    assert [field.name for field in fields] == [
        "X-Seen", "X-First", "Received", "From", "Subject", "X-Spam"]
    size = len(data) - len(fields[0].raw)
    assert fields[0].value.endswith(f"; size {size}; sender alice@example.org; "
                                    f"recipients bob@example.net")
    log = relay.log()
    assert f"{queue_id}: filter first: replaced the message" in log
    assert f"{queue_id}: filter first: added X-First" in log
    assert records == [(queue_id, len(data))]


LIMITS = SimpleNamespace(message_size=200, header_size=40, line_length=80, allow_nul=False)


@pytest.mark.parametrize("data, problem", [
    ("Subject: x\r\n\r\nbody\r\n", "str, not bytes"),
    (b"Subject: x\r\n\r\nbody", "a last line that does not end in CRLF"),
    (b"Subject: x\n\nbody\r\n", "a bare CR or LF (lines end in CRLF)"),
    (b"Subject: x\r\n\r\nbo\rdy\r\n", "a bare CR or LF (lines end in CRLF)"),
    (b"Subject: x\r\n\r\nbo\ndy\r\n", "a bare CR or LF (lines end in CRLF)"),
    (b"\r\nbody\r\n", "no header section"),
    (b"Subject: x\r\n\r\n" + b"y" * 190 + b"\r\n",
     "206 octets, over [limits] message_size (200)"),
    (b"Subject: x\r\n\r\nnul \x00\r\n", "a NUL octet"),
    (b"Subject: x\r\n\r\n" + b"y" * 79 + b"\r\n", "a line over [limits] line_length (80)"),
    (b"Subject: x\r\nX-Long: " + b"y" * 30 + b"\r\n\r\nbody\r\n",
     "a header section over [limits] header_size (40)"),
])
def test_a_replacement_the_queue_could_not_hold_is_refused(data, problem):
    with pytest.raises(policy_filters.BadFilterAnswer) as info:
        policy_filters.checked(Decision.NO_OPINION.with_message(data), LIMITS)
    assert str(info.value) == f"replaced the message with {problem}"


def test_a_replacement_within_the_limits_is_taken():
    fits = b"Subject: x\r\n\r\n" + b"y" * 78 + b"\r\n"
    assert policy_filters.checked(Decision.ACCEPT.with_message(fits), LIMITS).message == fits
    # A BINARYMIME message's body is octets: bare CR, LF, NUL, long lines.
    binary = b"Subject: x\r\n\r\n\x00\r" + b"y" * 100 + b"\n"
    assert policy_filters.checked(Decision.ACCEPT.with_message(binary), LIMITS,
                                  binary=True).message == binary
    with pytest.raises(ValueError):
        Decision.defer().with_message(fits)


def test_a_replacement_may_be_as_big_as_the_message_it_replaces():
    # The DATA reader does not count the relay's Received field, nor do
    # the fields earlier filters added: the message as it stands may be
    # past the limits, and a filter that keeps it so is not refused.
    data = b"Received: r\r\nSubject: " + b"x" * 40 + b"\r\n\r\n" + (b"y" * 70 + b"\r\n") * 3
    current = SimpleNamespace(size=len(data), header_bytes=data[:data.index(b"\r\n\r\n") + 2])
    decision = Decision.NO_OPINION.with_message(data)
    assert policy_filters.checked(decision, LIMITS, current=current) is decision
    with pytest.raises(policy_filters.BadFilterAnswer):
        policy_filters.checked(Decision.NO_OPINION.with_message(data + b"more\r\n"), LIMITS,
                               current=current)


@pytest.mark.parametrize("data, problem", [
    (b"Subject: x\nX: y\r\n\r\n\n", "a bare CR or LF (lines end in CRLF)"),
    # To its empty line, as the DATA reader scans it, not to its last field.
    (b"Subject: x\r\n\nX-A: y\n\x00body", "a last line that does not end in CRLF"),
    (b"Subject: x\r\nnot a field\nBcc: evil\r\n\r\nb", "a bare CR or LF (lines end in CRLF)"),
    (b"Subject: x\r\n\x00\x01garbage\r\n\r\n", "a NUL octet"),
])
def test_a_binarymime_replacements_header_section_is_held_to_crlf_lines(data, problem):
    with pytest.raises(policy_filters.BadFilterAnswer) as info:
        policy_filters.checked(Decision.NO_OPINION.with_message(data), LIMITS, binary=True)
    assert str(info.value) == f"replaced the message with {problem}"


def test_the_limits_allow_for_the_relays_own_received_field():
    # The client sent 180 octets under a limit of 200; our Received field
    # made the file bigger.  A filter adding a little is held to 200 plus
    # that field, as the DATA reader did not count it.
    received = b"Received: from client by relay with ESMTP id 0123456789\r\n"
    sent = b"Subject: x\r\n\r\n" + (b"y" * 70 + b"\r\n") * 2 + b"z" * 20 + b"\r\n"
    current = SimpleNamespace(size=len(received + sent), header_bytes=received + b"Subject: x\r\n",
                              fields=header_section.parse(received + sent)[0])
    grown = received + b"X-Filtered: yes\r\n" + sent
    assert len(sent) <= 200 < len(grown) <= 200 + len(received)
    decision = Decision.NO_OPINION.with_message(grown)
    assert policy_filters.checked(decision, LIMITS, current=current) is decision


# -- failures -----------------------------------------------------------------------

@pytest.mark.parametrize("options, logged", [
    ({"answer": "raise"}, r"plugin first check_message\('[0-9A-Z]+'\) failed"),
    ({"answer": "garbage"}, r"plugin first check_message\('[0-9A-Z]+'\): returned 'yes', "
                            r"not a Decision"),
    ({"answer": "hang"}, r"plugin first check_message\('[0-9A-Z]+'\): no answer within 1"),
    ({"inject": "yes"}, r"plugin first check_message\('[0-9A-Z]+'\): header X-Bad: value "
                        r"'a\\r\\nBcc: mallory@example\.net' holds CR, LF"),
    ({"replace_badly": "yes"}, r"plugin first check_message\('[0-9A-Z]+'\): replaced the "
                               r"message with a last line that does not end in CRLF"),
])
def test_a_failing_filter_is_451_nothing_queued_and_the_session_goes_on(
        relay_for, nexthop, options, logged):
    # second would accept: a failure is not "no opinion", it stops the message.
    relay = relay_for("first, second", timeout="1", first=options, second={"answer": "accept"})
    reply, after = send(relay, after="NOOP")
    assert reply == FAILED
    assert after == (250, b"2.0.0 Ok")
    time.sleep(0.5)
    for directory in ("active", "hold", "tmp"):
        assert spool_files(relay, directory) == []
    log = relay.log()
    assert re.search(logged, log), log
    assert re.search(r": filter first failed: 451 4\.3\.0 Temporary failure checking message",
                     log)


# -- the pieces, without a relay ---------------------------------------------------

def test_header_values_may_hold_folding_but_no_other_line_break():
    field = header_section.new_field("X-A", "one\r\n two")
    assert (field.raw, field.value) == (b"X-A: one\r\n two\r\n", "one two")
    for value in ("one\r\ntwo", "one\rtwo", "one\ntwo", "a\x00b", "a\r\n", "x\r\n \r\n y"):
        with pytest.raises(header_section.BadField):
            header_section.new_field("X-A", value)
    for name in ("X A", "X:A", "", "Ä"):
        with pytest.raises(header_section.BadField):
            header_section.new_field(name, "v")


def test_non_ascii_header_values_only_with_smtputf8():
    with pytest.raises(header_section.BadField, match="SMTPUTF8"):
        header_section.new_field("X-A", "café")
    assert header_section.new_field("X-A", "café", smtputf8=True).raw == "X-A: café\r\n".encode()


def test_header_section_ends_at_the_empty_line_or_at_body_text():
    data = b"Received: a\r\n\tb\r\nSubject: s\r\n\r\nbody: not a field\r\n"
    fields, end = header_section.parse(data)
    assert [(f.name, f.value) for f in fields] == [("Received", "a\tb"), ("Subject", "s")]
    assert data[end:] == b"\r\nbody: not a field\r\n"
    fields, end = header_section.parse(b"Received: a\r\nno colon here\r\n", complete=True)
    assert [f.name for f in fields] == ["Received"] and end == 13
    assert header_section.parse(b"Received: a\r\nSubj", complete=False)[1] is None


@pytest.mark.parametrize("answer", [
    Decision("reject", 250, "2.0.0", "not a rejection"),
    Decision("defer", 550, "5.0.0", "not a deferral"),
    Decision("redirect", text="x", recipients=("not an address",)),
    Decision("redirect", text="x"),
    Decision("maybe"),
    None,
])
def test_answers_outside_the_contract_are_refused(answer):
    with pytest.raises(policy_filters.BadFilterAnswer):
        policy_filters.checked(answer)


# -- the spool's side: the view, the rewrite, the commit into hold/ -----------------

class SpoolSideTests(unittest.TestCase):
    """SpoolWriter.view/rewrite/commit(hold=True) with the reactor running."""

    MESSAGE = (b"Received: from client.test\r\n\tby relay.test\r\n"
               b"Subject: x\r\nX-Spam: yes\r\n\r\n" + b"body line\r\n" * 20000)

    def setUp(self):
        self.spool = Spool(os.path.join(tempfile.mkdtemp(prefix="filters-"), "spool"))
        self.addCleanup(shutil.rmtree, os.path.dirname(self.spool.path))
        self.spool.start()
        self.addCleanup(self.spool.stop)
        self.writer = self.spool.new_message()
        self.writer.write(self.MESSAGE)
        self.envelope = Envelope(sender="", recipients=["bob@example.net"])

    @defer.inlineCallbacks
    def changed_view(self):
        view = yield self.writer.view(self.envelope)
        decision = Decision.NO_OPINION.with_headers(add=[("X-New", "1")], remove=["x-spam"])
        return view, view.with_fields(policy_filters.changed_fields(view.fields, decision, False))

    @defer.inlineCallbacks
    def test_the_view_reads_the_file_written_so_far(self):
        view = yield self.writer.view(self.envelope)
        self.assertEqual(view.headers, [("Received", "from client.test\tby relay.test"),
                                        ("Subject", "x"), ("X-Spam", "yes")])
        self.assertEqual((view.sender, view.size), (None, len(self.MESSAGE)))
        self.assertEqual(view.recipients, [Mailbox("bob", "example.net")])
        with view.open() as f:
            self.assertEqual(f.read(), self.MESSAGE)

    @defer.inlineCallbacks
    def test_the_view_is_read_in_the_spools_threads_not_the_reactors(self):
        readers = []
        read = MessageView.read

        def recorded(*args):
            readers.append(threading.current_thread())
            return read(*args)
        self.patch(MessageView, "read", staticmethod(recorded))
        view = yield self.writer.view(self.envelope)
        self.assertEqual(view.size, len(self.MESSAGE))
        self.assertEqual(len(readers), 1)
        self.assertIsNot(readers[0], threading.main_thread())

    @defer.inlineCallbacks
    def test_a_view_of_a_message_thrown_away_fails_without_raising(self):
        self.writer.abort()
        with self.assertRaises(RuntimeError):
            yield self.writer.view(self.envelope)

    @defer.inlineCallbacks
    def test_a_changed_view_reads_the_new_fields_then_the_old_body(self):
        _, changed = yield self.changed_view()
        expected = b"X-New: 1\r\n" + self.MESSAGE.replace(b"X-Spam: yes\r\n", b"")
        with changed.open() as f:
            self.assertEqual(f.read(), expected)
        self.assertEqual(changed.size, len(expected))

    @defer.inlineCallbacks
    def test_rewrite_then_commit_into_hold(self):
        _, changed = yield self.changed_view()
        yield self.writer.rewrite(changed)
        self.assertEqual(listing(self.spool, "tmp"), [f"{self.writer.queue_id}.msg"])
        queue_id = yield self.writer.commit(self.envelope, hold=True)
        self.assertEqual(listing(self.spool, "active"), [])
        self.assertEqual(listing(self.spool, "hold"), [f"{queue_id}.msg"])
        stored = queue_files.message_of(os.path.join(self.spool.path, "hold"), queue_id)
        self.assertEqual(stored, b"X-New: 1\r\n" + self.MESSAGE.replace(b"X-Spam: yes\r\n", b""))
        record, where = self.spool.load_any(queue_id)
        self.assertEqual((where, record["size"]), ("hold", len(stored)))
        self.assertEqual(list(self.spool.held_ids()), [queue_id])

    @defer.inlineCallbacks
    def test_a_failed_rewrite_leaves_the_message_as_it_was(self):
        _, changed = yield self.changed_view()

        def full(*args):
            raise OSError(28, "No space left on device")
        self.patch(shutil, "copyfileobj", full)
        with self.assertRaises(OSError):
            yield self.writer.rewrite(changed)
        self.assertEqual(listing(self.spool, "tmp"), [f"{self.writer.queue_id}.msg"])
        self.writer.write(b"more\r\n")
        queue_id = yield self.writer.commit(self.envelope)
        self.assertEqual(queue_files.message_of(os.path.join(self.spool.path, "active"), queue_id),
                         self.MESSAGE + b"more\r\n")


def test_a_rewrite_left_by_a_crash_is_part_of_the_layout_and_removed_at_start(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    name = rewrite_name(f"{queue_ids.new_queue_id()}.msg", "0123abcd")
    assert layout.expected_kind("tmp", name) == "a regular file"
    open(os.path.join(spool.path, "tmp", name), "wb").close()
    spool.recover()
    assert os.listdir(os.path.join(spool.path, "tmp")) == []


def minted_in(slot):
    try:
        queue_ids.use_slot(slot)
        return queue_ids.new_queue_id()
    finally:
        queue_ids._slot = None


def test_a_dead_inbound_workers_rewrite_is_removed_with_its_other_files(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    tmp = os.path.join(spool.path, "tmp")
    mine, other = minted_in(7), minted_in(8)
    names = [f"{mine}.msg", rewrite_name(f"{mine}.msg", "0123abcd"),
             rewrite_name(f"{other}.msg", "0123abcd")]
    for name in names:
        open(os.path.join(tmp, name), "wb").close()
    assert spool.remove_unfinished(slot=7) == 2
    assert os.listdir(tmp) == [names[2]]


# -- the docs' filter example, loaded from docs/plugins.rst --------------------------

def test_the_docs_filter_example_refuses_executables_and_marks_the_rest(tmp_path, nexthop):
    from tests.test_plugin_docs import examples
    plugins = tmp_path / "site-plugins"
    plugins.mkdir()
    (plugins / "no_executables.py").write_text(examples()["no_executables.py"])
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "0"},
        "delivery": {"smarthost": f"[127.0.0.1]:{nexthop.port}", "smarthost_tls": "none"},
        "plugins": {"path": str(plugins), "filters": "no_executables"},
    }).start()
    attachment = (b"From: alice@example.org\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                  b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                  b"--b\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Disposition: attachment; filename=\"Invoice.EXE\"\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n")
    try:
        assert send(relay, attachment) == (550, b"5.7.1 Executable attachments are refused")
        queued_id(send(relay))
        [message] = nexthop.wait_for(1)
    finally:
        relay.stop()
    assert message["data"].startswith(b"X-Attachments: checked\r\nReceived: ")
    assert message["data"].endswith(BODY)
