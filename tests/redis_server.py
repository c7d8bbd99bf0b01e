"""A real ``redis-server`` for tests, on a free loopback port in a tmp dir.

Nothing is written to disk (``--save '' --appendonly no``).  A server that
cannot start fails the test that asked for it: the Debian package
``redis-server`` is in the Makefile's TEST_TOOLS.
"""

import shutil
import socket
import subprocess
import time

from tests.relay_process import free_port


class RedisServer:
    """``redis-server`` on 127.0.0.1, in ``workdir``; :meth:`start` again
    after :meth:`stop` brings it back on the same port (a restart)."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.port = free_port()
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=10):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; "
                               "make test-tools does it)")
        self._log = open(f"{self.workdir}/redis.log", "ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}:\n{self.log()}")
            if self.command("PING") == "+PONG":
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
        self._log.close()

    def command(self, *words):
        """Send one command in RESP and return the first line of the
        answer, or None when nobody listens: enough for PING, PTTL and
        DBSIZE, with no client library between the test and the server."""
        request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        try:
            with socket.create_connection(("127.0.0.1", self.port), 2) as s:
                s.sendall(request.encode())
                return s.makefile("rb").readline().decode().rstrip("\r\n")
        except OSError:
            return None

    def log(self):
        with open(f"{self.workdir}/redis.log", errors="replace") as f:
            return f.read()
