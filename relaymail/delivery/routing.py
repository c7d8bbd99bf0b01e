"""Where a recipient's mail goes next, and the addresses to try there.

:meth:`Router.destination` picks the next hop for a recipient domain: its
[routes] entry, else the [delivery] smarthost, else the domain's own MX
hosts.  Messages are grouped by that :class:`Destination` for connection
reuse and concurrency caps.  :meth:`Router.hops` then turns a destination
into the ordered list of :class:`Hop` (host name, IP address, port) the
client tries one after another, or fails with a :class:`RoutingError` that
says whether to retry later or bounce now.

DNS follows RFC 5321 section 5.1 (MX records by preference, equal
preferences in random order, the domain's own addresses when it has no MX
records) and RFC 7505 (null MX).
"""

import dataclasses
import ipaddress
import os
import random
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import (
    AuthoritativeDomainError, DNSFormatError, DNSNameError,
    DNSNotImplementedError, DNSQueryRefusedError, DNSServerError,
    DNSUnknownError)

from relaymail import sanitize
from relaymail.config import is_ip_address
from relaymail.delivery import dane, tls_policy, tls_report
from relaymail.delivery.client import Hop
from relaymail.delivery.mta_sts import PolicyStore
from relaymail.delivery.secure_dns import DNSLookupError, SecureResolver
from relaymail.queue import layout

log = Logger(namespace="relaymail.delivery")

# Addresses handed to the client for one destination.  Postfix caps
# addresses at smtp_mx_address_limit (5) and sessions at
# smtp_mx_session_limit (2); we allow more addresses because we try IPv4
# and IPv6 of each host, so 10 covers five dual-stack MX hosts, and the
# client's own connect timeout bounds the time spent on dead ones.
MAX_HOPS = 10

# MX hosts whose addresses we look up for one domain: a hostile or broken
# zone may list hundreds, and each costs two queries.
MAX_MX_HOSTS = 10

# RFC 3463: X.4.3 "directory server failure" covers a DNS lookup that could
# not be completed; 5.1.2 "bad destination system address" a domain that
# does not exist.  RFC 7505 section 4 gives the null MX reply.
_DNS_FAILURE = "4.4.3"
_NO_SUCH_DOMAIN = "5.1.2"
_NULL_MX_CODE = 556
_NULL_MX = "5.1.10"
# X.7.5, cryptographic failure: what the domain's TLS policy asks cannot be had.
_TLS_POLICY = "4.7.5"


@dataclass(frozen=True)
class Destination:
    """What messages are grouped by for connection reuse and concurrency.

    ``kind`` is ``'smarthost'``, ``'route'`` (a [routes] entry) or ``'mx'``
    (the recipient domain's own MX hosts).  ``host`` is the next hop's host
    for the first two, and the recipient domain (its ``domain_key``, which
    may be an address literal such as ``'[192.0.2.1]'``) for ``'mx'``.
    ``mx_lookup`` is False when ``host`` is to be connected to directly.
    ``tls`` is a route's ``[route_tls]`` policy, None for the default (a
    part of the key: two domains routed to one host with different TLS
    policies must not share connections), and for ``'mx'`` the domain's
    level ([tls_policy], else [delivery] tls_policy).  ``demand`` is what
    the messages ask themselves (:data:`~relaymail.delivery.tls_policy.REQUIRETLS`,
    :data:`~relaymail.delivery.tls_policy.TLS_OPTIONAL`), None for nothing.
    """

    kind: str
    host: str
    port: int
    mx_lookup: bool
    tls: str | None = None
    demand: str | None = None
    #: The transport whose jobs these are (relaymail.delivery.router.SMTP);
    #: a class attribute, not a field: not part of the key.
    transport = "smtp"

    @property
    def label(self) -> str:
        """How logs name the destination: ``'[10.0.0.5]:25'``,
        ``'relay.example:587'`` or ``'example.com'``."""
        if self.kind == "mx":
            return self.host
        if not self.mx_lookup:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class RoutingError(Exception):
    """No hop could be found for a destination.

    ``temporary`` says whether to try again later (True) or bounce now;
    ``code`` is the SMTP reply code to report when one is fixed by a
    standard (556 for null MX), else None and the caller picks 4xx or 5xx;
    ``enhanced`` is the RFC 3463 code and ``text`` the human-readable
    reason, which never holds anything but domain names and DNS results.
    """

    def __init__(self, temporary, code, enhanced, text):
        super().__init__(text)
        self.temporary = temporary
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __repr__(self):
        return (f"RoutingError(temporary={self.temporary!r}, code={self.code!r}, "
                f"enhanced={self.enhanced!r}, text={self.text!r})")


def route_key(routes, recipient_domain):
    """The [routes] key that decides for ``recipient_domain``, or None:
    the domain itself, else the longest ``.parent`` entry above it
    (``.corp.test`` for a.b.corp.test; never for corp.test), as Postfix's
    transport(5) lookup tries the domain, then each parent domain."""
    if recipient_domain in routes:
        return recipient_domain
    if recipient_domain.startswith("["):
        return None     # an address literal has no parent domains
    labels = recipient_domain.split(".")
    for start in range(1, len(labels)):
        parent = "." + ".".join(labels[start:])
        if parent in routes:
            return parent
    return None


class Router:
    """Chooses destinations and looks up their hops.

    :param settings: relaymail settings; uses ``routes``,
        ``delivery.smarthost`` and ``delivery.mx_port``.
    :param resolver: a ``twisted.names`` IResolver; None builds one from
        ``/etc/resolv.conf`` (and ``/etc/hosts``).
    :param reactor: the reactor for that default resolver.
    :param rng: a ``random.Random`` for shuffling MX hosts of equal
        preference; tests pass a seeded one.
    :param secure_resolver: a
        :class:`~relaymail.delivery.secure_dns.SecureResolver` for DANE's
        DNSSEC-validated lookups; None builds one from ``/etc/resolv.conf``
        when ``resolver`` is None too, else DANE is off (a test's resolver
        has no AD bit to give).
    :param sts: a :class:`~relaymail.delivery.mta_sts.PolicyStore`; None
        builds one caching under ``QUEUE/mta-sts`` when ``resolver`` is
        None too, else MTA-STS is off.
    :param tls_report: a
        :class:`~relaymail.delivery.tls_report.TLSReportRecorder` counting
        the policy failures found here (and by the store it builds), or
        None.
    """

    def __init__(self, settings, resolver=None, reactor=None, rng=None,
                 secure_resolver=None, sts=None, tls_report=None):
        self._routes = settings.routes
        self._route_tls = settings.route_tls
        self._smarthost = settings.delivery.smarthost
        self._smarthost_tls = settings.delivery.smarthost_tls
        self._mx_port = settings.delivery.mx_port
        self._mx_tls = settings.delivery.tls_policy
        self._tls_policy = settings.tls_policy
        # The daemon's router (no resolver given) builds what DANE and
        # MTA-STS need; a test's router gets only what it is handed.
        built_here = resolver is None and reactor is not None
        if secure_resolver is None and built_here:
            secure_resolver = SecureResolver.from_resolv_conf(reactor)
            distrust = secure_resolver.describe_distrust()
            if distrust and not self._smarthost:
                # Said once, where MX delivery happens; a smarthost set-up
                # (the common one) has no use for it.
                log.info("{text}", text=distrust)
        self._secure = secure_resolver
        if resolver is None:
            # The system resolver (/etc/resolv.conf, /etc/hosts, a cache);
            # it runs on the global reactor.
            resolver = client.createResolver()
            # Each query's UDP port is a "protocol" Twisted announces as it
            # starts and stops: two lines per lookup that say nothing.
            dns.DNSDatagramProtocol.noisy = False
        self._resolver = resolver
        if sts is None and built_here:
            sts = PolicyStore(resolver, reactor,
                              cache_dir=os.path.join(settings.queue.path, layout.MTA_STS),
                              port=settings.delivery.mta_sts_port,
                              ca_file=settings.delivery.tls_ca_file or None,
                              tls_report=tls_report)
        self._sts = sts
        self._tls_report = tls_report
        self._random = rng if rng is not None else random.Random()

    @property
    def resolver(self):
        """The twisted.names resolver of the ordinary lookups."""
        return self._resolver

    def destination(self, recipient_domain: str) -> Destination:
        """The next hop for mail to ``recipient_domain``.

        :param recipient_domain: a ``Mailbox.domain_key``: a lower-case
            A-label domain, or an address literal such as ``'[192.0.2.1]'``.
        """
        key = route_key(self._routes, recipient_domain)
        if key is not None:
            route = self._routes[key]
            return Destination("route", route.host, route.port, route.mx_lookup,
                               self._route_tls.get(key))
        if self._smarthost is not None:
            hop = self._smarthost
            return Destination("smarthost", hop.host, hop.port, hop.mx_lookup)
        # An address literal names the host itself (RFC 5321 4.1.3): there
        # is nothing to look up.
        literal = recipient_domain.startswith("[")
        # Only a [tls_policy] entry is part of the key; [delivery]
        # tls_policy is every other mx destination's, and _level says so.
        key = route_key(self._tls_policy, recipient_domain)
        level = self._tls_policy[key] if key is not None else None
        return Destination("mx", recipient_domain, self._mx_port, not literal, level)

    def hops(self, destination: Destination):
        """The addresses to try for ``destination``, best first.

        :return: a Deferred firing with a non-empty list of :class:`Hop`,
            or failing with :class:`RoutingError`.
        """
        return defer.ensureDeferred(self._hops(destination))

    async def _hops(self, destination):
        """The body of :meth:`hops`: the hops, each with the TLS it must
        have when that is not simply the destination's ClientConfig's."""
        hops = await self._plain_hops(destination)
        if destination.kind == "mx":
            hops = await self._secured(destination, hops)
        if destination.demand == tls_policy.REQUIRETLS:
            hops = self._for_requiretls(destination, hops)
        return hops

    async def _plain_hops(self, destination):
        """The hops of :meth:`hops`, before any TLS policy."""
        port = destination.port
        if destination.kind == "mx" and not destination.mx_lookup:
            address = _literal_address(destination.host)
            return [Hop(address, address, port)]
        if self._dane_applies(destination):
            return await self._secure_hops(destination)
        # Only the recipient's own domain can be told "does not exist" by
        # DNS; a smarthost or route that fails to resolve is our own
        # configuration (or our DNS) at fault, so its mail waits for a fix
        # instead of bouncing, as Postfix defers mail for a bad relayhost.
        final = destination.kind == "mx"
        if not destination.mx_lookup:
            hosts = [destination.host]
        else:
            hosts = await self._mail_exchangers(destination.host, final)
        hops = await self._resolve_hosts(hosts, port)
        if not hops.found:
            raise RoutingError(
                True, None, _DNS_FAILURE,
                f"No address found for {destination.label}: {hops.why()}")
        return hops.found

    async def _mail_exchangers(self, domain, final):
        """The host names to try for ``domain``, in order (RFC 5321 5.1)."""
        try:
            answers, _authority, _additional = (
                await self._resolver.lookupMailExchange(domain))
        except Exception as exc:
            raise _lookup_error(domain, "MX", exc, final) from None
        return self._exchangers(domain, answers, final)

    def _exchangers(self, domain, answers, final):
        """The host names the MX answer for ``domain`` gives, in order."""
        records = [answer.payload for answer in answers if answer.type == dns.MX]
        if not records:
            # No MX records: the domain itself is the implicit MX.
            return [domain]
        # The null MX of RFC 7505 has the root as its exchange.  Section 3
        # forbids other MX records beside it; if a broken zone has some,
        # those are still worth trying.
        usable = [record for record in records if _name(record.name)]
        if not usable:
            if final:
                raise RoutingError(False, _NULL_MX_CODE, _NULL_MX,
                                   "Recipient address has null MX")
            raise RoutingError(True, None, _DNS_FAILURE,
                               f"Next hop {domain} has null MX")
        return self._order(usable)[:MAX_MX_HOSTS]

    def _order(self, records):
        """Host names by preference, shuffling hosts of equal preference
        (RFC 5321 5.1) so they share the load; duplicates dropped."""
        groups = {}
        for record in records:
            groups.setdefault(record.preference, []).append(_name(record.name))
        ordered = []
        for preference in sorted(groups):
            group = groups[preference]
            self._random.shuffle(group)
            for name in group:
                if name not in ordered:
                    ordered.append(name)
        return ordered

    async def _resolve_hosts(self, hosts, port):
        """Every host's addresses as Hops, in host order, IPv4 first."""
        lookups = [defer.ensureDeferred(self._addresses(host)) for host in hosts]
        results = await defer.gatherResults(lookups)
        hops = _Hops()
        for host, (addresses, problem) in zip(hosts, results):
            if not addresses:
                hops.skipped.append(f"{host}: {problem}")
            for address in addresses:
                hops.add(Hop(host, address, port))
        return hops

    async def _addresses(self, host):
        """``(addresses, problem)``: the host's IPv4 then IPv6 addresses,
        and why there are none when there are none.  Never fails."""
        if is_ip_address(host):
            # An MX pointing at an address is against RFC 5321 5.1 but
            # common enough to honour rather than defer forever.
            return [host], None
        # IPv4 first rather than Postfix's random smtp_address_preference:
        # many hosts have IPv6 addresses but no working IPv6 route, and a
        # dead first address costs a whole connect timeout per attempt.
        results = await defer.DeferredList(
            [self._resolver.lookupAddress(host),
             self._resolver.lookupIPV6Address(host)],
            consumeErrors=True)
        addresses = []
        problems = []
        for (ok, result), (kind, record_type) in zip(
                results, [("A", dns.A), ("AAAA", dns.AAAA)]):
            if ok:
                answers = result[0]
                # A resolver that followed a CNAME returns it too; only the
                # address records at the end of the chain matter.
                addresses.extend(_address_text(answer.payload)
                                 for answer in answers if answer.type == record_type)
            else:
                problems.append(f"{kind} {_describe(result.value)}")
        return addresses, "; ".join(problems) or "no A or AAAA records"


    # -- TLS: DANE, MTA-STS, REQUIRETLS ------------------------------------

    def _level(self, destination):
        """The TLS level of an mx destination: its configured one, with
        DANE and MTA-STS left out for mail marked "TLS-Required: No"
        (RFC 8689 5) and for an address literal (no domain to publish
        either)."""
        level = destination.tls or self._mx_tls
        if level in ("dane", "sts") and (destination.demand == tls_policy.TLS_OPTIONAL
                                         or not destination.mx_lookup):
            return "may"
        return level

    def _dane_applies(self, destination):
        return (destination.kind == "mx" and self._secure is not None
                and self._level(destination) == "dane")

    async def _secure_hops(self, destination):
        """The hops of an mx destination under ``dane``, looked up through
        the validating resolver; each host whose MX, address and TLSA
        answers all validated (RFC 7672 2.2) gets its DANE HopSecurity,
        the others none yet (MTA-STS or ``may`` decide for them)."""
        domain, port = destination.host, destination.port
        try:
            answer = await self._secure.lookup(domain, dns.MX)
        except DNSLookupError as exc:
            raise RoutingError(True, None, _DNS_FAILURE,
                               f"DNS MX lookup for {domain} failed: {exc}") from None
        if answer.nxdomain:
            raise RoutingError(False, None, _NO_SUCH_DOMAIN,
                               f"Host or domain name not found: {domain} (NXDOMAIN)")
        hosts = self._exchangers(domain, answer.records, True)
        found = await defer.gatherResults(
            [defer.ensureDeferred(self._secure_host(host, port, answer.authenticated, domain))
             for host in hosts])
        hops = _Hops()
        for host, (addresses, security, problem) in zip(hosts, found):
            if not addresses:
                hops.skipped.append(f"{host}: {problem}")
            for address in addresses:
                hops.add(Hop(host, address, port, security))
        if not hops.found:
            raise RoutingError(True, None, _DNS_FAILURE,
                               f"No address found for {destination.label}: {hops.why()}")
        return hops.found

    async def _secure_host(self, host, port, mx_secure, domain):
        """``(addresses, DANE HopSecurity or None, problem)`` for one MX
        host.  A TLSA lookup that fails (not "no such records") makes the
        host unusable, as RFC 7672 2.2 says: a forged failure must not
        turn DANE off.

        An MX host from an MX answer that did not validate still gets DANE
        when its own answers did (RFC 7672 2.2.1: a signed provider's
        hosts serving an unsigned domain), but is not counted as
        authenticated for REQUIRETLS, whose MX lookup must be secure (RFC
        8689 4.2.1)."""
        if is_ip_address(host):
            return [host], None, None
        addresses, secure, problems, expanded = [], True, [], host
        for record_type, kind in ((dns.A, "A"), (dns.AAAA, "AAAA")):
            try:
                answer = await self._secure.lookup(host, record_type)
            except DNSLookupError as exc:
                problems.append(f"{kind} {exc}")
                continue
            found = [_address_text(rr.payload) for rr in answer.records if rr.type == record_type]
            addresses.extend(found)
            secure = secure and (answer.authenticated or not found)
            for rr in answer.records:
                if rr.type == dns.CNAME:
                    expanded = rr.payload.name.name.decode("ascii", "replace").rstrip(".")
        if not addresses:
            return [], None, "; ".join(problems) or "no A or AAAA records"
        if not secure:
            return addresses, None, None
        # RFC 7672 2.2.2: an MX host that is a (validated) alias has its
        # TLSA records at the alias's target first, then at its own name;
        # a DANE-TA certificate may carry either name (3.2.2).
        bases = (expanded, host) if expanded.lower() != host.lower() else (host,)
        for base in bases:
            lookup = await dane.lookup_tlsa(self._secure, base, port)
            if lookup.problem:
                if self._tls_report is not None:
                    # RFC 8460 4.3.2.1: the resolver gave no valid TLSA answer.
                    self._tls_report.failure(
                        tls_policy.HopSecurity("dane", "dane", domain=domain),
                        tls_report.DNSSEC_INVALID, host)
                return [], None, f"TLSA lookup failed ({lookup.problem}); not used without DANE"
            if lookup.records and not lookup.authenticated:
                return addresses, None, None
            if lookup.records:
                return addresses, tls_policy.dane_security(
                    host, lookup.records, names=bases, authenticated=mx_secure), None
        return addresses, None, None

    async def _secured(self, destination, hops):
        """Each hop of an mx destination with its HopSecurity: DANE's where
        found, else MTA-STS's (under dane or sts), else the level's own."""
        level = self._level(destination)
        if level not in ("dane", "sts"):
            if level == "may":
                return hops             # the mx ClientConfig's own level
            security = tls_policy.configured(level)
            return [dataclasses.replace(hop, security=security) for hop in hops]
        policy = None
        if self._sts is not None and any(hop.security is None or not hop.security.verifies
                                         for hop in hops):
            policy = await self._sts.policy(destination.host)
        kept, left_out = [], []
        for hop in hops:
            security = hop.security
            if security is None or not security.verifies:
                # No DANE, or TLSA records none of which is usable (plain
                # text forbidden, nothing to check): MTA-STS may ask more.
                from_sts = tls_policy.sts_security(policy, hop.name)
                if security is None or from_sts is None or from_sts.verifies:
                    security = from_sts
            if security is None:
                left_out.append(hop.name)
            elif security == tls_policy.OPPORTUNISTIC:
                kept.append(hop)        # neither DANE nor MTA-STS: may, as configured
            else:
                security = dataclasses.replace(security, domain=destination.host)
                kept.append(dataclasses.replace(hop, security=security))
        if not kept:
            names = ", ".join(dict.fromkeys(left_out))
            if self._tls_report is not None:
                # RFC 8460 4.3.1: no MX host the policy allows.
                self._tls_report.failure(
                    tls_policy.HopSecurity("verify", "mta-sts", domain=destination.host,
                                           policy_strings=policy.strings()),
                    tls_report.VALIDATION_FAILURE, left_out[0])
            raise RoutingError(True, None, _TLS_POLICY,
                               f"MTA-STS policy of {destination.host} (mode enforce) names "
                               f"none of its MX hosts ({names})")
        return kept

    def _for_requiretls(self, destination, hops):
        """The hops that can carry REQUIRETLS mail (RFC 8689 4.2.1), each
        held to a checked certificate and REQUIRETLS; none is a bounce."""
        if destination.kind != "mx":
            level = (self._smarthost_tls if destination.kind == "smarthost"
                     else destination.tls or "may")
            configured = tls_policy.HopSecurity(level, level,
                                                authenticated=level in ("verify", "wrapper"))
            security = tls_policy.for_requiretls(configured)
            if security is None:
                key = "smarthost_tls" if destination.kind == "smarthost" else "[route_tls]"
                raise RoutingError(
                    False, None, tls_policy.REQUIRETLS_ENHANCED,
                    f"REQUIRETLS: the next hop {destination.label} is not reached with a "
                    f"verified certificate ({key} is {level}, not verify or wrapper)")
            return [dataclasses.replace(hop, security=security) for hop in hops]
        kept = []
        for hop in hops:
            security = hop.security and tls_policy.for_requiretls(hop.security)
            if security is not None:
                kept.append(dataclasses.replace(hop, security=security))
        if not kept:
            raise RoutingError(
                False, None, tls_policy.REQUIRETLS_ENHANCED,
                f"REQUIRETLS: no MX host of {destination.host} can be authenticated "
                "(no DNSSEC-validated TLSA records and no MTA-STS policy naming it)")
        return kept


class _Hops:
    """Hops gathered for one destination: deduplicated by address and
    capped at :data:`MAX_HOPS`, with the reasons hosts were skipped."""

    def __init__(self):
        self.found = []
        self.skipped = []
        self._seen = set()

    def add(self, hop):
        """Keep ``hop`` unless its address is already listed or the list
        is full."""
        if hop.address not in self._seen and len(self.found) < MAX_HOPS:
            self._seen.add(hop.address)
            self.found.append(hop)

    def why(self):
        """Why nothing was found, one clause per host."""
        return ", ".join(self.skipped) or "no usable hosts"


def _lookup_error(name, kind, exc, final):
    """The RoutingError for a failed ``kind`` lookup of ``name``."""
    if _is_nxdomain(exc):
        text = f"Host or domain name not found: {name} (NXDOMAIN)"
        if final:
            return RoutingError(False, None, _NO_SUCH_DOMAIN, text)
        return RoutingError(True, None, _DNS_FAILURE, text)
    return RoutingError(True, None, _DNS_FAILURE,
                        f"DNS {kind} lookup for {name} failed: {_describe(exc)}")


def _is_nxdomain(exc):
    """True when ``exc`` says the name does not exist at all.

    The other response codes subclass DomainError too, so the test is for
    the name error itself, not its base class.
    """
    return isinstance(exc, (DNSNameError, AuthoritativeDomainError))


# Response codes by the names dig and RFC 1035 4.1.1 use; most specific
# first, since all of them subclass DomainError.
_FAILURE_NAMES = [
    (DNSNameError, "NXDOMAIN"),
    (AuthoritativeDomainError, "NXDOMAIN"),
    (DNSServerError, "SERVFAIL"),
    (DNSQueryRefusedError, "REFUSED"),
    (DNSFormatError, "FORMERR"),
    (DNSNotImplementedError, "NOTIMP"),
    (DNSUnknownError, "unknown response code"),
    (defer.TimeoutError, "timed out"),
]


def _describe(exc):
    """A short, one-line name for a DNS failure."""
    for cls, name in _FAILURE_NAMES:
        if isinstance(exc, cls):
            return name
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _name(name):
    """A DNS name as text without the trailing dot; '' for the root.

    A label may hold any octet (RFC 2181 11).  Octets outside ASCII are
    written ``\\xHH`` (U+FFFD would make the next lookup fail to encode the
    name), and controls such as CR or ESC ``\\x{HEX}`` (relaymail.sanitize):
    a hostile zone's MX target must not reach log lines and DSNs as it is.
    No host has such a name; its lookup fails like any other."""
    text = (name.name.decode("ascii", "backslashreplace") if isinstance(name, dns.Name)
            else str(name))
    return sanitize.escape(text.rstrip(".").lower())


def _address_text(payload):
    """The IP address of an A or AAAA record as text."""
    return str(ipaddress.ip_address(payload.address))


def _literal_address(literal):
    """The IP address in an address literal (RFC 5321 4.1.3):
    ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    inner = literal.removeprefix("[").removesuffix("]")
    if inner.lower().startswith("ipv6:"):
        text, family = inner[len("ipv6:"):], ipaddress.IPv6Address
    else:
        text, family = inner, ipaddress.IPv4Address
    try:
        return str(family(text))
    except ValueError:
        # A General-address-literal (a tag other than IPv6) has no
        # standard meaning we can connect to.
        raise RoutingError(False, None, _NO_SUCH_DOMAIN,
                           f"Unsupported address literal: {literal}") from None
