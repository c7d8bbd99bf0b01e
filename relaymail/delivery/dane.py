"""DANE for SMTP (RFC 7672): TLSA records, and a server's chain held to them.

An MX host whose address and TLSA records (``_25._tcp.HOST``, RFC 6698)
validated under DNSSEC must show a certificate chain matching one of its
usable records:

``DANE-EE`` (usage 3)
    the server's own certificate (selector 0) or public key (selector 1)
    matches; names and dates are not checked (RFC 7672 3.1.1: the DNS
    already named the key).
``DANE-TA`` (usage 2)
    some certificate of the chain matches and is the trust anchor the
    server's certificate verifies up to, dates included, and the server's
    certificate names the MX host (RFC 7672 3.2.2 and 3.2.3: one leading
    wildcard label allowed).

Usages 0 and 1 (PKIX-TA, PKIX-EE) are unusable for SMTP (RFC 7672 3.1.3),
as are unknown selectors and matching types (RFC 6698 4.1).
"""

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import crypto
from twisted.names import dns

from relaymail.delivery import tls
from relaymail.delivery.secure_dns import DNSLookupError

#: The TLSA resource record type (RFC 6698 7.1); twisted.names has no
#: class for it and hands it over as an UnknownRecord.
TLSA_TYPE = 52

DANE_TA, DANE_EE = 2, 3
_SELECTORS = (0, 1)                  # full certificate, SubjectPublicKeyInfo
_MATCHING = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}
_USAGE_NAMES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}


@dataclass(frozen=True)
class TLSA:
    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def from_wire(cls, rdata):
        """The record in an RR's data, or None when it is too short."""
        if len(rdata) < 4:
            return None
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @property
    def usable(self):
        """RFC 7672 3.1.3: DANE-TA or DANE-EE, with a known selector and
        matching type (and, for a digest, data of the digest's size)."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in _SELECTORS:
            return False
        digest = _MATCHING.get(self.matching, False)
        if digest is False:
            return False
        return digest is None or len(self.data) == digest().digest_size

    @property
    def presentation(self):
        """The record as a zone file writes it: ``3 1 1 <hex>``."""
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"

    def __str__(self):
        return (f"{_USAGE_NAMES.get(self.usage, self.usage)} {self.selector} "
                f"{self.matching} {self.data.hex()[:16]}...")

    def matches(self, certificate):
        """True when ``certificate`` (a cryptography x509.Certificate) is
        the one this record names, by its selector and matching type."""
        if self.selector == 0:
            selected = certificate.public_bytes(Encoding.DER)
        else:
            selected = certificate.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digest = _MATCHING[self.matching]
        return (selected if digest is None else digest(selected).digest()) == self.data


@dataclass(frozen=True)
class TLSALookup:
    """What ``_PORT._tcp.HOST`` gave: usable or not, it is the caller's to
    judge; ``problem`` is set when the lookup itself failed."""

    records: tuple
    authenticated: bool
    problem: str | None = None


async def lookup_tlsa(resolver, host, port):
    """The TLSA records of ``host`` for SMTP on ``port``.

    :param resolver: a :class:`relaymail.delivery.secure_dns.SecureResolver`.
    """
    name = f"_{port}._tcp.{host.rstrip('.')}"
    try:
        answer = await resolver.lookup(name, TLSA_TYPE)
    except DNSLookupError as exc:
        return TLSALookup((), False, str(exc))
    records = []
    for rr in answer.records:
        if rr.type != TLSA_TYPE:
            continue            # the CNAMEs on the way
        payload = rr.payload
        data = payload.data if isinstance(payload, dns.UnknownRecord) else b""
        record = TLSA.from_wire(data)
        if record is not None:
            records.append(record)
    return TLSALookup(tuple(records), answer.authenticated)


@dataclass(frozen=True)
class Match:
    """The outcome of :func:`match_chain`: ``usage`` is the usage of the
    record that matched; ``text`` says why none did."""

    ok: bool
    usage: int | None = None
    text: str = ""


def match_chain(records, chain_der, names):
    """Hold a server's chain (DER certificates, leaf first) to ``records``.

    :param names: the names a DANE-TA checked certificate may carry.
    """
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        return Match(False, text=f"unreadable certificate: {exc}")
    if not chain:
        return Match(False, text="the server showed no certificate")
    leaf = chain[0]
    for record in records:
        if record.usage == DANE_EE and _matches(record, leaf):
            return Match(True, DANE_EE)
    problems = []
    for record in records:
        if record.usage != DANE_TA:
            continue
        for anchor in chain:
            if _matches(record, anchor):
                try:
                    problem = _verified_to(leaf, chain, anchor, names)
                except Exception as exc:
                    problem = f"the chain cannot be checked: {type(exc).__name__}: {exc}"
                if problem is None:
                    return Match(True, DANE_TA)
                problems.append(problem)
    if problems:
        return Match(False, text="; ".join(dict.fromkeys(problems)))
    kinds = ", ".join(sorted({_USAGE_NAMES.get(r.usage, str(r.usage)) for r in records}))
    return Match(False, text=f"no certificate of the chain matches the {kinds} records")


def _matches(record, certificate):
    """``record.matches``, with a certificate whose key cannot be read
    (an unknown algorithm, a malformed key: the peer chose it) matching
    nothing rather than raising."""
    try:
        return record.matches(certificate)
    except Exception:
        return False


def _verified_to(leaf, chain, anchor, names):
    """None when ``leaf`` verifies up to ``anchor`` (a DANE-TA match) and
    names one of ``names``, else what is wrong."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    # The anchor may be an intermediate: a chain ending at it is complete.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    failure = tls.chain_error(store, [leaf] + [c for c in chain[1:] if c is not anchor])
    if failure is not None:
        return f"the chain does not verify up to the DANE-TA certificate: {failure}"
    if not tls.names_one_of(leaf, names):
        return f"the certificate names none of {', '.join(names)}"
    return None
