"""relaymail.tcp.write over real loopback sockets: sent at once when
nothing is buffered, Twisted's buffering otherwise, bytes in order; and
the message stream that ends a one-chunk message in one write."""

import io
import pathlib
import socket

from twisted.internet import defer, reactor, ssl, tcp as twisted_tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from relaymail import tcp
from relaymail.delivery.stream import MessageProducer
from relaymail.policy.recipients import Policy
from relaymail.smtp.server import SMTPFactory
from tests.support import MemoryQueue, make_settings
from tests.test_client import SERVER_NAME, authority, server_tls_options


class Collector(Protocol):
    """The far end: keeps what arrives, fires ``got`` once ``want`` bytes came."""

    def __init__(self, want):
        self.want = want
        self.data = b""
        self.got = defer.Deferred()
        self.connected_d = defer.Deferred()
        self._waiting = None

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.data += data
        if len(self.data) >= self.want and not self.got.called:
            self.got.callback(self.data)
        if self._waiting is not None and self._waiting[0](self.data):
            _, d = self._waiting
            self._waiting = None
            d.callback(self.data)

    def until(self, condition):
        """A Deferred firing once what arrived meets ``condition``."""
        if condition(self.data):
            return defer.succeed(self.data)
        d = defer.Deferred()
        self._waiting = (condition, d)
        return d


class Held(Protocol):
    """The near end: does nothing itself; the test writes on it."""

    def connectionMade(self):
        self.factory.made.callback(self)


class NearFactory(Factory):
    protocol = Held

    def __init__(self):
        self.made = defer.Deferred()


@implementer(IPullProducer)
class PullProducer:
    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class WriteTests(unittest.TestCase):
    timeout = 10     # a write that never arrives fails in seconds, not trial's 120

    async def connect(self, want):
        near = NearFactory()
        port = reactor.listenTCP(0, near, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        far = Collector(want)
        client = ClientFactory.forProtocol(lambda: far)
        reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        server = await near.made
        await far.connected_d
        self.addCleanup(far.transport.abortConnection)
        self.addCleanup(server.transport.abortConnection)
        return server.transport, far

    async def test_a_write_with_nothing_buffered_leaves_before_the_reactor_turns(self):
        transport, far = await self.connect(7)
        tcp.write(transport, b"220 ok\n")
        # Nothing left for the reactor: no watch for writability was set.
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await far.got, b"220 ok\n")

    async def test_a_write_behind_buffered_data_waits_its_turn(self):
        transport, far = await self.connect(12)
        transport.write(b"first ")
        tcp.write(transport, b"second")
        self.assertIn(transport, reactor.getWriters())
        self.assertEqual(await far.got, b"first second")

    async def test_at_once_false_keeps_twisted_buffering(self):
        transport, far = await self.connect(3)
        tcp.write(transport, b"250", at_once=False)
        self.assertEqual(transport._tempDataBuffer, [b"250"])
        self.assertEqual(await far.got, b"250")

    async def test_a_pull_producer_is_left_to_the_transport_asking_for_more(self):
        # A pull producer writes when the transport, its buffer drained,
        # asks; a write that never touched the buffer would never ask.
        transport, far = await self.connect(4)
        transport.registerProducer(PullProducer(), False)
        self.addCleanup(transport.unregisterProducer)
        tcp.write(transport, b"data")
        self.assertEqual(transport._tempDataBuffer, [b"data"])
        self.assertEqual(await far.got, b"data")

    async def test_what_the_socket_does_not_take_is_buffered_and_arrives_in_order(self):
        size = 1024 * 1024
        transport, far = await self.connect(size + 4)
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        far.transport.pauseProducing()
        payload = bytes(range(256)) * (size // 256)
        tcp.write(transport, payload)
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        self.assertTrue(0 < buffered < size, buffered)
        tcp.write(transport, b"tail")
        far.transport.resumeProducing()
        self.assertEqual(await far.got, payload + b"tail")

    async def test_nothing_is_sent_after_an_abort(self):
        # Twisted drops what is written between abortConnection() and the
        # connectionLost it calls on a later turn; so must the eager path.
        transport, far = await self.connect(1)
        far_lost = defer.Deferred()
        far.connectionLost = lambda reason: far_lost.callback(far.data)
        transport.abortConnection()
        tcp.write(transport, b"AFTER-ABORT")
        self.assertEqual(await far_lost, b"")

    async def test_after_starttls_a_write_goes_through_tls(self):
        # STARTTLS turns a plain connection into TLS in place: the eager
        # path must step aside, or the bytes would leave unencrypted.
        transport, far = await self.connect(len(b"secret reply"))
        raw = []
        real = transport.writeSomeData
        transport.writeSomeData = lambda data: (raw.append(bytes(data)), real(data))[1]
        transport.startTLS(server_tls_options("ca"))
        far.transport.startTLS(ssl.optionsForClientTLS(
            SERVER_NAME, trustRoot=ssl.Certificate.loadPEM(authority().cert_pem)))
        tcp.write(transport, b"secret reply")
        self.assertEqual(await far.got, b"secret reply")
        self.assertTrue(raw)
        self.assertFalse(any(b"secret" in sent for sent in raw), raw)

    async def test_a_closed_peer_is_found_by_the_buffered_path(self):
        transport, far = await self.connect(1)
        lost = defer.Deferred()
        transport.protocol.connectionLost = lambda reason: lost.callback(reason.type)
        # Not reading: only a write can find the reset, so an eager send
        # that swallowed the error without buffering would leave this
        # connection open for ever.
        transport.stopReading()
        far.transport.abortConnection()
        # Written before our side read the RST: the error comes back from
        # send(2) and the connection is closed as Twisted closes it.
        for _ in range(20):
            tcp.write(transport, b"x" * 65536)
            await deferLater(0.01)
            if lost.called:
                break
        self.assertEqual(await lost, ConnectionLost)


def deferLater(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class CountingServer(twisted_tcp.Server):
    sends = None

    def writeSomeData(self, data):
        self.sends.append(bytes(data))
        return super().writeSomeData(data)


class PipeliningTests(unittest.TestCase):
    timeout = 10     # a write that never arrives fails in seconds, not trial's 120

    async def test_replies_to_a_pipelined_group_leave_in_one_write(self):
        settings = make_settings(self.mktemp_path())
        factory = SMTPFactory(settings, Policy([], [], settings), MemoryQueue(), reactor=reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sends = []
        port.transport = type("Counting", (CountingServer,), {"sends": sends})
        group = (b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                 b"RCPT TO:<b@example.com>\r\nRSET\r\n")
        far = Collector(1)
        reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: far))
        await far.until(lambda data: data.endswith(b"\r\n"))
        self.addCleanup(far.transport.abortConnection)
        self.assertTrue(far.data.startswith(b"220 "), far.data)
        self.assertEqual(len(sends), 1)         # the greeting, at once
        far.transport.write(group)
        # Four replies, the last RSET's.
        await far.until(lambda data: data.count(b"\r\n250 ") == 4)
        [answer] = sends[1:]
        self.assertEqual(far.data, sends[0] + answer)
        self.assertTrue(answer.endswith(b"250 2.0.0 Ok\r\n"), answer)

    def mktemp_path(self):
        path = pathlib.Path(self.mktemp())
        path.mkdir(parents=True)
        return path


class MessageStreamTests(unittest.TestCase):
    """relaymail.delivery.stream.MessageProducer on a real connection."""

    timeout = 10

    connect = WriteTests.connect

    async def everything_sent(self, transport, far):
        """All the far end got, once our side has closed: nothing sent
        twice or late slips past a test that waited for ``want`` bytes."""
        closed = defer.Deferred()
        far.connectionLost = lambda reason: closed.callback(far.data)
        transport.loseConnection()
        return await closed

    async def test_a_message_of_one_chunk_and_its_end_leave_in_one_write_at_once(self):
        message = b"Subject: x\r\n\r\n.starts with a dot\r\nbody\r\n"
        wire = b"Subject: x\r\n\r\n..starts with a dot\r\nbody\r\n.\r\n"
        transport, far = await self.connect(len(wire))
        sends = []
        real = transport.writeSomeData
        transport.writeSomeData = lambda data: (sends.append(bytes(data)), real(data))[1]
        done = MessageProducer(io.BytesIO(message), transport).start()
        self.assertTrue(done.called)
        self.assertEqual(sends, [wire])
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await self.everything_sent(transport, far), wire)

    async def test_a_message_of_many_chunks_arrives_whole_with_one_end(self):
        message = b"".join(b".line %d\r\n" % n for n in range(200))
        wire = message.replace(b".line", b"..line") + b".\r\n"
        transport, far = await self.connect(len(wire))
        done = MessageProducer(io.BytesIO(message), transport, chunk_size=7).start()
        await done
        self.assertEqual(await self.everything_sent(transport, far), wire)

    async def test_a_message_of_whole_chunks_ends_once_and_stuffs_across_their_edges(self):
        # Every chunk ends in CRLF and the next begins with a dot: the read
        # ahead finds an empty read after the last full chunk.
        message = b".abcde\r\n" * 6
        wire = b"..abcde\r\n" * 6 + b".\r\n"
        transport, far = await self.connect(len(wire))
        await MessageProducer(io.BytesIO(message), transport, chunk_size=8).start()
        self.assertEqual(await self.everything_sent(transport, far), wire)

    async def test_an_empty_message_is_just_the_end(self):
        transport, far = await self.connect(3)
        await MessageProducer(io.BytesIO(b""), transport).start()
        self.assertEqual(await self.everything_sent(transport, far), b".\r\n")

    async def test_a_read_error_ahead_sends_no_end_of_data(self):
        # The chunk before a failed read must not be taken for the last:
        # ending DATA then would deliver a truncated message.
        class FailsSecondRead(io.BytesIO):
            reads = 0

            def read(self, size=-1):
                self.reads += 1
                if self.reads == 2:
                    raise OSError(5, "Input/output error")
                return super().read(size)
        transport, far = await self.connect(1)
        done = MessageProducer(FailsSecondRead(b"x" * 20 + b"\r\n"), transport, chunk_size=8).start()
        with self.assertRaises(OSError):
            await done
        self.assertIsNone(transport.producer)
        self.assertEqual(await self.everything_sent(transport, far), b"")
