"""A real Exim for tests: Debian's exim4-daemon-light, run from its unpacked
package.

Debian's exim4 packages conflict with postfix (both are the system's
mail-transport-agent), and the tests need both, so ``make test-tools``
unpacks the .deb (``apt-get download`` and ``dpkg -x``) into
``.cache/exim4`` of the checkout instead of installing it.  The binary is
built for the Debian-exim user, which only exim4-base's install script
makes: :class:`Exim` runs it in a mount namespace of its own
(``unshare --mount``) where /etc/passwd and /etc/group are copies that
have that user, as ``nobody``'s uid, so the machine's files stay as they
are.  Everything else -- configuration, spool, logs -- is in a fresh
directory, given with ``-C`` (root keeps root with -C, which the daemon
needs to bind and to switch to the Exim user), and ``exim_path`` points the
re-exec of deliveries at the unpacked binary.

The configuration accepts every recipient (except local parts starting
with ``refuse``, which get ``550 5.1.1``) and relays everything on to
``127.0.0.1:onward_port`` (a :class:`tests.nexthop.NextHop`, or
relaymail itself with Exim as its upstream), offering PIPELINING, 8BITMIME,
SMTPUTF8, CHUNKING and, with a certificate, STARTTLS.  With
``client_auth`` (user, password) and ``client_ca`` (PEM bytes) it logs in
to the onward hop, over STARTTLS it verifies.  A daemon that does not start fails the test with its log.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from tests.relay_process import REPO, free_port

EXIM = os.path.join(REPO, ".cache", "exim4", "usr", "sbin", "exim4")

_CONFIG = """\
exim_path = {exim}
exim_user = Debian-exim
exim_group = Debian-exim
primary_hostname = exim.test
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
# The L field on <= lines says whether the client pipelined.
log_selector = +pipelining +smtp_protocol_error +received_recipients
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
keep_environment =
smtputf8_advertise_hosts = *
chunking_advertise_hosts = *
pipelining_advertise_hosts = *
accept_8bitmime = true
message_size_limit = 100M
{tls}
acl_smtp_rcpt = check_rcpt

begin acl
check_rcpt:
  deny    local_parts = ^refuse
          message = 5.1.1 <$local_part@$domain>: no such user here
  accept

begin routers
onward:
  driver = manualroute
  route_list = * 127.0.0.1::{onward_port} byname
  self = send
  transport = onward_smtp

begin transports
onward_smtp:
  driver = smtp
  allow_localhost
  hosts_try_fastopen =
{onward}
"""

# With client_auth: the onward hop must take STARTTLS, its certificate
# chain checked against client_ca (not its name: it is 127.0.0.1), and AUTH
# PLAIN with these credentials.
_CLIENT_AUTH = """\
  hosts_require_tls = *
  tls_verify_hosts = *
  tls_verify_certificates = {ca}
  tls_verify_cert_hostnames =
  hosts_require_auth = *
  # Vouch for the envelope sender: Exim then sends MAIL ... AUTH=sender
  # (RFC 4954 5), as it does for mail its own clients submitted.
  authenticated_sender = $sender_address

begin authenticators
plain_client:
  driver = plaintext
  public_name = PLAIN
  client_send = ^{user}^{password}
"""


class Exim:
    """One Exim daemon; :meth:`start`, then :attr:`port` takes SMTP."""

    def __init__(self, onward_port, certificate=None, client_auth=None, client_ca=None):
        assert os.access(EXIM, os.X_OK), (
            f"{EXIM} is missing: make test-tools unpacks Debian's exim4-daemon-light there "
            "(apt-get download exim4-daemon-light; dpkg -x)")
        assert os.geteuid() == 0, "Exim's daemon needs root to switch to its user"
        self.root = tempfile.mkdtemp(prefix="rm-exim-")
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.onward_port = onward_port
        self.certificate = certificate
        self.client_auth = client_auth
        self.client_ca = client_ca
        self._process = None

    def _write_files(self):
        nobody = pwd.getpwnam("nobody")
        for name in ("spool", "log"):
            os.makedirs(os.path.join(self.root, name))
            os.chown(os.path.join(self.root, name), nobody.pw_uid, nobody.pw_gid)
        tls = "tls_advertise_hosts ="
        if self.certificate is not None:
            for name, pem in (("cert.pem", self.certificate.cert_pem),
                              ("key.pem", self.certificate.key_pem)):
                path = os.path.join(self.root, name)
                with open(path, "wb") as file:
                    file.write(pem)
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
                os.chmod(path, 0o600)
            tls = (f"tls_advertise_hosts = *\ntls_certificate = {self.root}/cert.pem\n"
                   f"tls_privatekey = {self.root}/key.pem")
        onward = ""
        if self.client_auth is not None:
            ca = os.path.join(self.root, "client-ca.pem")
            with open(ca, "wb") as file:
                file.write(self.client_ca)
            user, password = self.client_auth
            onward = _CLIENT_AUTH.format(ca=ca, user=user, password=password)
        self.config = os.path.join(self.root, "exim.conf")
        with open(self.config, "w") as file:
            file.write(_CONFIG.format(exim=EXIM, root=self.root, port=self.port,
                                      onward_port=self.onward_port, tls=tls, onward=onward))
        # The namespace's /etc/passwd and /etc/group: the machine's, plus
        # the user Exim was built for.
        for name, line in (("passwd", f"Debian-exim:x:{nobody.pw_uid}:{nobody.pw_gid}::/nonexistent:"
                                      "/usr/sbin/nologin\n"),
                           ("group", f"Debian-exim:x:{nobody.pw_gid}:\n")):
            with open(f"/etc/{name}") as original, open(os.path.join(self.root, name), "w") as copy:
                copy.write(original.read() + line)

    def start(self, timeout=20):
        self._write_files()
        script = (f"mount --make-rprivate / && mount --bind {self.root}/passwd /etc/passwd && "
                  f"mount --bind {self.root}/group /etc/group && "
                  f"exec {EXIM} -C {self.config} -bdf -odi")
        self._process = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", script], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._process.poll()
            if status is not None:
                output = self._process.stdout.read().decode("utf-8", "replace")
                self._process = None
                raise AssertionError(f"exim exited with status {status}:\n{output}\n{self.mainlog()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    probe.recv(512)
                    probe.sendall(b"QUIT\r\n")
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"exim did not listen within {timeout}s:\n{self.mainlog()}")

    def mainlog(self):
        try:
            with open(os.path.join(self.root, "log", "mainlog"), encoding="utf-8",
                      errors="replace") as file:
                return file.read()
        except OSError as exc:
            return f"(no mainlog: {exc})"

    def wait_for_log(self, text, timeout=20):
        """Wait until the main log holds ``text``; return the log."""
        deadline = time.monotonic() + timeout
        while text not in self.mainlog():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in exim's mainlog:\n{self.mainlog()}")
            time.sleep(0.05)
        return self.mainlog()

    def stop(self):
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
