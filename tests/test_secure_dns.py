"""Tests for relaymail.delivery.secure_dns: queries that carry the AD bit.

The server is a real twisted.names server on loopback (UDP and TCP on one
port) playing a validating resolver: it sets AD on the answers for the
names it is told are signed, truncates the UDP answers it is told to, and
can be made to answer SERVFAIL (a bogus signature) or a forged id.
"""

import io

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.trial import unittest

from relaymail.delivery.secure_dns import (
    Answer, DNSLookupError, SecureResolver, nameservers, trusts_ad)
from relaymail.logobserver import TextObserver
from tests.test_routing import A, MX, RecordingServer, Zone


class TLSARecord(dns.UnknownRecord):
    """A TLSA record (type 52) as the wire has it."""

    TYPE = 52

    def __init__(self, usage, selector, matching, data, ttl=60):
        super().__init__(bytes([usage, selector, matching]) + data, ttl)


class ValidatingServer(RecordingServer):
    """A resolver's answers with the AD bit set for the names in ``signed``
    (as a validating resolver does for a signed zone) and the UDP answer
    truncated for the names in ``truncated``, so the client asks by TCP."""

    def __init__(self, zone, signed=(), truncated=(), servfail=()):
        super().__init__(zone, servfail=servfail)
        self.signed = set(signed)
        self.truncated = set(truncated)
        self.flags_seen = []        # (ad, do) of every query
        self.no_edns = False        # answer FORMERR to EDNS, as old servers do

    def handleQuery(self, message, protocol, address):
        edns = dns._EDNSMessage._fromMessage(message)
        self.flags_seen.append((bool(message.authenticData), bool(edns.dnssecOK)))
        if self.no_edns and edns.ednsVersion is not None:
            reply = dns.Message(id=message.id, answer=1, rCode=dns.EFORMAT)
            reply.queries = message.queries
            protocol.writeMessage(reply, address)
            return None
        return super().handleQuery(message, protocol, address)

    def sendReply(self, protocol, message, address):
        name = message.queries[0].name.name.decode("ascii").lower() if message.queries else ""
        message.authenticData = int(name in self.signed)
        if name in self.truncated and isinstance(protocol, dns.DNSDatagramProtocol):
            message.answers, message.trunc = [], 1
        return super().sendReply(protocol, message, address)


def serve(case, server):
    """Listen with ``server`` on UDP and TCP at one loopback port; return
    the port."""
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(server), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, server, interface="127.0.0.1")
        except CannotListenError:
            # The UDP port's TCP twin is someone else's: pick another.
            udp.stopListening()
            continue
        case.addCleanup(udp.stopListening)
        case.addCleanup(tcp.stopListening)
        return port
    raise AssertionError("no loopback port free for both UDP and TCP")


ZONE = {
    "signed.test": [MX(10, "mx.signed.test")],
    "mx.signed.test": [A("127.0.0.1")],
    "_25._tcp.mx.signed.test": [TLSARecord(3, 1, 1, b"\x01" * 32)],
    "plain.test": [MX(10, "mx.plain.test")],
    "mx.plain.test": [A("127.0.0.2")],
    "big.test": [A(f"127.0.1.{i}") for i in range(1, 60)],
    "bogus.test": [A("127.0.0.3")],
}


class SecureResolverTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.server = ValidatingServer(
            Zone(ZONE), signed={"signed.test", "mx.signed.test", "_25._tcp.mx.signed.test",
                                "big.test"},
            truncated={"big.test"}, servfail={"bogus.test"})
        self.port = serve(self, self.server)
        self.resolver = SecureResolver([("127.0.0.1", self.port)], reactor, timeout=(2,))

    @defer.inlineCallbacks
    def test_a_signed_answer_is_authenticated_and_the_query_asked_for_it(self):
        answer = yield self.resolver.lookup("signed.test", dns.MX)
        self.assertTrue(answer.authenticated)
        self.assertFalse(answer.nxdomain)
        [record] = answer.records
        self.assertEqual(record.payload.name.name, b"mx.signed.test")
        # AD and DO were both asked (RFC 6840 5.7, RFC 3225).
        self.assertEqual(self.server.flags_seen, [(True, True)])

    @defer.inlineCallbacks
    def test_a_query_writes_no_line_to_the_log(self):
        # Each query has a UDP port of its own; Twisted announces the port
        # and the protocol as they start and stop.  Four lines a query, and
        # a relay delivering to MX hosts asks several names a message.
        out = io.StringIO()
        observer = TextObserver(out)
        globalLogPublisher.addObserver(observer)
        try:
            yield self.resolver.lookup("mx.plain.test", dns.A)
            yield self.resolver.lookup("signed.test", dns.MX)
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertEqual(out.getvalue(), "")

    @defer.inlineCallbacks
    def test_an_unsigned_answer_is_not_authenticated(self):
        answer = yield self.resolver.lookup("mx.plain.test", dns.A)
        self.assertFalse(answer.authenticated)
        self.assertEqual([r.payload.dottedQuad() for r in answer.records], ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_a_tlsa_record_arrives_as_its_wire_data(self):
        answer = yield self.resolver.lookup("_25._tcp.mx.signed.test", 52)
        [record] = answer.records
        self.assertEqual(record.type, 52)
        self.assertEqual(record.payload.data, b"\x03\x01\x01" + b"\x01" * 32)
        self.assertTrue(answer.authenticated)

    @defer.inlineCallbacks
    def test_a_truncated_answer_is_asked_again_over_tcp(self):
        answer = yield self.resolver.lookup("big.test", dns.A)
        self.assertEqual(len(answer.records), 59)
        self.assertTrue(answer.authenticated)
        self.assertEqual(self.server.queries, [("big.test", "A"), ("big.test", "A")])

    @defer.inlineCallbacks
    def test_a_server_without_edns_is_asked_again_without_it(self):
        self.server.no_edns = True
        answer = yield self.resolver.lookup("mx.plain.test", dns.A)
        self.assertEqual([r.payload.dottedQuad() for r in answer.records], ["127.0.0.2"])
        self.assertEqual(self.server.flags_seen, [(True, True), (True, False)])

    @defer.inlineCallbacks
    def test_nxdomain_is_an_answer_not_an_error(self):
        answer = yield self.resolver.lookup("absent.test", dns.A)
        self.assertEqual(answer, Answer((), False, nxdomain=True))

    @defer.inlineCallbacks
    def test_servfail_is_an_error_and_is_not_asked_again(self):
        resolver = SecureResolver([("127.0.0.1", self.port)], reactor, timeout=(2, 2))
        with self.assertRaises(DNSLookupError) as caught:
            yield resolver.lookup("bogus.test", dns.A)
        self.assertEqual(str(caught.exception), "127.0.0.1: SERVFAIL")
        self.assertEqual(self.server.queries, [("bogus.test", "A")])

    @defer.inlineCallbacks
    def test_a_silent_server_is_a_timeout_naming_it(self):
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = SecureResolver([("127.0.0.1", silent.getHost().port)], reactor,
                                  timeout=(0.2,))
        with self.assertRaises(DNSLookupError) as caught:
            yield resolver.lookup("signed.test", dns.MX)
        self.assertEqual(str(caught.exception), "127.0.0.1: no answer within 0.2 s")

    @defer.inlineCallbacks
    def test_a_forged_answer_with_another_id_is_ignored(self):
        # A spoofer answers first, with the AD bit and the wrong id; the
        # real answer that follows is the one taken.
        class Forger(DatagramProtocol):
            def datagramReceived(self, data, address):
                query = dns.Message()
                query.fromStr(data)
                forged = dns.Message(id=(query.id + 1) % 65536, answer=1, authenticData=1)
                forged.queries = query.queries
                forged.answers = [dns.RRHeader(name=b"mx.plain.test", payload=A("192.0.2.66"))]
                self.transport.write(forged.toStr(), address)
                real = dns.Message(id=query.id, answer=1)
                real.queries = query.queries
                real.answers = [dns.RRHeader(name=b"mx.plain.test", payload=A("127.0.0.2"))]
                self.transport.write(real.toStr(), address)
        forger = reactor.listenUDP(0, Forger(), interface="127.0.0.1")
        self.addCleanup(forger.stopListening)
        resolver = SecureResolver([("127.0.0.1", forger.getHost().port)], reactor,
                                  timeout=(2,))
        answer = yield resolver.lookup("mx.plain.test", dns.A)
        self.assertFalse(answer.authenticated)
        self.assertEqual([r.payload.dottedQuad() for r in answer.records], ["127.0.0.2"])


class NameserversTests(unittest.TestCase):

    def test_the_nameserver_lines_of_resolv_conf(self):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write("# local\nsearch example.com\nnameserver 127.0.0.53\n"
                       "nameserver ::1\noptions edns0\n")
        self.assertEqual(nameservers(path), [("127.0.0.53", 53), ("::1", 53)])

    def test_no_resolv_conf_means_the_local_host(self):
        self.assertEqual(nameservers(self.mktemp()), [("127.0.0.1", 53)])

    def test_ad_is_believed_from_this_host_or_with_trust_ad_only(self):
        cases = (("nameserver 127.0.0.53\nnameserver ::1\n", True),
                 ("nameserver 127.0.0.53\nnameserver 192.0.2.53\n", False),
                 ("nameserver 192.0.2.53\noptions edns0 trust-ad\n", True),
                 ("", True))                 # no line: 127.0.0.1
        for text, trusted in cases:
            path = self.mktemp()
            with open(path, "w") as file:
                file.write(text)
            self.assertEqual(trusts_ad(path), trusted, text)
            resolver = SecureResolver.from_resolv_conf(reactor, path)
            self.assertEqual(resolver.trust_ad, trusted)
            self.assertEqual(resolver.describe_distrust(path) is None, trusted)


class UntrustedResolverTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_an_untrusted_resolver_authenticates_nothing(self):
        server = ValidatingServer(Zone(ZONE), signed={"signed.test"})
        port = serve(self, server)
        resolver = SecureResolver([("127.0.0.1", port)], reactor, timeout=(2,), trust_ad=False)
        answer = yield resolver.lookup("signed.test", dns.MX)
        self.assertEqual((len(answer.records), answer.authenticated), (1, False))
