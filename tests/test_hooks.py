"""The connect, HELO and MAIL hooks, and plugins that block, over a real
socket with the relay run by twistd and site plugins loaded from a
directory as a site would drop them in."""

import re
import socket
import textwrap

import pytest

from tests.relay_process import RelayProcess, free_port

SITE_PLUGINS = textwrap.dedent('''\
    """Site policies as an administrator would write them."""
    import time

    from twisted.internet import defer
    from twisted.plugin import IPlugin
    from zope.interface import implementer, provider

    from relaymail.interfaces import (
        Decision, IConnectionPolicy, IHeloPolicy, IPluginFactory, IRecipientValidator,
        ISenderPolicy)


    @implementer(IConnectionPolicy)
    class Gatekeeper:
        name = "gatekeeper"

        def check_connection(self, context):
            if context.client_ip == "127.0.0.2":
                return Decision.reject(554, "5.7.1", "Access denied by site policy")
            if context.client_ip == "127.0.0.3":
                return Decision.defer("Busy, come back later", code=421, enhanced="4.7.0")
            if context.client_ip == "127.0.0.4":
                raise RuntimeError("gatekeeper bug")
            if context.client_ip == "127.0.0.5":
                return defer.Deferred()          # never answers
            return Decision.NO_OPINION


    @implementer(IHeloPolicy)
    class HeloCheck:
        name = "helocheck"

        def check_helo(self, helo, context):
            if helo == "forged.example":
                return Decision.reject(550, "5.7.1", "Helo command rejected: forged")
            return Decision.NO_OPINION


    @implementer(ISenderPolicy)
    class SenderCheck:
        name = "sendercheck"

        def check_sender(self, sender, parameters, context):
            if sender is not None and sender.local_text == "spammer":
                return Decision.reject(550, "5.7.1", "Sender address rejected: spammer")
            if sender is not None and sender.local_text == "grey":
                return Decision.defer("Greylisted, try again", code=450, enhanced="4.7.1")
            if parameters.get("SIZE") == "999":
                return Decision.reject(552, "5.3.4", "Size 999 is unlucky here")
            if sender is None:
                return Decision.accept("Null sender welcome")
            return Decision.NO_OPINION


    @implementer(IRecipientValidator)
    class Sleepy:
        """Blocks the way a database driver does, and says so."""
        name = "sleepy"
        blocking = True

        def check_recipient(self, recipient, context):
            if recipient.local_text == "sleep":
                time.sleep(3)
                return Decision.accept()
            if recipient.local_text == "thread":
                return Decision.reject(550, "5.1.1", "answered from a thread")
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION


    @implementer(IRecipientValidator)
    class Napper:
        """Blocks without saying so: relaymail can only name it."""
        name = "napper"

        def check_recipient(self, recipient, context):
            if recipient.local_text == "nap":
                time.sleep(0.3)
                return Decision.accept()
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION


    def _factory(plugin_class):
        @provider(IPlugin, IPluginFactory)
        class Factory:
            name = plugin_class.name

            @staticmethod
            def build(context):
                return plugin_class()
        return Factory


    gatekeeper = _factory(Gatekeeper)
    helocheck = _factory(HeloCheck)
    sendercheck = _factory(SenderCheck)
    sleepy = _factory(Sleepy)
    napper = _factory(Napper)
''')


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hooks")
    plugins = workdir / "plugins"
    plugins.mkdir()
    (plugins / "site_policies.py").write_text(SITE_PLUGINS)
    proxy_port = free_port()
    process = RelayProcess(workdir, {
        "server": {"trusted_networks": "10.9.9.0/24",
                   "proxy_listen": f"tcp:{proxy_port}:interface=127.0.0.1",
                   "proxy_trusted": "127.0.0.1/32"},
        "relay": {"domains": "example.com"},
        "plugins": {"connect": "gatekeeper", "helo": "helocheck", "senders": "sendercheck",
                    "recipients": "sleepy, napper, domains", "path": str(plugins),
                    "timeout": "1"},
    })
    process.proxy_port = proxy_port
    yield process.start()
    process.stop()


class Client:
    """A raw SMTP client from a chosen loopback address (any 127/8 source
    reaches the relay's 127.0.0.1: the plugins tell the clients apart)."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
        self.port = self.sock.getsockname()[1]
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed before a whole reply: " + repr(lines))
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")

    def ask(self, line):
        self.send(line)
        return self.reply()

    def closed(self):
        return self.file.read() == b""

    def close(self):
        self.file.close()
        self.sock.close()


def test_a_refused_client_gets_554_and_only_quit_is_answered(relay):
    client = Client(relay.port, "127.0.0.2")
    assert client.reply() == "554 relay.test Access denied by site policy\r\n"
    assert client.ask("EHLO client.test") == (
        f"503 Error: access denied for unknown[127.0.0.2]:{client.port}\r\n")
    assert client.ask("MAIL FROM:<a@example.org>") == (
        f"503 Error: access denied for unknown[127.0.0.2]:{client.port}\r\n")
    assert client.ask("QUIT") == "221 relay.test Bye\r\n"
    assert client.closed()
    assert (f"unknown[127.0.0.2]:{client.port}: connect refused by gatekeeper: "
            "554 5.7.1 Access denied by site policy") in relay.log()


def test_behind_a_proxy_the_connect_plugins_judge_the_client_the_proxy_names(relay):
    # The proxy itself (127.0.0.1) is welcome; the client it names is not.
    with socket.create_connection(("127.0.0.1", relay.proxy_port), 10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 40001 25\r\n")
        assert sock.recv(512) == b"554 relay.test Access denied by site policy\r\n"
    assert ("unknown[127.0.0.2]:40001: connect refused by gatekeeper: "
            "554 5.7.1 Access denied by site policy") in relay.log()


def test_a_deferred_client_gets_421_and_is_closed(relay):
    client = Client(relay.port, "127.0.0.3")
    assert client.reply() == "421 relay.test Busy, come back later\r\n"
    assert client.closed()


def test_a_connect_plugin_that_raises_or_never_answers_gives_421_4_3_0(relay):
    for source in ("127.0.0.4", "127.0.0.5"):
        client = Client(relay.port, source)
        assert client.reply() == (
            "421 relay.test Temporary failure checking the client, try again later\r\n"), source
        assert client.closed()
    log = relay.log()
    assert "gatekeeper bug" in log
    assert "plugin gatekeeper check_connection" in log and "no answer within 1.0 seconds" in log


def test_other_clients_are_greeted(relay):
    client = Client(relay.port, "127.0.0.6")
    assert client.reply() == "220 relay.test ESMTP relaymail\r\n"
    client.close()


def test_a_refused_helo_leaves_the_session_without_one(relay):
    client = Client(relay.port)
    client.reply()
    assert client.ask("HELO forged.example") == "550 Helo command rejected: forged\r\n"
    assert client.ask("MAIL FROM:<a@example.org>") == "503 Error: send HELO/EHLO first\r\n"
    assert client.ask("EHLO forged.example") == "550 Helo command rejected: forged\r\n"
    assert client.ask("EHLO client.test").startswith("250-relay.test Hello client.test\r\n")
    assert client.ask("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok\r\n"
    client.close()
    assert "helo=<forged.example> refused by helocheck: 550 5.7.1 Helo command rejected" in (
        relay.log())


def test_sender_plugins_refuse_defer_and_see_the_parameters(relay):
    client = Client(relay.port)
    client.reply()
    client.ask("EHLO client.test")
    # Pipelined: the refused MAIL leaves no transaction for RCPT and DATA.
    client.send("MAIL FROM:<spammer@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA")
    assert client.reply() == "550 5.7.1 Sender address rejected: spammer\r\n"
    assert client.reply() == "503 5.5.1 Error: need MAIL command\r\n"
    assert client.reply() == "503 5.5.1 Error: need MAIL command\r\n"
    assert client.ask("MAIL FROM:<grey@example.org>") == "450 4.7.1 Greylisted, try again\r\n"
    assert client.ask("MAIL FROM:<a@example.org> SIZE=999") == (
        "552 5.3.4 Size 999 is unlucky here\r\n")
    assert client.ask("MAIL FROM:<>") == "250 2.1.0 Null sender welcome\r\n"
    assert client.ask("RSET") == "250 2.0.0 Ok\r\n"
    assert client.ask("MAIL FROM:<a@example.org> SIZE=100") == "250 2.1.0 Ok\r\n"
    assert client.ask("RCPT TO:<bob@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    log = relay.log()
    assert ("mail from=<spammer@example.org> refused by sendercheck: "
            "550 5.7.1 Sender address rejected: spammer") in log
    assert "rcpt from=<a@example.org> to=<bob@example.com> by=domains: 250 2.1.5 Ok" in log


def test_a_blocking_plugin_runs_in_a_thread_and_never_delays_other_sessions(relay):
    sleeper = Client(relay.port)
    sleeper.reply()
    sleeper.ask("EHLO sleeper.test")
    sleeper.ask("MAIL FROM:<a@example.org>")
    sleeper.send("RCPT TO:<sleep@example.com>")
    # While the plugin sleeps 3 s in its thread, another client is served
    # whole: banner, EHLO, a blocking plugin's answer from a second thread.
    other = Client(relay.port)
    assert other.reply() == "220 relay.test ESMTP relaymail\r\n"
    assert other.ask("EHLO other.test").startswith("250-relay.test Hello other.test\r\n")
    assert other.ask("MAIL FROM:<b@example.org>") == "250 2.1.0 Ok\r\n"
    assert other.ask("RCPT TO:<thread@example.com>") == "550 5.1.1 answered from a thread\r\n"
    assert other.ask("QUIT") == "221 2.0.0 relay.test Bye\r\n"
    other.close()
    # Only now, at the 1 s timeout, does the sleeper hear: its reply was
    # owed while the other session ran start to end.
    assert sleeper.reply() == (
        "451 4.3.0 Temporary failure checking recipient, try again later\r\n")
    assert sleeper.ask("NOOP") == "250 2.0.0 Ok\r\n"
    sleeper.close()
    assert "plugin sleepy check_recipient('sleep@example.com'): no answer within 1.0 seconds" in (
        relay.log())


def test_a_plugin_that_blocks_without_saying_so_is_named_in_the_log(relay):
    client = Client(relay.port)
    client.reply()
    client.ask("EHLO client.test")
    client.ask("MAIL FROM:<a@example.org>")
    assert client.ask("RCPT TO:<nap@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert re.search(r"plugin napper check_recipient held the reactor for 0\.\d\d s: every "
                     r"session of this process waited; a plugin that blocks must say "
                     r"blocking = True", relay.log())
    assert "plugin sleepy check_recipient held" not in relay.log()


def test_a_plugins_reply_text_is_ascii_and_fits_a_reply_line():
    # Found in review: a database value (sql's VRFY text) could make a
    # 2000-character reply, or send raw UTF-8 to a client without SMTPUTF8.
    from relaymail.interfaces import Decision
    from relaymail.smtp.replies import OK, decision_reply
    reply = decision_reply(Decision.reject(550, "5.7.1", "café " + "x" * 2000), OK, utf8=False)
    wire = reply.encode()
    assert wire.startswith(b"550 5.7.1 caf\\x{E9} xxx")
    assert wire.endswith(b"x...\r\n")
    assert len(wire) <= 512
    assert decision_reply(Decision.accept("Alice <alice@example.com>"), OK).text == (
        "Alice <alice@example.com>")
    # A transaction with SMTPUTF8 may hear UTF-8 (RFC 6531 3.7.4).
    assert decision_reply(Decision.reject(550, "5.1.1", "Jürgen left"), OK).text == (
        "Jürgen left")
