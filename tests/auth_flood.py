"""A password-guessing flood against a running relay, for tests and benchmarks.

:class:`Flood` runs ``sessions`` SMTP sessions from loopback addresses in
a thread of its own (asyncio), each sending ``AUTH PLAIN`` with a wrong
password as soon as the previous reply came, or ``interval`` seconds after
its previous guess if that is later, and reconnecting when the relay
closes it.  It counts the replies by their first line.

:class:`FloodProcess` runs one in a process of its own at a lower CPU
priority (nice 10): a real attacker's client runs on the attacker's
machines, and the flood should not take the relay's CPU, nor the GIL of
the process timing a login, as a test artefact.  Run as a script
(``python -m tests.auth_flood PORT SESSIONS INTERVAL [SOURCE]``) it prints
``ready`` once every session has sent an AUTH and one has been refused
after hashing, floods until its
standard input closes, then prints the reply counts as JSON.
"""

import asyncio
import base64
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time

WRONG = base64.b64encode(b"\0alice\0wrong guess").decode()


def auth_plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Flood:
    def __init__(self, port, sessions, interval=0.0, source="127.0.0.1", host="127.0.0.1"):
        self.port = port
        self.sessions = sessions
        self.interval = interval
        # One address, or several separated by commas (a flood from many
        # addresses): session N uses the Nth, round and round.
        self.sources = source.split(",")
        self.host = host
        self.replies = collections.Counter()
        self.guessing = set()         # sessions that have sent an AUTH
        self.hashed = False           # a guess has been refused with 535
        self._stop = None
        self._loop = None
        self._thread = None

    def start(self):
        started = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._stop = asyncio.Event()
            started.set()
            self._loop.run_until_complete(self._run())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="auth-flood", daemon=True)
        self._thread.start()
        started.wait()
        return self

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def wait_until_flooding(self, timeout):
        """Until every session has sent a guess and one guess has been
        hashed and refused (a 535): the flood is in full swing."""
        deadline = time.monotonic() + timeout
        while len(self.guessing) < self.sessions or not self.hashed:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.guessing)} flood sessions got going, "
                                     f"hashed: {self.hashed}")
            time.sleep(0.05)
    async def _run(self):
        tasks = [asyncio.ensure_future(self._session(i)) for i in range(self.sessions)]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _session(self, number):
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port,
                    local_addr=(self.sources[number % len(self.sources)], 0))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            try:
                await self._guess(number, reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

    async def _guess(self, number, reader, writer):
        line = await reader.readline()
        if not line.startswith(b"220 "):
            self.replies[line.strip().decode(errors="replace")] += 1
            return
        writer.write(b"EHLO flood.test\r\n")
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"250 "):
                break
        loop = asyncio.get_running_loop()
        while line:
            sent = loop.time()
            writer.write(f"AUTH PLAIN {WRONG}\r\n".encode())
            self.guessing.add(number)
            line = await reader.readline()
            if not line:
                return
            self.replies[line.strip().decode(errors="replace")] += 1
            self.hashed = self.hashed or line.startswith(b"535 ")
            if line.startswith(b"421"):
                return
            await asyncio.sleep(sent + self.interval - loop.time())


class FloodProcess:
    """A :class:`Flood` in a niced child process; ``replies`` after stop()."""

    def __init__(self, port, sessions, interval=0.0, source="127.0.0.1", timeout=120):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.auth_flood", str(port), str(sessions), str(interval),
             source],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root, env=env,
            preexec_fn=lambda: os.nice(10))
        self.replies = None
        self._timeout = timeout

    def wait_until_flooding(self):
        line = self.process.stdout.readline()
        if line != b"ready\n":
            self.process.kill()
            raise AssertionError(f"flood did not get going: {line!r}")

    def stop(self):
        if self.replies is not None:
            return
        # communicate() closes stdin: the child's cue to stop.
        out, _ = self.process.communicate(timeout=self._timeout)
        self.replies = json.loads(out) if out.strip() else {}


def main(argv):
    port, sessions, interval = int(argv[0]), int(argv[1]), float(argv[2])
    source = argv[3] if len(argv) > 3 else "127.0.0.1"
    flood = Flood(port, sessions, interval, source=source).start()
    try:
        flood.wait_until_flooding(120)
        print("ready", flush=True)
        sys.stdin.read()
    finally:
        flood.stop()
    print(json.dumps(dict(flood.replies)), flush=True)


def timed_login(port, user, password, source, host="127.0.0.1", timeout=30):
    """Connect from ``source``, EHLO, then time one AUTH PLAIN: (reply
    line, seconds from sending AUTH to its reply)."""
    with socket.create_connection((host, port), timeout, source_address=(source, 0)) as s:
        stream = s.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        s.sendall(b"EHLO good.test\r\n")
        while not stream.readline().startswith(b"250 "):
            pass
        started = time.monotonic()
        s.sendall(f"AUTH PLAIN {auth_plain(user, password)}\r\n".encode())
        line = stream.readline()
        return line, time.monotonic() - started


def rss_kib(pid):
    """The process's resident set size (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class RSSSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread."""

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self._done.wait(self.interval)


if __name__ == "__main__":
    main(sys.argv[1:])
