"""relaymail's stdout log observer writes exactly what twistd's would."""

import io
import json

from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.scripts._twistd_unix import ServerOptions

from relaymail import logline
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


def test_json_lines_carry_logline_s_text_once():
    out = io.StringIO()
    log = Logger(namespace="relaymail.test", observer=JSONObserver(out))
    logline.info(log, "s1: queued as {ABC}", queue_id="ABC")
    record = json.loads(out.getvalue())
    assert record["text"] == "s1: queued as {ABC}" and record["queue_id"] == "ABC"
    assert logline.TEXT not in record


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
