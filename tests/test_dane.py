"""Tests for relaymail.delivery.dane: TLSA records and chains held to them.

The chains are real certificates made for each test (tests.certs): a CA,
an intermediate it signs, server certificates, a self-signed one.
"""

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import defer, reactor
from twisted.trial import unittest

from relaymail.delivery import dane
from relaymail.delivery.dane import TLSA, TLSALookup, lookup_tlsa, match_chain
from relaymail.delivery.secure_dns import SecureResolver
from tests import certs
from tests.test_routing import Zone
from tests.test_secure_dns import TLSARecord, ValidatingServer, serve


def der(pem):
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki(pem):
    return x509.load_pem_x509_certificate(pem).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage, selector, matching, pem):
    selected = der(pem) if selector == 0 else spki(pem)
    data = {0: selected, 1: hashlib.sha256(selected).digest(),
            2: hashlib.sha512(selected).digest()}[matching]
    return TLSA(usage, selector, matching, data)


class IntermediateCA:
    """A CA signed by ``root``, signing server certificates: the chain a
    DANE-TA record for the intermediate is checked along."""

    def __init__(self, root):
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "intermediate")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = name
        self.cert = (x509.CertificateBuilder().subject_name(name)
                     .issuer_name(x509.load_pem_x509_certificate(root.cert_pem).subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(root._key, hashes.SHA256()))

    def issue(self, name, expired=False):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        until = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=3)).not_valid_after(until)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(Encoding.DER)


class RecordTests(unittest.TestCase):

    def test_wire_data_is_usage_selector_matching_then_data(self):
        self.assertEqual(TLSA.from_wire(b"\x03\x01\x01" + b"\xab" * 32),
                         TLSA(3, 1, 1, b"\xab" * 32))
        self.assertIsNone(TLSA.from_wire(b"\x03\x01\x01"))

    def test_only_dane_ta_and_dane_ee_with_known_parameters_are_usable(self):
        sha256 = b"\x00" * 32
        self.assertTrue(TLSA(3, 1, 1, sha256).usable)
        self.assertTrue(TLSA(2, 0, 2, b"\x00" * 64).usable)
        self.assertTrue(TLSA(3, 0, 0, b"any certificate").usable)
        self.assertFalse(TLSA(1, 1, 1, sha256).usable)      # PKIX-EE: RFC 7672 3.1.3
        self.assertFalse(TLSA(0, 1, 1, sha256).usable)      # PKIX-TA
        self.assertFalse(TLSA(3, 2, 1, sha256).usable)      # no such selector
        self.assertFalse(TLSA(3, 1, 3, sha256).usable)      # no such matching type
        self.assertFalse(TLSA(3, 1, 1, b"\x00" * 31).usable)  # not a SHA-256 digest


class DaneEETests(unittest.TestCase):

    def setUp(self):
        # A self-signed certificate for another name, long expired: DANE-EE
        # checks neither (RFC 7672 3.1.1).
        old = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
        self.server = certs.self_signed("somewhere.else", valid_from=old,
                                        valid_until=old + datetime.timedelta(days=1))
        self.chain = [der(self.server.cert_pem)]

    def test_every_selector_and_matching_type(self):
        for selector in (0, 1):
            for matching in (0, 1, 2):
                match = match_chain([record(3, selector, matching, self.server.cert_pem)],
                                    self.chain, ["mx.example.net"])
                self.assertEqual((match.ok, match.usage), (True, 3), (selector, matching))

    def test_another_key_does_not_match(self):
        other = certs.self_signed("mx.example.net")
        match = match_chain([record(3, 1, 1, other.cert_pem)], self.chain, ["mx.example.net"])
        self.assertEqual((match.ok, match.text),
                         (False, "no certificate of the chain matches the DANE-EE records"))

    def test_one_matching_record_among_others_is_enough(self):
        other = certs.self_signed("mx.example.net")
        records = [record(3, 1, 1, other.cert_pem), record(3, 1, 1, self.server.cert_pem)]
        self.assertTrue(match_chain(records, self.chain, ["mx.example.net"]).ok)

    def test_an_empty_chain_never_matches(self):
        match = match_chain([record(3, 1, 1, self.server.cert_pem)], [], ["mx.example.net"])
        self.assertEqual((match.ok, match.text), (False, "the server showed no certificate"))


class DaneTATests(unittest.TestCase):

    def setUp(self):
        self.root = certs.CertificateAuthority()
        self.intermediate = IntermediateCA(self.root)
        self.intermediate_der = self.intermediate.cert.public_bytes(Encoding.DER)
        self.intermediate_pem = self.intermediate.cert.public_bytes(Encoding.PEM)

    def test_a_chain_up_to_the_intermediate_named_by_the_record(self):
        chain = [self.intermediate.issue("mx.example.net"), self.intermediate_der]
        for selector in (0, 1):
            match = match_chain([record(2, selector, 1, self.intermediate_pem)], chain,
                                ["mx.example.net"])
            self.assertEqual((match.ok, match.usage), (True, 2))

    def test_the_root_as_anchor_when_the_server_sends_it(self):
        chain = [self.intermediate.issue("mx.example.net"), self.intermediate_der,
                 der(self.root.cert_pem)]
        match = match_chain([record(2, 1, 1, self.root.cert_pem)], chain, ["mx.example.net"])
        self.assertTrue(match.ok)

    def test_the_name_must_match(self):
        chain = [self.intermediate.issue("mx.example.net"), self.intermediate_der]
        match = match_chain([record(2, 1, 1, self.intermediate_pem)], chain,
                            ["mx.example.org"])
        self.assertEqual((match.ok, match.text),
                         (False, "the certificate names none of mx.example.org"))

    def test_an_expired_server_certificate_fails(self):
        chain = [self.intermediate.issue("mx.example.net", expired=True), self.intermediate_der]
        match = match_chain([record(2, 1, 1, self.intermediate_pem)], chain,
                            ["mx.example.net"])
        self.assertFalse(match.ok)
        self.assertIn("certificate has expired", match.text)

    def test_a_certificate_the_anchor_did_not_sign_fails(self):
        # The anchor is in the chain, but the server's certificate comes
        # from another CA: matching a certificate is not enough.
        stranger = IntermediateCA(certs.CertificateAuthority("other CA"))
        chain = [stranger.issue("mx.example.net"), self.intermediate_der]
        match = match_chain([record(2, 1, 1, self.intermediate_pem)], chain,
                            ["mx.example.net"])
        self.assertFalse(match.ok)
        self.assertIn("does not verify up to the DANE-TA certificate", match.text)

    def test_a_wildcard_covers_one_label(self):
        chain = [self.intermediate.issue("*.example.net"), self.intermediate_der]
        records = [record(2, 1, 1, self.intermediate_pem)]
        self.assertTrue(match_chain(records, chain, ["mx.example.net"]).ok)
        self.assertFalse(match_chain(records, chain, ["a.mx.example.net"]).ok)


class LookupTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_the_records_at_port_and_host_with_their_validation(self):
        zone = {"_25._tcp.mx.signed.test": [TLSARecord(3, 1, 1, b"\x01" * 32),
                                            TLSARecord(2, 0, 1, b"\x02" * 32)],
                "_25._tcp.mx.plain.test": [TLSARecord(3, 1, 1, b"\x03" * 32)]}
        server = ValidatingServer(Zone(zone), signed={"_25._tcp.mx.signed.test"},
                                  servfail={"_25._tcp.mx.bogus.test"})
        resolver = SecureResolver([("127.0.0.1", serve(self, server))], reactor, timeout=(2,))
        found = yield defer.ensureDeferred(lookup_tlsa(resolver, "mx.signed.test", 25))
        self.assertEqual(found, TLSALookup((TLSA(3, 1, 1, b"\x01" * 32),
                                            TLSA(2, 0, 1, b"\x02" * 32)), True))
        found = yield defer.ensureDeferred(lookup_tlsa(resolver, "mx.plain.test.", 25))
        self.assertEqual(found, TLSALookup((TLSA(3, 1, 1, b"\x03" * 32),), False))
        found = yield defer.ensureDeferred(lookup_tlsa(resolver, "mx.bogus.test", 25))
        self.assertEqual(found, TLSALookup((), False, "127.0.0.1: SERVFAIL"))
        self.assertEqual(dane.TLSA_TYPE, 52)


class HostileChainTests(unittest.TestCase):

    def test_a_certificate_with_a_key_nobody_can_read_matches_nothing(self):
        # The peer picks its chain: an entry whose key algorithm is unknown
        # (the EC OID 1.2.840.10045.2.1 turned into ...2.9) must be a
        # mismatch, not an exception out of the session.
        server = certs.self_signed("mx.example.net")
        patched = der(server.cert_pem).replace(bytes.fromhex("06072a8648ce3d0201"),
                                                bytes.fromhex("06072a8648ce3d0209"), 1)
        self.assertNotEqual(patched, der(server.cert_pem))
        records = [record(2, 1, 1, server.cert_pem), record(3, 1, 1, server.cert_pem)]
        match = match_chain(records, [patched, patched], ["mx.example.net"])
        self.assertEqual((match.ok, match.text),
                         (False, "no certificate of the chain matches the DANE-EE, DANE-TA "
                                 "records"))
