"""MX delivery under DANE, MTA-STS and REQUIRETLS, end to end in one
process: the real spool, scheduler, router and client; a loopback DNS
server playing a validating resolver (tests.test_secure_dns); an HTTPS
policy host; and next-hop SMTP servers with real certificates on
127.0.0.1 and 127.0.0.2."""

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import defer, reactor, ssl
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import client, dns
from twisted.trial import unittest
from twisted.web import server

from relaymail.delivery.mta_sts import PolicyStore
from relaymail.delivery.secure_dns import SecureResolver
from relaymail.queue.spool import Spool
from tests import certs
from tests.nexthop import NextHop
from tests.relay_process import free_port
from tests import test_direct_mx
from tests.test_mta_sts import PolicyHost
from relaymail.config import load_config
from tests.test_routing import CNAME, MX, A, Zone
from tests.test_secure_dns import TLSARecord, ValidatingServer, serve

STS_POLICY = (b"version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n")


def spki_sha256(pair):
    key = x509.load_pem_x509_certificate(pair.cert_pem).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER,
                                           PublicFormat.SubjectPublicKeyInfo)).digest()


class PolicyHarness:
    """The zone, next hops, policy host and delivery side of these tests,
    for a TestCase to mix in; each test builds its own with ``start``."""

    timeout = 30
    spool_directory = test_direct_mx.DirectDeliveryTests.spool_directory
    queue = test_direct_mx.DirectDeliveryTests.queue
    until = test_direct_mx.DirectDeliveryTests.until
    start_scheduler = test_direct_mx.DirectDeliveryTests.start_scheduler

    def setUp(self):
        self.port = free_port()
        self.ca = certs.CertificateAuthority()
        self.ca_file = self.mktemp()
        with open(self.ca_file, "wb") as file:
            file.write(self.ca.cert_pem)
        self.lines = []

        def observe(event):
            if event.get("log_namespace", "").startswith("relaymail"):
                self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def start(self, records, signed=(), policy_level="dane", table=None, tls_report=None):
        tlsa_name = f"_{self.port}._tcp.mx.dane.test"
        zone = {
            "dane.test": [MX(10, "mx.dane.test")],
            "mx.dane.test": [A("127.0.0.2")],
            tlsa_name: records,
            "sts.test": [MX(10, "mx.sts.test")],
            "mx.sts.test": [A("127.0.0.1")],
            "_mta-sts.sts.test": [dns.Record_TXT(b"v=STSv1; id=1;")],
            "mta-sts.sts.test": [A("127.0.0.1")],
            "plain.test": [MX(10, "mx.plain.test")],
            "mx.plain.test": [A("127.0.0.1")],
        }
        signed = {"dane.test", "mx.dane.test", tlsa_name} if signed == () else set(signed)
        self.zone = zone
        self.dns = ValidatingServer(Zone(zone), signed=signed)
        dns_port = serve(self, self.dns)
        self.resolver = client.Resolver(servers=[("127.0.0.1", dns_port)], timeout=(2,))
        self.secure = SecureResolver([("127.0.0.1", dns_port)], reactor, timeout=(2,))
        self.policy_host = PolicyHost()
        self.policy_host.body = STS_POLICY
        pair = self.ca.issue("mta-sts.sts.test", "mta-sts.dane.test")
        https = reactor.listenSSL(
            0, server.Site(self.policy_host),
            ssl.PrivateCertificate.loadPEM(pair.cert_pem + pair.key_pem).options(),
            interface="127.0.0.1")
        self.addCleanup(https.stopListening)
        spool = self.spool_directory()
        overrides = {("tls_policy", domain): level for domain, level in (table or {}).items()}
        overrides.update({
            ("server", "hostname"): "relay.test", ("queue", "path"): spool,
            ("queue", "min_backoff"): "60", ("delivery", "mx_port"): str(self.port),
            ("delivery", "connect_timeout"): "2", ("delivery", "command_timeout"): "5",
            ("delivery", "data_timeout"): "2", ("delivery", "tls_policy"): policy_level,
            ("delivery", "tls_ca_file"): self.ca_file,
            ("delivery", "mta_sts_port"): str(https.getHost().port)})
        settings = load_config(None, overrides)
        self.sts = PolicyStore(self.resolver, reactor, cache_dir=f"{spool}/mta-sts",
                               port=https.getHost().port, ca_file=self.ca_file, timeout=5,
                               tls_report=tls_report)
        self.spool = Spool(settings.queue.path, reactor=reactor)
        self.spool.start()
        self.addCleanup(self.spool.stop)
        self.settings = settings
        self.start_scheduler(settings, tls_report, secure_resolver=self.secure, sts=self.sts)

    def hop(self, host, pair=None, extensions=()):
        hop = NextHop(port=self.port, host=host, starttls=pair,
                      extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                                  *extensions))
        self.addCleanup(hop.stop)
        return hop

    def logged(self, text):
        return [line for line in self.lines if text in line]

    @defer.inlineCallbacks
    def outcome_line(self, queue_id, recipient):
        prefix = f"{queue_id}: to=<{recipient}>"
        yield self.until(lambda: self.logged(prefix), f"the outcome for {recipient}")
        line = self.logged(prefix)[0]
        if "status=bounced" in line:
            # The bounce (to a domain the zone lacks, so itself dropped)
            # and the removal finish before the spool is stopped.
            yield self.until(lambda: not list(self.spool.ids()), "an empty queue")
        return line


class TLSPolicyTests(PolicyHarness, unittest.TestCase):

    # -- DANE ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_certificate_matching_its_tlsa_record_is_verified_by_dane_ee(self):
        # Self-signed, for a name nobody asked: DANE-EE vouches by key alone.
        pair = certs.self_signed("anything.example")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))])
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        yield self.until(lambda: hop.messages, "delivery")
        self.assertTrue(hop.messages[0]["tls"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertRegex(line, r"relay=mx\.dane\.test\[127\.0\.0\.2\]:\d+, tls=TLSv1\.[23] \S+ "
                               r"verified by DANE-EE, tls_policy=dane, .*status=sent")
        self.assertIn((f"_{self.port}._tcp.mx.dane.test", 52), self.dns.queries)

    @defer.inlineCallbacks
    def test_a_certificate_matching_no_tlsa_record_gets_no_message(self):
        pair = certs.self_signed("mx.dane.test")
        other = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(other))])
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("dsn=4.7.5, status=deferred (DANE: the certificate of "
                      "mx.dane.test[127.0.0.2]", line)
        self.assertIn("matches none of its TLSA records", line)
        self.assertEqual(hop.messages, [])
        self.assertNotIn("MAIL", " ".join(hop.commands))

    @defer.inlineCallbacks
    def test_dane_ta_checks_the_chain_and_the_mx_name(self):
        right = self.ca.issue("mx.dane.test")
        ca_sha256 = hashlib.sha256(x509.load_pem_x509_certificate(self.ca.cert_pem).public_key()
                                   .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                                   ).digest()
        self.start([TLSARecord(2, 1, 1, ca_sha256)])
        # The server sends its CA too, as RFC 7672 3.2.1 asks of DANE-TA.
        hop = self.hop("127.0.0.2", certs.KeyPair(right.cert_pem + self.ca.cert_pem,
                                                  right.key_pem))
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("verified by DANE-TA, tls_policy=dane", line)
        self.assertEqual(len(hop.messages), 1)

    @defer.inlineCallbacks
    def test_a_signed_host_behind_an_unsigned_mx_answer_still_gets_dane(self):
        # RFC 7672 2.2.1: the host's own TLSA records hold, but REQUIRETLS
        # needs the MX answer itself validated (RFC 8689 4.2.1).
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))],
                   signed={"mx.dane.test", f"_{self.port}._tcp.mx.dane.test"})
        hop = self.hop("127.0.0.2", pair, extensions=("REQUIRETLS",))
        plain = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(plain, "bob@dane.test")
        self.assertIn("verified by DANE-EE, tls_policy=dane", line)
        marked = yield self.queue_marked("carol@dane.test", requiretls=True)
        line = yield self.outcome_line(marked, "carol@dane.test")
        self.assertIn("dsn=5.7.10, status=bounced (REQUIRETLS: no MX host of dane.test can be "
                      "authenticated", line)
        self.assertEqual([m["recipients"] for m in hop.messages], [["bob@dane.test"]])

    @defer.inlineCallbacks
    def test_an_mx_alias_has_its_tlsa_records_at_the_target(self):
        # RFC 7672 2.2.2: mx.alias.test is a CNAME for mx.dane.test; the
        # TLSA records and the DANE-TA certificate's name are the target's.
        right = self.ca.issue("mx.dane.test")
        ca_sha256 = hashlib.sha256(x509.load_pem_x509_certificate(self.ca.cert_pem).public_key()
                                   .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                                   ).digest()
        tlsa = f"_{self.port}._tcp.mx.dane.test"
        self.start([TLSARecord(2, 1, 1, ca_sha256)],
                   signed={"alias.test", "mx.alias.test", "mx.dane.test", tlsa})
        self.zone.update({"alias.test": [MX(10, "mx.alias.test")],
                          "mx.alias.test": [CNAME("mx.dane.test")]})
        hop = self.hop("127.0.0.2", certs.KeyPair(right.cert_pem + self.ca.cert_pem,
                                                  right.key_pem))
        queue_id = yield self.queue("a@example.org", ["bob@alias.test"])
        line = yield self.outcome_line(queue_id, "bob@alias.test")
        self.assertIn("relay=mx.alias.test[127.0.0.2]", line)
        self.assertIn("verified by DANE-TA, tls_policy=dane", line)
        self.assertEqual(len(hop.messages), 1)
        self.assertIn((tlsa, 52), self.dns.queries)
        self.assertNotIn((f"_{self.port}._tcp.mx.alias.test", 52), self.dns.queries)

    @defer.inlineCallbacks
    def test_an_mx_name_no_query_can_carry_is_deferred_once(self):
        # A label of 20 octets the resolver writes as \\xHH: 80 characters,
        # past what a query can carry.  One deferral, not a retry storm.
        self.start([])
        self.zone["hostile.test"] = [dns.Record_MX(10, b"a" + b"\xc2" * 20 + b".hostile.test")]
        self.dns.signed.add("hostile.test")
        queue_id = yield self.queue("a@example.org", ["bob@hostile.test"])
        line = yield self.outcome_line(queue_id, "bob@hostile.test")
        self.assertIn("dsn=4.4.3, status=deferred (No address found for hostile.test", line)
        self.assertEqual(len(self.logged(f"{queue_id}: to=<bob@hostile.test>")), 1)
        self.assertEqual(self.logged("delivery connection failed"), [])

    @defer.inlineCallbacks
    def test_a_dane_host_without_starttls_is_not_sent_plain_text(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))])
        hop = self.hop("127.0.0.2")                 # no STARTTLS offered
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("dsn=4.7.4, status=deferred (TLS is required, but was not offered by "
                      "host mx.dane.test[127.0.0.2]", line)
        self.assertEqual(hop.messages, [])

    @defer.inlineCallbacks
    def test_tlsa_records_that_did_not_validate_are_ignored(self):
        # The same mismatching record, but the resolver did not set AD: no
        # DANE (an attacker can forge unsigned answers both ways).
        pair = certs.self_signed("mx.dane.test")
        other = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(other))],
                   signed={"dane.test", "mx.dane.test"})
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertRegex(line, r"tls=TLSv1\.[23] \S+ unverified, delay=.*status=sent")
        self.assertEqual(len(hop.messages), 1)
        # The records were asked for (the host's addresses validated), and
        # set aside because their answer did not.
        self.assertIn((f"_{self.port}._tcp.mx.dane.test", 52), self.dns.queries)

    @defer.inlineCallbacks
    def test_only_unusable_tlsa_records_still_forbid_plain_text(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(1, 1, 1, spki_sha256(pair))])        # PKIX-EE: unusable
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("unverified, tls_policy=dane-unusable", line)
        self.assertEqual(len(hop.messages), 1)

    @defer.inlineCallbacks
    def test_unusable_tlsa_records_do_not_hide_an_mta_sts_policy(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(1, 1, 1, spki_sha256(pair))])        # PKIX-EE: unusable
        self.zone.update({"_mta-sts.dane.test": [dns.Record_TXT(b"v=STSv1; id=1;")],
                          "mta-sts.dane.test": [A("127.0.0.1")]})
        self.policy_host.body = STS_POLICY.replace(b"mx.sts.test", b"mx.dane.test")
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        # enforce asks for a verified certificate; a self-signed one fails.
        self.assertIn("status=deferred", line)
        self.assertIn("dsn=4.7.", line)
        self.assertEqual(hop.messages, [])

    @defer.inlineCallbacks
    def test_a_failed_tlsa_lookup_defers_rather_than_dropping_dane(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))])
        self.dns.servfail.add(f"_{self.port}._tcp.mx.dane.test")
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue("a@example.org", ["bob@dane.test"])
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("dsn=4.4.3, status=deferred", line)
        self.assertIn("TLSA lookup failed (127.0.0.1: SERVFAIL)", line)
        self.assertEqual(hop.messages, [])

    # -- MTA-STS --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_mta_sts_enforce_delivers_to_a_verified_named_mx(self):
        self.start([])
        hop = self.hop("127.0.0.1", self.ca.issue("mx.sts.test"))
        queue_id = yield self.queue("a@example.org", ["bob@sts.test"])
        line = yield self.outcome_line(queue_id, "bob@sts.test")
        self.assertRegex(line, r"tls=TLSv1\.[23] \S+ verified, tls_policy=mta-sts, .*status=sent")
        self.assertEqual(len(hop.messages), 1)
        self.assertEqual(self.policy_host.requests,
                         [(b"mta-sts.sts.test", b"/.well-known/mta-sts.txt")])

    @defer.inlineCallbacks
    def test_mta_sts_enforce_refuses_a_certificate_that_does_not_verify(self):
        self.start([])
        hop = self.hop("127.0.0.1", certs.self_signed("mx.sts.test"))
        queue_id = yield self.queue("a@example.org", ["bob@sts.test"])
        line = yield self.outcome_line(queue_id, "bob@sts.test")
        self.assertIn("status=deferred", line)
        self.assertIn("dsn=4.7.", line)
        self.assertEqual(hop.messages, [])

    @defer.inlineCallbacks
    def test_mta_sts_enforce_with_no_named_mx_defers(self):
        self.start([])
        self.policy_host.body = STS_POLICY.replace(b"mx.sts.test", b"other.sts.test")
        hop = self.hop("127.0.0.1", self.ca.issue("mx.sts.test"))
        queue_id = yield self.queue("a@example.org", ["bob@sts.test"])
        line = yield self.outcome_line(queue_id, "bob@sts.test")
        self.assertIn("dsn=4.7.5, status=deferred (MTA-STS policy of sts.test (mode enforce) "
                      "names none of its MX hosts (mx.sts.test))", line)
        self.assertEqual(hop.connections, 0)

    @defer.inlineCallbacks
    def test_mta_sts_testing_delivers_as_may(self):
        self.start([])
        self.policy_host.body = STS_POLICY.replace(b"enforce", b"testing")
        hop = self.hop("127.0.0.1", certs.self_signed("mx.sts.test"))
        queue_id = yield self.queue("a@example.org", ["bob@sts.test"])
        line = yield self.outcome_line(queue_id, "bob@sts.test")
        self.assertIn("unverified, tls_policy=mta-sts-testing", line)
        self.assertEqual(len(hop.messages), 1)

    @defer.inlineCallbacks
    def test_under_may_no_policy_is_looked_up(self):
        self.start([TLSARecord(3, 1, 1, b"\x00" * 32)], policy_level="may")
        dane_hop = self.hop("127.0.0.2", certs.self_signed("mx.dane.test"))
        sts_hop = self.hop("127.0.0.1", certs.self_signed("mx.sts.test"))
        first = yield self.queue("a@example.org", ["bob@dane.test"])
        second = yield self.queue("a@example.org", ["bob@sts.test"])
        for queue_id, rcpt in ((first, "bob@dane.test"), (second, "bob@sts.test")):
            line = yield self.outcome_line(queue_id, rcpt)
            self.assertRegex(line, r"tls=TLSv1\.[23] \S+ unverified, delay=.*status=sent")
        self.assertEqual((len(dane_hop.messages), len(sts_hop.messages)), (1, 1))
        self.assertEqual(self.policy_host.requests, [])
        self.assertEqual([q for q in self.dns.queries if q[1] not in ("MX", "A", "AAAA")], [])

    @defer.inlineCallbacks
    def test_a_tls_policy_table_entry_beats_the_default(self):
        self.start([], policy_level="may", table={"plain.test": "verify"})
        hop = self.hop("127.0.0.1", certs.self_signed("mx.plain.test"))
        queue_id = yield self.queue("a@example.org", ["bob@plain.test"])
        line = yield self.outcome_line(queue_id, "bob@plain.test")
        self.assertIn("status=deferred", line)
        self.assertEqual(hop.messages, [])

    # -- REQUIRETLS and TLS-Required: No ---------------------------------------

    @defer.inlineCallbacks
    def queue_marked(self, recipient, **marks):
        writer = self.spool.new_message()
        writer.write(b"Subject: marked\r\n\r\nhello\r\n")
        from relaymail.envelope import Envelope
        queue_id = yield writer.commit(Envelope(sender="a@example.org", recipients=[recipient],
                                                **marks))
        self.scheduler.message_queued(queue_id)
        return queue_id

    @defer.inlineCallbacks
    def test_requiretls_mail_goes_to_a_dane_host_offering_requiretls(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))])
        hop = self.hop("127.0.0.2", pair, extensions=("REQUIRETLS",))
        queue_id = yield self.queue_marked("bob@dane.test", requiretls=True)
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn("status=sent", line)
        [mail] = [c for c in hop.commands if c.startswith("MAIL")]
        self.assertEqual(mail, "MAIL FROM:<a@example.org> REQUIRETLS")

    @defer.inlineCallbacks
    def test_requiretls_mail_bounces_from_a_host_without_requiretls(self):
        pair = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(pair))])
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue_marked("bob@dane.test", requiretls=True)
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertIn(f"dsn=5.7.10, status=bounced (REQUIRETLS: host mx.dane.test[127.0.0.2]:{self.port} "
                      "does not offer REQUIRETLS)", line)
        self.assertEqual(hop.messages, [])

    @defer.inlineCallbacks
    def test_requiretls_mail_bounces_for_a_domain_without_dane_or_mta_sts(self):
        self.start([])
        hop = self.hop("127.0.0.1", certs.self_signed("mx.plain.test"),
                       extensions=("REQUIRETLS",))
        queue_id = yield self.queue_marked("bob@plain.test", requiretls=True)
        line = yield self.outcome_line(queue_id, "bob@plain.test")
        self.assertIn("dsn=5.7.10, status=bounced (REQUIRETLS: no MX host of plain.test can be "
                      "authenticated", line)
        self.assertEqual(hop.connections, 0)

    @defer.inlineCallbacks
    def test_tls_required_no_mail_passes_a_tlsa_mismatch_as_may(self):
        # RFC 8689 5: the sender asked that DANE and MTA-STS not stop it.
        pair = certs.self_signed("mx.dane.test")
        other = certs.self_signed("mx.dane.test")
        self.start([TLSARecord(3, 1, 1, spki_sha256(other))])
        hop = self.hop("127.0.0.2", pair)
        queue_id = yield self.queue_marked("bob@dane.test", tls_optional=True)
        line = yield self.outcome_line(queue_id, "bob@dane.test")
        self.assertRegex(line, r"tls=TLSv1\.[23] \S+ unverified, delay=.*status=sent")
        self.assertEqual(len(hop.messages), 1)
