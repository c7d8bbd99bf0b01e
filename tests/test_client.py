"""The outbound ESMTP client against a scripted server on a real socket.

:class:`ScriptedServer` is a small SMTP server written for these tests:
each test says what it advertises and how it answers, and afterwards reads
exactly what arrived -- every read, every command line, every message as
it was on the wire.  The pure pieces (reply parsing, dot-stuffing) are also
tested alone, at the end.
"""

import copy
import functools
import os
import re
import tempfile
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st
from OpenSSL import SSL
from twisted.internet import defer, reactor, task
from twisted.internet import error as internet_error
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from relaymail.delivery import client as client_module
from relaymail.delivery.client import (
    ClientConfig, DeliveryError, Hop, RecipientResult, connect)
from relaymail.delivery.responses import MalformedReply, ReplyReader, parse_ehlo, size_limit
from relaymail.delivery.stream import CHUNK_SIZE
from relaymail.delivery.stuffing import DotStuffer
from relaymail.queue import queue_file
from tests import certs

SERVER_NAME = "mx.test"
HELO = "client.test"
PLAIN_KEYWORDS = ("SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")


# -- throwaway certificates, made once per run ------------------------------

@functools.cache
def authority():
    return certs.CertificateAuthority()


@functools.cache
def server_cert(kind):
    """'ca': signed by the test CA for mx.test; 'self': self-signed for mx.test."""
    if kind == "ca":
        return authority().issue(SERVER_NAME)
    return certs.self_signed(SERVER_NAME)


@implementer(IOpenSSLContextFactory)
class ServerContext:
    """A server TLS context factory for a test certificate (built with
    cryptography objects, which pyOpenSSL prefers to its own)."""

    def __init__(self, pair):
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(x509.load_pem_x509_certificate(pair.cert_pem))
        self._context.use_privatekey(serialization.load_pem_private_key(pair.key_pem, None))

    def getContext(self):
        return self._context


@functools.cache
def server_tls_options(kind):
    return ServerContext(server_cert(kind))


# -- the scripted server --------------------------------------------------------

@dataclass
class Script:
    """How the test server behaves.

    ``replies`` maps a verb (``'MAIL'``, ``'DATA'``, ``'.'`` for the end of
    data, ...) to replies used in turn before the defaults; ``rcpt`` maps a
    recipient to its reply.  ``stall`` names a verb (or ``'greeting'``)
    never answered; ``close_on`` a verb that makes the server hang up.
    """

    keywords: tuple = PLAIN_KEYWORDS
    keywords_after_tls: tuple | None = None
    pipelining: bool = False
    tls: str | None = None          # 'ca' or 'self': offer STARTTLS with that certificate
    inject: bytes = b""             # written right after the 220 to STARTTLS
    greeting: bytes = b"220 mx.test ESMTP scripted"
    replies: dict = field(default_factory=dict)
    rcpt: dict = field(default_factory=dict)
    stall: str | None = None
    close_on: str | None = None
    pause_after_354: bool = False
    # A server that says 421 and neither closes nor reads on (RFC 5321 3.8
    # has it close): our side must not wait on it.
    stay_after_421: bool = False
    # Recipients taken in one transaction, past which RCPT gets rcpt_limit_reply.
    rcpt_limit: int | None = None
    rcpt_limit_reply: bytes = b"452 4.5.3 Error: too many recipients"
    hang_up_in_handshake: bool = False  # say 220 to STARTTLS, then hang up

    def advertised(self, tls_active):
        keywords = list(self.keywords_after_tls if tls_active and self.keywords_after_tls
                        is not None else self.keywords)
        if self.pipelining:
            keywords.insert(0, "PIPELINING")
        if self.tls and not tls_active:
            keywords.append("STARTTLS")
        return keywords


class ScriptedServer(Protocol):
    """One server connection; records what it receives."""

    def __init__(self, script):
        self.script = script
        self.reads = []        # every dataReceived, as it came
        self.commands = []     # every command line (and AUTH LOGIN answer)
        self.messages = []     # DATA content as on the wire, terminator included
        self.envelopes = []    # the recipients each of those messages went to
        self.tls = False
        self.closed = defer.Deferred()
        self._buffer = b""
        self._in_data = False
        self._stopped = False
        self._auth_login = []
        self._greeted = False
        self._reset()

    def _reset(self):
        self._mail = False
        self._accepted = []

    def connectionMade(self):
        if self.script.stall != "greeting":
            self.transport.write(self.script.greeting + b"\r\n")

    def connectionLost(self, reason):
        self.closed.callback(None)

    def dataReceived(self, data):
        self.reads.append(data)
        if self._stopped:
            return
        self._buffer += data
        while not self._stopped:
            if self._in_data:
                end = self._data_end()
                if end is None:
                    return
                message, self._buffer = self._buffer[:end], self._buffer[end:]
                self._end_of_data(message)
            else:
                line, found, rest = self._buffer.partition(b"\r\n")
                if not found:
                    return
                self._buffer = rest
                self._command(line)

    def _data_end(self):
        if self._buffer.startswith(b".\r\n"):
            return 3
        index = self._buffer.find(b"\r\n.\r\n")
        return None if index < 0 else index + 5

    def _say(self, verb, default):
        queue = self.script.replies.get(verb)
        reply = queue.pop(0) if queue else default
        self.transport.write(reply + b"\r\n")
        self._hang_up_after(reply)
        return reply

    def _hang_up_after(self, reply):
        # RFC 5321 3.8: a 421 closes the channel; what was sent after the
        # command stays unread.
        if reply.startswith(b"421") and not self.script.stay_after_421:
            self._stopped = True
            self.transport.loseConnection()

    def _command(self, line):
        self.commands.append(line)
        if self._auth_login:
            challenge = self._auth_login.pop(0)
            if challenge is None:
                self._say("AUTH", b"235 2.7.0 Authentication successful")
            else:
                self.transport.write(challenge + b"\r\n")
            return
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        if verb == self.script.stall:
            self._stopped = True
            return
        if verb == self.script.close_on:
            self._stopped = True
            self.transport.loseConnection()
            return
        handler = getattr(self, "_do_" + verb, None)
        if handler is None:
            self._say(verb, b"500 5.5.2 Error: command not recognized")
        else:
            handler(line)

    def _do_EHLO(self, line):
        keywords = [b"mx.test"] + [k.encode() for k in self.script.advertised(self.tls)]
        lines = [b"250-" + k for k in keywords[:-1]] + [b"250 " + keywords[-1]]
        if self._say("EHLO", b"\r\n".join(lines)).startswith(b"2"):
            self._greeted = True
            self._reset()

    def _do_HELO(self, line):
        if self._say("HELO", b"250 mx.test").startswith(b"2"):
            self._greeted = True
            self._reset()

    def _do_MAIL(self, line):
        if not self._greeted:
            self._say("MAIL", b"503 5.5.1 Error: send HELO/EHLO first")
        elif self._say("MAIL", b"250 2.1.0 Ok").startswith(b"2"):
            self._mail = True

    def _do_RCPT(self, line):
        if not self._mail:
            self.transport.write(b"503 5.5.1 Error: need MAIL command\r\n")
            return
        address = line[line.index(b"<") + 1:line.rindex(b">")].decode()
        reply = self.script.rcpt.get(address, b"250 2.1.5 Ok")
        limit = self.script.rcpt_limit
        if limit is not None and len(self._accepted) >= limit:
            reply = self.script.rcpt_limit_reply
        self.transport.write(reply + b"\r\n")
        self._hang_up_after(reply)
        if reply.startswith(b"2"):
            self._accepted.append(address)

    def _do_DATA(self, line):
        if not self._mail:
            self.transport.write(b"503 5.5.1 Error: need RCPT command\r\n")
        elif not self._accepted:
            self.transport.write(b"554 5.5.1 Error: no valid recipients\r\n")
        elif self._say("DATA", b"354 End data with <CR><LF>.<CR><LF>").startswith(b"354"):
            self._in_data = True
            if self.script.pause_after_354:
                self.transport.pauseProducing()

    def _end_of_data(self, message):
        self._in_data = False
        self.messages.append(message)
        self.envelopes.append(self._accepted)
        self._reset()
        if self.script.stall == ".":
            self._stopped = True
            return
        self._say(".", b"250 2.0.0 Ok: queued as 4XyZ")

    def _do_RSET(self, line):
        self._reset()
        self._say("RSET", b"250 2.0.0 Ok")

    def _do_NOOP(self, line):
        self._say("NOOP", b"250 2.0.0 Ok")

    def _do_QUIT(self, line):
        self._say("QUIT", b"221 2.0.0 Bye")
        self._stopped = True
        self.transport.loseConnection()

    def _do_STARTTLS(self, line):
        if not self.script.tls or self.tls:
            self._say("STARTTLS", b"454 4.7.0 TLS not available")
            return
        reply = self._say("STARTTLS", b"220 2.0.0 Ready to start TLS")
        if not reply.startswith(b"220"):
            return
        # Written before the switch, so it leaves in plain text right
        # behind the 220 (CVE-2011-0411).
        if self.script.inject:
            self.transport.write(self.script.inject)
        if self.script.hang_up_in_handshake:
            self._stopped = True
            self.transport.loseConnection()
            return
        self.transport.startTLS(server_tls_options(self.script.tls))
        self.tls = True
        self._greeted = False
        self._buffer = b""
        self._reset()

    def _do_AUTH(self, line):
        words = line.split()
        mechanism = words[1].upper() if len(words) > 1 else b""
        if mechanism == b"PLAIN":
            self._say("AUTH", b"235 2.7.0 Authentication successful")
        elif mechanism == b"LOGIN":
            self.transport.write(b"334 VXNlcm5hbWU6\r\n")
            self._auth_login = [b"334 UGFzc3dvcmQ6", None]
        else:
            self.transport.write(b"504 5.5.4 Unrecognized authentication type\r\n")


class ScriptedFactory(Factory):
    noisy = False

    def __init__(self, script):
        self.script = script
        self.connections = []

    def buildProtocol(self, addr):
        server = ScriptedServer(self.script)
        self.connections.append(server)
        return server

    @property
    def only(self):
        """The one connection a test expects."""
        assert len(self.connections) == 1, self.connections
        return self.connections[0]


# -- helpers ----------------------------------------------------------------------

def config(**overrides):
    values = dict(helo_name=HELO, tls="may", connect_timeout=5, command_timeout=5,
                  data_timeout=5, data_block_timeout=5, quit_timeout=2)
    values.update(overrides)
    return ClientConfig(**values)


def reference_stuffing(message):
    """Dot-stuffing as RFC 5321 4.5.2 words it, for whole messages."""
    stuffed = re.sub(rb"(\A|\r\n)\.", rb"\1..", message)
    if message and not message.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def tricky_message():
    """A message over two chunks with the awkward cases: a dot at the very
    start, a line that is just '.', a line starting '..', a CR|LF split
    across the first chunk boundary followed by '.', a CRLF ending the
    second chunk with '.' starting the third, and no final CRLF."""
    filler = b"".join(b"line %05d of filler text, long enough to matter\r\n" % i
                      for i in range(3000))
    head = b".dot at the very start\r\n.\r\n..two dots\r\nSubject: x\r\n\r\n"
    body = (head + filler)[:CHUNK_SIZE - 1]
    body += b"\r\n.split across the CR|LF boundary\r\n"
    body = (body + filler)[:2 * CHUNK_SIZE - 2] + b"\r\n"
    body += b".dot at the start of the third chunk\r\n" + filler[:5000]
    body += b"last line without CRLF"
    assert body[CHUNK_SIZE - 1:CHUNK_SIZE + 2] == b"\r\n."
    assert body[2 * CHUNK_SIZE - 2:2 * CHUNK_SIZE + 1] == b"\r\n."
    return body


class ClientTestCase(unittest.TestCase):
    """Runs a scripted server per test and cleans every connection up."""

    timeout = 20

    def setUp(self):
        self.client_connections = []
        original = client_module.ClientConnection

        def tracked(*args, **kwargs):
            connection = original(*args, **kwargs)
            self.client_connections.append(connection)
            return connection

        self.patch(client_module, "ClientConnection", tracked)

    def serve(self, script=None):
        factory = ScriptedFactory(script or Script())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        return factory, Hop(SERVER_NAME, "127.0.0.1", port.getHost().port)

    async def _stop(self, port, factory):
        for connection in self.client_connections:
            connection.abort()
            await connection.wait_closed()
        for server in factory.connections:
            if not server.closed.called:
                server.transport.abortConnection()
            await server.closed
        await port.stopListening()

    def message_file(self, content):
        handle, path = tempfile.mkstemp(suffix=".msg")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self.addCleanup(os.unlink, path)
        return path

    async def session_for(self, script=None, **overrides):
        factory, hop = self.serve(script)
        session = await connect(reactor, hop, config(**overrides))
        return factory, session

    async def connect_fails(self, script=None, hop=None, **overrides):
        if hop is None:
            _, hop = self.serve(script)
        try:
            await connect(reactor, hop, config(**overrides))
        except DeliveryError as error:
            return error
        self.fail("connect() succeeded")

    async def failed_both_ways(self, **script):
        """One message to b@example.com, with PIPELINING and without, at a
        server following ``script`` (Script's fields), each delivery
        expected to fail: ``[(pipelining, server, session, error)]``."""
        path = self.message_file(SIMPLE)
        failures = []
        for pipelining in (True, False):
            # A copy each: a server uses up its scripted replies.
            factory, session = await self.session_for(
                Script(pipelining=pipelining, **copy.deepcopy(script)))
            error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
            failures.append((pipelining, factory.only, session, error))
        return failures

    async def deliver_fails(self, session, *args, **kwargs):
        try:
            await session.deliver(*args, **kwargs)
        except DeliveryError as error:
            return error
        self.fail("deliver() succeeded")


SIMPLE = b"Subject: hello\r\n\r\nbody\r\n"


# -- plain delivery ------------------------------------------------------------------

class PlainDeliveryTests(ClientTestCase):

    async def test_plain_delivery_sends_exact_bytes(self):
        content = tricky_message()
        path = self.message_file(content)
        factory, session = await self.session_for()
        results = await session.deliver("sender@example.org", ["rcpt@example.com"], path,
                                        body="8BITMIME")
        self.assertEqual(results, [RecipientResult("rcpt@example.com", 250, "2.0.0",
                                                   "Ok: queued as 4XyZ")])
        server = factory.only
        self.assertEqual(server.commands, [
            b"EHLO client.test",
            b"MAIL FROM:<sender@example.org> SIZE=%d BODY=8BITMIME" % len(content),
            b"RCPT TO:<rcpt@example.com>",
            b"DATA",
        ])
        self.assertEqual(server.messages, [reference_stuffing(content)])
        wire = server.messages[0]
        self.assertTrue(wire.startswith(b"..dot at the very start\r\n..\r\n...two dots\r\n"))
        self.assertIn(b"\r\n..split across the CR|LF boundary\r\n", wire)
        self.assertIn(b"\r\n..dot at the start of the third chunk\r\n", wire)
        self.assertTrue(wire.endswith(b"last line without CRLF\r\n.\r\n"))
        self.assertFalse(session.tls)
        self.assertEqual(session.remote, f"mx.test[127.0.0.1]:{server.transport.getHost().port}")

    async def test_message_ending_in_crlf_gets_just_the_dot(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for()
        await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(factory.only.messages, [SIMPLE + b".\r\n"])
        # 7BIT is the default: no BODY parameter.
        self.assertEqual(factory.only.commands[1], b"MAIL FROM:<a@example.org> SIZE=%d" % len(SIMPLE))

    async def test_a_queue_file_sends_its_message_and_never_its_record(self):
        # As the spool keeps it: the message, its record, the trailer.  The
        # length comes from the record in force (the Job's message_size),
        # so not even a record the checks would refuse (here of another
        # version) lets a byte of it out.
        tail = queue_file.record_and_trailer(b'{"version":9}\n', len(SIMPLE))
        path = self.message_file(SIMPLE + tail)
        factory, session = await self.session_for()
        await session.deliver("a@example.org", ["b@example.com"], path, size=len(SIMPLE))
        self.assertEqual(factory.only.messages, [SIMPLE + b".\r\n"])
        self.assertEqual(factory.only.commands[1], b"MAIL FROM:<a@example.org> SIZE=%d" % len(SIMPLE))

    async def test_null_sender_and_smtputf8(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for()
        await session.deliver("", ["jürgen@example.com"], path, smtputf8=True)
        self.assertEqual(factory.only.commands[1:3], [
            b"MAIL FROM:<> SIZE=%d SMTPUTF8" % len(SIMPLE),
            "RCPT TO:<jürgen@example.com>".encode(),
        ])

    async def test_pipelining_sends_mail_rcpt_and_data_in_one_write(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(pipelining=True))
        results = await session.deliver("a@example.org", ["b@example.com", "c@example.com"], path)
        self.assertEqual([r.code for r in results], [250, 250])
        self.assertIn(b"MAIL FROM:<a@example.org> SIZE=%d\r\nRCPT TO:<b@example.com>\r\n"
                      b"RCPT TO:<c@example.com>\r\nDATA\r\n" % len(SIMPLE), factory.only.reads)

    async def test_without_pipelining_one_command_per_write(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(pipelining=False))
        await session.deliver("a@example.org", ["b@example.com", "c@example.com"], path)
        reads = factory.only.reads
        self.assertEqual(reads[:5], [
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@example.org> SIZE=%d\r\n" % len(SIMPLE),
            b"RCPT TO:<b@example.com>\r\n",
            b"RCPT TO:<c@example.com>\r\n",
            b"DATA\r\n",
        ])

    async def test_helo_after_ehlo_is_refused_with_500(self):
        path = self.message_file(SIMPLE)
        script = Script(replies={"EHLO": [b"500 5.5.2 what is EHLO?"]})
        factory, session = await self.session_for(script)
        self.assertEqual(session.extensions, {})
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)
        self.assertEqual(factory.only.commands[:3], [
            b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<a@example.org>"])

    async def test_ehlo_extensions_are_read(self):
        factory, session = await self.session_for(Script(pipelining=True))
        self.assertEqual(session.extensions, {
            "PIPELINING": "", "SIZE": "10485760", "8BITMIME": "",
            "ENHANCEDSTATUSCODES": "", "SMTPUTF8": ""})

    async def test_connection_reuse_runs_two_transactions_on_one_connection(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(pipelining=True))
        first = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertTrue(session.is_open())
        second = await session.deliver("c@example.org", ["d@example.com"], path)
        self.assertEqual([first[0].code, second[0].code], [250, 250])
        await session.quit()
        server = factory.only
        self.assertEqual(server.commands, [
            b"EHLO client.test",
            b"MAIL FROM:<a@example.org> SIZE=%d" % len(SIMPLE), b"RCPT TO:<b@example.com>", b"DATA",
            b"MAIL FROM:<c@example.org> SIZE=%d" % len(SIMPLE), b"RCPT TO:<d@example.com>", b"DATA",
            b"QUIT",
        ])
        self.assertEqual(len(server.messages), 2)
        self.assertFalse(session.is_open())

    async def test_one_connection_carries_many_messages(self):
        # Each reply to the final dot must be counted as asked for; a
        # miscount only shows after several messages on one connection.
        path = self.message_file(SIMPLE)
        for pipelining in (True, False):
            factory, session = await self.session_for(Script(pipelining=pipelining))
            for n in range(12):
                results = await session.deliver("a@example.org", [f"b{n}@example.com"], path)
                self.assertEqual(results[0].code, 250)
            self.assertTrue(session.is_open())
            await session.quit()
            self.assertEqual(len(factory.only.messages), 12)


# -- replies that refuse ----------------------------------------------------------------

class RefusalTests(ClientTestCase):

    async def test_per_recipient_results_keep_the_order_of_recipients(self):
        path = self.message_file(SIMPLE)
        script = Script(pipelining=True, rcpt={
            "later@example.com": b"450 4.2.0 Mailbox busy",
            "gone@example.com": b"550 5.1.1 <gone@example.com>: Recipient address rejected",
            "plain@example.com": b"550 no enhanced code here",
        })
        factory, session = await self.session_for(script)
        results = await session.deliver(
            "a@example.org",
            ["ok@example.com", "later@example.com", "gone@example.com", "plain@example.com"], path)
        self.assertEqual(results, [
            RecipientResult("ok@example.com", 250, "2.0.0", "Ok: queued as 4XyZ"),
            RecipientResult("later@example.com", 450, "4.2.0", "Mailbox busy"),
            RecipientResult("gone@example.com", 550, "5.1.1",
                            "<gone@example.com>: Recipient address rejected"),
            RecipientResult("plain@example.com", 550, "5.0.0", "no enhanced code here"),
        ])
        self.assertEqual(len(factory.only.messages), 1)

    async def test_all_recipients_refused_sends_no_message_and_resets_before_reuse(self):
        path = self.message_file(SIMPLE)
        script = Script(pipelining=True, rcpt={"x@example.com": b"550 5.1.1 No such user"})
        factory, session = await self.session_for(script)
        results = await session.deliver("a@example.org", ["x@example.com"], path)
        self.assertEqual(results, [RecipientResult("x@example.com", 550, "5.1.1", "No such user")])
        server = factory.only
        self.assertEqual(server.messages, [])
        self.assertTrue(session.is_open())
        # The transaction ended abnormally: RSET before the next MAIL.
        await session.deliver("a@example.org", ["y@example.com"], path)
        self.assertEqual(server.commands[4:6], [b"RSET", b"MAIL FROM:<a@example.org> SIZE=%d"
                                                % len(SIMPLE)])
        self.assertEqual(len(server.messages), 1)

    async def test_all_recipients_refused_without_pipelining_sends_no_data(self):
        path = self.message_file(SIMPLE)
        script = Script(rcpt={"x@example.com": b"550 5.1.1 No such user"})
        factory, session = await self.session_for(script)
        results = await session.deliver("a@example.org", ["x@example.com"], path)
        self.assertEqual(results[0].code, 550)
        self.assertNotIn(b"DATA", factory.only.commands)
        self.assertEqual(factory.only.messages, [])

    async def test_4xx_to_mail_is_a_temporary_error(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(
            Script(replies={"MAIL": [b"451 4.3.0 Try again later"]}))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, 451, "4.3.0", "Try again later"))
        self.assertEqual(error.remote, session.remote)
        self.assertNotIn(b"RCPT TO:<b@example.com>", factory.only.commands)

    async def test_5xx_to_mail_is_a_permanent_error(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(
            Script(pipelining=True, replies={"MAIL": [b"553 5.1.8 Sender domain does not exist"]}))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced),
                         (False, 553, "5.1.8"))
        self.assertEqual(factory.only.messages, [])
        # The pipelined RCPT and DATA replies were read: still in step.
        self.assertTrue(session.is_open())
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)

    async def test_552_after_the_dot_applies_to_every_accepted_recipient(self):
        path = self.message_file(SIMPLE)
        script = Script(replies={".": [b"552 5.3.4 Message too big for system"]},
                        rcpt={"x@example.com": b"550 5.1.1 No such user"})
        factory, session = await self.session_for(script)
        results = await session.deliver("a@example.org",
                                        ["b@example.com", "x@example.com", "c@example.com"], path)
        self.assertEqual(results, [
            RecipientResult("b@example.com", 552, "5.3.4", "Message too big for system"),
            RecipientResult("x@example.com", 550, "5.1.1", "No such user"),
            RecipientResult("c@example.com", 552, "5.3.4", "Message too big for system"),
        ])

    async def test_error_to_data_applies_to_accepted_recipients(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(
            Script(replies={"DATA": [b"451 4.3.0 Queue file write error"]}))
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results, [RecipientResult("b@example.com", 451, "4.3.0",
                                                   "Queue file write error")])
        self.assertEqual(factory.only.messages, [])

    async def test_message_over_the_size_limit_bounces_without_sending(self):
        path = self.message_file(b"x" * 2000)
        factory, session = await self.session_for(Script(keywords=("SIZE 1000", "8BITMIME")))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text), (
            False, None, "5.3.4", f"message size 2000 exceeds the limit 1000 of {session.remote}"))
        self.assertEqual(factory.only.commands, [b"EHLO client.test"])
        self.assertTrue(session.is_open())

    async def test_declared_8bitmime_but_ascii_goes_without_body_to_a_server_without_it(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(keywords=("SIZE 0",)))
        await session.deliver("a@example.org", ["b@example.com"], path, body="8BITMIME")
        self.assertEqual(factory.only.commands[1], b"MAIL FROM:<a@example.org> SIZE=%d" % len(SIMPLE))
        self.assertEqual(factory.only.messages, [SIMPLE + b".\r\n"])

    async def test_ascii_smtputf8_message_goes_without_smtputf8_to_a_server_without_it(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(keywords=("8BITMIME",)))
        results = await session.deliver("a@example.org", ["b@example.com"], path, smtputf8=True)
        self.assertEqual(results[0].code, 250)
        self.assertEqual(factory.only.commands[1:3], [
            b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>"])
        self.assertEqual(factory.only.messages, [SIMPLE + b".\r\n"])

    async def test_non_ascii_recipient_without_smtputf8_bounces_5_6_7_without_sending(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(keywords=("8BITMIME",)))
        error = await self.deliver_fails(session, "a@example.org", ["jürgen@example.com"], path,
                                         smtputf8=True)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text), (
            False, None, "5.6.7",
            f"address <jürgen@example.com> needs SMTPUTF8, and {session.remote} does not "
            "offer SMTPUTF8"))
        self.assertEqual(factory.only.commands, [b"EHLO client.test"])
        self.assertTrue(session.is_open())


# -- a server without 8BITMIME ------------------------------------------------------------

class RecipientLimitTests(ClientTestCase):
    """A server that takes fewer recipients a transaction than we have
    (RFC 5321 4.5.3.1.8 and 4.5.3.1.10): the rest go in further
    transactions at once, never to be retried after a backoff."""

    FIVE = [f"r{n}@example.com" for n in range(1, 6)]

    def rcpts(self, server):
        return [c for c in server.commands if c.startswith(b"RCPT")]

    async def test_the_rest_go_in_further_transactions_as_many_as_the_server_took(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(pipelining=True, rcpt_limit=2))
        results = await session.deliver("a@example.org", self.FIVE, path)
        self.assertEqual(results, [RecipientResult(a, 250, "2.0.0", "Ok: queued as 4XyZ")
                                   for a in self.FIVE])
        server = factory.only
        self.assertEqual(server.envelopes, [self.FIVE[0:2], self.FIVE[2:4], self.FIVE[4:5]])
        self.assertEqual(server.messages, [SIMPLE + b".\r\n"] * 3)
        # Five RCPTs first, then only as many as the server took: 2 and 1.
        self.assertEqual(len(self.rcpts(server)), 5 + 2 + 1)
        self.assertEqual([c for c in server.commands if not c.startswith(b"RCPT")],
                         [b"EHLO client.test"] + [b"MAIL FROM:<a@example.org> SIZE=%d"
                                                  % len(SIMPLE), b"DATA"] * 3)
        self.assertTrue(session.is_open())

    async def envelopes_delivering_all_five(self, script):
        """The recipients of each message ``script``'s server got, once
        all five were delivered."""
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(script)
        results = await session.deliver("a@example.org", self.FIVE, path)
        self.assertEqual([r.code for r in results], [250] * 5)
        return factory.only.envelopes

    async def test_without_pipelining_too(self):
        envelopes = await self.envelopes_delivering_all_five(Script(rcpt_limit=3))
        self.assertEqual(envelopes, [self.FIVE[0:3], self.FIVE[3:5]])

    async def test_a_552_5_5_3_of_an_rfc_821_server_is_read_the_same_way(self):
        envelopes = await self.envelopes_delivering_all_five(Script(
            pipelining=True, rcpt_limit=4, rcpt_limit_reply=b"552 5.5.3 Too many recipients"))
        self.assertEqual(envelopes, [self.FIVE[0:4], self.FIVE[4:5]])

    async def test_a_452_of_another_kind_is_not_a_count(self):
        # 452 4.3.1 is the server short of storage: the retry is the answer.
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(
            pipelining=True, rcpt_limit=1, rcpt_limit_reply=b"452 4.3.1 Insufficient storage"))
        results = await session.deliver("a@example.org", self.FIVE[:2], path)
        self.assertEqual(results, [
            RecipientResult(self.FIVE[0], 250, "2.0.0", "Ok: queued as 4XyZ"),
            RecipientResult(self.FIVE[1], 452, "4.3.1", "Insufficient storage")])
        self.assertEqual(len(factory.only.messages), 1)

    async def test_a_452_to_every_recipient_waits_for_the_retry(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(pipelining=True, rcpt_limit=0))
        results = await session.deliver("a@example.org", self.FIVE[:2], path)
        self.assertEqual(results, [RecipientResult(a, 452, "4.5.3", "Error: too many recipients")
                                   for a in self.FIVE[:2]])
        self.assertEqual(factory.only.messages, [])
        self.assertEqual(len(self.rcpts(factory.only)), 2)

    async def test_a_552_5_5_3_with_nobody_delivered_is_deferred_not_bounced(self):
        # Found by review: the 552 was made temporary only on the way out of
        # further transactions, so with the first recipient's message
        # refused after the dot, the second's 552 5.5.3 bounced.
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(
            pipelining=True, rcpt_limit=1, rcpt_limit_reply=b"552 5.5.3 Too many recipients",
            replies={".": [b"451 4.3.0 Try later"]}))
        results = await session.deliver("a@example.org", self.FIVE[:2], path)
        self.assertEqual(results, [
            RecipientResult(self.FIVE[0], 451, "4.3.0", "Try later"),
            RecipientResult(self.FIVE[1], None, "4.5.3",
                            "552 5.5.3 Too many recipients "
                            "(taken as temporary: RFC 5321 4.5.3.1.10)")])

    async def test_a_further_transaction_that_fails_keeps_what_was_delivered(self):
        path = self.message_file(SIMPLE)
        script = Script(pipelining=True, rcpt_limit=2,
                        replies={"MAIL": [b"250 2.1.0 Ok", b"421 4.3.2 going down now"]})
        factory, session = await self.session_for(script)
        results = await session.deliver("a@example.org", self.FIVE, path)
        held = ("Error: too many recipients (a further transaction failed: "
                "421 4.3.2 going down now)")
        self.assertEqual(results, [RecipientResult(a, 250, "2.0.0", "Ok: queued as 4XyZ")
                                   for a in self.FIVE[:2]]
                         + [RecipientResult(a, 452, "4.5.3", held) for a in self.FIVE[2:]])
        self.assertEqual(factory.only.envelopes, [self.FIVE[:2]])
        self.assertFalse(session.is_open())

    async def test_a_552_left_over_is_deferred_not_bounced(self):
        # The further transaction delivers to nobody (r2 is busy): r3 keeps
        # its 552 5.5.3 for the retry, made temporary.
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(
            pipelining=True, rcpt_limit=1, rcpt_limit_reply=b"552 5.5.3 Too many recipients",
            rcpt={self.FIVE[1]: b"450 4.2.0 Mailbox busy"}))
        results = await session.deliver("a@example.org", self.FIVE[:3], path)
        self.assertEqual(results, [
            RecipientResult(self.FIVE[0], 250, "2.0.0", "Ok: queued as 4XyZ"),
            RecipientResult(self.FIVE[1], 450, "4.2.0", "Mailbox busy"),
            RecipientResult(self.FIVE[2], None, "4.5.3",
                            "552 5.5.3 Too many recipients "
                            "(taken as temporary: RFC 5321 4.5.3.1.10)")])
        self.assertEqual(factory.only.envelopes, [self.FIVE[:1]])


class DowngradeTests(ClientTestCase):
    """RFC 6152 3: no octet above 127 goes to a server that did not offer
    8BITMIME; the message is converted to 7 bits instead."""

    async def test_undeclared_8bit_text_arrives_quoted_printable_and_dot_stuffed(self):
        content = (b"Subject: hello\r\n\r\n.caf\xc3\xa9 au lait\r\n" + b"\xc3\xa9" * 40
                   + b"\r\n.\r\nend\r\n")
        path = self.message_file(content)
        factory, session = await self.session_for(Script(keywords=("SIZE 10485760",)))
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)
        converted = (b"Subject: hello\r\nMIME-Version: 1.0\r\n"
                     b"Content-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                     b".caf=C3=A9 au lait\r\n"
                     # 25 octets (75 characters) and "=" on each line.
                     + b"=C3=A9" * 12 + b"=C3=\r\n"
                     + b"=A9" + b"=C3=A9" * 12 + b"=\r\n"
                     + b"=C3=A9" * 12 + b"=C3=\r\n"
                     + b"=A9=C3=A9=C3=A9\r\n"
                     b"=2E\r\nend\r\n")
        server = factory.only
        self.assertEqual(server.commands[1], b"MAIL FROM:<a@example.org> SIZE=%d" % len(converted))
        self.assertEqual(server.messages, [reference_stuffing(converted)])
        self.assertTrue(server.messages[0].isascii())
        self.assertTrue(server.messages[0].startswith(b"Subject: hello\r\n"))
        self.assertIn(b"\r\n..caf=C3=A9 au lait\r\n", server.messages[0])

    async def test_declared_8bitmime_is_converted_not_bounced(self):
        content = b"Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve\r\n"
        path = self.message_file(content)
        factory, session = await self.session_for(Script(keywords=("SIZE 0",)))
        await session.deliver("a@example.org", ["b@example.com"], path, body="8BITMIME")
        converted = (b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                     b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                     b"na=C3=AFve\r\n")
        server = factory.only
        self.assertEqual(server.commands[1], b"MAIL FROM:<a@example.org> SIZE=%d" % len(converted))
        self.assertEqual(server.messages, [converted + b".\r\n"])

    async def test_8bit_inside_multipart_signed_bounces_5_6_3_without_sending(self):
        content = (b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=x; boundary=s\r\n"
                   b"\r\n--s\r\nContent-Type: text/plain\r\n\r\n\xc3\xa9\r\n--s\r\n"
                   b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
        path = self.message_file(content)
        factory, session = await self.session_for(Script(keywords=("SIZE 0",)))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text), (
            False, None, "5.6.3",
            "message has 8-bit content inside a signed part (multipart/signed), "
            f"and {session.remote} does not offer 8BITMIME"))
        self.assertEqual(factory.only.commands, [b"EHLO client.test"])

    async def test_8bit_header_field_bounces_5_6_7_without_sending(self):
        path = self.message_file(b"Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nascii\r\n")
        factory, session = await self.session_for(Script(keywords=("SIZE 0",)))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.enhanced), (False, "5.6.7"))
        self.assertEqual(factory.only.commands, [b"EHLO client.test"])

    async def test_converted_size_is_checked_against_the_limit(self):
        # 600 octets grow to 1,800 encoded: over a limit of 1,000.
        path = self.message_file(b"Subject: x\r\n\r\n" + b"\xe9" * 600 + b"\r\n")
        factory, session = await self.session_for(Script(keywords=("SIZE 1000",)))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual(error.enhanced, "5.3.4")
        self.assertIn("exceeds the limit 1000", error.text)


# -- sessions that fail ------------------------------------------------------------------

class SessionFailureTests(ClientTestCase):

    async def test_connection_refused_is_temporary_4_4_1(self):
        factory = ScriptedFactory(Script())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        hop = Hop(SERVER_NAME, "127.0.0.1", number)
        error = await self.connect_fails(hop=hop)
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.4.1"))
        self.assertEqual(error.text, f"connect to mx.test[127.0.0.1]:{number}: Connection refused")
        self.assertEqual(error.remote, hop.label)

    async def test_554_greeting_is_permanent(self):
        error = await self.connect_fails(Script(greeting=b"554 5.7.1 You are not welcome"))
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (False, 554, "5.7.1", "You are not welcome"))

    async def test_421_greeting_is_temporary(self):
        error = await self.connect_fails(Script(greeting=b"421 4.3.2 Too busy"))
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, 421, "4.3.2"))

    async def test_silent_server_times_out_with_4_4_2(self):
        error = await self.connect_fails(Script(stall="greeting"), command_timeout=0.3)
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.4.2"))
        self.assertIn("timed out while receiving the initial server greeting", error.text)

    async def test_server_stalling_on_mail_times_out_with_4_4_2(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(stall="MAIL"), command_timeout=0.3)
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.enhanced), (True, "4.4.2"))
        self.assertIn("timed out while receiving the reply to MAIL FROM", error.text)
        self.assertFalse(session.is_open())

    async def test_server_stalling_after_the_dot_times_out(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(stall="."), data_timeout=0.3)
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.enhanced), (True, "4.4.2"))
        self.assertIn("end of data", error.text)

    async def test_server_not_reading_the_message_times_out(self):
        # Bigger than the socket buffers, so the server's not reading stops us.
        path = self.message_file(b"0123456789abcdef" * (1 << 20) + b"\r\n")
        factory, session = await self.session_for(Script(keywords=(), pause_after_354=True),
                                                  data_block_timeout=0.3)
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.enhanced), (True, "4.4.2"))
        self.assertIn("timed out while sending the message body", error.text)

    async def test_lost_connection_during_the_transaction_is_4_4_2(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(close_on="RCPT"))
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.4.2"))
        self.assertIn("lost connection with", error.text)
        self.assertFalse(session.is_open())

    async def test_a_421_to_a_pipelined_mail_is_the_reason_not_the_hang_up_after_it(self):
        # The RCPT and DATA sent with the MAIL get no replies: the server
        # closed the channel after its 421.  Its words reach the log and the
        # DSN, not "lost connection".
        for pipelining, server, session, error in await self.failed_both_ways(
                replies={"MAIL": [b"421 4.3.2 Shutting down now"]}):
            self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                             (True, 421, "4.3.2", "Shutting down now"))
            self.assertFalse(session.is_open())
            self.assertEqual(server.commands[-1][:4], b"MAIL")
            # Pipelined, the RCPT and DATA went in the MAIL's write.
            self.assertEqual(b"\r\nDATA\r\n" in b"".join(server.reads), pipelining)

    async def test_a_421_to_a_pipelined_rcpt_ends_the_transaction_with_its_words(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(
            pipelining=True, rcpt={"c@example.com": b"421 4.7.0 Too many errors, bye"}))
        error = await self.deliver_fails(session, "a@example.org",
                                         ["b@example.com", "c@example.com", "d@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, 421, "4.7.0", "Too many errors, bye"))
        self.assertFalse(session.is_open())
        self.assertEqual(factory.only.messages, [])

    async def test_a_421_to_the_only_rcpt_fails_the_transaction_with_or_without_pipelining(self):
        # Found by review: unpipelined, the 421 came back as the recipient's
        # deferral, so the pool never tried the next hop; pipelined, the
        # wait for DATA's reply raised it.  Now both raise.
        for _, server, session, error in await self.failed_both_ways(
                rcpt={"b@example.com": b"421 4.3.2 Going down"}):
            self.assertEqual((error.temporary, error.code, error.enhanced, error.text,
                              error.after_data), (True, 421, "4.3.2", "Going down", False))
            self.assertFalse(session.is_open())
            self.assertEqual(server.messages, [])

    async def test_after_a_421_no_reply_is_awaited_for_a_command_never_sent(self):
        # Found by review: unpipelined, the second RCPT was not sent after
        # the first's 421, but its reply was awaited for command_timeout.
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(
            Script(rcpt={"b@example.com": b"421 4.3.2 Going down"}, stay_after_421=True),
            command_timeout=10)
        started = reactor.seconds()
        error = await self.deliver_fails(session, "a@example.org",
                                         ["b@example.com", "c@example.com"], path)
        self.assertLess(reactor.seconds() - started, 2)
        self.assertEqual((error.code, error.enhanced, error.text), (421, "4.3.2", "Going down"))
        self.assertNotIn(b"RCPT TO:<c@example.com>", factory.only.commands)

    async def test_a_421_to_data_fails_the_transaction(self):
        # Found by review: it was every recipient's deferral, and the next
        # MX was not tried although the server took nothing.
        for _, server, _, error in await self.failed_both_ways(
                replies={"DATA": [b"421 4.3.2 Going down"]}):
            self.assertEqual((error.code, error.enhanced, error.text, error.after_data),
                             (421, "4.3.2", "Going down", False))
            self.assertEqual(server.messages, [])

    async def test_a_421_said_while_idle_is_the_reason_given_to_the_next_job(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script())
        factory.only.transport.write(b"421 4.4.2 Idle too long\r\n")
        for _ in range(200):
            if not session.is_open():
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(session.is_open())
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, 421, "4.4.2", "Idle too long"))

    async def test_malformed_reply_fails_the_session(self):
        error = await self.connect_fails(Script(replies={"EHLO": [b"250-mx.test\r\nhello there"]}))
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.5.0"))
        self.assertIn("malformed reply", error.text)

    async def test_quit_is_safe_after_the_server_hung_up(self):
        factory, session = await self.session_for()
        factory.only.transport.loseConnection()
        await session.wait_closed()
        self.assertFalse(session.is_open())
        self.assertIsNone(await session.quit())


# -- TLS -----------------------------------------------------------------------------------

class TLSTests(ClientTestCase):

    def ca_file(self):
        return self.message_file(authority().cert_pem)

    async def test_may_starts_tls_when_offered_and_says_ehlo_again(self):
        path = self.message_file(SIMPLE)
        script = Script(tls="self", keywords_after_tls=("SIZE 5000", "8BITMIME"))
        factory, session = await self.session_for(script, tls="may")
        self.assertTrue(session.tls)
        self.assertEqual(session.extensions, {"SIZE": "5000", "8BITMIME": ""})
        await session.deliver("a@example.org", ["b@example.com"], path)
        server = factory.only
        self.assertTrue(server.tls)
        self.assertEqual(server.commands[:4], [
            b"EHLO client.test", b"STARTTLS", b"EHLO client.test",
            b"MAIL FROM:<a@example.org> SIZE=%d" % len(SIMPLE)])
        self.assertEqual(server.messages, [SIMPLE + b".\r\n"])

    async def test_may_continues_in_plain_text_when_not_offered(self):
        path = self.message_file(SIMPLE)
        factory, session = await self.session_for(Script(), tls="may")
        self.assertFalse(session.tls)
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)

    async def test_none_never_starts_tls(self):
        factory, session = await self.session_for(Script(tls="self"), tls="none")
        self.assertFalse(session.tls)
        self.assertNotIn(b"STARTTLS", factory.only.commands)

    async def test_encrypt_accepts_any_certificate(self):
        factory, session = await self.session_for(Script(tls="self"), tls="encrypt")
        self.assertTrue(session.tls)

    async def test_encrypt_without_starttls_fails_without_sending_mail(self):
        factory, hop = self.serve(Script())
        error = await self.connect_fails(hop=hop, tls="encrypt")
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text), (
            True, None, "4.7.4", f"TLS is required, but was not offered by host {hop.label}"))
        await factory.only.closed
        self.assertEqual(factory.only.commands, [b"EHLO client.test", b"QUIT"])

    async def test_a_421_to_starttls_fails_the_opening_even_under_may(self):
        # Found by review: "may" carried on in plain text on a connection
        # the 421 had ended, and the pool, handed a session that could
        # take no job, opened the same first hop again and again.
        factory, hop = self.serve(Script(tls="self",
                                         replies={"STARTTLS": [b"421 4.3.2 Shutting down"]}))
        error = await self.connect_fails(hop=hop, tls="may")
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, 421, "4.3.2", "Shutting down"))
        await factory.only.closed
        self.assertEqual(factory.only.commands, [b"EHLO client.test", b"STARTTLS"])

    async def test_may_with_a_failed_handshake_is_temporary_4_7_5(self):
        error = await self.connect_fails(Script(tls="self", hang_up_in_handshake=True), tls="may")
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.5"))
        self.assertIn("TLS handshake with", error.text)

    async def test_verify_against_the_test_ca_with_the_right_name(self):
        content = tricky_message()
        path = self.message_file(content)
        factory, session = await self.session_for(Script(tls="ca"), tls="verify",
                                                  ca_file=self.ca_file())
        self.assertTrue(session.tls)
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)
        # Streamed through the TLS layer, chunk boundaries and all.
        self.assertEqual(factory.only.messages, [reference_stuffing(content)])

    async def test_verify_fails_on_the_wrong_host_name(self):
        factory, hop = self.serve(Script(tls="ca"))
        wrong = Hop("other.test", hop.address, hop.port)
        error = await self.connect_fails(hop=wrong, tls="verify", ca_file=self.ca_file())
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.5"))
        self.assertIn("does not match the host name other.test", error.text)
        self.assertNotIn(b"MAIL", b" ".join(factory.only.commands))

    async def test_verify_fails_on_a_self_signed_certificate(self):
        error = await self.connect_fails(Script(tls="self"), tls="verify", ca_file=self.ca_file())
        self.assertEqual((error.temporary, error.enhanced), (True, "4.7.5"))
        self.assertIn("verification failed", error.text)

    async def test_verify_with_an_unreadable_ca_file_fails(self):
        error = await self.connect_fails(Script(tls="ca"), tls="verify",
                                         ca_file="/nonexistent/ca.pem")
        self.assertEqual((error.temporary, error.enhanced), (True, "4.7.5"))

    async def test_injected_reply_after_starttls_is_discarded(self):
        path = self.message_file(SIMPLE)
        script = Script(tls="self", inject=b"250 fake\r\n250-PIPELINING\r\n",
                        keywords_after_tls=("SIZE 5000", "8BITMIME"))
        factory, session = await self.session_for(script, tls="encrypt")
        server = factory.only
        # The injection reached us in the read that carried the 220.
        self.assertTrue(session.tls)
        # Had '250 fake' been taken as the reply to the EHLO after TLS,
        # the extensions would be empty and every later reply one off.
        self.assertEqual(session.extensions, {"SIZE": "5000", "8BITMIME": ""})
        self.assertEqual(server.commands[:3], [b"EHLO client.test", b"STARTTLS",
                                               b"EHLO client.test"])
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results, [RecipientResult("b@example.com", 250, "2.0.0",
                                                   "Ok: queued as 4XyZ")])
        self.assertEqual(server.messages, [SIMPLE + b".\r\n"])


# -- implicit TLS (wrapper) --------------------------------------------------------------

class WrapperTests(ClientTestCase):
    """``tls = 'wrapper'``: TLS from the first byte, as on port 465."""

    def serve_tls(self, kind, script=None):
        factory = ScriptedFactory(script or Script())
        port = reactor.listenSSL(0, factory, server_tls_options(kind), interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        return factory, Hop(SERVER_NAME, "127.0.0.1", port.getHost().port)

    async def test_wrapper_speaks_tls_from_the_first_byte_and_verifies(self):
        content = tricky_message()
        path = self.message_file(content)
        factory, hop = self.serve_tls("ca", Script(keywords=PLAIN_KEYWORDS + ("STARTTLS",)))
        session = await connect(reactor, hop, config(
            tls="wrapper", ca_file=self.message_file(authority().cert_pem)))
        self.assertTrue(session.tls)
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 250)
        server = factory.only
        # No STARTTLS inside TLS, even when (wrongly) offered.
        self.assertEqual(server.commands, [
            b"EHLO client.test", b"MAIL FROM:<a@example.org> SIZE=%d" % len(content),
            b"RCPT TO:<b@example.com>", b"DATA"])
        self.assertEqual(server.messages, [reference_stuffing(content)])

    async def test_wrapper_then_auth_inside_the_tls_session(self):
        factory, hop = self.serve_tls("ca", Script(keywords=("AUTH PLAIN LOGIN",)))
        session = await connect(reactor, hop, config(
            tls="wrapper", ca_file=self.message_file(authority().cert_pem),
            auth_user="user", auth_password="pass"))
        self.assertTrue(session.tls)
        self.assertEqual(factory.only.commands, [b"EHLO client.test",
                                                 b"AUTH PLAIN AHVzZXIAcGFzcw=="])

    async def test_wrapper_refuses_an_untrusted_certificate_temporarily(self):
        factory, hop = self.serve_tls("self")
        error = await self.connect_fails(hop=hop, tls="wrapper",
                                         ca_file=self.message_file(authority().cert_pem))
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.5"))
        self.assertIn(f"TLS handshake with {hop.label} failed: server certificate "
                      "verification failed", error.text)
        self.assertEqual(factory.only.commands, [])

    async def test_wrapper_refuses_the_wrong_host_name(self):
        factory, hop = self.serve_tls("ca")
        wrong = Hop("other.test", hop.address, hop.port)
        error = await self.connect_fails(hop=wrong, tls="wrapper",
                                         ca_file=self.message_file(authority().cert_pem))
        self.assertEqual((error.temporary, error.enhanced), (True, "4.7.5"))
        self.assertIn("does not match the host name other.test", error.text)
        self.assertEqual(factory.only.commands, [])

    async def test_wrapper_against_a_plain_text_server_fails_temporarily(self):
        factory, hop = self.serve(Script())
        error = await self.connect_fails(hop=hop, tls="wrapper",
                                         ca_file=self.message_file(authority().cert_pem))
        self.assertEqual((error.temporary, error.enhanced), (True, "4.7.5"))
        self.assertIn(f"TLS handshake with {hop.label} failed", error.text)
        # What reached it is our ClientHello (a TLS handshake record,
        # RFC 8446 5.1: content type 22), never an SMTP command in plain text.
        self.assertEqual(factory.only.reads[0][:1], b"\x16")


# -- AUTH ------------------------------------------------------------------------------------

class AuthTests(ClientTestCase):

    async def test_auth_plain_over_tls(self):
        script = Script(tls="self", keywords_after_tls=("AUTH LOGIN PLAIN",))
        factory, session = await self.session_for(script, tls="encrypt", auth_user="user",
                                                  auth_password="pass")
        self.assertEqual(factory.only.commands, [
            b"EHLO client.test", b"STARTTLS", b"EHLO client.test",
            b"AUTH PLAIN AHVzZXIAcGFzcw=="])

    async def test_auth_login_when_plain_is_not_offered(self):
        script = Script(tls="self", keywords_after_tls=("AUTH LOGIN",))
        factory, session = await self.session_for(script, tls="may", auth_user="user",
                                                  auth_password="pass")
        self.assertEqual(factory.only.commands[3:], [b"AUTH LOGIN", b"dXNlcg==", b"cGFzcw=="])

    async def test_a_421_to_auth_is_the_server_closing_not_our_credentials(self):
        script = Script(tls="self", keywords_after_tls=("AUTH PLAIN",),
                        replies={"AUTH": [b"421 4.3.2 Shutting down"]})
        error = await self.connect_fails(script, tls="encrypt", auth_user="user",
                                         auth_password="pass")
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, 421, "4.3.2", "Shutting down"))

    async def test_no_credentials_without_tls(self):
        factory, hop = self.serve(Script(keywords=("AUTH PLAIN LOGIN",)))
        error = await self.connect_fails(hop=hop, tls="may", auth_user="user",
                                         auth_password="s3cret")
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (True, None, "4.7.0", "refusing to send credentials without TLS"))
        await factory.only.closed
        self.assertEqual(factory.only.commands, [b"EHLO client.test", b"QUIT"])

    async def test_no_auth_offered_is_temporary(self):
        error = await self.connect_fails(Script(tls="self"), tls="may", auth_user="user",
                                         auth_password="pass")
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.0"))

    async def test_rejected_credentials_defer_and_are_never_shown(self):
        # Our password is wrong, not the recipient: a bounce would lose
        # every message (Postfix smtp_sasl_auth_soft_bounce = yes).
        script = Script(tls="self", keywords_after_tls=("AUTH PLAIN",),
                        replies={"AUTH": [b"535 5.7.8 Authentication credentials invalid"]})
        factory, hop = self.serve(script)
        error = await self.connect_fails(hop=hop, tls="may", auth_user="user",
                                         auth_password="s3cret")
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text), (
            True, None, "4.7.8",
            f"SASL authentication (PLAIN) failed; server {hop.label} said: 535 5.7.8 "
            "Authentication credentials invalid (deferred: a problem on our side, "
            "not with the recipient)"))
        for text in (str(error), repr(error), repr(config(auth_user="u", auth_password="s3cret"))):
            self.assertNotIn("s3cret", text)

    async def test_login_refused_after_the_password_defers(self):
        script = Script(tls="self", keywords_after_tls=("AUTH LOGIN",),
                        replies={"AUTH": [b"535 5.7.8 Bad"]})
        error = await self.connect_fails(script, tls="may", auth_user="user",
                                         auth_password="pass")
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.8"))
        self.assertIn("SASL authentication (LOGIN) failed", error.text)

    async def test_530_to_mail_from_a_chosen_hop_defers(self):
        path = self.message_file(SIMPLE)
        script = Script(replies={"MAIL": [b"530 5.7.0 Authentication required"]})
        factory, session = await self.session_for(script, tls="none", chosen_hop=True)
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced), (True, None, "4.7.0"))
        self.assertIn("said: 530 5.7.0 Authentication required", error.text)

    async def test_530_to_mail_from_a_recipients_mx_is_permanent(self):
        # An MX that wants AUTH from the world will never take the
        # message; waiting five days for it helps nobody.
        path = self.message_file(SIMPLE)
        script = Script(replies={"MAIL": [b"530 5.7.0 Authentication required"]})
        factory, session = await self.session_for(script, tls="none")
        error = await self.deliver_fails(session, "a@example.org", ["b@example.com"], path)
        self.assertEqual((error.temporary, error.code, error.enhanced), (False, 530, "5.7.0"))


# -- the pure parts -----------------------------------------------------------------------------

def test_reply_reader_parses_multiline_replies_and_enhanced_codes():
    reader = ReplyReader()
    reader.feed(b"250-mx.test\r\n250-SIZE 1000\r\n250 8BITMIME\r\n550-5.1.1 No such\r\n"
                b"550 5.1.1 user here\r\n")
    ehlo = reader.next_reply()
    assert (ehlo.code, ehlo.lines) == (250, ("mx.test", "SIZE 1000", "8BITMIME"))
    assert parse_ehlo(ehlo) == {"SIZE": "1000", "8BITMIME": ""}
    refusal = reader.next_reply()
    assert (refusal.code, refusal.enhanced, refusal.text) == (550, "5.1.1", "No such user here")
    assert reader.next_reply() is None


def test_reply_reader_waits_for_the_last_line():
    reader = ReplyReader()
    reader.feed(b"250-first\r\n250 sec")
    assert reader.next_reply() is None
    reader.feed(b"ond\n")
    assert reader.next_reply().lines == ("first", "second")


def test_reply_reader_refuses_garbage_and_code_changes():
    for data in (b"hello\r\n", b"25 short\r\n", b"250-a\r\n251 b\r\n", b"250xtext\r\n"):
        reader = ReplyReader()
        reader.feed(data)
        try:
            reader.next_reply()
        except MalformedReply:
            continue
        raise AssertionError(f"{data!r} was accepted")


def test_reply_reader_caps_a_reply():
    reader = ReplyReader(max_reply_bytes=1000)
    reader.feed(b"250-" + b"x" * 600 + b"\r\n250-" + b"y" * 600)
    try:
        reader.next_reply()
    except MalformedReply as exc:
        assert "longer than 1000" in str(exc)
    else:
        raise AssertionError("no cap")


def test_reply_text_loses_control_characters_and_mismatched_enhanced_codes():
    reader = ReplyReader()
    reader.feed(b"451 5.1.1 odd\x00text\r\n")
    reply = reader.next_reply()
    assert reply.enhanced is None
    assert reply.enhanced_or_derived == "4.0.0"
    assert reply.text == "5.1.1 odd\\x{0}text"


def test_an_enhanced_code_takes_ascii_digits_only():
    # Arabic-Indic digits are \d to Python's re without re.ASCII: "5.\u0661.1"
    # would be taken as a code, and go into our replies and bounces.
    reader = ReplyReader()
    reader.feed("550 5.\u0661.1 unknown\r\n".encode())
    reply = reader.next_reply()
    assert reply.enhanced is None
    assert reply.enhanced_or_derived == "5.0.0"


def test_reply_text_escapes_c1_controls_and_unicode_line_separators():
    # As UTF-8 from a hostile next hop: U+2028, U+2029 and NEL break a
    # line for str.splitlines(), CSI and ESC drive a terminal, CR ends a
    # header line.  TAB and other non-ASCII text stay as they are.
    reader = ReplyReader()
    reader.feed("550-5.1.1 no\u2028ID: to=<x>, status=sent\r\n"
                "550 5.1.1 a\x85b\u2029c\x9bd\x1b[2Je\rf\tg \u00e9\r\n".encode())
    reply = reader.next_reply()
    assert reply.lines == ("5.1.1 no\\x{2028}ID: to=<x>, status=sent",
                           "5.1.1 a\\x{85}b\\x{2029}c\\x{9B}d\\x{1B}[2Je\\x{D}f\tg \u00e9")
    assert str(reply) == ("550 no\\x{2028}ID: to=<x>, status=sent "
                          "a\\x{85}b\\x{2029}c\\x{9B}d\\x{1B}[2Je\\x{D}f\tg \u00e9")
    assert str(reply).splitlines() == [str(reply)]


def test_size_limit_follows_rfc_1870():
    assert size_limit({}) is None
    assert size_limit({"SIZE": ""}) is None
    assert size_limit({"SIZE": "0"}) is None
    assert size_limit({"SIZE": "52428800"}) == 52428800


def test_auth_equals_form_is_read_as_auth():
    reader = ReplyReader()
    reader.feed(b"250-mx\r\n250-AUTH=LOGIN\r\n250 AUTH PLAIN LOGIN\r\n")
    assert parse_ehlo(reader.next_reply()) == {"AUTH": "PLAIN LOGIN"}


_message_bytes = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x", b".."]),
                          max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(message=_message_bytes, cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_dot_stuffing_does_not_depend_on_chunk_boundaries(message, cuts):
    stuffer = DotStuffer()
    points = sorted({min(c, len(message)) for c in cuts} | {0, len(message)})
    out = b"".join(stuffer.feed(message[a:b]) for a, b in zip(points, points[1:]))
    assert out + stuffer.finish() == reference_stuffing(message)


@settings(max_examples=100, deadline=None)
@given(replies=st.lists(st.tuples(st.integers(200, 599), st.lists(
    st.text(alphabet="abc 1.", max_size=10), min_size=1, max_size=3)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=5))
def test_reply_reader_does_not_depend_on_read_boundaries(replies, cuts):
    wire = b""
    for code, lines in replies:
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            wire += f"{code}{sep}{line}\r\n".encode()
    reader = ReplyReader()
    got = []
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    for a, b in zip(points, points[1:]):
        reader.feed(wire[a:b])
        while (reply := reader.next_reply()) is not None:
            got.append((reply.code, list(reply.lines)))
    assert got == [(code, lines) for code, lines in replies]


def test_a_delivery_error_text_is_escaped_whatever_made_it():
    # A TLS error names what the server's certificate says; a DNS error the
    # names a zone gave.  None of it reaches a log line or a DSN raw.
    error = DeliveryError(True, None, "4.7.5",
                          "TLS error: certificate is for 'a\x1b[2J\u2028b\r\nc'", remote="x")
    assert error.text == "TLS error: certificate is for 'a\\x{1B}[2J\\x{2028}b\\x{D}\\x{A}c'"
    assert str(error) == error.text


def test_a_connect_cut_by_a_wrapped_failure_is_named_without_its_repr():
    # What twisted.internet.tcp fails a connection attempt with when a
    # stop aborts it while connecting.  No "Traceback" in a log line.
    cut = internet_error.ConnectError(string=Failure(internet_error.ConnectionLost()))
    assert client_module.connect_problem(cut) == ("Connection to the other side was lost in a non-clean "
                                     "fashion.")
    refused = internet_error.ConnectError(osError=Failure(internet_error.ConnectionRefusedError()))
    assert client_module.connect_problem(refused) == "Connection refused"
