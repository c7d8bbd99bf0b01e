"""relaymail's stdout log observer writes exactly what twistd's would."""

import copy
import io
import json
import pickle

from twisted.logger import (
    Logger, LogPublisher, eventAsJSON, formatEvent, globalLogPublisher, textFileLogObserver)
from twisted.python import log as legacy_log
from twisted.scripts._twistd_unix import ServerOptions

from relaymail import logline, logobserver
from relaymail.logobserver import JSONObserver, TextObserver, stdout_observer, use_for


def test_same_lines_as_twistds_observer():
    ours, theirs = io.StringIO(), io.StringIO()
    log = Logger(namespace="relaymail.test",
                 observer=LogPublisher(TextObserver(ours), textFileLogObserver(theirs)))
    log.info("connect from {ip}", ip="192.0.2.1")
    log.info("two\nlines {{braces}}")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("with a traceback")
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") > 4


def test_lines_logline_rendered_are_twistds_too():
    # logline.info's text is written as it is, not parsed again: the line
    # must still be the one twistd's observer makes of the same event.
    ours, theirs = io.StringIO(), io.StringIO()
    log = Logger(namespace="relaymail.test",
                 observer=LogPublisher(TextObserver(ours, "inbound.1"), textFileLogObserver(theirs)))
    logline.info(log, "s1: queued as {ABC} from=<a\nb@example.org>", queue_id="ABC")
    logline.info(log, "s1: disconnect", session="s1", log_system="legacy.system")
    expected = theirs.getvalue().replace(" [relaymail.test#", " [inbound.1 relaymail.test#")
    expected = expected.replace(" [legacy.system]", " [inbound.1 legacy.system]")
    assert ours.getvalue() == expected
    lines = ours.getvalue().split("\n")
    assert lines[0].endswith(
        " [inbound.1 relaymail.test#info] s1: queued as {ABC} from=<a\\x{A}b@example.org>")
    assert lines[1].endswith(" [inbound.1 legacy.system] s1: disconnect")


def test_logline_s_lines_are_not_rendered_again(monkeypatch):
    # The point of the fast path: no format parsing for logline's events.
    def no_parsing(*args, **kwargs):
        raise AssertionError("the format was parsed again")
    monkeypatch.setattr(logobserver, "eventAsText", no_parsing)
    monkeypatch.setattr(logobserver, "formatEvent", no_parsing)
    text, structured = io.StringIO(), io.StringIO()
    log = Logger(namespace="relaymail.test",
                 observer=LogPublisher(TextObserver(text), JSONObserver(structured)))
    logline.info(log, "s1: queued as {ABC}", queue_id="ABC")
    assert text.getvalue().endswith(" [relaymail.test#info] s1: queued as {ABC}\n")
    assert json.loads(structured.getvalue())["text"] == "s1: queued as {ABC}"


def test_other_observers_see_a_plain_event():
    # Nothing added for them: twistd's JSON log and a worker's events to
    # its master carry the fields the caller gave and a format string.
    events = []
    logline.info(Logger(namespace="relaymail.test", observer=events.append),
                 "s1: queued as {ABC}", queue_id="ABC")
    [event] = events
    assert {key for key in event if not key.startswith("log_")} == {"queue_id"}
    assert json.loads(eventAsJSON(event))["log_format"] == "s1: queued as {{ABC}}"
    assert formatEvent(event) == "s1: queued as {ABC}"


def test_an_empty_logline_writes_no_line_as_twistd_would():
    ours, theirs = io.StringIO(), io.StringIO()
    log = Logger(namespace="relaymail.test",
                 observer=LogPublisher(TextObserver(ours), textFileLogObserver(theirs)))
    logline.info(log, "")
    assert ours.getvalue() == theirs.getvalue() == ""


def options(*argv):
    parsed = ServerOptions()
    parsed.parseOptions([*argv, "relaymail"])
    return parsed


def test_used_only_where_twistd_would_write_to_stdout():
    assert options("-n")["logger"] is stdout_observer
    assert options("-n", "--logfile=-")["logger"] is stdout_observer
    assert options("-n", "--logfile=/tmp/relaymail-test.log")["logger"] is None
    assert options("-n", "--syslog")["logger"] is None
    assert options()["logger"] is None
    assert options("-n", "--logger=twisted.logger.textFileLogObserver")["logger"].__name__ == (
        "textFileLogObserver")


def test_use_for_without_twistd_does_nothing():
    use_for(None)


def test_text_from_outside_cannot_add_a_line():
    out = io.StringIO()
    log = Logger(namespace="relaymail.test", observer=TextObserver(out))
    forged = "no\u2028ID: to=<x>, status=sent"
    log.info("reply {text}", text=f"550 5.1.1 {forged}")
    log.info("reply {text}", text="a\rb\x85c\u2029d\x0be\x0cf\x1cg\x1b[2Jh\x9bi")
    lines = out.getvalue().split("\n")[:-1]
    assert len(lines) == 2
    assert lines[0].endswith(" [relaymail.test#info] reply 550 5.1.1 no\\x{2028}ID: to=<x>, status=sent")
    assert lines[1].endswith(" reply a\\x{D}b\\x{85}c\\x{2029}d\\x{B}e\\x{C}f\\x{1C}g\\x{1B}[2Jh\\x{9B}i")
    assert all(line.splitlines() == [line] for line in lines)


def test_a_line_feed_still_continues_the_event_behind_a_tab():
    out = io.StringIO()
    Logger(namespace="relaymail.test", observer=TextObserver(out)).info("one\ntwo\u2028three")
    assert out.getvalue().endswith(" [relaymail.test#info] one\n\ttwo\\x{2028}three\n")


def test_a_copied_logline_event_keeps_its_text():
    # An observer that copies events (or pickles them) must not see the
    # braces escaped twice.
    events = []
    logline.info(Logger(namespace="relaymail.test", observer=events.append), "s1: {ABC}")
    for copied in (copy.deepcopy(events[0]), pickle.loads(pickle.dumps(events[0]["log_format"]))):
        form = copied["log_format"] if isinstance(copied, dict) else copied
        assert form == "s1: {{ABC}}" and form.text == "s1: {ABC}"


def test_the_lines_of_a_dns_query_port_are_left_out_and_other_ports_are_not():
    out = io.StringIO()
    observer = TextObserver(out)
    globalLogPublisher.addObserver(observer)
    try:
        for text in ["_UDPQuery starting on 43861", "DNSDatagramProtocol starting on 5300",
                     "(UDP Port 43861 Closed)", "SMTPFactory starting on 2525",
                     "(TCP Port 2525 Closed)", "(UDP Port 43861 Closed) and more"]:
            legacy_log.msg(text)        # as Twisted's ports write them
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [line.split(" ", 2)[2] for line in out.getvalue().splitlines()] == [
        "SMTPFactory starting on 2525", "(TCP Port 2525 Closed)",
        "(UDP Port 43861 Closed) and more"]
