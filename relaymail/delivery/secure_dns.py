"""DNS lookups that say whether the answer was DNSSEC-validated.

DANE (RFC 7672) rests on one bit: the AD ("authentic data") flag a
validating resolver sets on an answer it has checked.  The twisted.names
client neither asks for it nor reports it, so this module sends its own
queries: recursion desired, AD set (RFC 6840 5.7: a resolver then says
whether the answer validated) and EDNS with DO (RFC 3225), to each
nameserver of ``/etc/resolv.conf`` in turn, over UDP and again over TCP
when the answer was truncated.

The AD bit is only as good as the path to the resolver: anyone between
us and a remote resolver can set it.  So, as glibc does (resolv.conf(5)),
it is believed only from nameservers on this host (127.0.0.0/8, ::1:
unbound, systemd-resolved with DNSSEC on) or when resolv.conf says
``options trust-ad``; otherwise no answer is authenticated and DANE never
applies.  With a local resolver that does not validate, the same.
"""

import io
import ipaddress
import random
import struct
from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.names import dns

#: RFC 1035 4.2.1 caps UDP answers at 512 bytes without EDNS; 1232 is the
#: payload size the DNS flag day 2020 settled on (no IP fragmentation).
EDNS_PAYLOAD = 1232

#: Seconds to wait for each server on each round, as twisted.names'
#: client.Resolver does by default (1, 3, 11, 45) but shorter: a DANE
#: lookup delays one delivery attempt, which is retried anyway.
DEFAULT_TIMEOUT = (1, 3, 11)


class DNSLookupError(Exception):
    """The lookup had no answer to trust: SERVFAIL, REFUSED, a timeout."""


@dataclass(frozen=True)
class Answer:
    """One lookup's answer.

    :ivar records: the answer section's ``dns.RRHeader`` s (CNAMEs
        included; callers pick the type they asked for).
    :ivar authenticated: the resolver set AD: every record validated.
    :ivar nxdomain: the name does not exist (rcode NXDOMAIN).
    """

    records: tuple
    authenticated: bool
    nxdomain: bool = False


def nameservers(path="/etc/resolv.conf"):
    """The ``(address, 53)`` of each ``nameserver`` line of ``path``;
    127.0.0.1 when there is none or the file is missing (resolv.conf(5))."""
    return _read_resolv_conf(path)[0]


def _read_resolv_conf(path):
    """``(servers, trust_ad)`` from resolv.conf."""
    servers, trust_ad = [], False
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            for line in file:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1], 53))
                elif fields and fields[0] == "options" and "trust-ad" in fields[1:]:
                    trust_ad = True
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)], trust_ad


def trusts_ad(path="/etc/resolv.conf"):
    """Whether the AD bit of resolv.conf's nameservers is believed: all on
    this host, or ``options trust-ad``."""
    servers, trust_ad = _read_resolv_conf(path)
    return trust_ad or all(_is_loopback(address) for address, _ in servers)


def _is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class SecureResolver:
    """Queries with the AD and DO bits, to ``servers`` in order.

    :param servers: ``(address, port)`` pairs.
    :param reactor: the reactor to send from.
    :param timeout: seconds per server per round.
    :param rng: ``random.Random`` for query ids (tests may seed it).
    :param trust_ad: False to count no answer as authenticated (the AD
        bit could be forged on the way from a remote resolver).
    """

    def __init__(self, servers, reactor, timeout=DEFAULT_TIMEOUT, rng=None, trust_ad=True):
        self._servers = list(servers)
        self.trust_ad = trust_ad
        self._reactor = reactor
        self._timeout = tuple(timeout)
        self._rng = rng or random.SystemRandom()

    @classmethod
    def from_resolv_conf(cls, reactor, path="/etc/resolv.conf"):
        servers, _ = _read_resolv_conf(path)
        return cls(servers, reactor, trust_ad=trusts_ad(path))

    def describe_distrust(self, path="/etc/resolv.conf"):
        """The log line saying why no answer is authenticated, or None."""
        if self.trust_ad:
            return None
        servers = ", ".join(address for address, _ in self._servers)
        return (f"DANE: the AD bit of {servers} is not believed (not on this host, and no "
                f"'options trust-ad' in {path}): no TLSA record is used; run a validating "
                "resolver on this host")

    def lookup(self, name, record_type):
        """A Deferred firing with the :class:`Answer` for ``name`` (str)
        and ``record_type`` (a ``dns`` type code), or failing with
        :class:`DNSLookupError`."""
        return defer.ensureDeferred(self._lookup(name.rstrip("."), record_type))

    async def _lookup(self, name, record_type):
        problems = []
        for timeout in self._timeout:
            for server in self._servers:
                try:
                    message = await self._ask(server, name, record_type, timeout)
                    if message.rCode == dns.EFORMAT:
                        # RFC 6891 7: a server that does not know EDNS
                        # says FORMERR; ask it the plain way (it will not
                        # validate either, so nothing is lost).
                        message = await self._ask(server, name, record_type, timeout,
                                                  edns=False)
                except DNSLookupError as exc:
                    problems.append(f"{server[0]}: {exc}")
                    continue
                authenticated = self.trust_ad and bool(message.authenticData)
                if message.rCode == dns.OK:
                    return Answer(tuple(message.answers), authenticated)
                if message.rCode == dns.ENAME:
                    return Answer((), authenticated, nxdomain=True)
                problems.append(f"{server[0]}: {_rcode_name(message.rCode)}")
                # SERVFAIL from a validating resolver is how a bogus
                # answer looks: asking again will not change it.
                if message.rCode == dns.ESERVER:
                    raise DNSLookupError("; ".join(dict.fromkeys(problems)))
        raise DNSLookupError("; ".join(dict.fromkeys(problems)) or "no nameserver")

    async def _ask(self, server, name, record_type, timeout, edns=True):
        query_id = self._rng.randrange(1, 65536)
        try:
            query = dns.Query(name, record_type, dns.IN)
            query.name.encode(io.BytesIO())
        except Exception as exc:
            # A name no query can carry (a hostile MX target's label of
            # escaped octets past 63 characters): an answer, not a crash.
            raise DNSLookupError(f"cannot ask for {name!r}: {exc}") from None
        if edns:
            request = dns._EDNSMessage(
                id=query_id, recDes=True, authenticData=True, dnssecOK=True,
                maxSize=EDNS_PAYLOAD, queries=[query])
        else:
            request = dns.Message(id=query_id, recDes=1, authenticData=1)
            request.queries = [query]
        payload = request.toStr()
        message = await self._over(_UDPQuery, server, payload, query_id, name, record_type,
                                   timeout)
        if message.trunc:
            message = await self._over(_TCPQuery, server, payload, query_id, name,
                                       record_type, timeout)
        return message

    async def _over(self, kind, server, payload, query_id, name, record_type, timeout):
        query = kind(payload, query_id, name, record_type)
        timer = self._reactor.callLater(timeout, query.timed_out, timeout)
        try:
            query.start(self._reactor, server)
            return await query.answered
        finally:
            if timer.active():
                timer.cancel()
            query.stop()


def _rcode_name(rcode):
    return {dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL", dns.ENOTIMP: "NOTIMP",
            dns.EREFUSED: "REFUSED"}.get(rcode, f"rcode {rcode}")


def _decoded(data, query_id, name, record_type):
    """The response in ``data`` when it answers our question, else None
    (a stray or spoofed datagram is ignored, not taken)."""
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception:
        return None
    if message.id != query_id or not message.answer or len(message.queries) != 1:
        return None
    question = message.queries[0]
    if (question.name.name.decode("ascii", "replace").rstrip(".").lower() != name.lower()
            or question.type != record_type):
        return None
    return message


class _Query:
    """One request to one server: ``answered`` fires with its Message."""

    def __init__(self, payload, query_id, name, record_type):
        self.payload = payload
        self.query_id = query_id
        self.name = name
        self.record_type = record_type
        self.answered = defer.Deferred()

    def got(self, data):
        message = _decoded(data, self.query_id, self.name, self.record_type)
        if message is not None and not self.answered.called:
            self.answered.callback(message)
        return message is not None

    def failed(self, text):
        if not self.answered.called:
            self.answered.errback(DNSLookupError(text))

    def timed_out(self, timeout):
        self.failed(f"no answer within {timeout:g} s")


class _UDPQuery(_Query, protocol.DatagramProtocol):
    port = None
    noisy = False       # no "Starting protocol"/"Stopping protocol" line per query

    def start(self, reactor, server):
        try:
            interface = "::" if ":" in server[0] else ""
            self.port = reactor.listenUDP(0, self, interface=interface)
            self.transport.connect(*server)
            self.transport.write(self.payload)
        except Exception as exc:
            self.failed(f"cannot send: {exc}")

    def datagramReceived(self, data, address):
        self.got(data)

    def connectionRefused(self):
        self.failed("connection refused")

    def stop(self):
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class _TCPQuery(_Query):
    """The same request over TCP (RFC 1035 4.2.2: a two-byte length first)."""

    connector = None

    def start(self, reactor, server):
        query = self

        class Stream(protocol.Protocol):
            buffer = b""

            def connectionMade(self):
                self.transport.write(struct.pack("!H", len(query.payload)) + query.payload)

            def dataReceived(self, data):
                self.buffer += data
                if len(self.buffer) >= 2:
                    (size,) = struct.unpack("!H", self.buffer[:2])
                    if len(self.buffer) >= 2 + size:
                        if not query.got(self.buffer[2:2 + size]):
                            query.failed("a TCP answer that does not match the question")
                        self.transport.loseConnection()

            def connectionLost(self, reason):
                if not reason.check(ConnectionDone):
                    query.failed(f"TCP: {reason.getErrorMessage()}")
                else:
                    query.failed("TCP connection closed without an answer")

        class Connecting(protocol.ClientFactory):
            def buildProtocol(self, addr):
                return Stream()

            def clientConnectionFailed(self, connector, reason):
                query.failed(f"TCP: {reason.getErrorMessage()}")

        self.connector = reactor.connectTCP(server[0], server[1], Connecting(),
                                            timeout=30)

    def stop(self):
        if self.connector is not None:
            self.connector.disconnect()
            self.connector = None
