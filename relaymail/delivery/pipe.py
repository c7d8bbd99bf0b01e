"""The ``pipe`` transport: hand a message to a command (Postfix pipe(8)).

The site names its commands, never the mail: ``[plugin:pipe]`` holds
``command.NAME = TEMPLATE`` lines (read by :mod:`relaymail.plugins.pipe`),
and a Route ``("pipe", "NAME")`` or ``("pipe", "NAME:ARGUMENT")`` picks one.
A template is split into words once, at start-up, as a POSIX shell would
split it (``shlex``), but no shell ever runs: each word is then filled in
on its own, so an address with spaces, quotes or ``;`` stays one argument
and is never interpreted.  The fields:

``{sender}``     the envelope sender (``null_sender``, MAILER-DAEMON as in
                 Postfix, for ``<>``)
``{recipient}``  the recipient address
``{local_part}`` and ``{domain}`` its two halves (the local part unquoted,
                 as Postfix's ``${mailbox}``: ``"john doe"@x`` gives
                 ``john doe``)
``{queue_id}``   the message's queue id
``{nexthop}``    the route's ARGUMENT after ``NAME:`` (empty without one)

A template with a per-recipient field (``{recipient}``, ``{local_part}``,
``{domain}``) runs once per recipient, one after the other; otherwise once
for all of the job's recipients, who then share its outcome.  The message
goes to the command's standard input (with LF line ends, as Postfix's pipe
writes them, unless ``newline = crlf``; a BINARYMIME message exactly as
received, since its CR LF pairs may be data), through the reactor's process
support: nothing blocks.  An address that starts with ``-`` is refused
(5.1.3) before any command runs, as Postfix's ``allow_min_user = no``
does, so that no address can pass itself off as an option.

The command runs as the relay's user, in ``directory``, with a small
environment: ``PATH``, the variables ``export_environment`` names copied
from the relay's own (Postfix's export_environment), and ``env.NAME``
values.  It has ``timeout`` seconds; past them it is killed and the
recipients deferred.

The exit status is read as sendmail's sysexits(3), the way Postfix's
sys_exits.c does: 0 delivered; EX_TEMPFAIL (75) and EX_OSERR (71) deferred
(4.3.0); the other sysexits codes bounce with their own status (EX_NOUSER
67 5.1.1, EX_NOHOST 68 5.1.2, EX_DATAERR 65 5.6.0, EX_CANTCREAT 73 5.2.0,
EX_NOPERM 77 5.7.0, EX_CONFIG 78 5.3.5 ...), and any other status bounces
with 5.3.0, "unknown mail system error".  A command killed by a signal,
one that cannot be started or a timeout defers.  The first line of what
the command wrote (standard error, else standard output; at most
:data:`MAX_OUTPUT` bytes are read, control characters escaped) goes into
the reason, for the log and the bounce.
"""

import os
import shlex
import shutil
import signal
import string

from twisted.internet import defer, error, protocol, threads
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from zope.interface import implementer

from relaymail import sanitize
from relaymail.address import AddressError, parse_forward_path
from relaymail.interfaces import ITransport, RecipientOutcome

log = Logger(namespace="relaymail.delivery")

#: The fields a template may use; the first three make it run per recipient.
PER_RECIPIENT = ("recipient", "local_part", "domain")
FIELDS = PER_RECIPIENT + ("sender", "queue_id", "nexthop")

#: Output kept from a command for its reason: Postfix keeps a limited
#: amount too; a command printing without end must not fill our memory.
MAX_OUTPUT = 4096
#: The longest first line quoted in a reason.
MAX_LINE = 200

#: util-linux's setsid(1), which starts each command in a session (and so a
#: process group) of its own; None where it is missing.
_SETSID = shutil.which("setsid", path="/usr/bin:/bin")

#: Seconds beyond the commands' own limits before the runner gives up on a
#: delivery: room for starting the commands and reading their outcomes.
_TIME_LIMIT_SLACK = 5.0

# sysexits(3) as Postfix's sys_exits.c maps them: status, RFC 3463 code,
# text.  A code whose status starts with 4 is a soft error.
SYSEXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}


class Template:
    """One ``command.NAME`` value: argv words, each with its fields.

    :raise ValueError: for a template that does not split, is empty, does
        not start with an absolute path, or uses an unknown field.
    """

    def __init__(self, text):
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot split {text!r} into words: {exc}") from None
        if not words:
            raise ValueError("an empty command")
        fields = set()
        for word in words:
            for _literal, field, spec, conversion in string.Formatter().parse(word):
                if field is None:
                    continue
                if field not in FIELDS or spec or conversion:
                    raise ValueError(
                        f"unknown field {{{field}}} in {word!r}; the fields are "
                        + ", ".join(f"{{{name}}}" for name in FIELDS)
                        + " (write {{ and }} for braces)")
                fields.add(field)
        if "{" in words[0] or not os.path.isabs(words[0]):
            raise ValueError(f"the command must be an absolute path, not {words[0]!r}")
        self.words = words
        #: The fields the template names.
        self.fields = frozenset(fields)
        self.per_recipient = bool(fields.intersection(PER_RECIPIENT))

    def argv(self, values):
        """The argument vector with ``values`` (field -> str) filled in.
        A value is inserted as it is, never parsed again."""
        return [word.format_map(values) for word in self.words]


@implementer(ITransport)
class PipeTransport:
    """The built-in ``pipe`` transport (see the module docstring).

    :param commands: NAME -> :class:`Template`.
    :param environment: the child's whole environment, a dict.
    """

    name = "pipe"
    description = "delivers to the commands [plugin:pipe] defines (Postfix pipe)"

    def __init__(self, commands, environment, directory="/", timeout=1000.0,
                 null_sender="MAILER-DAEMON", crlf=False, reactor=None):
        self.commands = dict(commands)
        self._environment = {k.encode(): v.encode() for k, v in environment.items()}
        self._directory = directory
        self._timeout = timeout
        self._null_sender = null_sender
        self._crlf = crlf
        self._reactor = reactor

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def time_limit(self, recipients, next_hop):
        """How long a delivery to ``recipients`` may take in all: one
        ``timeout`` per run of the command (one per recipient when its
        template names one), so that a job of several runs is not cut
        short -- and delivered again -- after some of them succeeded."""
        name = (next_hop or "default").partition(":")[0]
        template = self.commands.get(name)
        runs = len(recipients) if template is not None and template.per_recipient else 1
        return self._timeout * max(1, runs) + _TIME_LIMIT_SLACK

    def deliver(self, message, recipients, next_hop):
        """Run the command ``next_hop`` names; see the module docstring."""
        return defer.ensureDeferred(self._deliver(message, list(recipients), next_hop))

    async def _deliver(self, message, recipients, next_hop):
        name, _, argument = (next_hop or "default").partition(":")
        template = self.commands.get(name)
        if template is None:
            problem = (f"pipe: no command named {name!r} ([plugin:pipe] command.{name}; "
                       f"known: {', '.join(sorted(self.commands)) or 'none'})")
            log.error("{queue_id}: {problem}", queue_id=message.queue_id, problem=problem)
            return {r: RecipientOutcome.deferred(problem, "4.3.5") for r in recipients}
        sender = str(message.sender) if message.sender is not None else self._null_sender
        common = {"sender": sender, "queue_id": message.queue_id, "nexthop": argument}
        outcomes = {}
        runs = []
        for recipient in recipients:
            values = dict(common, **_recipient_fields(recipient))
            # Only the fields the command gets: a sender it never sees
            # cannot be read as an option by it.
            if any(value.startswith("-") for key, value in values.items()
                   if key in template.fields and key != "queue_id"):
                outcomes[recipient] = RecipientOutcome.bounced(
                    "pipe: an address may not start with '-' (it would read as an option)",
                    "5.1.3")
            elif template.per_recipient or not runs:
                runs.append(([recipient], values))
            else:
                runs[0][0].append(recipient)
        for group, values in runs:
            outcome = await self._run(message, name, template.argv(values))
            for recipient in group:
                outcomes[recipient] = outcome
        return outcomes

    async def _run(self, message, name, argv):
        if not os.access(argv[0], os.X_OK):
            problem = f"pipe: command {name}: {argv[0]} is not an executable file"
            log.error("{queue_id}: {problem}", queue_id=message.queue_id, problem=problem)
            return RecipientOutcome.deferred(problem, "4.3.5")
        reactor = self.reactor
        try:
            body = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), message.open)
        except OSError as exc:
            return RecipientOutcome.deferred(
                f"pipe: cannot read the message file: {exc.strerror or exc}", "4.3.0")
        # A BINARYMIME message has no lines to convert: its CR LF pairs
        # may be data (RFC 3030 3), so it goes as received.
        child = _Child(body, self._crlf or message.envelope.body == "BINARYMIME")
        try:
            # In a session of its own (setsid), so that a timeout kills
            # what the command started too, as Postfix's pipe(8) kills the
            # process group; otherwise a grandchild could still deliver a
            # message we then try again.
            launcher = [_SETSID, *argv] if _SETSID else argv
            reactor.spawnProcess(child, launcher[0], launcher, env=self._environment,
                                 path=self._directory)
            child.own_group = _SETSID is not None
        except OSError as exc:
            body.close()
            return RecipientOutcome.deferred(
                f"pipe: command {name}: cannot start: {exc.strerror or exc}", "4.3.0")
        timer = reactor.callLater(self._timeout, child.kill)
        try:
            status = await child.exited
        finally:
            if timer.active():
                timer.cancel()
        return _outcome(name, status, child)


def _recipient_fields(recipient):
    try:
        mailbox = parse_forward_path(f"<{recipient}>", smtputf8=True)
        # Unquoted: the command wants the mailbox name, not SMTP syntax.
        local, domain = mailbox.local_text, mailbox.domain
    except AddressError:
        local, _, domain = recipient.rpartition("@")
    return {"recipient": recipient, "local_part": local, "domain": domain}


def _outcome(name, status, child):
    said = child.first_line()
    tail = f": {said}" if said else ""
    if child.timed_out:
        return RecipientOutcome.deferred(f"pipe: command {name}: time limit exceeded{tail}",
                                         "4.3.0")
    if status.signal is not None:
        return RecipientOutcome.deferred(
            f"pipe: command {name}: killed by signal {status.signal}{tail}", "4.3.0")
    code = status.exit_code
    if code == 0:
        return RecipientOutcome.delivered(f"delivered via {name} command{tail}")
    enhanced, text = SYSEXITS.get(code, ("5.3.0", f"unknown mail system error {code}"))
    reason = f"pipe: command {name}: exit {code} ({text}){tail}"
    if enhanced.startswith("4"):
        return RecipientOutcome.deferred(reason, enhanced)
    return RecipientOutcome.bounced(reason, enhanced)


class _Status:
    def __init__(self, exit_code=None, signal=None):
        self.exit_code = exit_code
        self.signal = signal


class _Child(protocol.ProcessProtocol):
    """One command: the message to its stdin, its output kept (bounded),
    ``exited`` firing with a :class:`_Status` once it has exited."""

    def __init__(self, body, crlf):
        self._body = body
        self._crlf = crlf
        self.output = {1: b"", 2: b""}
        self.timed_out = False
        #: The command leads a process group of its own (it was started
        #: through setsid): a kill reaches all of it.
        self.own_group = False
        self.exited = defer.Deferred(lambda _: self.kill(timed_out=False))

    def connectionMade(self):
        source = self._body if self._crlf else _LFReader(self._body)
        sending = FileSender().beginFileTransfer(source, self.transport)
        # A command that exits without reading all of it closes the pipe
        # under us: what it says with its exit status is what counts.
        sending.addBoth(self._sent)

    def _sent(self, _):
        self._body.close()
        try:
            self.transport.closeStdin()
        except Exception:
            pass

    def childDataReceived(self, fd, data):
        if fd in self.output and len(self.output[fd]) < MAX_OUTPUT:
            self.output[fd] += data[:MAX_OUTPUT - len(self.output[fd])]

    def kill(self, timed_out=True):
        """Kill the command (and its process group); ``timed_out`` says
        why, for its outcome: False when a stop cancels the delivery."""
        self.timed_out = timed_out
        pid = getattr(self.transport, "pid", None)
        if self.own_group and pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processExited(self, reason):
        # processExited, not processEnded: a child of the command that keeps
        # our pipes open must not hold the delivery once the command is gone.
        value = reason.value
        status = _Status(getattr(value, "exitCode", None), getattr(value, "signal", None))
        if isinstance(value, error.ProcessDone):
            status = _Status(0)
        try:
            self.transport.loseConnection()
        except Exception:
            pass
        if not self.exited.called:
            self.exited.callback(status)

    def first_line(self):
        for fd in (2, 1):
            for line in self.output[fd].decode("utf-8", "replace").splitlines():
                if line.strip():
                    line = " ".join(line.split())
                    if len(line) > MAX_LINE:
                        line = line[:MAX_LINE] + "..."
                    return sanitize.escape(line)
        return ""


class _LFReader:
    """A file reading ``file`` with CRLF turned into LF, for FileSender."""

    def __init__(self, file):
        self._file = file
        self._carry = b""

    def read(self, size):
        chunk = self._file.read(size)
        if not chunk:
            rest, self._carry = self._carry, b""
            return rest
        data = self._carry + chunk
        # A CR at the end may be half of a CRLF split between two reads.
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        else:
            self._carry = b""
        return data.replace(b"\r\n", b"\n") or self.read(size)
