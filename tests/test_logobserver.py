"""relaymail's stdout log observer writes exactly what twistd's would."""

import io

from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.scripts._twistd_unix import ServerOptions

from relaymail.logobserver import TextObserver, stdout_observer, use_for


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
