"""Tests for relaymail.delivery.mta_sts: policies parsed, fetched, cached.

The policy host is a real twisted.web HTTPS server on 127.0.0.1 with a
certificate from a test CA; its name and the TXT records come from the
loopback DNS server of tests.test_routing.
"""

import json
import os

from twisted.internet import defer, reactor, ssl
from twisted.names import client, dns
from twisted.trial import unittest
from twisted.web import resource, server

from relaymail.delivery.mta_sts import (
    MAX_AGE_LIMIT, Policy, PolicyError, PolicyStore, parse_policy, txt_policy_id)
from tests import certs
from tests.test_routing import A, RecordingServer, Zone

POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\n"
          b"mx: *.backup.example.net\r\nmax_age: 86400\r\n")


class ParseTests(unittest.TestCase):

    def test_the_txt_record_id(self):
        self.assertEqual(txt_policy_id(["v=STSv1; id=20261201T000000;"]), "20261201T000000")
        self.assertEqual(txt_policy_id(["v=spf1 -all", "v=STSv1;id=abc"]), "abc")

    def test_no_policy_from_a_txt_record_that_is_not_one(self):
        self.assertIsNone(txt_policy_id([]))
        self.assertIsNone(txt_policy_id(["v=STSv1; id=a", "v=STSv1; id=b"]))  # RFC 8461 3.1
        self.assertIsNone(txt_policy_id(["v=STSv1; id=has-hyphen"]))
        self.assertIsNone(txt_policy_id(["v=STSv1; id=" + "a" * 33]))
        self.assertIsNone(txt_policy_id(["id=abc; v=STSv1"]))
        self.assertIsNone(txt_policy_id(["v=STSv10; id=abc"]))
        self.assertEqual(txt_policy_id(["v=STSv10; id=a", "v=STSv1; id=b"]), "b")

    def test_a_policy_file(self):
        policy = parse_policy(POLICY.decode(), "abc", 1000.0)
        self.assertEqual(policy, Policy("enforce", ("mx1.example.net", "*.backup.example.net"),
                                        86400, "abc", 1000.0))

    def test_max_age_is_capped_at_a_year(self):
        text = "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 999999999\n"
        self.assertEqual(parse_policy(text, "x", 0).max_age, MAX_AGE_LIMIT)

    def test_bad_policies_say_what_is_wrong(self):
        for text, problem in (
                ("mode: enforce\nmx: a\nmax_age: 1\n", "version is None, not 'STSv1'"),
                ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                 "mode is 'strict', not one of enforce, testing, none"),
                ("version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
                 "max_age is 'soon', not a number of seconds"),
                ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mode enforce names no mx"),
                ("version: STSv1\nmode enforce\n", "line 2 is not 'key: value'")):
            with self.assertRaises(PolicyError) as caught:
                parse_policy(text, "x", 0)
            self.assertEqual(str(caught.exception), problem)

    def test_mx_patterns(self):
        policy = parse_policy(POLICY.decode(), "abc", 0)
        self.assertTrue(policy.matches("mx1.example.net"))
        self.assertTrue(policy.matches("MX1.Example.NET."))
        self.assertTrue(policy.matches("a.backup.example.net"))
        # A wildcard is one label, and not the bare domain (RFC 8461 4.1).
        self.assertFalse(policy.matches("a.b.backup.example.net"))
        self.assertFalse(policy.matches("backup.example.net"))
        self.assertFalse(policy.matches("mx2.example.net"))


class PolicyHost(resource.Resource):
    """``/.well-known/mta-sts.txt`` with what the test sets."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = POLICY
        self.code = 200
        self.content_type = b"text/plain; charset=utf-8"
        self.location = None
        self.requests = []
        self.stall = False          # send part of the body, then nothing

    def render_GET(self, request):
        self.requests.append((request.getRequestHostname(), request.path))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.content_type)
        if self.location:
            request.setHeader(b"location", self.location)
        if self.stall:
            request.write(self.body[:10])
            return server.NOT_DONE_YET
        return self.body


class PolicyStoreTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.ca = certs.CertificateAuthority()
        self.ca_file = self.mktemp()
        with open(self.ca_file, "wb") as file:
            file.write(self.ca.cert_pem)
        self.records = {
            "_mta-sts.example.net": [dns.Record_TXT(b"v=STSv1; id=one;")],
            "mta-sts.example.net": [A("127.0.0.1")],
        }
        self.dns = RecordingServer(Zone(self.records))
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.dns), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", udp.getHost().port)],
                                        timeout=(2,))
        self.host = PolicyHost()
        self.https = self.listen(self.ca.issue("mta-sts.example.net"))
        self.cache_dir = os.path.join(self.mktemp(), "mta-sts")
        self.now = 1_000_000.0

    def listen(self, pair):
        options = ssl.PrivateCertificate.loadPEM(pair.cert_pem + pair.key_pem).options()
        port = reactor.listenSSL(0, server.Site(self.host), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port

    def store(self, port=None, **kwargs):
        port = port or self.https.getHost().port
        return PolicyStore(self.resolver, reactor, cache_dir=self.cache_dir, port=port,
                           ca_file=self.ca_file, clock=lambda: self.now, timeout=5, **kwargs)

    @defer.inlineCallbacks
    def test_a_policy_is_fetched_and_kept_on_disk(self):
        policy = yield self.store().policy("Example.NET")
        self.assertEqual(policy, Policy("enforce", ("mx1.example.net", "*.backup.example.net"),
                                        86400, "one", self.now))
        self.assertEqual(self.host.requests, [(b"mta-sts.example.net", b"/.well-known/mta-sts.txt")])
        with open(os.path.join(self.cache_dir, "example.net.json")) as file:
            self.assertEqual(json.load(file), {
                "mode": "enforce", "mx": ["mx1.example.net", "*.backup.example.net"],
                "max_age": 86400, "policy_id": "one", "fetched": self.now})

    @defer.inlineCallbacks
    def test_the_same_id_is_not_fetched_again_a_new_one_is(self):
        store = self.store()
        yield store.policy("example.net")
        yield store.policy("example.net")
        self.assertEqual(len(self.host.requests), 1)
        # A new store (a restart) reads the disk rather than fetching.
        yield self.store().policy("example.net")
        self.assertEqual(len(self.host.requests), 1)
        self.records["_mta-sts.example.net"] = [dns.Record_TXT(b"v=STSv1; id=two;")]
        self.host.body = POLICY.replace(b"enforce", b"testing")
        self.resolver = client.Resolver(servers=self.resolver.servers, timeout=(2,))
        policy = yield self.store().policy("example.net")
        self.assertEqual((policy.mode, policy.policy_id, len(self.host.requests)),
                         ("testing", "two", 2))

    @defer.inlineCallbacks
    def test_a_policy_is_fetched_again_after_half_its_max_age(self):
        store = self.store()
        yield store.policy("example.net")
        self.now += 43199
        yield store.policy("example.net")
        self.assertEqual(len(self.host.requests), 1)
        self.now += 1
        self.host.body = POLICY.replace(b"enforce", b"testing")
        policy = yield store.policy("example.net")
        self.assertEqual((policy.mode, policy.fetched, len(self.host.requests)),
                         ("testing", self.now, 2))
        # A refresh that fails keeps the policy it would have replaced.
        self.now += 43200
        self.host.code = 503
        policy = yield store.policy("example.net")
        self.assertEqual((policy.mode, len(self.host.requests)), ("testing", 3))

    @defer.inlineCallbacks
    def test_a_cached_policy_outlives_its_txt_record_and_a_failed_fetch(self):
        # RFC 8461 10.2: an attacker who strips the TXT record or blocks
        # the HTTPS fetch must not turn a known policy off.
        yield self.store().policy("example.net")
        del self.records["_mta-sts.example.net"]
        policy = yield self.store().policy("example.net")
        self.assertEqual((policy.mode, policy.policy_id), ("enforce", "one"))
        self.records["_mta-sts.example.net"] = [dns.Record_TXT(b"v=STSv1; id=two;")]
        self.host.code = 500
        policy = yield self.store().policy("example.net")
        self.assertEqual((policy.mode, policy.policy_id), ("enforce", "one"))
        # Until max_age has passed.
        self.now += 86400
        policy = yield self.store().policy("example.net")
        self.assertIsNone(policy)

    @defer.inlineCallbacks
    def check_refused(self, store=None):
        policy = yield (store or self.store()).policy("example.net")
        self.assertIsNone(policy)
        self.assertFalse(os.path.exists(os.path.join(self.cache_dir, "example.net.json")))

    def test_no_txt_record_no_policy(self):
        del self.records["_mta-sts.example.net"]
        return self.check_refused()

    def test_a_redirect_is_not_followed(self):
        self.host.code = 301
        self.host.location = b"https://mta-sts.example.net/elsewhere"
        return self.check_refused()

    def test_a_policy_that_is_not_text_plain_is_refused(self):
        self.host.content_type = b"text/html"
        return self.check_refused()

    def test_a_policy_over_64_kib_is_refused(self):
        self.host.body = POLICY + b"mx: a.example.net\n" * 4000
        return self.check_refused()

    def test_a_certificate_for_another_name_is_refused(self):
        other = self.listen(self.ca.issue("www.example.net"))
        return self.check_refused(self.store(port=other.getHost().port))

    def test_a_certificate_from_an_unknown_ca_is_refused(self):
        other = self.listen(certs.CertificateAuthority("stranger").issue("mta-sts.example.net"))
        return self.check_refused(self.store(port=other.getHost().port))

    @defer.inlineCallbacks
    def test_a_policy_host_that_stalls_mid_body_is_given_up_on_in_time(self):
        self.host.stall = True
        store = PolicyStore(self.resolver, reactor, cache_dir=self.cache_dir,
                            port=self.https.getHost().port, ca_file=self.ca_file,
                            clock=lambda: self.now, timeout=0.5)
        policies = yield defer.gatherResults([store.policy("example.net") for _ in range(3)])
        self.assertEqual(policies, [None, None, None])
        self.assertEqual(len(self.host.requests), 1)

    @defer.inlineCallbacks
    def test_concurrent_asks_share_one_fetch(self):
        store = self.store()
        policies = yield defer.gatherResults([store.policy("example.net") for _ in range(5)])
        self.assertEqual({p.policy_id for p in policies}, {"one"})
        self.assertEqual(len(self.host.requests), 1)
        self.assertEqual(self.dns.queries.count(("_mta-sts.example.net", "TXT")), 1)
