"""Direct delivery by MX, end to end in one process: the real spool,
scheduler, destination pool, router and client, a real DNS server on
loopback (the internet's DNS is the one thing that cannot run here) and real
next-hop SMTP servers on 127.0.0.1 and 127.0.0.2."""

import email
import email.policy
import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.names import client, dns

from relaymail.delivery.destinations import DestinationPool, client_configs
from relaymail.delivery.routing import Router
from relaymail.envelope import Envelope
from relaymail.queue.scheduler import Scheduler
from relaymail.queue.spool import Spool
from tests import certs
from tests.nexthop import NextHop
from tests.relay_process import free_port
from tests.test_routing import MX, A, DNSTestCase, RecordingServer, Zone, settings_with

DIRECT_ZONE = {
    # mx1 listens on 127.0.0.2 (and can be told to refuse), mx2 on 127.0.0.1.
    "example.net": [MX(10, "mx1.example.net"), MX(20, "mx2.example.net")],
    "mx1.example.net": [A("127.0.0.2")],
    "mx2.example.net": [A("127.0.0.1")],
    "example.org": [MX(10, "mx2.example.net")],
    "nullmx.example": [MX(0, "")],
}


class DirectDeliveryTests(DNSTestCase):
    timeout = 30

    def setUp(self):
        self.dns = RecordingServer(Zone(DIRECT_ZONE))
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.dns), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port.getHost().port)], timeout=(2,))
        self.port = free_port()
        self.primary = NextHop(port=self.port, host="127.0.0.2")
        self.backup = NextHop(port=self.port, host="127.0.0.1")
        self.addCleanup(self.primary.stop)
        self.addCleanup(self.backup.stop)
        settings = settings_with(
            server__hostname="relay.test", queue__path=self.spool_directory(), queue__min_backoff="1",
            delivery__mx_port=str(self.port), delivery__connect_timeout="2",
            delivery__command_timeout="5", delivery__data_timeout="1",
            delivery__destination_concurrency="2")
        self.spool = Spool(settings.queue.path, reactor=reactor)
        self.spool.start()
        self.addCleanup(self.spool.stop)
        self.start_scheduler(settings)

    def start_scheduler(self, settings, tls_report=None, **router_options):
        """The delivery side as tap.build_service wires it, on the test DNS;
        ``router_options`` go to the Router (a secure resolver, an MTA-STS
        store), ``tls_report`` to the Router and the client configs."""
        if tls_report is not None:
            router_options["tls_report"] = tls_report
        router = Router(settings, resolver=self.resolver, **router_options)
        pool = DestinationPool(reactor, router, client_configs(settings, tls_report),
                               settings.delivery.destination_concurrency,
                               settings.delivery.max_connections)
        self.scheduler = Scheduler(self.spool, pool, router, settings, reactor)
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        # First (cleanups run last in, first out): as a worker stops, the
        # attempts under way record their outcomes before the spool stops;
        # a record written after would fail the test with a logged error.
        self.addCleanup(self.scheduler.drain, 1)

    def spool_directory(self):
        # trial's mktemp() is relative to the working directory: under
        # pytest that is the checkout, so use the system's temporary area.
        path = tempfile.mkdtemp(prefix="relaymail-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    @defer.inlineCallbacks
    def queue(self, sender, recipients, body=b"Subject: direct\r\n\r\nhello\r\n"):
        writer = self.spool.new_message()
        writer.write(body)
        queue_id = yield writer.commit(Envelope(sender=sender, recipients=recipients))
        self.scheduler.message_queued(queue_id)
        return queue_id

    @defer.inlineCallbacks
    def until(self, predicate, what):
        for _ in range(400):
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @defer.inlineCallbacks
    def test_mail_goes_to_the_preferred_mx(self):
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.primary.messages, "delivery")
        self.assertEqual(self.primary.messages[0]["recipients"], ["bob@example.net"])
        self.assertEqual(self.backup.messages, [])
        self.assertIn(("example.net", "MX"), self.dns.queries)

    @defer.inlineCallbacks
    def test_next_mx_after_a_4xx_to_mail(self):
        self.primary.mail_reply = lambda sender: (421, "4.3.2 Shutting down")
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.backup.messages, "delivery to the backup MX")
        self.assertEqual(self.primary.messages, [])
        self.assertEqual(self.backup.messages[0]["recipients"], ["bob@example.net"])

    @defer.inlineCallbacks
    def test_next_mx_after_a_421_to_an_unpipelined_rcpt(self):
        # Found by review: without PIPELINING the 421 came back as the
        # recipient's own deferral, and the backup MX was never tried.
        self.primary.extensions.remove("PIPELINING")
        self.primary.rcpt_reply = lambda address: (421, "4.3.2 Shutting down")
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.backup.messages, "delivery to the backup MX")
        self.assertEqual(self.primary.messages, [])

    @defer.inlineCallbacks
    def test_next_mx_after_a_421_to_a_later_rcpt_with_chunking(self):
        # Found by review: with BDAT the stored 421 was taken for a failure
        # after the content went, so mx2 was never tried; mx1 took nothing.
        self.primary.extensions.append("CHUNKING")
        self.primary.rcpt_reply = lambda address: (
            (421, "4.3.2 Shutting down") if address.startswith("carol") else (250, "2.1.5 Ok"))
        yield self.queue("a@example.org", ["bob@example.net", "carol@example.net"])
        yield self.until(lambda: self.backup.messages, "delivery to the backup MX")
        self.assertEqual(self.primary.messages, [])
        self.assertEqual(self.backup.messages[0]["recipients"],
                         ["bob@example.net", "carol@example.net"])

    @defer.inlineCallbacks
    def test_next_mx_after_a_421_to_starttls_and_mx1_is_asked_once(self):
        # Found by review: opportunistic TLS carried on after the 421 with
        # a session that could take no job, and the pool opened mx1 again
        # and again, never trying mx2.
        self.primary.stop()
        primary = NextHop(port=self.port, host="127.0.0.2",
                          starttls=certs.self_signed("mx1.example.net"))
        self.addCleanup(primary.stop)
        primary.starttls_reply = (421, "4.3.2 Shutting down")
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.backup.messages, "delivery to the backup MX")
        self.assertEqual([c for c in primary.commands if c.startswith("EHLO")],
                         ["EHLO relay.test"])

    @defer.inlineCallbacks
    def test_next_mx_after_a_connection_failure(self):
        self.primary.stop()
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.backup.messages, "delivery to the backup MX")

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        queue_id = yield self.queue("a@example.org", ["someone@nullmx.example"])
        # The bounce goes to the sender's MX, mx2 (127.0.0.1).
        yield self.until(lambda: self.backup.messages, "the bounce")
        bounce = self.backup.messages[0]
        self.assertEqual((bounce["sender"], bounce["recipients"]), ("", ["a@example.org"]))
        report = email.message_from_bytes(bounce["data"], policy=email.policy.default)
        status = list(report.iter_parts())[1].get_payload()[1]
        self.assertEqual(status["Status"], "5.1.10")
        self.assertEqual(status["Final-Recipient"], "rfc822; someone@nullmx.example")
        yield self.until(lambda: queue_id not in set(self.spool.ids()), "the original to leave")

    @defer.inlineCallbacks
    def test_destination_concurrency_cap_and_connection_reuse(self):
        def slow(transaction):
            time.sleep(0.2)
            return 250, "2.0.0 Ok"
        self.primary.data_reply = slow
        for n in range(6):
            yield self.queue("a@example.org", [f"user{n}@example.net"])
        yield self.until(lambda: len(self.primary.messages) == 6, "six deliveries")
        # Never more than destination_concurrency = 2 sessions at once, and
        # the two connections carried all six messages.
        self.assertEqual((self.primary.max_active, self.primary.connections), (2, 2))

    @defer.inlineCallbacks
    def test_record_damaged_while_queued_is_quarantined(self):
        writer = self.spool.new_message()
        writer.write(b"Subject: x\r\n\r\nx\r\n")
        queue_id = yield writer.commit(Envelope(sender="a@example.org", recipients=["b@example.net"]))
        with open(os.path.join(self.spool.path, "active", queue_id + ".json"), "w") as f:
            f.write("{ not json")
        self.scheduler.message_queued(queue_id)
        corrupt = os.path.join(self.spool.path, "corrupt", queue_id + ".json")
        yield self.until(lambda: os.path.exists(corrupt), "quarantine")
        self.assertEqual(list(self.spool.ids()), [])
        self.assertEqual(self.primary.messages + self.backup.messages, [])

    @defer.inlineCallbacks
    def test_no_next_mx_once_the_content_was_sent(self):
        # mx1 takes the message but answers the final dot too late: it may
        # have it, so it must not also go to mx2 in the same attempt.
        calls = []

        def late(transaction):
            calls.append(transaction)
            if len(calls) == 1:
                time.sleep(2.5)
            return 250, "2.0.0 Ok"
        self.primary.data_reply = late
        yield self.queue("a@example.org", ["bob@example.net"])
        yield self.until(lambda: self.primary.messages, "the slow delivery to mx1")
        self.assertEqual(self.backup.messages, [])

    @defer.inlineCallbacks
    def test_global_connection_cap(self):
        import threading
        self.scheduler.stopService()
        settings = settings_with(
            server__hostname="relay.test", queue__path=self.spool.path,
            delivery__mx_port=str(self.port), delivery__max_connections="1")
        self.start_scheduler(settings)
        lock, state = threading.Lock(), {"now": 0, "most": 0}

        def slow(transaction):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.1)
            with lock:
                state["now"] -= 1
            return 250, "2.0.0 Ok"
        self.primary.data_reply = self.backup.data_reply = slow
        for n in range(3):
            yield self.queue("a@example.org", [f"u{n}@example.net"])     # mx1, 127.0.0.2
            yield self.queue("a@example.net", [f"v{n}@example.org"])     # mx2, 127.0.0.1
        yield self.until(lambda: len(self.primary.messages) + len(self.backup.messages) == 6,
                         "six deliveries")
        # Two destinations, but max_connections = 1: never two at once.
        self.assertEqual(state["most"], 1)
