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

from twisted.logger import ILogObserver, eventAsJSON, eventAsText, formatTime
from zope.interface import implementer

from relaymail import sanitize


@implementer(ILogObserver)
class TextObserver:
    """Lines as twistd writes them: ``TIME [SYSTEM] TEXT``."""

    def __init__(self, out, process_name=None):
        self._out = out
        self._second = None
        self._stamp = ""
        # A worker beside others on one output names itself in the system
        # field: "[inbound.1 relaymail.smtp#info]".
        self._system_start = "[" if process_name is None else f"[{process_name} "

    def __call__(self, event):
        text = eventAsText(event, includeTimestamp=False)
        if not text:
            return
        if text.startswith("["):
            text = self._system_start + text[1:]
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


@implementer(ILogObserver)
class EventObserver:
    """A worker's events, one JSON object a line (twisted.logger's
    eventAsJSON), for a master that logs them as its own with their level,
    time and traceback intact (relaymail.process.master)."""

    def __init__(self, out):
        self._out = out

    def __call__(self, event):
        self._out.write(eventAsJSON(event) + "\n")
        self._out.flush()


def stdout_observer():
    """The factory twistd's ``--logger`` option names."""
    return TextObserver(sys.stdout)


def logs_lines_to_stdout(twistd_options):
    """True when twistd logs with :class:`TextObserver` on standard output:
    worker processes may then write their lines there themselves."""
    chosen = (twistd_options or {}).get("logger")
    # A name until twistd's own postOptions imports it.
    return chosen is stdout_observer or chosen == f"{__name__}.stdout_observer"


def use_for(twistd_options):
    """Make this observer twistd's when twistd would log to standard
    output anyway; ``twistd_options`` is twistd's ServerOptions."""
    if twistd_options is None:
        return
    to_stdout = twistd_options.get("nodaemon") and twistd_options.get("logfile") in (None, "", "-")
    if to_stdout and not twistd_options.get("syslog") and twistd_options.get("logger") is None:
        twistd_options["logger"] = f"{__name__}.stdout_observer"
