"""relaymail-queue: look at the mail queue, and change it.

::

    relaymail-queue [--config FILE] [--spool DIR] COMMAND [ARG]

    list [--json] [FILTERS]
                      the messages, oldest first             (mailq, postqueue -j)
    show ID [--body] [--raw]
                      a message's record and headers        (postcat -q)
    flush [--domain DOMAIN]
                      make every waiting message due now     (postqueue -f, -s)
    retry ID...       make messages due now                  (postqueue -i)
    delete ID...      delete messages                        (postsuper -d)
    hold ID...        keep messages from being delivered     (postsuper -h)
    release ID...     let held messages go, due now          (postsuper -H)

Each ID may be several ids, ``ALL`` (every queued message; every held one
for ``release``) or ``-`` (ids read from standard input, as ``postsuper
-d -``).  ``release`` of a message that is not held is an error.
FILTERS (``--sender``, ``--recipient``, ``--domain``,
:mod:`relaymail.queue.selection`) choose among ``ALL`` and what ``list``
shows; :mod:`relaymail.tools.queue_listing` says what ``list`` prints.

A change is carried out whether or not anybody reads its report: a pipe
closed half way (``delete ALL | head -1``) silences the rest of the
report, not the rest of the work.  Every change is logged in the relay's
log with who made it; made offline, it is kept for the relay to log at
its next start (:mod:`relaymail.queue.audit`).

``list`` and ``show`` only read the files, whoever is running.  The other
commands must not move files under a running daemon's feet: they try the
spool lock (:mod:`relaymail.queue.lock`) and, when they get it, no daemon
runs and they change the files themselves, holding the lock so that none
starts meanwhile; when the daemon holds it they send the request over
``QUEUE/control`` (:mod:`relaymail.queue.control`) and print its reply.
Both ways give the same reply lines.

Run as root on a spool that belongs to another user (the one the relay
runs as), the tool does its work with that user's ids, as Postfix's
postsuper does as the mail system owner: whoever owns the spool can put
links in it, and root following them could be led to read, write or
delete files anywhere.  The lock is opened as
:mod:`relaymail.queue.layout` says in any case.

What the queue holds came from outside: addresses, a next hop's replies,
the message's own header lines.  ``list`` and ``show`` never write it to
the terminal as it is: a character that is not printable (the C0 and C1
controls, ESC and CSI that start terminal escape sequences such as an
OSC 52 clipboard write or a clear screen, U+2028 and U+2029 that break a
line, the bidirectional overrides) is shown as ``\\x{HEX}``, its code
point in hexadecimal (ESC as ``\\x{1B}``), the notation of RFC 6533
section 3 that DSNs and the log use too (:mod:`relaymail.sanitize`).
Header lines keep their tabs.  ``show --raw`` writes the message's bytes
exactly as queued, for a pipe or a file.

Exit status: 0 when done; 1 when the queue said no (no such message, an
error reply, no daemon answering, an unreadable spool); 2 for a usage or
configuration error (a filter beside ids named one by one among them).
"""

import argparse
import contextlib
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from zope.interface import implementer

import relaymail
from relaymail import sanitize
from relaymail.config import ConfigError, load_config
from relaymail.queue import audit
from relaymail.queue import record as records
from relaymail.queue.control import (
    ALL, ControlError, IQueueControl, answer, control_path, plural)
from relaymail.queue.layout import UnsafeSpool
from relaymail.queue.lock import SpoolLock
from relaymail.queue.queue_file import NotRegularFile, open_message
from relaymail.queue.queue_id import is_queue_id
from relaymail.queue.selection import (
    NULL_SENDER, BadFilter, Selection, address_key, domain_key, matching_ids)
from relaymail.queue.spool import ACTIVE, HOLD, Spool
from relaymail.tools.queue_listing import (
    SpoolUnreadable, format_age, format_json, format_listing, format_utc, printable,
    read_queue)

PROGRAM = "relaymail-queue"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: How long to wait for the daemon's reply; deleting or flushing a very
#: large queue takes the daemon a while.
DEFAULT_TIMEOUT = 60.0

#: Threads for an offline flush: each due message costs an fsync, and
#: fsyncs overlap (see relaymail.queue.spool.COMMIT_THREADS).
FLUSH_THREADS = 16

#: A reply is one short line; more than this is not the daemon talking.
_REPLY_LIMIT = 4096

_SPOOL_DIRECTORIES = ("active", "hold", "tmp")

_ESCAPING = ("Characters that are not printable (controls such as ESC, "
             "U+2028, U+2029) are shown as \\x{HEX}, their code point in "
             "hexadecimal: ESC as \\x{1B}.")


class ToolError(Exception):
    """An expected problem, told in one line; the exit status is 1."""


class UsageError(Exception):
    """Options that do not go together; the exit status is 2."""


class _Context:
    """Where the output goes and what time it is, for one run."""

    def __init__(self, out, err, now, timeout):
        self.out = out
        self.err = err
        self.now = now
        self.timeout = timeout


def main(argv=None, out=None, err=None, now=None):
    """Run the tool.

    :param argv: the arguments, without the program name (``sys.argv``
        when None).
    :param out: where output goes (``sys.stdout`` when None), and
        ``err`` where problems go (``sys.stderr``).
    :param now: the time ages and due times are counted from, seconds
        since the epoch (the clock when None).
    :return: the exit status.
    """
    out = out or _tolerant(sys.stdout)
    err = err or _tolerant(sys.stderr)
    try:
        args = _parser().parse_args(argv)
        _check_combination(args)
    except SystemExit as exit:
        # argparse has printed the usage and why; 2 on error, 0 for --help.
        return exit.code
    except UsageError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return EXIT_USAGE
    try:
        spool_path = _spool_path(args)
    except ConfigError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return EXIT_USAGE
    context = _Context(out, err, time.time() if now is None else now, args.timeout)
    try:
        with as_spool_owner(spool_path):
            return args.run(args, spool_path, context)
    except ToolError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return EXIT_FAILED
    except BrokenPipeError:
        # "show ID | head": the reader has what it wanted.
        _quiet_if_standard(out, sys.stdout)
        return EXIT_OK
    finally:
        if getattr(context, "reader_gone", False):
            _quiet_if_standard(out, sys.stdout)
            _quiet_if_standard(err, sys.stderr)


def _tolerant(stream):
    # An address or an error text the terminal cannot show must not turn
    # into a traceback half way through a listing.
    try:
        stream.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
    return stream


def _quiet_if_standard(stream, standard):
    """After a closed pipe on ``stream``: when it is the process's own
    standard output (or error), point that descriptor at /dev/null, so
    that Python's flush at exit stays quiet too.  A stream a caller gave
    (a test, a script importing :func:`main`) is theirs: its descriptor
    is left alone."""
    if stream is not standard:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, standard.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


class _ReaderMayGo:
    """An output whose reader may close it half way (``delete ALL | head
    -1``): what is written after that goes nowhere, and the work goes
    on.  A command that changes the queue must not leave half of what it
    was asked undone because nobody reads its report any more."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def write(self, text):
        self._call(self._stream.write, text)

    def flush(self):
        self._call(self._stream.flush)

    def _call(self, method, *args):
        if self.gone:
            return
        try:
            method(*args)
        except BrokenPipeError:
            self.gone = True


def _whatever_the_reader_does(run):
    """Make a runner of changes write through :class:`_ReaderMayGo`: every
    change is made and its exit status kept, read or not."""
    def tolerant(args, spool_path, context):
        out, err = context.out, context.err
        context.out, context.err = _ReaderMayGo(out), _ReaderMayGo(err)
        try:
            return run(args, spool_path, context)
        finally:
            context.out.flush()
            context.err.flush()
            context.reader_gone = context.out.gone or context.err.gone
            context.out, context.err = out, err
    return tolerant


# -- the command line -----------------------------------------------------

_LIST_DETAIL = (
    "A header line, then for each message, oldest first: a line with its id, "
    "STATE (hold: not delivered until released; deferred: tried, and tried again "
    "later; active: not tried yet), size in bytes, arrival time (UTC), age and "
    "sender (<> for the null sender); below it, indented, the recipients still to "
    "deliver to, each group after its last error in parentheses, whole. The last "
    "line counts what was listed: '-- N Kbytes in M messages, H held.' "
    "--json prints instead one JSON object a line per message, with the fields of "
    "postqueue -j (queue_name, queue_id, arrival_time, message_size, sender, "
    "recipients: [{address, delay_reason}]) and attempts, next_attempt_time. ")

_FILTERS_DETAIL = (
    " --sender, --recipient and --domain choose among ALL: only the messages "
    "from that sender, or with a recipient still to do at that address or in that "
    "domain; case does not matter, and a domain matches in U-labels and in "
    "A-labels (xn--) alike.")


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Look at relaymail's mail queue and change it.  Works with "
                    "the daemon running (changes are asked of it over the "
                    "spool's control socket) or stopped (the files are changed "
                    "directly, under the spool lock).  Every change is logged in "
                    "the relay's log with the user who asked; one made while the "
                    "relay is stopped is kept in the spool's offline-actions file "
                    "and logged when the relay next starts.")
    parser.add_argument("--version", action="version",
                        version=f"relaymail {relaymail.__version__}")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="configuration file (INI); without it, the built-in "
                             "defaults, as for the daemon")
    parser.add_argument("--spool", metavar="DIR",
                        help="queue directory; overrides [queue] path")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                        metavar="SECONDS",
                        help="how long to wait for the daemon's reply "
                             f"(default {DEFAULT_TIMEOUT:g})")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND",
                                     required=True)

    def command(name, run, help_text, detail=""):
        sub = commands.add_parser(name, help=help_text,
                                  description=f"{help_text}. {detail}" if detail else help_text)
        sub.set_defaults(run=run)
        return sub

    listing = command("list", _list, "the messages in the queue, oldest first",
                      _LIST_DETAIL + _ESCAPING)
    listing.add_argument("--json", action="store_true",
                         help="one JSON object a line per message, as postqueue -j")
    _add_filters(listing, "list only the messages")
    show = command("show", _show, "a message's envelope, delivery state and headers",
                   _ESCAPING + " Header lines keep their tabs; --raw shows them as they are.")
    show.add_argument("queue_id", type=_queue_id, metavar="ID")
    show.add_argument("--body", action="store_true",
                      help="the whole message, not only its headers")
    show.add_argument("--raw", action="store_true",
                      help="the message's bytes exactly as queued (CRLF line "
                           "ends, control characters and all, which can drive "
                           "a terminal: for a pipe or a file); the record is "
                           "shown escaped all the same")
    flush = command("flush", _whatever_the_reader_does(_changer(_flush_request)),
                    "make every waiting message due for delivery now",
                    "--domain makes due only the messages with a recipient still to "
                    "do in that domain (postqueue -s).")
    flush.add_argument("--domain", type=_filter(domain_key), metavar="DOMAIN",
                       help="only the messages with a recipient still to do in DOMAIN")
    several = ("IDs may be several; ALL means every message it applies to, and - "
               "reads IDs from standard input, white space between them "
               "(as postsuper -d -)." + _FILTERS_DETAIL)
    for name, help_text in (("retry", "make messages due for delivery now"),
                            ("hold", "keep messages from being delivered"),
                            ("release", "let held messages go, due now"),
                            ("delete", "delete messages (no question asked)")):
        sub = command(name, _whatever_the_reader_does(_each_id(name)), help_text, several)
        sub.add_argument("queue_ids", type=_queue_id_argument, nargs="+",
                         metavar="ID|ALL|-")
        _add_filters(sub, "with ALL, only the messages")
    return parser


def _add_filters(sub, which):
    sub.add_argument("--sender", type=_filter(_sender_key), metavar="ADDRESS",
                     help=f"{which} from ADDRESS (<> for the null sender)")
    sub.add_argument("--recipient", type=_filter(address_key), metavar="ADDRESS",
                     help=f"{which} with ADDRESS among the recipients still to do")
    sub.add_argument("--domain", type=_filter(domain_key), metavar="DOMAIN",
                     help=f"{which} with a recipient still to do in DOMAIN")


def _filter(key):
    """An argparse type: the value's comparison form, or the usage error."""
    def convert(text):
        try:
            return key(text)
        except BadFilter as error:
            raise argparse.ArgumentTypeError(str(error))
    return convert


def _sender_key(text):
    return "" if text.strip() in NULL_SENDER else address_key(text)


def _selection(args):
    return Selection(getattr(args, "sender", None), getattr(args, "recipient", None),
                     getattr(args, "domain", None))


def _check_combination(args):
    """Filters choose among ALL; with ids named one by one they would
    either be ignored or contradict them.

    :raise UsageError: for such a combination.
    """
    queue_ids = getattr(args, "queue_ids", None)
    if queue_ids is None or not _selection(args):
        return
    if queue_ids != [ALL]:
        named = _selection(args).describe()
        raise UsageError(f"{named} chooses among ALL: give ALL alone, not "
                         f"{' '.join(queue_ids)}")


def _flush_request(args):
    return "flush" if args.domain is None else f"flush {args.domain}"


def _each_id(name):
    """The runner of a command on several ids: one request each, in
    order; every outcome printed; exit 1 if any failed."""
    def run(args, spool_path, context):
        queue_ids = _expand_ids(args.queue_ids, name, spool_path, context, _selection(args))
        if queue_ids == [ALL] and name == "delete":
            return _report(carry_out(spool_path, "delete ALL", context), context)
        worst = EXIT_OK
        for queue_id in queue_ids:
            status = _report(carry_out(spool_path, f"{name} {queue_id}", context), context)
            worst = max(worst, status)
        return worst
    return run


#: Where ``ALL`` looks for each command's messages.
_ALL_IN = {"release": (HOLD,), "delete": (ACTIVE, HOLD), "hold": (ACTIVE,),
           "retry": (ACTIVE,)}


def _expand_ids(arguments, name, spool_path, context, selection):
    """The ids the arguments name: ``-`` read from standard input, ``ALL``
    the messages in active/ (hold/ for release), those ``selection``
    matches when it is not empty (held ones too for delete)."""
    queue_ids = []
    for argument in arguments:
        if argument == "-":
            for word in sys.stdin.read().split():
                try:
                    queue_ids.append(_queue_id(word))
                except argparse.ArgumentTypeError as error:
                    raise ToolError(f"standard input: {error}")
        elif argument == ALL and selection:
            summaries, problems = _read_queue(spool_path, selection, _ALL_IN[name])
            for problem in problems:
                context.err.write(f"{PROGRAM}: {problem}\n")
            queue_ids.extend(sorted(summary.queue_id for summary in summaries))
        elif argument == ALL:
            if name == "delete" and len(arguments) == 1:
                return [ALL]        # one request: the daemon deletes all at once
            spool = _readable_spool(spool_path)
            queue_ids.extend(sorted(spool.held_ids() if name == "release" else spool.ids()))
        else:
            queue_ids.append(argument)
    if not queue_ids:
        matching = f" matching {selection.describe()}" if selection else ""
        context.out.write(f"no message to {name}{matching}\n")
    return list(dict.fromkeys(queue_ids))


def _queue_id_argument(text):
    """An ID argument: a queue id, ALL, or - (ids on standard input)."""
    word = text.strip()
    if word == "-":
        return "-"
    if word.upper() == ALL:
        return ALL
    return _queue_id(text)


def _queue_id(text):
    # Ids are upper case; accept them typed in lower case too.
    queue_id = text.strip().upper()
    if not is_queue_id(queue_id):
        raise argparse.ArgumentTypeError(f"not a queue id: {text!r}")
    return queue_id


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0
    # A day at most: socket timeouts overflow past what time_t holds.
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds up to 86400, got {text!r}")
    return value


def _spool_path(args):
    """The spool directory, from the configuration as the daemon reads it.

    :raise ConfigError: as :func:`relaymail.config.load_config` does.
    """
    overrides = {("queue", "path"): args.spool} if args.spool is not None else None
    return load_config(args.config, overrides).queue.path


# -- list ---------------------------------------------------------------------

def _list(args, spool_path, context):
    summaries, problems = _read_queue(spool_path, _selection(args))
    for problem in problems:
        context.err.write(f"{PROGRAM}: {problem}\n")
    if args.json:
        for summary in summaries:
            context.out.write(format_json(summary) + "\n")
    else:
        context.out.write(format_listing(summaries, context.now, len(problems)))
    return EXIT_OK


def _read_queue(spool_path, selection, where=(ACTIVE, HOLD)):
    try:
        return read_queue(_readable_spool(spool_path), selection, where)
    except SpoolUnreadable as error:
        raise ToolError(str(error))


# -- show -----------------------------------------------------------------------

def _show(args, spool_path, context):
    spool = _readable_spool(spool_path)
    queue_id = args.queue_id
    try:
        record, where = spool.load_any(queue_id)
    except FileNotFoundError:
        raise ToolError(f"no such message {queue_id}")
    except records.CorruptRecord as error:
        raise ToolError(f"{queue_id}: bad record: {error}")
    except OSError as error:
        raise ToolError(f"{queue_id}: cannot read its record: {error.strerror}")
    context.out.write(format_record(record, where == HOLD, context.now))
    context.out.write("\n")
    try:
        with open_message(spool.message_path(queue_id, where), record["size"]) as message:
            if args.raw:
                _write_raw(message, context.out, args.body)
            else:
                _write_message(message, context.out, args.body)
    except FileNotFoundError:
        raise ToolError(f"{queue_id}: the message file is gone "
                        "(delivered, deleted or moved meanwhile?)")
    except OSError as error:
        raise ToolError(f"{queue_id}: cannot read the message: {error.strerror}")
    return EXIT_OK


def format_record(record, held, now):
    """Return a message's record as text for people, one field a line."""
    envelope = record["envelope"]
    body = str(envelope.get("body", "7BIT"))
    if envelope.get("smtputf8"):
        body += ", SMTPUTF8"
    if held:
        next_attempt = "none: on hold"
    else:
        next_attempt = _moment(record["next_attempt_at"], now, due=True)
    fields = [
        ("Queue ID", record["id"] + (" (on hold)" if held else "")),
        ("Queued", _moment(record["created_at"], now)),
        ("Size", plural(record["size"], "byte")),
        ("Sender", f"<{printable(str(envelope.get('sender') or ''))}>"),
        ("Client", _client(envelope)),
        ("Authenticated", printable(str(envelope.get("authenticated_user") or "-"))),
        ("Body", body),
        ("Attempts", str(record["attempts"])),
        ("Next attempt", next_attempt),
        ("Last error", printable(str(record["last_error"] or "-"))),
    ]
    lines = [f"{label + ':':<15}{printable(value)}" for label, value in fields]
    lines.append("Recipients:")
    for recipient in record["recipients"]:
        attempts = recipient.get("attempts", 0)
        lines.append(f"  {printable(recipient['address'])}: "
                     f"{printable(str(recipient.get('status', '?')))}, "
                     f"{printable(plural(attempts, 'attempt'))}")
        if recipient.get("last_error"):
            lines.append(f"    last error: {printable(str(recipient['last_error']))}")
    return "\n".join(lines) + "\n"


def _moment(when, now, due=False):
    """``2026-01-01 00:00:00 UTC (3m ago)``, or ``(in 2m)``, or for a due
    time that has passed, ``(due now)``."""
    if not isinstance(when, (int, float)) or isinstance(when, bool):
        return repr(when)
    text = format_utc(when)
    if when > now:
        return f"{text} (in {format_age(when - now)})"
    return f"{text} (due now)" if due else f"{text} ({format_age(now - when)} ago)"


def _client(envelope):
    helo = printable(str(envelope.get("helo") or ""))
    address = printable(str(envelope.get("client_ip") or ""))
    if address:
        return f"{helo} [{address}]" if helo else f"[{address}]"
    return helo or "-"


def _write_message(message, out, whole):
    """Copy the headers (everything with ``whole``) of a message file,
    with CRLF line ends made local and what is not printable escaped
    (a header line is the sender's: ESC in it would drive the terminal)."""
    for line in message:
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if not text and not whole:
            return
        out.write(sanitize.escape_for_terminal(text, keep="\t") + "\n")


def _write_raw(message, out, whole):
    """Copy the headers (everything with ``whole``) of a message file
    byte for byte, line ends as they are."""
    binary = getattr(out, "buffer", None)
    if binary is None:
        raise ToolError("--raw needs an output that takes bytes")
    out.flush()
    for line in message:
        if not whole and line in (b"\r\n", b"\n"):
            break
        binary.write(line)
    binary.flush()


# -- commands that change the queue -----------------------------------------------

def _changer(request_of):
    """Make the runner of a command that sends ``request_of(args)``."""
    def run(args, spool_path, context):
        return _report(carry_out(spool_path, request_of(args), context), context)
    return run


def carry_out(spool_path, request, context):
    """Carry out one control request, on the files or through the daemon.

    :return: the reply line (``ok ...`` or ``error ...``).
    :raise ToolError: when neither way is open.
    """
    _check_spool(spool_path)
    lock = SpoolLock(spool_path)
    try:
        locked = lock.acquire()
    except UnsafeSpool as error:
        raise ToolError(str(error))
    except OSError as error:
        raise ToolError(f"cannot lock the spool {spool_path}: {error.strerror}")
    if not locked:
        return ask_daemon(spool_path, request, context.timeout, lock.holder_pid())
    try:
        replies = []
        manager = OfflineManager(Spool(spool_path), context.now)
        # The manager answers at once, so the Deferred has fired.
        answer(manager, request).addCallback(replies.append)
        _record_offline(spool_path, request, replies[0], context)
        if request.startswith("flush") and replies[0].startswith("ok "):
            return replies[0] + "; relaymail is not running: nothing is delivered until it starts"
        return replies[0]
    finally:
        lock.release()


def _record_offline(spool_path, request, reply, context):
    """Keep what was done for the relay to log at its next start
    (:mod:`relaymail.queue.audit`).  The change is made whether or not
    this can be written: say so, and go on."""
    try:
        audit.record_offline(spool_path, request, audit.this_process(), reply, context.now)
    except OSError as error:
        context.err.write(f"{PROGRAM}: {request}: not recorded in "
                          f"{audit.journal_path(spool_path)}: {error.strerror}\n")


def ask_daemon(spool_path, request, timeout, pid=None):
    """Send ``request`` to the daemon over ``QUEUE/control``.

    :param pid: the daemon's process id, to name it in problems.
    :return: its reply line.
    :raise ToolError: when it does not answer.
    """
    path = control_path(spool_path)
    who = f"relaymail (process {pid})" if pid else "the process holding the spool lock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(path)
            connection.sendall(request.encode("ascii") + b"\n")
            return _read_reply(connection, who)
        except FileNotFoundError:
            raise ToolError(f"{who} holds the spool but has no control socket "
                            f"{path}; is it still starting?")
        except ConnectionRefusedError:
            raise ToolError(f"{who} holds the spool but nothing answers on {path} "
                            "(connection refused)")
        except socket.timeout:
            raise ToolError(f"{who} did not answer on {path} within {timeout:g} seconds")
        except OSError as error:
            raise ToolError(f"cannot talk to {who} on {path}: {error.strerror or error}")


def _read_reply(connection, who):
    data = b""
    while b"\n" not in data:
        chunk = connection.recv(_REPLY_LIMIT)
        if not chunk:
            raise ToolError(f"{who} closed the control connection without answering")
        data += chunk
        if len(data) > _REPLY_LIMIT:
            raise ToolError(f"{who} sent a reply longer than {_REPLY_LIMIT} bytes")
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("ascii", "replace")


def _report(reply, context):
    """Print a reply line; return the exit status it means."""
    status, _, text = reply.partition(" ")
    if status == "ok":
        context.out.write(text + "\n")
        return EXIT_OK
    if status == "error":
        context.err.write(f"{PROGRAM}: {text}\n")
    else:
        context.err.write(f"{PROGRAM}: unexpected reply: {reply!r}\n")
    return EXIT_FAILED


@implementer(IQueueControl)
class OfflineManager:
    """The control requests done on the spool's files, for when no daemon
    runs (the caller holds the spool lock): an
    :class:`relaymail.queue.control.IQueueControl` without a scheduler.

    :param spool: a :class:`relaymail.queue.spool.Spool`; it need not be
        started.
    :param now: the time "due now" means, seconds since the epoch.
    """

    def __init__(self, spool, now):
        self._spool = spool
        self._now = now

    def flush(self, domain=None):
        """Make every message in ``active/`` due (with ``domain``, those
        with a recipient still to do there); return how many are."""
        queue_ids = list(self._spool.ids())
        if domain is not None:
            queue_ids = matching_ids(self._spool, queue_ids, Selection(domain=domain))
        with ThreadPoolExecutor(FLUSH_THREADS) as pool:
            return sum(pool.map(self._make_due, queue_ids))

    def pickup(self):
        """Nothing to pick up with no daemon running: it schedules the
        whole queue when it starts."""
        return 0

    def _make_due(self, queue_id):
        try:
            return self._spool.make_due(queue_id, self._now)
        except (records.CorruptRecord, NotRegularFile):
            # Not deliverable anyway, and neither is a directory or FIFO
            # under a queue file's name: the daemon sets them aside.
            return False

    def retry(self, queue_id):
        if self._spool.make_due(queue_id, self._now):
            return True
        try:
            _, where = self._spool.load_any(queue_id)
        except FileNotFoundError:
            return False
        if where == HOLD:
            raise ControlError(f"{queue_id} is on hold; release it to deliver it")
        return False

    def delete(self, queue_id):
        return self._spool.delete(queue_id)

    def delete_all(self):
        return self._spool.delete_all()

    def hold(self, queue_id):
        return self._spool.hold(queue_id)

    def release(self, queue_id):
        _refuse_if_not_held(self._spool, queue_id)
        return self._spool.release(queue_id, self._now)


def _refuse_if_not_held(spool, queue_id):
    """``release`` of a message that is queued but not held is a mistake
    to tell, not a success to report (and must not make it due)."""
    if not spool.is_held(queue_id) and os.path.exists(spool.message_path(queue_id)):
        raise ControlError(f"{queue_id} is not on hold")


# -- the spool directory ---------------------------------------------------------

@contextlib.contextmanager
def as_spool_owner(path):
    """Within this block, when running as root and the spool at ``path``
    belongs to another user, have that user's effective ids and groups.

    Effective ids only, put back on the way out: the tool's own caller (a
    test, a script importing :func:`main`) goes on as root.
    """
    try:
        owner = os.stat(path) if os.geteuid() == 0 else None
    except OSError:
        owner = None        # no spool: the command says so in its words
    if owner is None or owner.st_uid == 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    # Groups first, then the gid, then the uid: each needs root.
    os.setgroups([owner.st_gid])
    os.setegid(owner.st_gid)
    os.seteuid(owner.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def _readable_spool(path):
    if not os.path.isdir(path):
        raise ToolError(f"no spool at {path}")
    return Spool(path)


def _check_spool(path):
    """Refuse a directory that is not a spool the daemon has laid out:
    the tool changes files only where the daemon put them."""
    _readable_spool(path)
    for name in _SPOOL_DIRECTORIES:
        if not os.path.isdir(os.path.join(path, name)):
            raise ToolError(f"{path} is not a relaymail spool (it has no {name}/); "
                            "has relaymail run on it?")


if __name__ == "__main__":
    sys.exit(main())
