"""A real Dovecot LMTP server for tests: Debian's dovecot-core and dovecot-lmtpd.

:class:`Dovecot` writes a dovecot.conf of its own in a fresh directory
(base_dir, log file, maildirs, users all inside it), starts ``dovecot -F``
on it with an LMTP listener on a Unix socket there and another on a free
127.0.0.1 port, and stops it.  Two users exist, ``alice`` and ``bob``
(``auth_username_format = %Ln``: the domain is dropped, so
``alice@example.com`` is alice); anyone else gets Dovecot's ``550 5.1.1``.
``tls=True`` offers STARTTLS (a self-signed certificate; ``ssl = no``
otherwise).  ``mail_save_crlf = yes`` stores messages with the CRLF line ends they came
with, so a test can compare bytes.

Dovecot refuses to store mail as uid 0 ("userdb returned 0 as uid"), so
under root the mailboxes belong to ``nobody``, whose uid Dovecot's master
(running as root) switches to for each delivery; the directory is made
traversable for it.  Started by another user, Dovecot runs every service
as that user (its internal and login users and group set to it, no
chroot); that set-up was checked by running this dovecot.conf as
``nobody``.  A Dovecot that does not start raises with its log:
tests fail, never skip.
"""

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from tests import certs
from tests.relay_process import free_port

DOVECOT = "/usr/sbin/dovecot"
USERS = ("alice", "bob")
# A mailbox with a quota of 1 KiB (Dovecot counts storage in kilobytes): it
# takes the recipient at RCPT and refuses a larger message after the final
# dot (552 5.2.2), while the others succeed.
FULL_USER = "carol"

_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
{users}
auth_username_format = %Ln
mail_location = maildir:{root}/mail/%n
mail_save_crlf = yes
mail_plugins = $mail_plugins quota
plugin {{
  quota = maildir:User quota
  quota_full_tempfail = no
}}
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
  default_fields = uid={uid} gid={gid} home={root}/mail/%n
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


class Dovecot:
    """One Dovecot instance; :meth:`start`, then :attr:`socket_path` and
    :attr:`port` take LMTP, :meth:`mailbox` lists what each user got."""

    def __init__(self, extra_config="", tls=False):
        # Short, because a Unix socket path is at most 107 bytes.
        self.root = tempfile.mkdtemp(prefix="rm-dovecot-")
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.socket_path = os.path.join(self.root, "run", "lmtp")
        self.log_path = os.path.join(self.root, "dovecot.log")
        self.extra_config = extra_config
        if tls:
            # STARTTLS on LMTP with a throwaway self-signed certificate.
            pair = certs.self_signed("lmtp.test")
            for name, pem in (("cert.pem", pair.cert_pem), ("key.pem", pair.key_pem)):
                with open(os.path.join(self.root, name), "wb") as file:
                    file.write(pem)
            self.extra_config += (f"ssl = yes\nssl_cert = <{self.root}/cert.pem\n"
                                  f"ssl_key = <{self.root}/key.pem\n")
        self._process = None

    def start(self, timeout=20):
        if os.geteuid() == 0:
            owner = pwd.getpwnam("nobody")
            users = ""
        else:
            # Unprivileged, Dovecot runs every service as the user who started it.
            owner = pwd.getpwuid(os.geteuid())
            group = grp.getgrgid(owner.pw_gid).gr_name
            users = (f"default_internal_user = {owner.pw_name}\n"
                     f"default_internal_group = {group}\n"
                     f"default_login_user = {owner.pw_name}\n"
                     # chroot needs root; anvil would fail to start with one.
                     "service anvil {\n  chroot =\n}\n")
        os.makedirs(os.path.join(self.root, "mail"))
        os.chown(os.path.join(self.root, "mail"), owner.pw_uid, owner.pw_gid)
        with open(os.path.join(self.root, "users"), "w") as users_file:
            for user in USERS:
                users_file.write(f"{user}:{{PLAIN}}unused::::::\n")
            users_file.write(f"{FULL_USER}:{{PLAIN}}unused::::::userdb_quota_rule=*:storage=1\n")
        config = os.path.join(self.root, "dovecot.conf")
        with open(config, "w") as file:
            file.write(_CONFIG.format(root=self.root, port=self.port, uid=owner.pw_uid,
                                      gid=owner.pw_gid, users=users))
            file.write(self.extra_config)
        if not os.access(DOVECOT, os.X_OK):
            raise AssertionError(f"{DOVECOT} is missing: apt-get install dovecot-core "
                                 "dovecot-lmtpd (make test-tools does)")
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", config], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._process.poll()
            if status is not None:
                output = self._process.stdout.read().decode("utf-8", "replace")
                self._process = None
                raise AssertionError(f"dovecot exited with status {status}; output:\n"
                                     f"{output}\nlog:\n{self.log()}")
            if os.path.exists(self.socket_path) and self._port_open():
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"dovecot did not listen within {timeout}s; log:\n{self.log()}")

    def _port_open(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                return file.read()
        except OSError as exc:
            return f"(no log: {exc})"

    def mailbox(self, user):
        """The messages in ``user``'s INBOX (new/), as stored bytes, oldest first."""
        new = os.path.join(self.root, "mail", user, "new")
        if not os.path.isdir(new):
            return []
        names = sorted(os.listdir(new), key=lambda name: os.stat(os.path.join(new, name)).st_mtime_ns)
        messages = []
        for name in names:
            with open(os.path.join(new, name), "rb") as file:
                messages.append(file.read())
        return messages

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
