"""A private Postfix instance for tests: Debian's postfix, run on its own
configuration directory, queue, log file and loopback ports.

:class:`Postfix` writes main.cf and master.cf into a fresh directory (the
queue, data directory and log file inside it too), starts it with
``postfix -c DIR start``, and stops it with ``postfix -c DIR stop``.  The
machine's own Postfix (/etc/postfix, its queue, port 25) is not touched and
need not be running.  Nothing is chrooted, so absolute paths (a CA file, a
Dovecot auth socket) work as written.

``main`` is main.cf settings over the defaults below; ``services`` are
extra master.cf entries, each a list of lines (the service line, then
``-o name=value`` overrides), e.g. an smtpd on a loopback port:
``[f"127.0.0.1:{port} inet n - n - - smtpd"]``.  :meth:`sendmail` runs
Postfix's sendmail(1) against this instance (``MAIL_CONFIG``), as an
application would.  ``maillog_file`` is the instance's log (postlogd), read
with :meth:`log` and awaited with :meth:`wait_for_log`.

Postfix checks its directories at start and refuses to run from one owned
by someone else, so everything is made by root for the ``postfix`` user
(``mail_owner``) and ``postdrop`` group, as Debian's package has them.  A
Postfix that does not start raises with its output and log: tests fail,
never skip.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import time

POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"

# The services every instance needs (Debian's master.cf without its
# optional pipes), none chrooted; "postlog" is what maillog_file writes
# through.
_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _defaults(root):
    return {
        "compatibility_level": "3.6",
        "queue_directory": f"{root}/spool",
        "data_directory": f"{root}/data",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "postfix.test",
        "mydomain": "postfix.test",
        "myorigin": "$myhostname",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "maillog_file": f"{root}/maillog",
        "maillog_file_prefixes": root,
        # No DNS in tests: next hops are written [127.0.0.1]:port.
        "smtp_host_lookup": "native",
        "smtp_dns_support_level": "disabled",
        # Clients are "unknown[127.0.0.1]" whatever /etc/hosts says.
        "smtpd_peername_lookup": "no",
        "biff": "no",
        # Retry soon: tests wait for a deferred message only seconds.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
    }


class Postfix:
    """One private Postfix; :meth:`start`, then its smtpd services take
    mail on the ports ``services`` named."""

    def __init__(self, main=None, services=()):
        self.root = tempfile.mkdtemp(prefix="rm-postfix-")
        os.chmod(self.root, 0o755)
        self.config_directory = os.path.join(self.root, "etc")
        self.log_path = os.path.join(self.root, "maillog")
        self.main = {**_defaults(self.root), **(main or {})}
        self.services = [list(service) for service in services]
        self._started = False

    def _write_config(self):
        os.makedirs(self.config_directory)
        # The queue directory belongs to root, the data directory to the
        # mail owner.
        os.makedirs(self.main["queue_directory"], 0o755)
        os.makedirs(self.main["data_directory"], 0o700)
        owner = pwd.getpwnam(self.main["mail_owner"])
        os.chown(self.main["data_directory"], owner.pw_uid, owner.pw_gid)
        with open(os.path.join(self.config_directory, "main.cf"), "w") as file:
            for key, value in self.main.items():
                file.write(f"{key} = {value}\n")
        with open(os.path.join(self.config_directory, "master.cf"), "w") as file:
            file.write(_MASTER)
            for service in self.services:
                file.write(service[0] + "\n")
                for option in service[1:]:
                    file.write(f"  {option}\n")

    def postfix(self, *args, timeout=60):
        """Run postfix(1) on this instance; return the CompletedProcess."""
        return subprocess.run([POSTFIX, "-c", self.config_directory, *args],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout=20):
        assert os.access(POSTFIX, os.X_OK), (
            f"{POSTFIX} is missing: apt-get install -y postfix (make test-tools does)")
        assert os.geteuid() == 0, "a private Postfix instance needs root to start"
        self._write_config()
        # start checks the configuration first and makes the queue's
        # subdirectories with Postfix's own owners and modes (post-install).
        result = self.postfix("start")
        if result.returncode != 0:
            raise AssertionError(f"postfix start failed:\n{result.stdout}{result.stderr}\n{self.log()}")
        self._started = True
        self.wait_for_log("daemon started", timeout)
        return self

    def stop(self):
        if self._started:
            self._started = False
            result = self.postfix("stop")
            if result.returncode != 0:
                # Still the master's pid: end it ourselves.
                self.postfix("abort")
            self._wait_for_the_master()

    def _wait_for_the_master(self, timeout=10):
        pid_file = os.path.join(self.main["queue_directory"], "pid", "master.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(pid_file) as file:
                    pid = int(file.read().strip())
                os.kill(pid, 0)
            except (OSError, ValueError):
                return
            time.sleep(0.05)

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def sendmail(self, arguments, message, timeout=30):
        """Postfix's sendmail(1) with ``arguments``, ``message`` (bytes) on
        its standard input, injecting into this instance."""
        return subprocess.run([SENDMAIL, *arguments], input=message, capture_output=True,
                              env={**os.environ, "MAIL_CONFIG": self.config_directory},
                              timeout=timeout)

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                return file.read()
        except OSError as exc:
            return f"(no log: {exc})"

    def wait_for_log(self, text, timeout=20):
        """Wait until the log holds ``text``; return the log."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the Postfix log:\n{self.log()}")
            time.sleep(0.05)
        return self.log()
