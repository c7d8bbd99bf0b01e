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

import json
import re
import sys
import time

from twisted.logger import ILogObserver, eventAsJSON, eventAsText, formatEvent, formatTime
from zope.interface import implementer

from relaymail import logline, sanitize

#: What :func:`stdout_observer` makes: "text" or "json" (``[log] format``),
#: set by makeService, which twistd calls before it starts logging.
_format = "text"


# Lines twisted.names' resolver writes through the legacy log whenever it
# reads /etc/resolv.conf (at its first lookup, and after each change):
# "b'/etc/resolv.conf' changed, reparsing", "Resolver added ('10.0.0.53',
# 53) to server list".  Routine, and at info level with no way to turn
# them off; the DNS servers in use are in resolv.conf for whoever asks.
_RESOLVER_NOISE = ("Resolver added ", "changed, reparsing")

# And the two lines Twisted's UDP port writes for every DNS query, since
# each query has a port of its own: "_UDPQuery starting on 43861" (relaymail's
# resolver, relaymail.delivery.secure_dns; "DNSDatagramProtocol ..." for
# twisted.names') and "(UDP Port 43861 Closed)".  A relay delivering to MX
# hosts asks several names a message: these were most of its log.
_QUERY_PORT_NOISE = re.compile(
    r"(?:_UDPQuery|DNSDatagramProtocol) starting on \d+|\(UDP Port \d+ Closed\)")


def is_noise(event):
    """True for an event no observer of ours writes."""
    message = event.get("message")
    if not message or event.get("isError") or len(message) != 1:
        return False
    text = message[0]
    return isinstance(text, str) and (text.startswith(_RESOLVER_NOISE[0])
                                      or text.endswith(_RESOLVER_NOISE[1])
                                      or _QUERY_PORT_NOISE.fullmatch(text) is not None)


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
        form = event.get("log_format")
        if (type(form) is logline.Rendered and form.text and "log_system" not in event
                and "log_failure" not in event):
            # Rendered and escaped by logline.info, one line: what
            # eventAsText would make of it, without parsing the format.
            level = event.get("log_level")
            text = (f"{self._system_start}{event.get('log_namespace', '-')}"
                    f"#{'-' if level is None else level.name}] {form.text}")
        else:
            text = self._rendered(event)
            if text is None:
                return
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if second != self._second:
                self._second = second
                self._stamp = formatTime(when)
            stamp = self._stamp
        self._out.write(f"{stamp} {text}\n")
        self._out.flush()

    def _rendered(self, event):
        """The line for any other event (twistd's, a legacy log message,
        a failure's traceback): None for one not to write."""
        if "message" in event and is_noise(event):
            return None
        text = eventAsText(event, includeTimestamp=False)
        if not text:
            return None
        if text.startswith("["):
            text = self._system_start + text[1:]
        return sanitize.escape_lines(text).replace("\n", "\n\t")


# Keys of an event that are twisted.logger's own or the legacy log's,
# not fields the relay gave it.
_NOT_FIELDS = {"message", "system", "isError", "time", "format", "why", "failure", "printed"}
_SCALARS = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class JSONObserver:
    """One JSON object a line (``[log] format = json``): ``time`` (ISO 8601,
    UTC), ``level``, ``system``, ``text`` (the line the text format would
    write), the worker's ``process`` name, a failure's ``traceback``, and
    every field the event carries (``session``, ``client``, ``queue_id``,
    ``recipient``...).  Non-ASCII is written as ``\\uXXXX`` escapes, so
    nothing in a value can split the line."""

    def __init__(self, out, process_name=None):
        self._out = out
        self._process = process_name
        self._second = None
        self._stamp = ""

    def __call__(self, event):
        if "message" in event and is_noise(event):
            return
        form = event.get("log_format")
        text = form.text if type(form) is logline.Rendered else formatEvent(event)
        record = {"time": self._time(event.get("log_time")),
                  "level": getattr(event.get("log_level"), "name", "info"),
                  "system": event.get("log_system") or event.get("log_namespace") or "-",
                  "text": text}
        if self._process is not None:
            record["process"] = self._process
        for key, value in event.items():
            if key.startswith("log_") or key in _NOT_FIELDS or key in record:
                continue
            if isinstance(value, _SCALARS):
                record[key] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
                record[key] = list(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()

    def _time(self, when):
        if when is None:
            return None
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((when - second) * 1000):03d}Z"


@implementer(ILogObserver)
class EventObserver:
    """A worker's events, one JSON object a line (twisted.logger's
    eventAsJSON), for a master that logs them as its own with their level,
    time and traceback intact (relaymail.process.master)."""

    def __init__(self, out):
        self._out = out

    def __call__(self, event):
        if "message" in event and is_noise(event):
            return
        self._out.write(eventAsJSON(event) + "\n")
        self._out.flush()


def stdout_observer():
    """The factory twistd's ``--logger`` option names."""
    if _format == "json":
        return JSONObserver(sys.stdout)
    return TextObserver(sys.stdout)


def use_format(log_format):
    """``[log] format`` for the observer twistd is about to make (and for
    the workers, which write to the same standard output)."""
    global _format
    _format = log_format


def worker_mode(lines_to_stdout):
    """How a worker logs (``relaymail.process.worker --log``): in the
    master's format on the standard output they share, else as events
    for the master to log."""
    if not lines_to_stdout:
        return "events"
    return "json" if _format == "json" else "lines"


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
