"""relaymail-bench: load an SMTP server with real SMTP sessions and report
how fast it takes mail.

::

    relaymail-bench --port 2525                         1000 messages, 20 sessions
    relaymail-bench --port 2525 --reuse --pid 4242      many per connection; server CPU, RSS
    relaymail-bench --port 2525 --chart out.png --concurrency 1,5,20,50
    relaymail-bench --port 2525 --idle 5000 --pid 4242  idle sessions: memory, NOOP
    relaymail-bench --port 2525 --messages 1 --size 104857600 --sessions 1 --pid 4242
    relaymail-bench --compare --messages 4000           beside Postfix (compare.py)

Any SMTP server will do; nothing else (no Postfix) is needed.  Each session
waits for the 220 greeting, says EHLO, and sends MAIL, RCPT (``--recipients``
of them) and DATA, then the message with its lines dot-stuffed (RFC 5321
4.5.2), and QUIT; with ``--reuse`` it keeps the connection and sends RSET
before each further message.  Commands are not pipelined: each waits for its
reply, as a simple client does.

What is measured:

- messages sent (a 250 after the final dot), over the wall-clock seconds from
  the first connection to the last reply: messages per second;
- latency, per message, from writing the final ``CRLF.CRLF`` to reading the
  reply to it, as p50/p95/p99 (nearest rank).  That is the point where the
  server holds the whole message and everything left is its own work: parse
  the end of data, write the message to stable storage, answer 250 (the
  relay's queue answers only after fsync).  Time before it is the client
  writing and the network; it would hide the cost a sender actually waits on
  for the server's durability, which is what the queue's contract costs;
- errors: every message that did not get its 250, counted by the first line
  of the reply that refused it (or of the connection problem);
- with ``--pid``, the server's CPU time (utime + stime from
  ``/proc/PID/stat``, with its live descendants and the children it reaped:
  a relaymail master and its workers) used during the run, per message
  sent, and the peak of the whole tree's ``VmRSS`` from
  ``/proc/PID/status``, sampled every 50 ms.

It is bounded: it sends exactly ``--messages`` messages (each counted once,
sent or error), opens connections only to ``--host``:``--port``, and stops
after ``--timeout`` seconds whatever the server does, reporting what it has.

Exit status: 0 when every message got its 250; 1 when some did not or the
run timed out; 2 for a usage error (including ``--chart`` without
matplotlib, the ``bench`` extra).
"""

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import sys
import time

PROGRAM = "relaymail-bench"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# The EHLO name: .invalid is reserved and never resolves (RFC 2606 2).
HELO_NAME = "relaymail-bench.invalid"

# How often the server's resident memory is looked at with --pid.
RSS_INTERVAL = 0.05

# Levels drawn by --chart when --concurrency is not given.
DEFAULT_LEVELS = (1, 5, 20, 50)

# Body lines: 76 characters and CRLF, under RFC 5322's 78.
LINE = b"x" * 76 + b"\r\n"


class UsageError(Exception):
    """A problem with the command line, told in one line; exit status 2."""


class Refused(Exception):
    """The server's reply was not the one the dialogue needs."""

    def __init__(self, reply):
        super().__init__(reply.first_line)
        self.reply = reply


class Reply(collections.namedtuple("Reply", "code first_line")):
    """A server reply: its code and its first line (code included)."""

    @property
    def positive(self):
        return 200 <= self.code < 300


# ---------------------------------------------------------------- the message


def make_body(size):
    """A body of exactly ``size`` bytes of CRLF-ended lines, the second of
    which begins with a dot so that the server's dot-unstuffing is
    exercised as mail from real clients exercises it."""
    lines = LINE * (size // len(LINE) + 1)
    body = lines[:size]
    if size >= 2:
        body = body[:-2] + b"\r\n"
    if size > len(LINE):
        body = body[:len(LINE)] + b"." + body[len(LINE) + 1:]
    return body


def dot_stuff(data):
    """``data`` with a dot added before every line that begins with one
    (RFC 5321 4.5.2), so that no line of the message reads as the end."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\n.", b"\n..")


def make_message(sender, recipients, size):
    """The message as it goes after DATA, dot-stuffed, without the line end
    that the final ``CRLF.CRLF`` supplies."""
    headers = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
               f"Subject: {PROGRAM}\r\n\r\n").encode()
    message = dot_stuff(headers + make_body(size))
    return message[:-2] if message.endswith(b"\r\n") else message


def recipient_list(address, count):
    """``count`` recipients: ``address`` itself for one, else its local part
    numbered from 1 (b1@example.net, b2@example.net, ...)."""
    if count == 1:
        return [address]
    local, _, domain = address.rpartition("@")
    return [f"{local}{n}@{domain}" for n in range(1, count + 1)]


# ---------------------------------------------------------------- the wire


class Connection:
    """One SMTP client connection: commands out, replies in."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host, port):
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def reply(self):
        """Read one reply, all its lines; raise ConnectionError at EOF."""
        first = None
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("connection closed by the server")
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                raise ConnectionError(f"malformed reply: {text[:80]}")
            first = first or text
            if text[3:4] != "-":
                return Reply(int(text[:3]), first)

    async def command(self, line):
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def expect(self, line, code=None):
        """Send ``line``; raise Refused unless the reply is ``code`` (any
        2xx when None)."""
        reply = await self.command(line)
        wanted = reply.code == code if code else reply.positive
        if not wanted:
            raise Refused(reply)
        return reply

    async def quit(self):
        """Say QUIT, read the reply, close; drop the connection instead if
        the run ends (timeout) while the server is slow to answer."""
        try:
            await self.command("QUIT")
        except (OSError, ConnectionError):
            pass
        except BaseException:
            self.abort()
            raise
        self.writer.close()

    def abort(self):
        """Drop the connection at once, without waiting for anything."""
        self.writer.transport.abort()


async def greet(host, port):
    """Connect, wait for the 220 and say EHLO; return the connection."""
    connection = await Connection.open(host, port)
    try:
        greeting = await connection.reply()
        if greeting.code != 220:
            raise Refused(greeting)
        await connection.expect(f"EHLO {HELO_NAME}", 250)
    except BaseException:
        connection.abort()
        raise
    return connection


async def transaction(connection, sender, recipients, message):
    """Send one message; return the seconds from final dot to its 250."""
    await connection.expect(f"MAIL FROM:<{sender}>")
    for recipient in recipients:
        await connection.expect(f"RCPT TO:<{recipient}>")
    await connection.expect("DATA", 354)
    connection.writer.write(message)
    # The message must have left before the clock starts, so that a large
    # one does not count its own transfer as the server's time.
    await connection.writer.drain()
    started = time.perf_counter()
    connection.writer.write(b"\r\n.\r\n")
    reply = await connection.reply()
    elapsed = time.perf_counter() - started
    if reply.code != 250:
        raise Refused(reply)
    return elapsed


# ---------------------------------------------------------------- the load


class Tally:
    """What a run has done so far: messages left to send, and outcomes."""

    def __init__(self, messages):
        self.left = messages
        self.latencies = []
        self.errors = collections.Counter()

    def take(self):
        """Claim the next message; False when all have been claimed."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def failed(self, problem):
        """Count a message that got no 250, under the first line of why."""
        text = str(problem) or type(problem).__name__
        self.errors[text.splitlines()[0]] += 1


async def one_per_connection(settings, tally, message):
    """A session that opens a connection per message and QUITs after it."""
    while tally.take():
        try:
            connection = await greet(settings.host, settings.port)
        except (OSError, ConnectionError, Refused) as problem:
            tally.failed(problem)
            continue
        try:
            tally.latencies.append(await transaction(connection, settings.sender,
                                                     settings.recipients, message))
        except (OSError, ConnectionError, Refused) as problem:
            tally.failed(problem)
        except BaseException:
            connection.abort()
            raise
        await connection.quit()


async def reused_connection(settings, tally, message):
    """A session that sends message after message on one connection, RSET
    before each after the first; a new connection only when the server
    closed or refused the last one (421)."""
    connection = None
    try:
        while tally.take():
            try:
                if connection is None:
                    connection = await greet(settings.host, settings.port)
                else:
                    await connection.expect("RSET")
                tally.latencies.append(await transaction(connection, settings.sender,
                                                         settings.recipients, message))
            except Refused as refused:
                tally.failed(refused)
                if refused.reply.code == 421 and connection is not None:
                    connection.abort()
                    connection = None
            except (OSError, ConnectionError) as problem:
                tally.failed(problem)
                if connection is not None:
                    connection.abort()
                    connection = None
    except BaseException:
        if connection is not None:
            connection.abort()
        raise
    if connection is not None:
        await connection.quit()


# ---------------------------------------------------------------- the server


def clock_ticks():
    return os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name, in parentheses, may hold spaces: count from after it.
    # fields[0] is field 3 of proc(5).
    return stat[stat.rindex(")") + 2:].split()


def process_tree(pid):
    """``pid`` and its live descendants: a relaymail master and its
    workers (docs/architecture.rst)."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent = int(_stat_fields(name)[1])
            except (OSError, IndexError, ValueError):
                continue        # gone meanwhile
            children.setdefault(parent, []).append(int(name))
    tree, waiting = [], [pid]
    while waiting:
        each = waiting.pop()
        tree.append(each)
        waiting.extend(children.get(each, ()))
    return tree


def cpu_seconds(pid):
    """CPU seconds (user and system) of ``pid``, its live descendants and
    the children it has reaped (a worker that was restarted)."""
    total = 0
    for each in process_tree(pid):
        try:
            fields = _stat_fields(each)
        except OSError:
            continue
        # utime, stime, cutime and cstime are fields 14 to 17.
        total += sum(int(value) for value in fields[11:15])
    return total / clock_ticks()


def rss_bytes(pid):
    """``VmRSS`` of ``pid`` and its live descendants, in bytes."""
    total = 0
    for each in process_tree(pid):
        try:
            total += process_rss(each)
        except OSError:
            continue        # gone meanwhile
    return total


def process_rss(pid):
    """``VmRSS`` of ``pid`` alone, in bytes (0 for a process without memory)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class ServerWatch:
    """The server process's CPU over a run and its peak resident memory."""

    def __init__(self, pid):
        self.pid = pid
        self.cpu_start = cpu_seconds(pid)
        self.cpu = None
        self.peak_rss = self.start_rss = rss_bytes(pid)

    async def sample(self):
        while True:
            await asyncio.sleep(RSS_INTERVAL)
            self._look()

    def _look(self):
        try:
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
        except OSError:
            pass        # it has exited; the report says what was seen

    def finish(self):
        self._look()
        try:
            self.cpu = cpu_seconds(self.pid) - self.cpu_start
        except OSError:
            self.cpu = None


# ---------------------------------------------------------------- one run


async def run(settings, sessions, timeout):
    """Send ``settings.messages`` messages over ``sessions`` concurrent
    sessions within ``timeout`` seconds; return the report as a dict."""
    tally = Tally(settings.messages)
    message = make_message(settings.sender, settings.recipients, settings.size)
    session = reused_connection if settings.reuse else one_per_connection
    watch = ServerWatch(settings.pid) if settings.pid else None
    sampler = asyncio.ensure_future(watch.sample()) if watch else None
    started = time.perf_counter()
    timed_out = False
    try:
        await asyncio.wait_for(
            asyncio.gather(*(session(settings, tally, message)
                             for _ in range(min(sessions, settings.messages)))),
            timeout)
    except asyncio.TimeoutError:
        timed_out = True
    seconds = time.perf_counter() - started
    if sampler:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        watch.finish()
    return report(settings, sessions, tally, seconds, timed_out, watch)


def percentile(ordered, p):
    """The nearest-rank ``p``th percentile of the sorted list ``ordered``."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def report(settings, sessions, tally, seconds, timed_out, watch):
    ordered = sorted(tally.latencies)
    sent = len(ordered)

    def ms(p):
        value = percentile(ordered, p)
        return None if value is None else round(value * 1000, 3)

    result = {
        "host": settings.host, "port": settings.port, "sessions": sessions,
        "messages": settings.messages, "size": settings.size,
        "recipients": len(settings.recipients), "reuse": settings.reuse,
        "sent": sent, "errors": sum(tally.errors.values()),
        "error_replies": dict(tally.errors.most_common()),
        "unfinished": settings.messages - sent - sum(tally.errors.values()),
        "timed_out": timed_out,
        "seconds": round(seconds, 3),
        "messages_per_second": round(sent / seconds, 1) if seconds > 0 else None,
        "latency_ms": {"p50": ms(50), "p95": ms(95), "p99": ms(99)},
    }
    if watch:
        result["server"] = {
            "pid": watch.pid,
            "cpu_seconds": None if watch.cpu is None else round(watch.cpu, 3),
            "cpu_ms_per_message": (round(watch.cpu * 1000 / sent, 3)
                                   if sent and watch.cpu is not None else None),
            "peak_rss_bytes": watch.peak_rss,
            "start_rss_bytes": watch.start_rss,
        }
    return result


def describe(result):
    """The report as a few lines of text."""
    latency = result["latency_ms"]

    def ms(value):
        return "-" if value is None else f"{value:.2f} ms"

    mode = "reused connections" if result["reuse"] else "a connection per message"
    lines = [
        f"{result['sessions']} sessions, {result['size']} bytes, "
        f"{result['recipients']} recipient(s), {mode}",
        f"sent        {result['sent']} of {result['messages']} in {result['seconds']:.3f} s: "
        f"{result['messages_per_second']} messages/s",
        f"latency     p50 {ms(latency['p50'])}, p95 {ms(latency['p95'])}, "
        f"p99 {ms(latency['p99'])} (final dot to reply)",
        f"errors      {result['errors']}",
    ]
    lines += [f"            {count} {why}" for why, count in result["error_replies"].items()]
    if result["timed_out"]:
        lines.append(f"timed out   {result['unfinished']} messages not finished")
    server = result.get("server")
    if server:
        cpu = "-" if server["cpu_seconds"] is None else f"{server['cpu_seconds']:.2f} s"
        per = server["cpu_ms_per_message"]
        lines.append(f"server      pid {server['pid']}: CPU {cpu}, "
                     f"{'-' if per is None else f'{per:.2f} ms'} per message, "
                     f"peak RSS {server['peak_rss_bytes'] / 2**20:.1f} MiB "
                     f"({(server['peak_rss_bytes'] - server['start_rss_bytes']) / 2**20:+.1f} MiB "
                     f"during the run)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the chart


def load_pyplot():
    """matplotlib's pyplot on a file-only backend, or UsageError."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise UsageError("--chart needs matplotlib: pip install relaymail[bench]") from None
    return pyplot


def draw_chart(pyplot, results, path):
    """Throughput and p99 latency against concurrency, on two y axes."""
    levels = [r["sessions"] for r in results]
    figure, throughput = pyplot.subplots(figsize=(7, 4.5))
    throughput.plot(levels, [r["messages_per_second"] or 0 for r in results],
                    "o-", color="tab:blue")
    throughput.set_xlabel("concurrent sessions")
    throughput.set_ylabel("messages per second", color="tab:blue")
    latency = throughput.twinx()
    latency.plot(levels, [r["latency_ms"]["p99"] or 0 for r in results], "s--", color="tab:red")
    latency.set_ylabel("p99 final dot to reply (ms)", color="tab:red")
    first = results[0]
    mode = "reuse" if first["reuse"] else "new connection per message"
    throughput.set_title(f"{first['host']}:{first['port']}: {first['messages']} messages of "
                         f"{first['size']} bytes, {mode}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# ---------------------------------------------------------------- command line


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Load an SMTP server and report messages per second, "
        "latency from final dot to reply, and the server's CPU and memory.")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="server port (needed but with --compare)")
    parser.add_argument("--sessions", type=_positive, default=20,
                        help="concurrent sessions (default 20)")
    parser.add_argument("--messages", type=_positive, default=1000,
                        help="messages to send in all (default 1000)")
    parser.add_argument("--size", type=_count, default=4096,
                        help="message body bytes (default 4096)")
    parser.add_argument("--recipients", dest="recipient_count", metavar="N",
                        type=_positive, default=1,
                        help="recipients per message (default 1)")
    parser.add_argument("--reuse", action="store_true",
                        help="many messages per connection, RSET between")
    parser.add_argument("--from", dest="sender", default="a@example.org",
                        help="envelope sender (default a@example.org)")
    parser.add_argument("--to", dest="recipient", default="b@example.net",
                        help="recipient; numbered (b1@, b2@...) for several (default b@example.net)")
    parser.add_argument("--pid", type=_positive,
                        help="server process: report its CPU time and peak RSS")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for the whole run (default 60)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="draw throughput and p99 against --concurrency (needs matplotlib)")
    parser.add_argument("--idle", type=_positive, metavar="N",
                        help="hold N sessions open after EHLO instead: memory per idle "
                             "session (with --pid) and NOOP latency beside them")
    parser.add_argument("--compare", action="store_true",
                        help="run ../shared/bench/compare.py (relaymail beside Postfix) with "
                             "these sessions, messages, size, recipients and --reuse")
    parser.add_argument("--compare-mode", choices=("accept", "relay"), default="accept",
                        help="compare.py's mode (default accept)")
    parser.add_argument("--concurrency", type=_levels,
                        help="comma-separated session counts to run in turn (default for "
                             "--chart: 1,5,20,50)")
    return parser


def _count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {text}")
    return value


def _levels(text):
    try:
        return [_positive(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected session counts like 1,5,20,50, got {text}")


def _settings(args):
    if args.port is None and not args.compare:
        raise UsageError("--port is needed (the server to load)")
    if args.pid and not os.path.exists(f"/proc/{args.pid}/stat"):
        raise UsageError(f"--pid {args.pid}: no such process")
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    args.recipients = recipient_list(args.recipient, args.recipient_count)
    return args


async def run_levels(settings, levels):
    """One run per concurrency level, all within ``settings.timeout``."""
    deadline = time.monotonic() + settings.timeout
    results = []
    for sessions in levels:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        results.append(await run(settings, sessions, left))
    return results


def main(argv=None, out=None, err=None):
    """Run the benchmark; return the exit status.

    :param argv: the arguments, without the program name (``sys.argv`` when None).
    :param out: where the report goes (``sys.stdout`` when None).
    :param err: where problems go (``sys.stderr`` when None).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:
        return exit.code
    try:
        settings = _settings(args)
        pyplot = load_pyplot() if args.chart else None
    except UsageError as problem:
        err.write(f"{PROGRAM}: {problem}\n")
        return EXIT_USAGE
    if args.compare:
        from relaymail.tools import bench_compare
        try:
            return bench_compare.run_compare(settings, out)
        except bench_compare.CannotCompare as problem:
            err.write(f"{PROGRAM}: --compare: {problem}\n")
            return EXIT_USAGE
    if args.idle:
        from relaymail.tools import bench_idle
        result = asyncio.run(bench_idle.run_idle(settings, args.idle))
        out.write(json.dumps(result) + "\n" if args.json else bench_idle.describe(result))
        return EXIT_OK if result["idle_sessions"] == args.idle else EXIT_FAILED
    levels = args.concurrency or (list(DEFAULT_LEVELS) if args.chart else [args.sessions])
    results = asyncio.run(run_levels(settings, levels))
    if pyplot:
        draw_chart(pyplot, results, args.chart)
    if args.json:
        out.write(json.dumps(results[0] if len(levels) == 1 else {"runs": results}) + "\n")
    else:
        out.write("\n".join(describe(result) for result in results))
    complete = len(results) == len(levels)
    ok = complete and all(r["sent"] == r["messages"] for r in results)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
