"""A next-hop SMTP server for tests: real sockets, answers scripted per test.

It runs in a thread of the test process and records every transaction it
accepts, so tests can wait for a delivery and look at the exact bytes.  It
can offer STARTTLS, speak TLS from the first byte (port 465 style) and ask
for AUTH, with certificates from :mod:`tests.certs`.  With ``CHUNKING``
among its extensions it takes BDAT (RFC 3030) too, and records the chunk
sizes it got (``chunks``, None for a message that came by DATA);
``BINARYMIME`` is only a keyword it offers.
"""

import base64
import os
import shutil
import socketserver
import ssl
import tempfile
import threading
import time


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that hangs up mid-session (a test's relay being killed)
        # is part of the tests, not an error worth a traceback.
        pass


class _Closing(Exception):
    """Said 421: the session ends."""


class NextHop:
    """An SMTP server on 127.0.0.1.

    ``rcpt_reply(address)`` and ``data_reply(message)`` may be replaced by a
    test to answer ``(code, text)``; by default everything is accepted.
    After any 421 it says, it hangs up, as RFC 5321 3.8 has a server do.

    ``starttls`` (a :class:`tests.certs.KeyPair`) offers STARTTLS with that
    certificate; ``implicit_tls`` speaks TLS with it from the first byte.
    ``passwords`` (user -> password, changeable while running) offers AUTH
    PLAIN and LOGIN once TLS is on, and refuses MAIL before AUTH.
    """

    def __init__(self, port=0, host="127.0.0.1", extensions=("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                                          "SIZE 100000000"), starttls=None, implicit_tls=None,
                 passwords=None):
        self.extensions = list(extensions)
        self.messages = []          # dicts: helo, sender, recipients, data, tls, user
        self.commands = []          # every command line of every session, in order
        self.passwords = passwords
        self._directory = tempfile.mkdtemp(prefix="nexthop-")
        self._starttls = self._context(starttls)
        self._implicit_tls = self._context(implicit_tls)
        self.connections = 0
        self.active = 0             # sessions open now, and the most at once
        self.max_active = 0
        self.mail_reply = lambda sender: (250, "2.1.0 Ok")
        self.rcpt_reply = lambda address: (250, "2.1.5 Ok")
        self.data_reply = lambda message: (250, "2.0.0 Ok: queued")
        # The reply to a BDAT chunk that is not the last.
        self.chunk_reply = lambda message: (250, "2.0.0 Ok: chunk received")
        self.greeting = (220, "nexthop.test ESMTP")
        # (code, text) said to STARTTLS instead of 220.
        self.starttls_reply = None
        self._changed = threading.Condition()
        hop = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                hop._session(self.request)

        self.server = _Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _context(self, pair):
        if pair is None:
            return None
        cert, key = (os.path.join(self._directory, name) for name in ("cert.pem", "key.pem"))
        with open(cert, "wb") as f:
            f.write(pair.cert_pem)
        with open(key, "wb") as f:
            f.write(pair.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        return context

    def wait_for_commands(self, predicate, timeout=20):
        """Wait until ``predicate(commands)`` is true; return the commands."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.commands):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"commands seen: {self.commands}")
                self._changed.wait(left)
            return list(self.commands)

    def wait_for(self, count, timeout=20):
        """Wait until ``count`` messages arrived; return them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.messages)} messages arrived, not {count}")
                self._changed.wait(left)
            return list(self.messages)

    def _session(self, sock):
        with self._changed:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        wire = _Wire(sock)
        try:
            if self._implicit_tls is not None:
                # A client that refuses our certificate ends it here.
                wire.start_tls(self._implicit_tls)
            self._converse(wire)
        except _Closing:
            pass
        finally:
            wire.close()
            with self._changed:
                self.active -= 1

    def _seen(self, command):
        with self._changed:
            self.commands.append(command)
            self._changed.notify_all()

    def _converse(self, wire):

        def reply(code, text):
            wire.wfile.write(f"{code} {text}\r\n".encode())
            wire.wfile.flush()
            if code == 421:
                # RFC 5321 3.8: the channel closes after a 421; what the
                # client pipelined after the command stays unread.
                raise _Closing()

        def readline():
            return wire.rfile.readline()

        reply(*self.greeting)
        if self.greeting[0] != 220:
            return
        transaction = None
        helo = None
        user = None
        while True:
            line = readline()
            if not line:
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self._seen(command)
            verb = command[:4].upper()
            if verb == "EHLO":
                helo = command[5:]
                lines = ["nexthop.test"] + self.extensions
                if self._starttls is not None and not wire.tls:
                    lines.append("STARTTLS")
                if self.passwords is not None and wire.tls:
                    lines.append("AUTH PLAIN LOGIN")
                wire.wfile.write("".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                                         for i, text in enumerate(lines)).encode())
                wire.wfile.flush()
            elif verb == "HELO":
                helo = command[5:]
                reply(250, "nexthop.test")
            elif command.upper() == "STARTTLS" and self._starttls is not None and not wire.tls:
                if self.starttls_reply is not None:
                    reply(*self.starttls_reply)
                    continue
                reply(220, "2.0.0 Ready to start TLS")
                wire.start_tls(self._starttls)
                helo = transaction = None
            elif verb == "AUTH" and self.passwords is not None and wire.tls and user is None:
                words = command.split()
                mechanism = words[1].upper() if len(words) > 1 else ""
                if mechanism == "PLAIN" and len(words) == 3:
                    _, name, password = base64.b64decode(words[2]).decode().split("\0")
                elif mechanism == "LOGIN":
                    reply(334, "VXNlcm5hbWU6")
                    name = base64.b64decode(readline().strip()).decode()
                    reply(334, "UGFzc3dvcmQ6")
                    password = base64.b64decode(readline().strip()).decode()
                else:
                    reply(504, "5.5.4 Unrecognized authentication type")
                    continue
                if self.passwords.get(name) == password:
                    user = name
                    reply(235, "2.7.0 Authentication successful")
                else:
                    reply(535, "5.7.8 Authentication credentials invalid")
            elif verb == "MAIL" and self.passwords is not None and user is None:
                reply(530, "5.7.0 Authentication required")
            elif verb == "MAIL":
                sender = command.split(":", 1)[1].split(">")[0].lstrip(" <")
                code, text = self.mail_reply(sender)
                if code == 250:
                    transaction = {"helo": helo, "sender": sender, "recipients": [], "mail": command,
                                   "tls": wire.tls, "user": user, "chunks": None}
                reply(code, text)
            elif verb == "RCPT":
                address = command.split(":", 1)[1].split(">")[0].lstrip(" <")
                code, text = self.rcpt_reply(address)
                if code == 250:
                    transaction["recipients"].append(address)
                reply(code, text)
            elif verb == "DATA":
                if not transaction or not transaction["recipients"]:
                    reply(554, "5.5.1 No valid recipients")
                    continue
                reply(354, "Go ahead")
                data = self._read_data(wire.rfile)
                transaction["data"] = data
                code, text = self.data_reply(transaction)
                if code == 250:
                    with self._changed:
                        self.messages.append(transaction)
                        self._changed.notify_all()
                transaction = None
                reply(code, text)
            elif verb == "BDAT" and "CHUNKING" in self.extensions:
                words = command.split()
                size, last = int(words[1]), len(words) > 2
                chunk = wire.rfile.read(size)
                if not transaction or not transaction["recipients"]:
                    reply(554, "5.5.1 No valid recipients")
                    continue
                if transaction["chunks"] is None:
                    transaction["chunks"], transaction["data"] = [], b""
                transaction["chunks"].append(size)
                transaction["data"] += chunk
                if not last:
                    code, text = self.chunk_reply(transaction)
                    reply(code, text)
                    if code != 250:
                        transaction = None
                    continue
                code, text = self.data_reply(transaction)
                if code == 250:
                    with self._changed:
                        self.messages.append(transaction)
                        self._changed.notify_all()
                transaction = None
                reply(code, text)
            elif verb == "RSET":
                transaction = None
                reply(250, "2.0.0 Ok")
            elif verb == "QUIT":
                reply(221, "2.0.0 Bye")
                return
            else:
                reply(502, "5.5.2 Not here")

    @staticmethod
    def _read_data(rfile):
        lines = []
        while True:
            line = rfile.readline()
            if line in (b".\r\n", b""):
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)


class _Wire:
    """One session's socket and its file objects, replaced by TLS ones at
    the switch (nothing is buffered then: the client waits for the 220)."""

    def __init__(self, sock):
        self.sock = sock
        self.tls = False
        self._files()

    def _files(self):
        self.rfile = self.sock.makefile("rb")
        self.wfile = self.sock.makefile("wb")

    def start_tls(self, context):
        self.rfile.close()
        self.wfile.close()
        self.sock = context.wrap_socket(self.sock, server_side=True,
                                        do_handshake_on_connect=False)
        self.tls = True
        self._files()
        # After the assignment, so close() ends the connection even when
        # the client refuses the handshake.
        self.sock.do_handshake()

    def close(self):
        for file in (self.rfile, self.wfile):
            try:
                file.close()
            except OSError:
                pass
        if self.tls:
            self.sock.close()
