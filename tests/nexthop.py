"""A next-hop SMTP server for tests: real sockets, answers scripted per test.

It runs in a thread of the test process and records every transaction it
accepts, so tests can wait for a delivery and look at the exact bytes.
"""

import socketserver
import threading
import time


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that hangs up mid-session (a test's relay being killed)
        # is part of the tests, not an error worth a traceback.
        pass


class NextHop:
    """An SMTP server on 127.0.0.1.

    ``rcpt_reply(address)`` and ``data_reply(message)`` may be replaced by a
    test to answer ``(code, text)``; by default everything is accepted.
    """

    def __init__(self, port=0, host="127.0.0.1", extensions=("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                                          "SIZE 100000000")):
        self.extensions = list(extensions)
        self.messages = []          # dicts: helo, sender, recipients, data
        self.connections = 0
        self.active = 0             # sessions open now, and the most at once
        self.max_active = 0
        self.mail_reply = lambda sender: (250, "2.1.0 Ok")
        self.rcpt_reply = lambda address: (250, "2.1.5 Ok")
        self.data_reply = lambda message: (250, "2.0.0 Ok: queued")
        self.greeting = (220, "nexthop.test ESMTP")
        self._changed = threading.Condition()
        hop = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                hop._session(self.rfile, self.wfile)

        self.server = _Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

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

    def _session(self, rfile, wfile):
        with self._changed:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._converse(rfile, wfile)
        finally:
            with self._changed:
                self.active -= 1

    def _converse(self, rfile, wfile):

        def reply(code, text):
            wfile.write(f"{code} {text}\r\n".encode())
            wfile.flush()

        reply(*self.greeting)
        if self.greeting[0] != 220:
            return
        transaction = None
        helo = None
        while True:
            line = rfile.readline()
            if not line:
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = command[:4].upper()
            if verb == "EHLO":
                helo = command[5:]
                lines = ["nexthop.test"] + self.extensions
                wfile.write("".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                                    for i, text in enumerate(lines)).encode())
                wfile.flush()
            elif verb == "HELO":
                helo = command[5:]
                reply(250, "nexthop.test")
            elif verb == "MAIL":
                sender = command.split(":", 1)[1].split(">")[0].lstrip(" <")
                code, text = self.mail_reply(sender)
                if code == 250:
                    transaction = {"helo": helo, "sender": sender, "recipients": [], "mail": command}
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
                data = self._read_data(rfile)
                transaction["data"] = data
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
