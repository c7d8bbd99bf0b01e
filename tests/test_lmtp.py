"""The lmtp transport (relaymail.delivery.lmtp) against the real Dovecot LMTP
server, over its Unix socket and over TCP, and against a scripted LMTP
server for what Dovecot will not do: hang up after the final dot, answer
too few times or with garbage, hang, lack 8BITMIME or PIPELINING.

Every test calls :meth:`LMTPTransport.deliver` directly with an IMessage
over a real file, as the scheduler will, and checks each recipient's
outcome exactly and the bytes at the far end.
"""

import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer, verify

from relaymail.address import parse_forward_path
from relaymail.delivery.client import ClientConfig
from relaymail.delivery.destinations import SENT, Job
from relaymail.delivery import lmtp
from relaymail.delivery.lmtp import LMTPTransport, NextHop, client_config, parse_next_hop
from relaymail.delivery.transports import TransportHop, TransportRunner
from relaymail.envelope import Envelope
from relaymail.header_section import Field
from relaymail.interfaces import IMessage, ITransport, RecipientOutcome
from relaymail.queue.message_view import MessageView
from relaymail.queue.queue_file import open_message
from tests.dovecot import FULL_USER, Dovecot
from tests.support import make_settings

SENDER = "sender@example.org"

# Ends without a line that starts with a dot being mistaken for the end:
# ".." and "." at line starts must reach the mailbox exactly as here.
MESSAGE = (b"From: Sender <sender@example.org>\r\n"
           b"To: alice@example.com, bob@example.com\r\n"
           b"Subject: LMTP test\r\n"
           b"Message-ID: <%s@example.org>\r\n"
           b"X-Relaymail-Test: kept as it is\r\n"
           b"\r\n"
           b"First line.\r\n"
           b".a line that starts with a dot\r\n"
           b"..two dots\r\n"
           b".\r\n"
           b"after a lone dot\r\n")


@implementer(IMessage)
class FileMessage:
    """An IMessage over a real file, as the queue hands one to a transport."""

    def __init__(self, path, sender, recipients, body="7BIT", smtputf8=False,
                 queue_id="TESTQUEUEID"):
        self.queue_id = queue_id
        self.path = path
        self.sender = parse_forward_path(f"<{sender}>", smtputf8) if sender else None
        self.recipients = [parse_forward_path(f"<{r}>", smtputf8) for r in recipients]
        self.envelope = Envelope(sender, list(recipients), body=body, smtputf8=smtputf8)
        self.size = os.path.getsize(path)
        self.headers = []
        self.opened = 0

    def open(self):
        self.opened += 1
        return open(self.path, "rb")


class LMTPTestCase(unittest.TestCase):
    timeout = 30

    def message(self, content, recipients, sender=SENDER, **kwargs):
        handle, path = tempfile.mkstemp(suffix=".msg")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self.addCleanup(os.unlink, path)
        return FileMessage(path, sender, recipients, **kwargs)

    def transport(self, **timeouts):
        settings = make_settings(self.mktemp_path())
        if timeouts:
            config = ClientConfig(helo_name="relay.test", tls="may", **timeouts)
            return LMTPTransport(reactor, settings, config=config)
        return LMTPTransport(reactor, settings)

    def mktemp_path(self):
        from pathlib import Path
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


def unique_message(tag):
    return MESSAGE % tag.encode("ascii")


def stored_parts(stored):
    """Split a message as Dovecot stored it into the header lines Dovecot
    put on top and the rest, which must be our message byte for byte."""
    added = []
    rest = stored
    while True:
        match = re.match(rb"(Return-Path|Received|Delivered-To): [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                         rest)
        if not match:
            return added, rest
        added.append(match.group(1))
        rest = rest[match.end():]


# -- Dovecot -------------------------------------------------------------------------

class DovecotTests(LMTPTestCase):
    """The real Dovecot: two known users, one unknown."""

    @classmethod
    def setUpClass(cls):
        cls.dovecot = Dovecot()
        try:
            cls.dovecot.start()
        except BaseException:
            cls.dovecot.remove()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dovecot.remove()

    def find(self, user, tag):
        marker = b"<%s@example.org>" % tag.encode("ascii")
        found = [m for m in self.dovecot.mailbox(user) if marker in m]
        self.assertEqual(len(found), 1, f"{user}'s mailbox:\n{self.dovecot.log()}")
        return found[0]

    async def deliver_to_three(self, next_hop, tag):
        content = unique_message(tag)
        recipients = ["alice@example.com", "bob@example.com", "nobody@example.com"]
        message = self.message(content, recipients)
        outcomes = await self.transport().deliver(message, recipients, next_hop)
        self.assertEqual(set(outcomes), set(recipients))
        for user in ("alice", "bob"):
            outcome = outcomes[f"{user}@example.com"]
            self.assertEqual((outcome.kind, outcome.status), ("delivered", "2.0.0"), outcome)
            self.assertRegex(outcome.reason, rf"^host {re.escape(self.label(next_hop))} said: "
                                             rf"250 2\.0\.0 <{user}@example\.com> \S+ Saved "
                                             r"\(in reply to end of DATA\)$")
        self.assertEqual(outcomes["nobody@example.com"], RecipientOutcome.bounced(
            f"host {self.label(next_hop)} said: 550 5.1.1 <nobody@example.com> "
            "User doesn't exist: nobody@example.com (in reply to RCPT TO)", "5.1.1"))
        for user in ("alice", "bob"):
            added, rest = stored_parts(self.find(user, tag))
            # Our bytes unchanged, dot-stuffing undone; Dovecot only adds on top.
            self.assertEqual(rest, content)
            self.assertEqual(added, [b"Return-Path", b"Received"])
            self.assertIn(b"Return-Path: <sender@example.org>\r\n", self.find(user, tag))
        self.assertEqual(self.dovecot.mailbox("nobody"), [])
        return outcomes

    def label(self, next_hop):
        return parse_next_hop(next_hop).label

    async def test_unix_socket_delivers_to_known_users_and_bounces_unknown_with_5_1_1(self):
        await self.deliver_to_three(self.dovecot.socket_path, "unix")

    async def test_unix_prefix_is_the_same_socket(self):
        await self.deliver_to_three("unix:" + self.dovecot.socket_path, "unix-prefix")

    async def test_tcp_host_port(self):
        await self.deliver_to_three(f"127.0.0.1:{self.dovecot.port}", "tcp")

    async def test_tcp_bracketed_host_port(self):
        await self.deliver_to_three(f"[127.0.0.1]:{self.dovecot.port}", "tcp-brackets")

    async def test_over_quota_mailbox_bounces_after_the_dot_while_the_next_is_delivered(self):
        # RFC 2033 4.2 with the real server: the recipient before alice is
        # refused after the message, and alice's own reply still counts.
        content = unique_message("quota") + b"over a kilobyte\r\n" * 100
        recipients = [f"{FULL_USER}@example.com", "alice@example.com"]
        message = self.message(content, recipients)
        outcomes = await self.transport().deliver(message, recipients, self.dovecot.socket_path)
        self.assertEqual(outcomes[f"{FULL_USER}@example.com"], RecipientOutcome.bounced(
            f"host {self.dovecot.socket_path} said: 552 5.2.2 <{FULL_USER}@example.com> "
            "Quota exceeded (mailbox for user is full) (in reply to end of DATA)", "5.2.2"))
        self.assertEqual(outcomes["alice@example.com"].kind, "delivered")
        self.assertEqual(stored_parts(self.find("alice", "quota"))[1], content)
        self.assertEqual(self.dovecot.mailbox(FULL_USER), [])

    async def test_eight_bit_message_goes_unchanged_to_dovecot_which_offers_8bitmime(self):
        content = (b"Subject: caf\xc3\xa9 bytes\r\nMessage-ID: <eightbit@example.org>\r\n"
                   b"Content-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve \xe2\x82\xac\r\n")
        message = self.message(content, ["alice@example.com"], body="8BITMIME")
        outcomes = await self.transport().deliver(message, ["alice@example.com"],
                                                  self.dovecot.socket_path)
        self.assertEqual(outcomes["alice@example.com"].kind, "delivered")
        _, rest = stored_parts(self.find("alice", "eightbit"))
        self.assertEqual(rest, content)

    async def test_null_sender(self):
        content = unique_message("null-sender")
        message = self.message(content, ["bob@example.com"], sender="")
        outcomes = await self.transport().deliver(message, ["bob@example.com"],
                                                  self.dovecot.socket_path)
        self.assertEqual(outcomes["bob@example.com"].kind, "delivered")
        self.assertTrue(self.find("bob", "null-sender").startswith(b"Return-Path: <>\r\n"))

    async def test_message_is_opened_once_and_closed(self):
        message = self.message(unique_message("opened"), ["alice@example.com"])
        await self.transport().deliver(message, ["alice@example.com"], self.dovecot.socket_path)
        self.assertEqual(message.opened, 1)


class DovecotTLSTests(LMTPTestCase):
    """Dovecot offering STARTTLS: taken over TCP, not over the Unix socket."""

    @classmethod
    def setUpClass(cls):
        cls.dovecot = Dovecot(tls=True)
        try:
            cls.dovecot.start()
        except BaseException:
            cls.dovecot.remove()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dovecot.remove()

    async def deliver(self, next_hop, tag):
        content = unique_message(tag)
        message = self.message(content, ["alice@example.com"])
        outcomes = await self.transport().deliver(message, ["alice@example.com"], next_hop)
        self.assertEqual(outcomes["alice@example.com"].kind, "delivered",
                         outcomes["alice@example.com"])
        marker = b"<%s@example.org>" % tag.encode("ascii")
        [stored] = [m for m in self.dovecot.mailbox("alice") if marker in m]
        _, rest = stored_parts(stored)
        self.assertEqual(rest, content)
        return stored[:len(stored) - len(rest)]

    async def test_starttls_over_tcp(self):
        added = await self.deliver(f"127.0.0.1:{self.dovecot.port}", "tls-tcp")
        # Dovecot's Received field says how the message came.
        self.assertRegex(added, rb"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ ")
        self.assertIn(b" with LMTPS\r\n", added)

    async def test_no_tls_over_the_unix_socket(self):
        added = await self.deliver(self.dovecot.socket_path, "tls-unix")
        self.assertNotIn(b"using TLS", added)
        self.assertIn(b" with LMTP\r\n", added)


# -- a scripted LMTP server ------------------------------------------------------------

@dataclass
class Script:
    """How the scripted server behaves.  ``after_dot`` is what it says after
    the final dot (None: one 250 per accepted recipient), then ``then``:
    ``'stay'`` (wait for QUIT), ``'close'`` (hang up) or ``'hang'`` (say and
    read nothing more).  ``stall`` names a step (``'greeting'``, a verb)
    from which it says nothing at all."""

    keywords: tuple = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME")
    greeting: bytes = b"220 lmtp.test LMTP ready"
    lhlo: bytes = None
    mail: bytes = b"250 2.1.0 Ok"
    rcpt: dict = field(default_factory=dict)
    data: bytes = b"354 End data with <CR><LF>.<CR><LF>"
    after_dot: list = None
    #: Seconds between the replies after the dot, each its own write
    #: (0: all in one write).
    apart: float = 0
    then: str = "stay"
    stall: str = None
    #: The reply to STARTTLS; after a 220 the server answers the client's
    #: TLS handshake with plain text.
    starttls: bytes = b"500 5.5.1 Unknown command"
    #: Recipients taken in one transaction, past which RCPT gets
    #: rcpt_limit_reply.
    rcpt_limit: int = None
    rcpt_limit_reply: bytes = b"452 4.5.3 Too many recipients"
    #: The reply to every MAIL after the first; after a 421 the server
    #: hangs up without another word (RFC 5321 3.8).
    later_mail: bytes = None
    #: What it says after each transaction's dot in turn, in place of
    #: after_dot (None: a 250 each); ``then`` comes after the last.
    after_dots: list = None
    #: Said unasked after the first transaction's replies, in their write.
    between: bytes = None


class ScriptedLMTP(Protocol):
    def __init__(self, script):
        self.script = script
        self.reads = []
        self.commands = []
        self.messages = []
        self.envelopes = []    # the recipients each of those messages went to
        self.closed = defer.Deferred()
        self._taken = []
        self._buffer = b""
        self._in_data = False
        self._accepted = 0
        self._silent = False
        self._fake_tls = False

    def connectionMade(self):
        if self.script.stall == "greeting":
            self._silent = True
        else:
            self._say(self.script.greeting)

    def connectionLost(self, reason):
        self.closed.callback(None)

    def _say(self, *lines):
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def dataReceived(self, data):
        self.reads.append(data)
        if self._fake_tls:
            self._fake_tls = False
            self._say(b"this is not TLS")
            return
        if self._silent:
            return
        self._buffer += data
        while not self._silent:
            if self._in_data:
                end = self._buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                message, self._buffer = self._buffer[:end + 5], self._buffer[end + 5:]
                self._in_data = False
                self.messages.append(message)
                self._end_of_data()
            else:
                line, found, rest = self._buffer.partition(b"\r\n")
                if not found:
                    return
                self._buffer = rest
                self._command(line)

    def _command(self, line):
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        if verb == self.script.stall:
            self._silent = True
            return
        if verb == "LHLO":
            if self.script.lhlo is not None:
                self._say(self.script.lhlo)
            else:
                keywords = [b"250-lmtp.test"] + [b"250-" + k.encode() for k in self.script.keywords]
                keywords[-1] = b"250 " + keywords[-1][4:]
                self._say(*keywords)
        elif verb == "MAIL":
            self._accepted, self._taken = 0, []
            reply = self.script.mail
            if self.script.later_mail is not None and any(
                    c.startswith(b"MAIL") for c in self.commands[:-1]):
                reply = self.script.later_mail
            self._say(reply)
            if reply.startswith(b"421"):
                # Gone, as RFC 5321 3.8 has it: the pipelined RCPTs and
                # DATA get nothing.
                self._silent = True
                self.transport.loseConnection()
        elif verb == "RCPT":
            address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            reply = self.script.rcpt.get(address, b"250 2.1.5 Ok")
            limit = self.script.rcpt_limit
            if limit is not None and self._accepted >= limit:
                reply = self.script.rcpt_limit_reply
            if reply.startswith(b"2"):
                self._accepted += 1
                self._taken.append(address)
            self._say(reply)
        elif verb == "DATA":
            if self._accepted == 0:
                self._say(b"503 5.5.1 No valid recipients")
            else:
                self._say(self.script.data)
                self._in_data = self.script.data.startswith(b"354")
        elif verb == "STARTTLS":
            self._say(self.script.starttls)
            if self.script.starttls.startswith(b"220"):
                self._silent = self._fake_tls = True
        elif verb == "QUIT":
            self._say(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self._say(b"500 5.5.1 Unknown command")

    def _end_of_data(self):
        self.envelopes.append(self._taken)
        replies = self.script.after_dot
        if self.script.after_dots is not None:
            replies = self.script.after_dots[len(self.messages) - 1]
        if replies is None:
            replies = [b"250 2.0.0 Saved"] * self._accepted
        if self.script.between is not None and len(self.messages) == 1:
            replies = [*replies, self.script.between]
        if self.script.after_dots is not None and len(self.messages) < len(self.script.after_dots):
            self._say(*replies)     # more transactions to come
            return
        if replies and self.script.apart:
            for n, reply in enumerate(replies[:-1]):
                reactor.callLater(n * self.script.apart, self._say, reply)
            reactor.callLater((len(replies) - 1) * self.script.apart, self._last, replies[-1])
            return
        if replies:
            self._say(*replies)
        self._then()

    def _last(self, reply):
        self._say(reply)
        self._then()

    def _then(self):
        if self.script.then == "close":
            self.transport.loseConnection()
        elif self.script.then == "hang":
            self._silent = True


class ScriptedFactory(Factory):
    noisy = False

    def __init__(self, script):
        self.script = script
        self.connections = []

    def buildProtocol(self, addr):
        server = ScriptedLMTP(self.script)
        self.connections.append(server)
        return server

    @property
    def only(self):
        assert len(self.connections) == 1, self.connections
        return self.connections[0]


class ScriptedTests(LMTPTestCase):

    def serve(self, script):
        factory = ScriptedFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        return factory, f"127.0.0.1:{port.getHost().port}"

    async def _stop(self, port, factory):
        for server in factory.connections:
            if not server.closed.called:
                server.transport.abortConnection()
            await server.closed
        await port.stopListening()

    async def run_script(self, script, recipients=("a@example.com", "b@example.com"),
                         content=b"Subject: x\r\n\r\nbody\r\n", transport=None, **kwargs):
        factory, hop = self.serve(script)
        message = self.message(content, list(recipients), **kwargs)
        transport = transport or self.transport()
        outcomes = await transport.deliver(message, list(recipients), hop)
        self.assertEqual(set(outcomes), set(recipients))
        return factory, hop, outcomes

    # the dialogue

    async def test_pipelined_dialogue_on_the_wire_and_dot_stuffing(self):
        content = b"Subject: x\r\n\r\n.dot\r\n..two\r\nend"
        factory, hop, outcomes = await self.run_script(Script(), content=content)
        server = factory.only
        self.assertEqual(server.commands, [
            b"LHLO mx.test",
            b"MAIL FROM:<sender@example.org>",
            b"RCPT TO:<a@example.com>",
            b"RCPT TO:<b@example.com>",
            b"DATA",
            b"QUIT",
        ])
        # RFC 2920: MAIL, the RCPTs and DATA in one write.
        self.assertIn(b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.com>\r\n"
                      b"RCPT TO:<b@example.com>\r\nDATA\r\n", server.reads)
        # RFC 5321 4.5.2 stuffing, and the missing final CRLF added.
        self.assertEqual(server.messages, [b"Subject: x\r\n\r\n..dot\r\n...two\r\nend\r\n.\r\n"])
        self.assertEqual(outcomes["a@example.com"], RecipientOutcome.delivered(
            f"host {hop} said: 250 2.0.0 Saved (in reply to end of DATA)", "2.0.0"))

    async def test_starttls_refused_carries_on_in_plain_text(self):
        script = Script(keywords=("PIPELINING", "8BITMIME", "STARTTLS"))
        factory, _, outcomes = await self.run_script(script)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        # The scripted server knows no STARTTLS (500); the same session goes on.
        self.assertEqual(factory.only.commands[:3], [
            b"LHLO mx.test", b"STARTTLS", b"MAIL FROM:<sender@example.org>"])

    async def test_failed_tls_handshake_defers_with_4_7_5(self):
        script = Script(keywords=("PIPELINING", "STARTTLS"), starttls=b"220 2.0.0 Go ahead")
        _, hop, outcomes = await self.run_script(script)
        outcome = outcomes["a@example.com"]
        self.assertEqual((outcome.kind, outcome.status), ("deferred", "4.7.5"))
        self.assertTrue(outcome.reason.startswith(f"TLS handshake with {hop} failed: "),
                        outcome.reason)

    async def test_without_pipelining_one_command_at_a_time(self):
        factory, _, outcomes = await self.run_script(Script(keywords=("8BITMIME",)))
        server = factory.only
        for command in (b"MAIL FROM:<sender@example.org>\r\n", b"RCPT TO:<a@example.com>\r\n",
                        b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"):
            self.assertIn(command, server.reads)
        self.assertEqual([o.kind for o in outcomes.values()], ["delivered", "delivered"])

    async def test_one_reply_per_recipient_after_the_dot_each_decides_its_own(self):
        script = Script(after_dot=[b"250 2.0.0 <a> Saved", b"452 4.2.2 <b> Mailbox full",
                                   b"552 5.2.2 <c> Quota exceeded"])
        _, hop, outcomes = await self.run_script(
            script, recipients=("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(outcomes, {
            "a@example.com": RecipientOutcome.delivered(
                f"host {hop} said: 250 2.0.0 <a> Saved (in reply to end of DATA)", "2.0.0"),
            "b@example.com": RecipientOutcome.deferred(
                f"host {hop} said: 452 4.2.2 <b> Mailbox full (in reply to end of DATA)", "4.2.2"),
            "c@example.com": RecipientOutcome.bounced(
                f"host {hop} said: 552 5.2.2 <c> Quota exceeded (in reply to end of DATA)",
                "5.2.2"),
        })

    async def test_a_421_for_one_recipient_after_the_dot_keeps_the_replies_after_it(self):
        # Found by review: the 421 made the connection drop what followed
        # it, so c, delivered, was deferred and would have been delivered
        # again.  In one read and in reads of their own.
        for apart in (0, 0.05):
            await self.one_421_among_three(apart)

    async def one_421_among_three(self, apart):
        script = Script(after_dot=[b"250 2.0.0 <a> Saved", b"421 4.3.0 <b> Shutting down",
                                   b"250 2.0.0 <c> Saved"], apart=apart, then="close")
        _, hop, outcomes = await self.run_script(
            script, recipients=("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"host {hop} said: 421 4.3.0 <b> Shutting down (in reply to end of DATA)", "4.3.0"))
        self.assertEqual([outcomes[a].kind for a in ("a@example.com", "c@example.com")],
                         ["delivered", "delivered"])

    async def test_many_recipients_all_get_their_reply(self):
        # More replies after the dot than the connection's allowance for
        # unsolicited ones: each is owed, none is a surprise.
        recipients = [f"r{n}@example.com" for n in range(12)]
        factory, _, outcomes = await self.run_script(Script(), recipients=recipients)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.commands[-1], b"QUIT")

    async def test_refused_recipients_keep_their_rcpt_reply_and_get_no_data_reply(self):
        script = Script(rcpt={"b@example.com": b"450 4.2.1 <b> Try later",
                              "c@example.com": b"550 5.1.1 <c> Unknown"})
        _, hop, outcomes = await self.run_script(
            script, recipients=("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(outcomes["a@example.com"].kind, "delivered")
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"host {hop} said: 450 4.2.1 <b> Try later (in reply to RCPT TO)", "4.2.1"))
        self.assertEqual(outcomes["c@example.com"], RecipientOutcome.bounced(
            f"host {hop} said: 550 5.1.1 <c> Unknown (in reply to RCPT TO)", "5.1.1"))

    async def test_no_recipient_accepted_sends_no_message(self):
        script = Script(rcpt={"a@example.com": b"550 5.1.1 no", "b@example.com": b"550 5.1.1 no"})
        factory, _, outcomes = await self.run_script(script)
        self.assertEqual({o.kind for o in outcomes.values()}, {"bounced"})
        self.assertEqual(factory.only.messages, [])

    async def test_server_without_enhanced_codes_gets_derived_ones(self):
        script = Script(after_dot=[b"250 ok", b"451 local problem"])
        _, hop, outcomes = await self.run_script(script)
        self.assertEqual(outcomes["a@example.com"].status, "2.0.0")
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"host {hop} said: 451 4.0.0 local problem (in reply to end of DATA)", "4.0.0"))

    # recipients over the server's limit (RFC 5321 4.5.3.1.8, 4.5.3.1.10)

    FIVE = [f"r{n}@example.com" for n in range(1, 6)]

    async def test_the_rest_go_in_further_transactions_as_many_as_the_server_took(self):
        factory, hop, outcomes = await self.run_script(
            Script(rcpt_limit=2), recipients=self.FIVE)
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.delivered(
            f"host {hop} said: 250 2.0.0 Saved (in reply to end of DATA)", "2.0.0")})
        server = factory.only
        self.assertEqual(server.envelopes, [self.FIVE[0:2], self.FIVE[2:4], self.FIVE[4:5]])
        self.assertEqual(server.messages, [b"Subject: x\r\n\r\nbody\r\n.\r\n"] * 3)
        rcpts = [c for c in server.commands if c.startswith(b"RCPT")]
        # Five RCPTs first, then only as many as the server took: 2 and 1.
        self.assertEqual(len(rcpts), 5 + 2 + 1)
        self.assertEqual([c for c in server.commands if not c.startswith(b"RCPT")],
                         [b"LHLO mx.test"] + [b"MAIL FROM:<sender@example.org>", b"DATA"] * 3
                         + [b"QUIT"])

    async def test_further_transactions_without_pipelining_too(self):
        factory, _, outcomes = await self.run_script(
            Script(keywords=("8BITMIME",), rcpt_limit=3), recipients=self.FIVE)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.envelopes, [self.FIVE[0:3], self.FIVE[3:5]])

    async def test_a_552_5_5_3_of_an_rfc_821_server_is_read_the_same_way(self):
        factory, _, outcomes = await self.run_script(Script(
            rcpt_limit=4, rcpt_limit_reply=b"552 5.5.3 Too many recipients"),
            recipients=self.FIVE)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.envelopes, [self.FIVE[0:4], self.FIVE[4:5]])

    async def test_a_452_of_another_kind_is_not_a_count(self):
        # 452 4.3.1 is the server short of storage: the retry is the answer.
        factory, hop, outcomes = await self.run_script(Script(
            rcpt_limit=1, rcpt_limit_reply=b"452 4.3.1 Insufficient storage"),
            recipients=self.FIVE[:2])
        self.assertEqual(outcomes[self.FIVE[0]].kind, "delivered")
        self.assertEqual(outcomes[self.FIVE[1]], RecipientOutcome.deferred(
            f"host {hop} said: 452 4.3.1 Insufficient storage (in reply to RCPT TO)", "4.3.1"))
        self.assertEqual(len(factory.only.messages), 1)

    async def test_a_452_to_every_recipient_waits_for_the_retry(self):
        factory, hop, outcomes = await self.run_script(
            Script(rcpt_limit=0), recipients=self.FIVE[:2])
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"host {hop} said: 452 4.5.3 Too many recipients (in reply to RCPT TO)", "4.5.3")})
        self.assertEqual(factory.only.messages, [])
        self.assertEqual(len([c for c in factory.only.commands if c.startswith(b"MAIL")]), 1)

    async def test_a_552_5_5_3_to_every_recipient_is_deferred_not_bounced(self):
        _, hop, outcomes = await self.run_script(Script(
            rcpt_limit=0, rcpt_limit_reply=b"552 5.5.3 Too many recipients"),
            recipients=self.FIVE[:2])
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"host {hop} said: 552 5.5.3 Too many recipients (in reply to RCPT TO) "
            "(taken as temporary: RFC 5321 4.5.3.1.10)", "4.5.3")})

    async def test_a_further_transaction_refused_leaves_the_delivered_delivered(self):
        factory, hop, outcomes = await self.run_script(Script(
            rcpt_limit=2, later_mail=b"421 4.3.2 Going down now"), recipients=self.FIVE)
        self.assertEqual([outcomes[r].kind for r in self.FIVE[:2]], ["delivered"] * 2)
        waiting = RecipientOutcome.deferred(
            f"host {hop} said: 452 4.5.3 Too many recipients (in reply to RCPT TO) "
            "(a further transaction failed: 421 4.3.2 Going down now)", "4.5.3")
        self.assertEqual([outcomes[r] for r in self.FIVE[2:]], [waiting] * 3)
        self.assertEqual(factory.only.envelopes, [self.FIVE[:2]])

    async def test_a_further_transaction_cut_after_the_dot_keeps_what_it_decided(self):
        # Four recipients, two a transaction: the second message gets one
        # reply, for r3, and the server hangs up before r4's.
        script = Script(rcpt_limit=2, after_dots=[None, [b"250 2.0.0 <r3> Saved"]],
                        then="close")
        factory, hop, outcomes = await self.run_script(script, recipients=self.FIVE[:4])
        self.assertEqual([outcomes[r].kind for r in self.FIVE[:3]], ["delivered"] * 3)
        self.assertEqual(outcomes[self.FIVE[2]].reason,
                         f"host {hop} said: 250 2.0.0 <r3> Saved (in reply to end of DATA)")
        self.assertEqual(outcomes[self.FIVE[3]], RecipientOutcome.deferred(
            f"host {hop} said: 452 4.5.3 Too many recipients (in reply to RCPT TO) "
            f"(a further transaction failed: lost connection with {hop} while receiving "
            "the reply for <r4@example.com> after the end of data)", "4.5.3"))
        self.assertEqual(factory.only.envelopes, [self.FIVE[:2], self.FIVE[2:4]])

    def queued(self, content, recipients, **envelope):
        """The IMessage the scheduler hands a transport: a MessageView of
        a queue file (relaymail.queue.message_view.queued_message)."""
        handle, path = tempfile.mkstemp(suffix=".msg")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self.addCleanup(os.unlink, path)
        return MessageView.read("TESTQUEUEID", Envelope(SENDER, list(recipients), **envelope),
                                path, len(content))

    async def test_further_transactions_with_the_schedulers_message(self):
        # Found by review: MessageView.open() gives a file that cannot
        # seek, and the second transaction failed with a traceback.
        factory, hop = self.serve(Script(rcpt_limit=2))
        message = self.queued(b"Subject: x\r\n\r\nbody\r\n", self.FIVE)
        outcomes = await self.transport().deliver(message, self.FIVE, hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.envelopes, [self.FIVE[0:2], self.FIVE[2:4], self.FIVE[4:5]])
        self.assertEqual(factory.only.messages, [b"Subject: x\r\n\r\nbody\r\n.\r\n"] * 3)

    async def test_further_transactions_with_changed_header_fields(self):
        # A filter's changed fields: a view that is not the queue file as
        # it is, read through a copy.
        factory, hop = self.serve(Script(rcpt_limit=2))
        message = self.queued(b"Subject: x\r\n\r\nbody\r\n", self.FIVE[:3])
        changed = message.with_fields(
            [*message.fields, Field("X-Filter", "yes", b"X-Filter: yes\r\n")])
        outcomes = await self.transport().deliver(changed, self.FIVE[:3], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.messages,
                         [b"Subject: x\r\nX-Filter: yes\r\n\r\nbody\r\n.\r\n"] * 2)

    async def test_eight_bit_conversion_of_the_schedulers_message(self):
        # Found by review: the conversion maps the file, and MessageView's
        # had no descriptor; every such message was deferred ("fileno").
        content = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"caf\xc3\xa9\r\n")
        factory, hop = self.serve(Script(keywords=("PIPELINING",), rcpt_limit=1))
        message = self.queued(content, self.FIVE[:2], body="8BITMIME")
        outcomes = await self.transport().deliver(message, self.FIVE[:2], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(len(factory.only.messages), 2)
        for sent in factory.only.messages:
            self.assertIn(b"caf=C3=A9\r\n", sent)

    async def test_a_552_5_5_3_is_deferred_when_the_first_transaction_is_cut_too(self):
        # Found by review: the 552 stayed a bounce when the connection went
        # after the dot, before any further transaction.
        _, hop, outcomes = await self.run_script(Script(
            rcpt_limit=1, rcpt_limit_reply=b"552 5.5.3 Too many recipients",
            after_dot=[], then="close"), recipients=self.FIVE[:2])
        self.assertEqual(outcomes[self.FIVE[1]], RecipientOutcome.deferred(
            f"host {hop} said: 552 5.5.3 Too many recipients (in reply to RCPT TO) "
            "(taken as temporary: RFC 5321 4.5.3.1.10)", "4.5.3"))
        self.assertEqual(outcomes[self.FIVE[0]].status, "4.4.2")

    async def test_a_421_after_the_replies_of_the_first_transaction(self):
        # In the same write as those replies: the session has sent the next
        # MAIL by the time it reads the 421, and takes it as MAIL's reply.
        factory, hop, outcomes = await self.run_script(
            Script(rcpt_limit=2, between=b"421 4.3.2 Shutting down"), recipients=self.FIVE[:3])
        self.assertEqual([outcomes[r].kind for r in self.FIVE[:2]], ["delivered"] * 2)
        self.assertEqual(outcomes[self.FIVE[2]], RecipientOutcome.deferred(
            f"host {hop} said: 452 4.5.3 Too many recipients (in reply to RCPT TO) "
            f"(a further transaction failed: host {hop} said: 421 4.3.2 Shutting down "
            "(in reply to MAIL FROM))", "4.5.3"))
        self.assertEqual(factory.only.envelopes, [self.FIVE[:2]])

    async def test_cancelled_part_way_tells_what_was_delivered(self):
        # What the runner's transport_timeout (and a stop) does.  Found by
        # review: the Deferred failed, and r1 and r2, stored, would have
        # been sent again at every retry.
        factory, hop = self.serve(Script(rcpt_limit=2, after_dots=[None, []], then="hang"))
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", self.FIVE)
        d = self.transport().deliver(message, self.FIVE, hop)
        while not factory.connections or len(factory.only.messages) < 2:
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        outcomes = await d
        self.assertEqual([outcomes[r].kind for r in self.FIVE[:2]], ["delivered"] * 2)
        cut = f"delivery by LMTP to {hop} cut short by a stop or [delivery] transport_timeout"
        self.assertEqual([outcomes[r] for r in self.FIVE[2:]], [RecipientOutcome.deferred(
            f"host {hop} said: 452 4.5.3 Too many recipients (in reply to RCPT TO) ({cut})",
            "4.5.3")] * 3)
        await factory.only.closed

    async def cancel_when(self, factory, ready, d):
        while not (factory.connections and ready(factory.only)):
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        return await d

    async def test_cancelled_after_a_reply_in_a_further_transaction_keeps_it(self):
        # Found by review: r3, delivered in the second transaction, kept
        # its old 452 and was deferred, to be sent again.
        factory, hop = self.serve(Script(
            rcpt_limit=2, after_dots=[None, [b"250 2.0.0 <r3> Saved"]], then="hang"))
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", self.FIVE)
        d = self.transport().deliver(message, self.FIVE, hop)
        while not (factory.connections and len(factory.only.messages) == 2):
            await task.deferLater(reactor, 0.01, lambda: None)
        # Time for r3's reply to cross the loopback; nothing tells the
        # test that the session has read it but the outcome itself.
        await task.deferLater(reactor, 0.2, lambda: None)
        d.cancel()
        outcomes = await d
        self.assertEqual(outcomes[self.FIVE[2]], RecipientOutcome.delivered(
            f"host {hop} said: 250 2.0.0 <r3> Saved (in reply to end of DATA)", "2.0.0"))
        self.assertEqual([outcomes[r].kind for r in self.FIVE], ["delivered"] * 3 + ["deferred"] * 2)

    async def test_cancelled_while_waiting_for_the_reply_to_quit(self):
        # Found by review: every outcome was lost with the cancellation.
        factory, hop = self.serve(Script(stall="QUIT"))
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", self.FIVE[:2])
        opened, open_file = [], message.open
        message.open = lambda: opened.append(open_file()) or opened[-1]
        d = self.transport().deliver(message, self.FIVE[:2], hop)
        outcomes = await self.cancel_when(factory, lambda server: b"QUIT" in server.commands, d)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        await factory.only.closed
        await task.deferLater(reactor, 0, lambda: None)
        self.assertTrue(opened[0].closed)

    async def test_cancelled_twice(self):
        # The runner's timeout, then its stop, before the first cut's
        # connection is gone.
        factory, hop = self.serve(Script(rcpt_limit=2, after_dots=[None, []], then="hang"))
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", self.FIVE)
        d = self.transport().deliver(message, self.FIVE, hop)
        while not (factory.connections and len(factory.only.messages) == 2):
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        d.cancel()
        outcomes = await d
        self.assertEqual([outcomes[r].kind for r in self.FIVE], ["delivered"] * 2 + ["deferred"] * 3)

    async def test_a_site_message_whose_open_gives_a_bare_reader(self):
        # IMessage.open() promises a file to read, no more.  Found by
        # review: one without seekable() failed with a traceback.
        content = b"Subject: x\r\n\r\nbody\r\n"
        message = self.message(content, self.FIVE[:3])
        readers = []

        class Reader:
            def __init__(self):
                self._data = io.BytesIO(content)
                self.closed = False

            def read(self, size=-1):
                return self._data.read(size)

            def close(self):
                self.closed = True

        message.open = lambda: readers.append(Reader()) or readers[-1]
        factory, hop = self.serve(Script(rcpt_limit=2))
        outcomes = await self.transport().deliver(message, self.FIVE[:3], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.messages, [content + b".\r\n"] * 2)
        self.assertEqual([r.closed for r in readers], [True])

    async def test_a_site_message_that_gives_a_wrong_size_is_sent_with_its_files_size(self):
        # SIZE= and a further transaction go by the file, not by what the
        # site's IMessage says (found by review: SIZE=3 was sent).
        content = b"Subject: x\r\n\r\nbody\r\n"
        message = self.message(content, self.FIVE[:3])
        message.size = 3
        factory, hop = self.serve(Script(rcpt_limit=2, keywords=("PIPELINING", "SIZE 1000")))
        outcomes = await self.transport().deliver(message, self.FIVE[:3], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        mails = [c for c in factory.only.commands if c.startswith(b"MAIL")]
        self.assertEqual(mails, [b"MAIL FROM:<%s> SIZE=%d" % (SENDER.encode(), len(content))] * 2)
        self.assertEqual(factory.only.messages, [content + b".\r\n"] * 2)

    async def test_a_site_message_whose_file_starts_past_its_beginning_is_sent_from_there(self):
        # A site's open() that gives a real file read up to the message
        # (a header of its own before it): what is left is the message,
        # and a further transaction sends that again, not the whole file.
        content = b"Subject: x\r\n\r\nbody\r\n"
        message = self.message(b"SITE-HEADER\n" + content, self.FIVE[:3])
        message.size = len(content)

        def after_the_header():
            file = open(message.path, "rb")
            file.readline()
            return file
        message.open = after_the_header
        factory, hop = self.serve(Script(rcpt_limit=2, keywords=("PIPELINING", "SIZE 1000")))
        outcomes = await self.transport().deliver(message, self.FIVE[:3], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.messages, [content + b".\r\n"] * 2)

    async def test_a_bounded_file_from_a_site_is_copied_and_sent_with_its_own_size(self):
        # relaymail's own MessageFile (open_message) is seekable, at 0 and
        # has a fileno, but fstat counts what follows the message (the
        # queue record).  Found by review.
        content = b"Subject: x\r\n\r\nbody\r\n"
        message = self.message(content + b"TRAILING-QUEUE-RECORD " * 10, self.FIVE[:2])
        message.size = len(content)
        message.open = lambda: open_message(message.path, len(content))
        factory, hop = self.serve(Script(keywords=("PIPELINING", "SIZE 1000")))
        outcomes = await self.transport().deliver(message, self.FIVE[:2], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        self.assertEqual(factory.only.messages, [content + b".\r\n"])
        mails = [c for c in factory.only.commands if c.startswith(b"MAIL")]
        self.assertEqual(mails, [b"MAIL FROM:<%s> SIZE=%d" % (SENDER.encode(), len(content))])

    async def test_a_bounded_file_converted_to_7bit_stops_where_the_message_ends(self):
        content = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"caf\xc3\xa9\r\n")
        message = self.message(content + b"SECRET-QUEUE-RECORD\r\n", self.FIVE[:2],
                               body="8BITMIME")
        message.size = len(content)
        message.open = lambda: open_message(message.path, len(content))
        factory, hop = self.serve(Script(keywords=("PIPELINING",)))
        outcomes = await self.transport().deliver(message, self.FIVE[:2], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        [sent] = factory.only.messages
        self.assertNotIn(b"SECRET", sent)
        self.assertTrue(sent.isascii())

    async def test_a_file_whose_fstat_says_0_is_copied(self):
        # A regular file whose fstat says 0 (procfs, sysfs, FUSE): mapped
        # in place, the 7-bit check saw 0 bytes and sent 8-bit content
        # unconverted to a server without 8BITMIME.
        content = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"caf\xc3\xa9\r\n")
        message = self.message(content, self.FIVE[:2], body="8BITMIME")
        real_fstat = os.fstat
        self.patch(lmtp.os, "fstat", lambda fd: os.stat_result(
            (*real_fstat(fd)[:6], 0, *real_fstat(fd)[7:])))
        factory, hop = self.serve(Script(keywords=("PIPELINING", "SIZE 1000")))
        outcomes = await self.transport().deliver(message, self.FIVE[:2], hop)
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        [sent] = factory.only.messages
        self.assertTrue(sent.isascii())
        self.assertIn(b"caf=C3=A9", sent)

    async def test_cancelled_in_the_first_transaction_defers_everyone_4_4_2(self):
        factory, hop = self.serve(Script(stall="DATA"))
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", self.FIVE[:2])
        d = self.transport().deliver(message, self.FIVE[:2], hop)
        while not factory.connections or b"DATA" not in factory.only.commands:
            await task.deferLater(reactor, 0.01, lambda: None)
        d.cancel()
        outcomes = await d
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"delivery by LMTP to {hop} cut short by a stop or [delivery] transport_timeout",
            "4.4.2")})

    # refusals before the recipients

    async def test_mail_refused_with_5xx_bounces_everyone(self):
        _, hop, outcomes = await self.run_script(Script(mail=b"553 5.1.8 Bad sender"))
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.bounced(
            f"host {hop} said: 553 5.1.8 Bad sender (in reply to MAIL FROM)", "5.1.8")})

    async def test_mail_refused_with_4xx_defers_everyone(self):
        _, _, outcomes = await self.run_script(Script(mail=b"451 4.3.0 Try later"))
        self.assertEqual({(o.kind, o.status) for o in outcomes.values()}, {("deferred", "4.3.0")})

    async def test_greeting_refused_with_5xx_defers(self):
        _, hop, outcomes = await self.run_script(Script(greeting=b"554 5.3.2 not now"))
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"host {hop} said: 554 5.3.2 not now (in reply to the greeting) "
            "(deferred: the LMTP server is not taking mail)", "4.3.2")})

    async def test_lhlo_refused_defers(self):
        factory, _, outcomes = await self.run_script(Script(lhlo=b"500 5.5.1 Unknown command"))
        self.assertEqual({(o.kind, o.status) for o in outcomes.values()}, {("deferred", "4.5.1")})
        self.assertEqual(factory.only.commands, [b"LHLO mx.test", b"QUIT"])

    async def test_data_refused_decides_every_accepted_recipient(self):
        _, hop, outcomes = await self.run_script(Script(data=b"554 5.6.0 no data today"))
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.bounced(
            f"host {hop} said: 554 5.6.0 no data today (in reply to DATA)", "5.6.0")})

    async def test_message_over_the_servers_size_bounces_before_mail(self):
        factory, _, outcomes = await self.run_script(
            Script(keywords=("PIPELINING", "SIZE 10")))
        self.assertEqual({(o.kind, o.status) for o in outcomes.values()}, {("bounced", "5.3.4")})
        self.assertEqual(factory.only.commands, [b"LHLO mx.test", b"QUIT"])

    # hostile servers

    async def test_server_closing_after_the_dot_defers_everyone(self):
        _, hop, outcomes = await self.run_script(Script(after_dot=[], then="close"))
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"lost connection with {hop} while receiving the reply for <a@example.com> "
            "after the end of data", "4.4.2")})

    async def test_too_few_replies_then_close_defers_the_rest(self):
        script = Script(after_dot=[b"250 2.0.0 <a> Saved"], then="close")
        _, hop, outcomes = await self.run_script(
            script, recipients=("a@example.com", "b@example.com", "c@example.com"))
        self.assertEqual(outcomes["a@example.com"].kind, "delivered")
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"lost connection with {hop} while receiving the reply for <b@example.com> "
            "after the end of data", "4.4.2"))
        self.assertEqual(outcomes["c@example.com"], outcomes["b@example.com"])

    async def test_garbage_reply_after_the_dot_defers_the_rest(self):
        script = Script(after_dot=[b"250 2.0.0 <a> Saved", b"hello there"])
        _, hop, outcomes = await self.run_script(script)
        self.assertEqual(outcomes["a@example.com"].kind, "delivered")
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"protocol error from {hop}: malformed reply: not a reply line: 'hello there'",
            "4.5.0"))

    async def test_intermediate_reply_after_the_dot_is_a_protocol_error(self):
        script = Script(after_dot=[b"354 more?", b"250 2.0.0 late"])
        _, hop, outcomes = await self.run_script(script)
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"protocol error from {hop}: 354 more? in reply to end of DATA", "4.5.0")})

    async def test_hung_after_the_dot_times_out_and_defers(self):
        transport = self.transport(data_timeout=0.5)
        script = Script(after_dot=[b"250 2.0.0 <a> Saved"], then="hang")
        _, hop, outcomes = await self.run_script(script, transport=transport)
        self.assertEqual(outcomes["a@example.com"].kind, "delivered")
        self.assertEqual(outcomes["b@example.com"], RecipientOutcome.deferred(
            f"conversation with {hop} timed out while receiving the reply for "
            "<b@example.com> after the end of data", "4.4.2"))

    async def test_hung_greeting_times_out_and_defers(self):
        transport = self.transport(command_timeout=0.5)
        _, hop, outcomes = await self.run_script(Script(stall="greeting"), transport=transport)
        self.assertEqual(set(outcomes.values()), {RecipientOutcome.deferred(
            f"conversation with {hop} timed out while receiving the initial server greeting",
            "4.4.2")})

    async def test_hung_at_rcpt_times_out_and_defers(self):
        transport = self.transport(command_timeout=0.5)
        _, _, outcomes = await self.run_script(Script(stall="RCPT"), transport=transport)
        self.assertEqual({(o.kind, o.status) for o in outcomes.values()}, {("deferred", "4.4.2")})

    # 8-bit mail and a server without 8BITMIME

    async def test_eight_bit_body_is_converted_for_a_server_without_8bitmime(self):
        content = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"caf\xc3\xa9\r\n")
        factory, _, outcomes = await self.run_script(
            Script(keywords=("PIPELINING",)), content=content, body="8BITMIME")
        self.assertEqual({o.kind for o in outcomes.values()}, {"delivered"})
        server = factory.only
        self.assertIn(b"MAIL FROM:<sender@example.org>", server.commands)
        sent = server.messages[0]
        self.assertTrue(sent.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", sent)
        self.assertIn(b"caf=C3=A9\r\n", sent)

    async def test_eight_bit_with_8bitmime_offered_declares_body(self):
        content = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
        factory, _, _ = await self.run_script(Script(), content=content, body="8BITMIME")
        self.assertIn(b"MAIL FROM:<sender@example.org> BODY=8BITMIME", factory.only.commands)
        self.assertEqual(factory.only.messages, [content + b".\r\n"])

    async def test_unconvertible_eight_bit_is_deferred_not_bounced(self):
        content = (b"Subject: signed\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/signed; boundary=b; protocol=x\r\n\r\n"
                   b"--b\r\nContent-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n"
                   b"--b\r\nContent-Type: application/x-sig\r\n\r\nsig\r\n--b--\r\n")
        factory, hop, outcomes = await self.run_script(
            Script(keywords=("PIPELINING",)), content=content, body="8BITMIME")
        outcome = outcomes["a@example.com"]
        self.assertEqual((outcome.kind, outcome.status), ("deferred", "4.6.3"))
        self.assertIn(f"and the LMTP server {hop} does not offer 8BITMIME (deferred until "
                      "it does)", outcome.reason)
        self.assertEqual(factory.only.commands, [b"LHLO mx.test", b"QUIT"])

    async def test_smtputf8_declared_and_offered(self):
        content = "Subject: caf\u00e9\r\n\r\nhi\r\n".encode()
        recipients = ("j\u00f6rg@example.com",)
        factory, _, outcomes = await self.run_script(
            Script(keywords=("PIPELINING", "8BITMIME", "SMTPUTF8")), recipients=recipients,
            content=content, body="8BITMIME", smtputf8=True)
        self.assertEqual(outcomes[recipients[0]].kind, "delivered")
        self.assertIn(b"MAIL FROM:<sender@example.org> BODY=8BITMIME SMTPUTF8",
                      factory.only.commands)
        self.assertIn("RCPT TO:<j\u00f6rg@example.com>".encode(), factory.only.commands)

    # next hops

    async def test_no_server_on_the_socket_defers_with_4_4_1(self):
        path = os.path.join(os.path.abspath(self.mktemp_path()), "none")
        message = self.message(b"Subject: x\r\n\r\nx\r\n", ["a@example.com"])
        outcomes = await self.transport().deliver(message, ["a@example.com"], path)
        outcome = outcomes["a@example.com"]
        self.assertEqual((outcome.kind, outcome.status), ("deferred", "4.4.1"))
        self.assertTrue(outcome.reason.startswith(f"connect to {path}: "), outcome.reason)

    async def test_bad_next_hop_defers_with_4_3_5_and_logs_an_error(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        message = self.message(b"Subject: x\r\n\r\nx\r\n", ["a@example.com"])
        outcomes = await self.transport().deliver(message, ["a@example.com"], "localhost")
        self.assertEqual(outcomes, {"a@example.com": RecipientOutcome.deferred(
            "lmtp transport misconfigured: 'localhost': no port (LMTP has no default port, "
            "RFC 2033)", "4.3.5")})
        errors = [e for e in events if e.get("log_level") is not None
                  and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["queue_id"], "TESTQUEUEID")
        self.assertEqual(message.opened, 0)


class NextHopTests(unittest.TestCase):

    def test_socket_paths(self):
        self.assertEqual(parse_next_hop("/run/dovecot/lmtp"), NextHop(path="/run/dovecot/lmtp"))
        self.assertEqual(parse_next_hop("unix:/run/dovecot/lmtp"),
                         NextHop(path="/run/dovecot/lmtp"))

    def test_tcp(self):
        self.assertEqual(parse_next_hop("[127.0.0.1]:24"), NextHop(host="127.0.0.1", port=24))
        self.assertEqual(parse_next_hop("mail.test:2424"), NextHop(host="mail.test", port=2424))
        hop = parse_next_hop("[::1]:24")
        self.assertEqual((hop.host, hop.port, hop.label), ("::1", 24, "[::1]:24"))

    def test_refused(self):
        for text, problem in [
            (None, "an lmtp route needs a next hop"),
            ("", "an lmtp route needs a next hop"),
            ("mail.test", "no port (LMTP has no default port"),
            ("[mail.test]", "no port (LMTP has no default port"),
            ("mail.test:25", "must not be used on port 25 (RFC 2033 1)"),
            ("mail.test:0", "the port must be a number from 1 to 65535"),
            ("mail.test:lmtp", "the port must be a number from 1 to 65535"),
            ("::1:24", "write IPv6 as [address]:port"),
            ("private/dovecot-lmtp", "the socket path must be absolute"),
            ("unix:private/lmtp", "the socket path must be absolute"),
        ]:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_next_hop(text)
            self.assertIn(problem, str(caught.exception))


class ContractTests(unittest.TestCase):

    def test_provides_itransport_named_lmtp(self):
        transport = LMTPTransport(reactor, make_settings(self._path()))
        self.assertTrue(verify.verifyObject(ITransport, transport))
        self.assertEqual(transport.name, "lmtp")

    def test_timeouts_and_lhlo_name_come_from_delivery_settings(self):
        settings = make_settings(self._path(), delivery__helo_name="relay.example.net",
                                 delivery__connect_timeout="7", delivery__command_timeout="8",
                                 delivery__data_timeout="9")
        config = client_config(settings)
        self.assertEqual((config.helo_name, config.connect_timeout, config.command_timeout,
                          config.data_timeout), ("relay.example.net", 7, 8, 9))
        self.assertEqual(client_config(make_settings(self._path())).helo_name, "mx.test")

    def _path(self):
        from pathlib import Path
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class CutByTheRunnerTests(LMTPTestCase):
    """The TransportRunner (relaymail.delivery.transports) stopping an lmtp
    delivery part way: what the finished transaction delivered is handed
    on as decided, the rest left as it was (no attempt counted)."""

    serve = ScriptedTests.serve
    _stop = ScriptedTests._stop

    async def test_a_stop_hands_on_what_was_delivered(self):
        factory, hop = self.serve(Script(rcpt_limit=2, after_dots=[None, []], then="hang"))
        recipients = [f"r{n}@example.com" for n in range(1, 5)]
        message = self.message(b"Subject: x\r\n\r\nbody\r\n", recipients)
        lmtp = self.transport()
        registry = SimpleNamespace(get=lambda name: lmtp, taking_jobs=lambda: [])
        runner = TransportRunner(reactor, registry, lambda job: message, None, 2, 300)
        ended = defer.Deferred()
        job = Job(queue_id="TESTQUEUEID", destination=TransportHop("lmtp", hop), sender=SENDER,
                  recipients=recipients, message_path=message.path,
                  on_done=lambda job, outcomes: ended.callback(("done", outcomes)),
                  on_abandoned=lambda job, decided=(): ended.callback(("abandoned", decided)))
        runner.submit(job)
        while not (factory.connections and len(factory.only.messages) == 2):
            await task.deferLater(reactor, 0.01, lambda: None)
        runner.stop()
        how, decided = await ended
        self.assertEqual(how, "abandoned")
        self.assertEqual([(o.address, o.status) for o in decided],
                         [(recipients[0], SENT), (recipients[1], SENT)])
        await factory.only.closed
