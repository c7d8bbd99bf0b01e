"""TLS-RPT (RFC 8460): sessions counted, days added up, reports built and
sent -- by mail through the real queue to a real next hop, and by HTTPS
POST to a real server -- on the loopback DNS and HTTPS of
tests/test_tls_policy.py."""

import datetime
import email
import email.policy
import gzip
import json
import os

import pytest
from twisted.internet import defer, reactor, ssl
from twisted.names import dns
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from relaymail.delivery import tls_report
from relaymail.delivery.tls_policy import HopSecurity
from relaymail.delivery.tls_report import (
    TLSReporter, TLSReportRecorder, build_report, classify, merged, rua_targets)
from tests import certs
from tests.relay_process import RelayProcess
from tests.test_delivery import send
from tests.test_routing import MX, A
from tests.test_secure_dns import TLSARecord
from tests import test_tls_policy
from tests.test_tls_policy import spki_sha256

DAY = "2026-12-01"
NOON = datetime.datetime(2026, 12, 1, 12, tzinfo=datetime.timezone.utc).timestamp()
NEXT_DAY = NOON + 12 * 3600 + 700          # past midnight and REPORT_DELAY


def dane(domain="dane.test"):
    return HopSecurity("dane", "dane", domain=domain, policy_strings=("3 1 1 abcd",))


class PartsTests(unittest.TestCase):

    def test_failure_texts_map_to_rfc_8460_result_types(self):
        for text, result in (
                ("TLS is required, but was not offered by host mx[1.2.3.4]:25",
                 "starttls-not-supported"),
                ("TLS is required, but host mx refused to start TLS: 454 no", "starttls-not-supported"),
                ("server certificate does not match the host name mx.example", "certificate-host-mismatch"),
                ("server certificate verification failed: untrusted or invalid certificate chain",
                 "certificate-not-trusted"),
                ("DANE: ... the chain does not verify up to the DANE-TA certificate: "
                 "certificate has expired", "certificate-expired"),
                ("DANE: the certificate of mx matches none of its TLSA records: no certificate",
                 "validation-failure")):
            self.assertEqual(classify(text), result, text)

    def test_the_rua_of_one_tlsrptv1_record(self):
        self.assertEqual(rua_targets(["v=TLSRPTv1; rua=mailto:a@r.test,https://r.test/x"]),
                         ["mailto:a@r.test", "https://r.test/x"])
        self.assertEqual(rua_targets(["v=TLSRPTv1;rua=ftp://r.test, mailto:b@r.test"]),
                         ["mailto:b@r.test"])
        self.assertEqual(rua_targets(["v=TLSRPTv1; rua=mailto:a@r.test",
                                      "v=TLSRPTv1; rua=mailto:b@r.test"]), [])
        self.assertEqual(rua_targets(["v=spf1 -all"]), [])
        self.assertEqual(rua_targets(["v=TLSRPTv10; rua=mailto:a@r.test"]), [])
        many = ",".join(f"mailto:{n}@r.test" for n in range(9))
        self.assertEqual(len(rua_targets([f"v=TLSRPTv1; rua={many}"])), tls_report.MAX_RUA)

    def test_counts_of_two_processes_add_up_in_the_report(self):
        directory = self.mktemp()
        first = TLSReportRecorder(directory, clock=lambda: NOON, pid=11)
        second = TLSReportRecorder(directory, clock=lambda: NOON, pid=22)
        first.success(dane(), "mx.dane.test")
        first.success(dane(), "mx.dane.test")
        second.success(dane(), "mx2.dane.test")
        second.failure(dane(), "validation-failure", "mx2.dane.test", "192.0.2.2")
        # Not reported: no domain policy behind it.
        second.success(HopSecurity("may", "may", domain="dane.test"), "mx.dane.test")
        first.flush()
        second.flush()
        # Named by pid and start: a pid used again the same day gets a file of its own.
        self.assertEqual(sorted(os.listdir(directory)),
                         [f"{DAY}.11126400000.json", f"{DAY}.22126400000.json"])
        later = TLSReportRecorder(directory, clock=lambda: NOON + 60, pid=11)
        self.assertEqual(later.token, "11126460000")
        total = merged([os.path.join(directory, n) for n in os.listdir(directory)])
        report = build_report(DAY, "dane.test", total, "relay.test", "postmaster@relay.test")
        self.assertEqual(report, {
            "organization-name": "relay.test",
            "date-range": {"start-datetime": "2026-12-01T00:00:00Z",
                           "end-datetime": "2026-12-01T23:59:59Z"},
            "contact-info": "postmaster@relay.test",
            "report-id": "2026-12-01T00:00:00Z_dane.test",
            "policies": [{
                "policy": {"policy-type": "tlsa", "policy-string": ["3 1 1 abcd"],
                           "policy-domain": "dane.test",
                           "mx-host": ["mx.dane.test", "mx2.dane.test"]},
                "summary": {"total-successful-session-count": 3,
                            "total-failure-session-count": 1},
                "failure-details": [{"result-type": "validation-failure",
                                     "receiving-mx-hostname": "mx2.dane.test",
                                     "receiving-ip": "192.0.2.2",
                                     "failed-session-count": 1}]}]})

    def test_a_damaged_count_file_is_skipped_not_fatal(self):
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, f"{DAY}.1.json"), "w") as file:
            file.write("{not json")
        self.assertEqual(merged([os.path.join(directory, f"{DAY}.1.json")]), {})


class Collector(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = []

    def render_POST(self, request):
        self.posts.append((request.path, request.getHeader(b"content-type"),
                           request.content.read()))
        return b"ok"


class ReportingTests(test_tls_policy.PolicyHarness, unittest.TestCase):
    """Sessions of the real client, counted; the day's reports sent."""

    def start_reporting(self, records, **options):
        self.now = NOON
        self.recorder = TLSReportRecorder(None, clock=lambda: self.now)
        self.start(records, tls_report=self.recorder, **options)
        self.reports = os.path.join(self.spool.path, "tls-rpt")
        self.recorder.directory = self.reports
        collector_pair = self.ca.issue("127.0.0.1")
        self.collector = Collector()
        https = reactor.listenSSL(
            0, server.Site(self.collector),
            ssl.PrivateCertificate.loadPEM(collector_pair.cert_pem + collector_pair.key_pem)
            .options(), interface="127.0.0.1")
        self.addCleanup(https.stopListening)
        self.zone.update({
            "_smtp._tls.dane.test": [dns.Record_TXT(b"v=TLSRPTv1; rua=mailto:tls@reports.test")],
            "_smtp._tls.sts.test": [dns.Record_TXT(
                f"v=TLSRPTv1; rua=https://127.0.0.1:{https.getHost().port}/tlsrpt".encode())],
            "reports.test": [MX(10, "mx.reports.test")],
            "mx.reports.test": [A("127.0.0.1")],
        })
        trust = ssl.Certificate.loadPEM(self.ca.cert_pem)
        self.reporter = TLSReporter(
            self.recorder, reactor, self.resolver, self.scheduler.queue_message,
            "relay.test", "postmaster@relay.test", clock=lambda: self.now,
            agent=Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust)))

    @defer.inlineCallbacks
    def test_a_day_of_dane_and_mta_sts_sessions_is_reported_by_mail_and_https(self):
        pair = certs.self_signed("mx.dane.test")
        self.start_reporting([TLSARecord(3, 1, 1, spki_sha256(pair))])
        dane_hop = self.hop("127.0.0.2", pair)
        # mx.sts.test shows a certificate no CA signed: an enforce failure.
        # The same listener takes the report mail for reports.test.
        sts_hop = self.hop("127.0.0.1", certs.self_signed("mx.sts.test"))
        first = yield self.queue("a@example.org", ["bob@dane.test"])
        second = yield self.queue("a@example.org", ["bob@sts.test"])
        yield self.outcome_line(first, "bob@dane.test")
        yield self.outcome_line(second, "bob@sts.test")
        self.now = NEXT_DAY
        self.assertTrue(self.reporter._holds_lock())
        self.recorder.flush()
        yield defer.ensureDeferred(self.reporter.send_due())
        # HTTPS for sts.test.
        [(path, content_type, body)] = self.collector.posts
        self.assertEqual((path, content_type), (b"/tlsrpt", b"application/tlsrpt+gzip"))
        report = json.loads(gzip.decompress(body))
        [policy] = report["policies"]
        self.assertEqual(policy["policy"], {
            "policy-type": "sts", "policy-domain": "sts.test", "mx-host": ["mx.sts.test"],
            "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.sts.test",
                              "max_age: 86400"]})
        self.assertEqual(policy["summary"], {"total-successful-session-count": 0,
                                             "total-failure-session-count": 1})
        self.assertEqual(policy["failure-details"], [{
            "result-type": "certificate-not-trusted", "receiving-mx-hostname": "mx.sts.test",
            "receiving-ip": "127.0.0.1", "failed-session-count": 1}])
        # Mail for dane.test, through the queue to reports.test's MX.
        yield self.until(lambda: any(m["recipients"] == ["tls@reports.test"]
                                     for m in sts_hop.messages), "the report mail")
        [mail] = [m for m in sts_hop.messages if m["recipients"] == ["tls@reports.test"]]
        self.assertEqual(mail["sender"], "postmaster@relay.test")
        parsed = email.message_from_bytes(mail["data"], policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "tlsrpt")
        self.assertEqual(parsed["TLS-Report-Domain"], "dane.test")
        self.assertEqual(parsed["TLS-Required"], "No")
        self.assertEqual(parsed["Subject"], "Report Domain: dane.test Submitter: relay.test "
                                            "Report-ID: <2026-12-01T00:00:00Z_dane.test>")
        attachment = [p for p in parsed.iter_attachments()][0]
        self.assertEqual(attachment.get_content_type(), "application/tlsrpt+gzip")
        self.assertEqual(attachment.get_filename(),
                         "relay.test!dane.test!1796083200!1796169599!1.json.gz")
        report = json.loads(gzip.decompress(attachment.get_content()))
        [policy] = report["policies"]
        self.assertEqual(policy["policy"]["policy-type"], "tlsa")
        self.assertEqual(policy["policy"]["policy-string"],
                         [f"3 1 1 {spki_sha256(pair).hex()}"])
        self.assertEqual(policy["summary"], {"total-successful-session-count": 1,
                                             "total-failure-session-count": 0})
        self.assertEqual(len(dane_hop.messages), 1)
        # The day is done: its files are gone, so it is never sent twice.
        self.assertEqual(sorted(os.listdir(self.reports)), ["lock"])

    @defer.inlineCallbacks
    def test_the_current_day_and_a_domain_without_a_record_send_nothing(self):
        pair = certs.self_signed("mx.dane.test")
        self.start_reporting([TLSARecord(3, 1, 1, spki_sha256(pair))])
        self.hop("127.0.0.2", pair)
        del self.zone["_smtp._tls.dane.test"]
        first = yield self.queue("a@example.org", ["bob@dane.test"])
        yield self.outcome_line(first, "bob@dane.test")
        self.recorder.flush()
        self.assertEqual(self.reporter.due_days(), {})      # the day is not over
        self.now = NEXT_DAY
        self.recorder.flush()
        yield defer.ensureDeferred(self.reporter.send_due())
        self.assertEqual(self.collector.posts, [])
        self.assertEqual(os.listdir(self.reports), [])

    def counted(self):
        """The recorder's counts as the day's report would add them up."""
        self.recorder.flush()
        return {key[:2]: (entry["success"], entry["failures"])
                for key, entry in merged([os.path.join(self.reports, name)
                                          for name in os.listdir(self.reports)]).items()}

    @defer.inlineCallbacks
    def test_policy_failures_before_any_session_are_counted(self):
        pair = certs.self_signed("mx.dane.test")
        self.start_reporting([TLSARecord(3, 1, 1, spki_sha256(pair))])
        self.dns.servfail.add(f"_{self.port}._tcp.mx.dane.test")
        self.policy_host.body = b"version: STSv1\nmode: strict\n"
        first = yield self.queue("a@example.org", ["bob@dane.test"])
        second = yield self.queue("a@example.org", ["bob@sts.test"])
        self.hop("127.0.0.1", self.ca.issue("mx.sts.test"))
        yield self.outcome_line(first, "bob@dane.test")
        yield self.outcome_line(second, "bob@sts.test")
        self.assertEqual(self.counted(), {
            ("tlsa", "dane.test"): (0, {("dnssec-invalid", "mx.dane.test", ""): 1}),
            ("sts", "sts.test"): (0, {("sts-policy-invalid", "", ""): 1})})


    @defer.inlineCallbacks
    def test_mta_sts_testing_delivers_and_reports_what_enforce_would_refuse(self):
        self.start_reporting([])
        self.policy_host.body = test_tls_policy.STS_POLICY.replace(b"enforce", b"testing")
        hop = self.hop("127.0.0.1", certs.self_signed("mx.sts.test"))
        first = yield self.queue("a@example.org", ["bob@sts.test"])
        line = yield self.outcome_line(first, "bob@sts.test")
        self.assertIn("status=sent", line)
        self.assertEqual(len(hop.messages), 1)
        self.assertEqual(self.counted(), {("sts", "sts.test"): (
            0, {("certificate-not-trusted", "mx.sts.test", "127.0.0.1"): 1})})

    @defer.inlineCallbacks
    def test_mta_sts_testing_with_a_good_certificate_is_a_success(self):
        self.start_reporting([])
        self.policy_host.body = test_tls_policy.STS_POLICY.replace(b"enforce", b"testing")
        self.hop("127.0.0.1", self.ca.issue("mx.sts.test"))
        first = yield self.queue("a@example.org", ["bob@sts.test"])
        yield self.outcome_line(first, "bob@sts.test")
        self.assertEqual(self.counted(), {("sts", "sts.test"): (1, {})})


    @defer.inlineCallbacks
    def test_a_record_that_cannot_be_looked_up_is_tried_again_later(self):
        pair = certs.self_signed("mx.dane.test")
        self.start_reporting([TLSARecord(3, 1, 1, spki_sha256(pair))])
        hop = self.hop("127.0.0.1", certs.self_signed("mx.reports.test"))
        self.hop("127.0.0.2", pair)
        first = yield self.queue("a@example.org", ["bob@dane.test"])
        yield self.outcome_line(first, "bob@dane.test")
        self.now = NEXT_DAY
        self.recorder.flush()
        self.dns.servfail.add("_smtp._tls.dane.test")
        yield defer.ensureDeferred(self.reporter.send_due())
        [kept] = [n for n in os.listdir(self.reports) if n.endswith(".json")]
        self.assertTrue(kept.startswith(f"{DAY}."))
        self.dns.servfail.discard("_smtp._tls.dane.test")
        yield defer.ensureDeferred(self.reporter.send_due())
        self.assertEqual(os.listdir(self.reports), [])
        yield self.until(lambda: any(m["recipients"] == ["tls@reports.test"]
                                     for m in hop.messages), "the report mail")

    @defer.inlineCallbacks
    def test_a_mailto_at_an_address_literal_is_refused(self):
        self.start_reporting([])
        self.now = NEXT_DAY
        queued = []
        self.reporter._queue_message = lambda envelope, message: queued.append(envelope)
        with self.assertRaises(ValueError):
            yield defer.ensureDeferred(self.reporter._mail(
                {"report-id": "x", "date-range": {"start-datetime": DAY + "T00:00:00Z"},
                 "policies": []}, b"", "mailto:a%00b@[10.0.0.1]"))
        self.assertEqual(queued, [])


@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_daemon_runs_and_stops_with_tls_reports_on(tmp_path, workers):
    relay = RelayProcess(tmp_path, {"server": {"workers": workers},
                                    "delivery": {"tls_report": "yes",
                                                 "tls_report_organization": "relay.test"}})
    relay.start()
    try:
        send(relay, "alice@example.org", ["bob@example.com"])
    finally:
        relay.stop()
    assert "Traceback" not in relay.log()
    assert "Unhandled" not in relay.log()
