"""A real PostgreSQL server for tests, on a free loopback port in a tmp dir.

Debian's ``postgresql`` package (Makefile TEST_TOOLS) puts ``initdb`` and
``postgres`` in ``/usr/lib/postgresql/VERSION/bin``, off every PATH.
PostgreSQL refuses to run as root, so under root it runs as the
``postgres`` system user (``setpriv``, which execs: the process we signal
is the postmaster itself), in a directory made for that user.  A server
that cannot start raises with its log: the test fails, it never skips.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import psycopg

from tests.relay_process import free_port


def postgres_bin():
    """The newest installed server's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda path: int(path.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; "
                           "make test-tools does it)")
    return os.path.dirname(found[-1])


class PostgresServer:
    """``postgres`` on 127.0.0.1:``port``; :meth:`start` again after
    :meth:`stop` brings the same cluster back on the same port."""

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="relaymail-pg-")
        self.data = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "postgres.log")
        self.process = None
        self._as_user = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                             "--init-groups", "--"]

    def url(self, dbname="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def initdb(self):
        result = subprocess.run(
            [*self._as_user, f"{self.bin}/initdb", "-D", self.data, "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"initdb exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return self

    def start(self, timeout=30):
        self._log = open(self.log_path, "ab")
        # fsync off: a test cluster is thrown away, and a durable commit
        # per statement only slows the suite.
        self.process = subprocess.Popen(
            [*self._as_user, f"{self.bin}/postgres", "-D", self.data, "-p", str(self.port),
             "-h", "127.0.0.1", "-k", self.workdir, "-c", "fsync=off",
             "-c", "max_connections=50"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}:\n{self.log()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections:\n{self.log()}")

    def stop(self):
        """Fast shutdown (SIGINT): open sessions are cut, as when the
        database is restarted under a running relay."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            self.process.wait(30)
            self._log.close()
        self.process = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def execute(self, sql, dbname="postgres"):
        with psycopg.connect(self.url(dbname), autocommit=True) as connection:
            connection.execute(sql)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()
