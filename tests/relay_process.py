"""Run the real relay (``twistd -n relaymail``) on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import time

from tests import queue_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd(*args, cwd=None, timeout=30, options=(), preexec_fn=None):
    """Run twistd to completion (for --help and bad configs); ``options``
    are twistd's own (``--uid``), given before the plugin name;
    ``preexec_fn`` runs in the child before twistd (to set resource limits)."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", *options, "relaymail", *args], cwd=cwd or REPO,
                          env=_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def _env():
    env = dict(os.environ)
    # The checkout's code and its twisted/plugins dropin, not a stale install.
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class RelayProcess:
    """The relay with a config written from ``sections`` (dict of section
    name -> dict of keys), listening on 127.0.0.1:``port``."""

    def __init__(self, workdir, sections):
        self.workdir = str(workdir)
        self.port = free_port()
        self.spool = os.path.join(self.workdir, "spool")
        self.log_path = os.path.join(self.workdir, "relaymail.log")
        base = {
            "server": {"listen": f"tcp:{self.port}:interface=127.0.0.1", "hostname": "relay.test"},
            "queue": {"path": self.spool},
            # Tests never reach outside the machine: unless a test names a
            # next hop, mail waits for a loopback port where nobody listens.
            "delivery": {"smarthost": f"[127.0.0.1]:{free_port()}"},
        }
        for section, keys in sections.items():
            base.setdefault(section, {}).update(keys)
        self.config = os.path.join(self.workdir, "relaymail.ini")
        with open(self.config, "w") as f:
            for section, keys in base.items():
                f.write(f"[{section}]\n")
                for key, value in keys.items():
                    f.write(f"{key} = {value}\n")
        self.process = None
        self.extra_args = []
        self.host = "127.0.0.1"
        self.preexec_fn = None      # run in the child before twistd
        self.environment = {}       # variables added to the relay's

    def start(self, timeout=20):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *self.extra_args, "relaymail", "--config", self.config],
            cwd=self.workdir, env={**_env(), **self.environment}, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), 2) as probe:
                    # A whole polite session, so the relay has let go of
                    # it (connection limits) before a test starts.
                    probe.recv(512)
                    probe.sendall(b"QUIT\r\n")
                    while probe.recv(512):
                        pass
                    return self
            except OSError:
                time.sleep(0.05)
        # Not left running (a test that fails here never reaches its stop):
        # a relay that never listened would go on restarting its workers.
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"relay did not listen:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)
            self._wait_for_the_workers()
        self._log.close()

    def _wait_for_the_workers(self, timeout=15):
        """Workers outlive a killed master for a moment, holding the spool
        lock: wait until it is free, so a test may start a relay again."""
        from relaymail.queue.lock import SpoolLock
        if not os.path.exists(os.path.join(self.spool, "lock")):
            return
        lock = SpoolLock(self.spool)
        deadline = time.monotonic() + timeout
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay's workers still hold {self.spool}")
            time.sleep(0.02)
        lock.release()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def active_files(self):
        return sorted(os.listdir(os.path.join(self.spool, "active")))

    def message(self, queue_id):
        """The message bytes of a queued message (its queue file up to the
        record: tests/queue_files.py)."""
        return queue_files.message_of(os.path.join(self.spool, "active"), queue_id)

    def record(self, queue_id, where="active"):
        """The record in force of a queued message."""
        return queue_files.record_of(os.path.join(self.spool, where), queue_id)

    def queued_ids(self, where="active"):
        """The ids of the messages in ``where``, sorted."""
        return sorted(name[:-4] for name in os.listdir(os.path.join(self.spool, where))
                      if name.endswith(".msg"))


def converse(port, data, timeout=10):
    """Send ``data`` in one write and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
