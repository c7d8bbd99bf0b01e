"""relaymail's default log observer for ``twistd -n``: twistd's own line
format, at less cost.

twistd's text observer works out the local time zone and formats the
timestamp for every event; relaymail logs about six events per message,
and that formatting alone was an eighth of the relay's Python time under
load.  This observer writes the same lines, formatting the timestamp once
per second.  It is used only where twistd would log to standard output
(``-n`` without ``--logfile``, ``--syslog`` or ``--logger``); every other
choice of the user is left to twistd.

One thing differs from twistd's lines: text from outside in an event (a
next hop's reply, a host name from DNS, a plugin's answer) cannot add a
line.  The characters :mod:`relaymail.sanitize` says must not pass, CR,
NEL and U+2028 among them, are escaped as ``\\x{HEX}``; only LF is kept,
and it is followed by a tab as twistd does, so that a reader can tell a
traceback's further lines from a new event.
"""

import sys

from twisted.logger import ILogObserver, eventAsText, formatTime
from zope.interface import implementer

from relaymail import sanitize


@implementer(ILogObserver)
class TextObserver:
    """Lines as twistd writes them: ``TIME [SYSTEM] TEXT``."""

    def __init__(self, out):
        self._out = out
        self._second = None
        self._stamp = ""

    def __call__(self, event):
        text = eventAsText(event, includeTimestamp=False)
        if not text:
            return
        text = sanitize.escape_lines(text)
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if second != self._second:
                self._second = second
                self._stamp = formatTime(when)
            stamp = self._stamp
        self._out.write(f"{stamp} {text}".replace("\n", "\n\t") + "\n")
        self._out.flush()


def stdout_observer():
    """The factory twistd's ``--logger`` option names."""
    return TextObserver(sys.stdout)


def use_for(twistd_options):
    """Make this observer twistd's when twistd would log to standard
    output anyway; ``twistd_options`` is twistd's ServerOptions."""
    if twistd_options is None:
        return
    to_stdout = twistd_options.get("nodaemon") and twistd_options.get("logfile") in (None, "", "-")
    if to_stdout and not twistd_options.get("syslog") and twistd_options.get("logger") is None:
        twistd_options["logger"] = f"{__name__}.stdout_observer"
