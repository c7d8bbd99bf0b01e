"""Tests for relaymail.delivery.routing: destinations and their hops.

DNS is real: an authoritative server built from twisted.names answers over
UDP on 127.0.0.1 from a dict of records, and the Router asks it through an
ordinary twisted.names client resolver.
"""

import random

import pytest
from twisted.internet import defer, reactor
from twisted.names import client, common, dns, server
from twisted.names.error import AuthoritativeDomainError
from twisted.trial import unittest

from relaymail.config import Smarthost, load_config
from relaymail.delivery.client import Hop
from relaymail.delivery.destinations import client_configs
from relaymail.delivery.routing import (
    MAX_HOPS, Destination, Router, RoutingError)


def MX(preference, exchange):
    return dns.Record_MX(preference, exchange.encode())


def A(address):
    return dns.Record_A(address)


def AAAA(address):
    return dns.Record_AAAA(address)


def CNAME(target):
    return dns.Record_CNAME(target.encode())


# The test zone; each test picks the names it needs.  flaky.partial.test
# and servfail.test get SERVFAIL from the server itself.
ZONE = {
    "pref.test": [MX(20, "mx2.pref.test"), MX(10, "mx1.pref.test"),
                  MX(30, "mx3.pref.test")],
    "mx1.pref.test": [A("192.0.2.1"), AAAA("2001:db8::1")],
    "mx2.pref.test": [A("192.0.2.2")],
    "mx3.pref.test": [AAAA("2001:db8::3")],

    "equal.test": [MX(10, "a.equal.test"), MX(10, "b.equal.test")],
    "a.equal.test": [A("192.0.2.10")],
    "b.equal.test": [A("192.0.2.11")],

    # No MX records: the domain's own addresses are its implicit MX.
    "implicit.test": [A("192.0.2.20"), AAAA("2001:db8::20")],
    # RFC 7505 null MX.
    "nullmx.test": [MX(0, ""), A("192.0.2.30")],
    # The name exists, but has nothing useful.
    "empty.test": [dns.Record_TXT(b"v=spf1 -all")],

    # One MX host does not exist, one has no addresses, one works.
    "partial.test": [MX(10, "gone.partial.test"), MX(15, "flaky.partial.test"),
                     MX(20, "bare.partial.test"), MX(30, "ok.partial.test")],
    "bare.partial.test": [dns.Record_TXT(b"nothing here")],
    "ok.partial.test": [A("192.0.2.40")],
    "deadmx.test": [MX(10, "gone.deadmx.test")],
    # A hostile zone: an MX target with ESC, CR and NEL octets in a label.
    "hostile.test": [dns.Record_MX(10, b"a\x1b[2J\rb\xc2\x85.hostile.test")],

    # Tolerated mistakes: an MX naming an address, and one naming a CNAME.
    "sloppy.test": [MX(10, "192.0.2.50"), MX(20, "alias.sloppy.test")],
    "alias.sloppy.test": [CNAME("real.sloppy.test")],
    "real.sloppy.test": [A("192.0.2.51")],

    # Many MX hosts, to show the cap.
    "many.test": [MX(i, f"h{i}.many.test") for i in range(12)],
    **{f"h{i}.many.test": [A(f"192.0.2.{100 + i}")] for i in range(12)},

    # Next hops named in settings.
    "relay.test": [A("192.0.2.60"), AAAA("2001:db8::60")],
    "relayed.test": [MX(10, "mx.relayed.test")],
    "mx.relayed.test": [A("192.0.2.61")],
    "route.test": [A("192.0.2.70")],
}


class Zone(common.ResolverBase):
    """An authoritative resolver answering from a dict of records.

    A name that is absent is NXDOMAIN; a name that is present without the
    type asked for is NODATA.  CNAMEs are followed the way a recursive
    resolver would, so the answer carries the chain and the records at
    its end.
    """

    def __init__(self, records):
        super().__init__()
        self.records = records

    def _lookup(self, name, cls, type, timeout):
        text = name.decode("ascii").lower()
        if text not in self.records:
            return defer.fail(AuthoritativeDomainError(text))
        return defer.succeed((self._answers(text, type), [], []))

    def _answers(self, text, type, depth=0):
        records = self.records.get(text, [])
        matching = [record for record in records if record.TYPE == type]
        if not matching and depth < 8:
            for record in records:
                if record.TYPE == dns.CNAME:
                    target = record.name.name.decode("ascii")
                    return ([self._header(text, record)]
                            + self._answers(target, type, depth + 1))
        return [self._header(text, record) for record in matching]

    @staticmethod
    def _header(text, record):
        return dns.RRHeader(name=text, type=record.TYPE, payload=record,
                            ttl=60, auth=True)


class RecordingServer(server.DNSServerFactory):
    """A DNS server that notes every question and answers SERVFAIL for
    the names in ``servfail``."""

    def __init__(self, zone, servfail=()):
        super().__init__(authorities=[zone])
        self.servfail = set(servfail)
        self.queries = []

    def handleQuery(self, message, protocol, address):
        query = message.queries[0]
        name = query.name.name.decode("ascii").lower()
        self.queries.append((name, dns.QUERY_TYPES.get(query.type, query.type)))
        if name in self.servfail:
            reply = dns.Message(id=message.id, answer=1, opCode=message.opCode,
                                recDes=message.recDes, rCode=dns.ESERVER)
            reply.queries = message.queries
            protocol.writeMessage(reply, address)
            return None
        return super().handleQuery(message, protocol, address)


def settings_with(routes=None, **keys):
    """Settings from the defaults plus ``section__key=value`` overrides and
    a ``routes`` dict of [routes] entries."""
    overrides = {("routes", domain): hop for domain, hop in (routes or {}).items()}
    for name, value in keys.items():
        section, key = name.split("__")
        overrides[(section, key)] = value
    return load_config(None, overrides)


class DNSTestCase(unittest.TestCase):
    """Starts the test DNS server and builds Routers that use it."""

    # Generous for a loaded machine, short enough to fail fast.
    TIMEOUT = (2,)

    def setUp(self):
        self.dns = RecordingServer(Zone(ZONE), servfail={"servfail.test",
                                                         "flaky.partial.test"})
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.dns),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.resolver = client.Resolver(
            servers=[("127.0.0.1", port.getHost().port)], timeout=self.TIMEOUT)

    def router(self, settings=None, seed=0, resolver=None, **keys):
        """A Router on the test server; ``keys`` as for settings_with."""
        if settings is None:
            settings = settings_with(delivery__mx_port="2525", **keys)
        return Router(settings, resolver=resolver or self.resolver,
                      rng=random.Random(seed))

    @defer.inlineCallbacks
    def hops_for(self, domain, **kwargs):
        """The hops for mail to ``domain``."""
        router = self.router(**kwargs)
        hops = yield router.hops(router.destination(domain))
        return hops

    @defer.inlineCallbacks
    def error_for(self, domain, **kwargs):
        """The RoutingError for mail to ``domain``."""
        try:
            yield self.hops_for(domain, **kwargs)
        except RoutingError as error:
            return error
        self.fail(f"no RoutingError for {domain}")

    def assert_error(self, error, temporary, code, enhanced, text):
        self.assertEqual((error.temporary, error.code, error.enhanced, error.text),
                         (temporary, code, enhanced, text))


class MXTests(DNSTestCase):
    """Direct delivery: the recipient domain's MX hosts."""

    @defer.inlineCallbacks
    def test_mx_hosts_in_preference_order_ipv4_first(self):
        hops = yield self.hops_for("pref.test")
        self.assertEqual(hops, [
            Hop("mx1.pref.test", "192.0.2.1", 2525),
            Hop("mx1.pref.test", "2001:db8::1", 2525),
            Hop("mx2.pref.test", "192.0.2.2", 2525),
            Hop("mx3.pref.test", "2001:db8::3", 2525),
        ])

    @defer.inlineCallbacks
    def test_equal_preferences_are_shuffled(self):
        seen = set()
        for seed in range(20):
            hops = yield self.hops_for("equal.test", seed=seed)
            seen.add(tuple(hop.name for hop in hops))
        self.assertEqual(seen, {("a.equal.test", "b.equal.test"),
                                ("b.equal.test", "a.equal.test")})

    @defer.inlineCallbacks
    def test_shuffle_follows_the_injected_random(self):
        first = yield self.hops_for("equal.test", seed=7)
        again = yield self.hops_for("equal.test", seed=7)
        self.assertEqual(first, again)

    @defer.inlineCallbacks
    def test_no_mx_records_means_implicit_mx(self):
        hops = yield self.hops_for("implicit.test")
        self.assertEqual(hops, [Hop("implicit.test", "192.0.2.20", 2525),
                                Hop("implicit.test", "2001:db8::20", 2525)])
        self.assertEqual(self.dns.queries, [
            ("implicit.test", "MX"), ("implicit.test", "A"),
            ("implicit.test", "AAAA")])

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        error = yield self.error_for("nullmx.test")
        self.assert_error(error, False, 556, "5.1.10", "Recipient address has null MX")
        # The domain's A record must not be used as an implicit MX.
        self.assertEqual(self.dns.queries, [("nullmx.test", "MX")])

    @defer.inlineCallbacks
    def test_nxdomain_bounces(self):
        error = yield self.error_for("example.invalid")
        self.assert_error(error, False, None, "5.1.2",
                          "Host or domain name not found: example.invalid (NXDOMAIN)")

    @defer.inlineCallbacks
    def test_servfail_is_temporary(self):
        error = yield self.error_for("servfail.test")
        self.assert_error(error, True, None, "4.4.3",
                          "DNS MX lookup for servfail.test failed: SERVFAIL")

    @defer.inlineCallbacks
    def test_dns_server_not_answering_is_temporary(self):
        # Take a free port and leave nothing listening on it.
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.dns),
                                 interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        silent = client.Resolver(servers=[("127.0.0.1", number)], timeout=(0.2,))
        error = yield self.error_for("pref.test", resolver=silent)
        self.assert_error(error, True, None, "4.4.3",
                          "DNS MX lookup for pref.test failed: timed out")

    @defer.inlineCallbacks
    def test_name_without_addresses_is_temporary(self):
        error = yield self.error_for("empty.test")
        self.assert_error(error, True, None, "4.4.3",
                          "No address found for empty.test: "
                          "empty.test: no A or AAAA records")

    @defer.inlineCallbacks
    def test_unresolvable_mx_hosts_are_skipped(self):
        hops = yield self.hops_for("partial.test")
        self.assertEqual(hops, [Hop("ok.partial.test", "192.0.2.40", 2525)])

    @defer.inlineCallbacks
    def test_no_mx_host_resolving_is_temporary(self):
        error = yield self.error_for("deadmx.test")
        self.assert_error(error, True, None, "4.4.3",
                          "No address found for deadmx.test: "
                          "gone.deadmx.test: A NXDOMAIN; AAAA NXDOMAIN")

    @defer.inlineCallbacks
    def test_control_octets_in_an_mx_target_are_escaped(self):
        error = yield self.error_for("hostile.test")
        self.assert_error(error, True, None, "4.4.3",
                          "No address found for hostile.test: "
                          "a\\x{1B}[2j\\x{D}b\\xc2\\x85.hostile.test: A NXDOMAIN; AAAA NXDOMAIN")

    @defer.inlineCallbacks
    def test_mx_naming_an_address_or_a_cname_is_tolerated(self):
        hops = yield self.hops_for("sloppy.test")
        self.assertEqual(hops, [Hop("192.0.2.50", "192.0.2.50", 2525),
                                Hop("alias.sloppy.test", "192.0.2.51", 2525)])

    @defer.inlineCallbacks
    def test_hops_are_capped(self):
        hops = yield self.hops_for("many.test")
        self.assertEqual(len(hops), MAX_HOPS)
        self.assertEqual([hop.address for hop in hops],
                         [f"192.0.2.{100 + i}" for i in range(MAX_HOPS)])

    @defer.inlineCallbacks
    def test_mx_port_setting_is_used(self):
        router = self.router(settings=settings_with())
        destination = router.destination("mx2.pref.test")
        hops = yield router.hops(destination)
        self.assertEqual(hops, [Hop("mx2.pref.test", "192.0.2.2", 25)])


class AddressLiteralTests(DNSTestCase):
    """user@[192.0.2.1]: connect to the address, ask DNS nothing."""

    @defer.inlineCallbacks
    def test_ipv4_literal(self):
        router = self.router()
        destination = router.destination("[192.0.2.1]")
        self.assertEqual(destination, Destination("mx", "[192.0.2.1]", 2525, False))
        self.assertEqual(destination.label, "[192.0.2.1]")
        hops = yield router.hops(destination)
        self.assertEqual(hops, [Hop("192.0.2.1", "192.0.2.1", 2525)])
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_ipv6_literal(self):
        hops = yield self.hops_for("[ipv6:2001:db8::1]")
        self.assertEqual(hops, [Hop("2001:db8::1", "2001:db8::1", 2525)])

    @defer.inlineCallbacks
    def test_general_address_literal_bounces(self):
        error = yield self.error_for("[x-tag:whatever]")
        self.assert_error(error, False, None, "5.1.2",
                          "Unsupported address literal: [x-tag:whatever]")

    def test_smarthost_takes_address_literals_too(self):
        router = self.router(delivery__smarthost="[relay.test]:587")
        self.assertEqual(router.destination("[192.0.2.1]"),
                         Destination("smarthost", "relay.test", 587, False))


class NextHopTests(DNSTestCase):
    """Smarthosts and [routes] entries."""

    @defer.inlineCallbacks
    def test_bracketed_smarthost_makes_no_mx_query(self):
        router = self.router(delivery__smarthost="[relay.test]:587")
        destination = router.destination("pref.test")
        self.assertEqual(destination, Destination("smarthost", "relay.test", 587, False))
        hops = yield router.hops(destination)
        self.assertEqual(hops, [Hop("relay.test", "192.0.2.60", 587),
                                Hop("relay.test", "2001:db8::60", 587)])
        self.assertEqual(sorted(self.dns.queries),
                         [("relay.test", "A"), ("relay.test", "AAAA")])

    @defer.inlineCallbacks
    def test_smarthost_without_brackets_looks_up_mx(self):
        router = self.router(delivery__smarthost="relayed.test:2526")
        destination = router.destination("pref.test")
        self.assertEqual(destination, Destination("smarthost", "relayed.test", 2526, True))
        hops = yield router.hops(destination)
        self.assertEqual(hops, [Hop("mx.relayed.test", "192.0.2.61", 2526)])
        self.assertEqual(self.dns.queries[0], ("relayed.test", "MX"))

    @defer.inlineCallbacks
    def test_ip_smarthost_asks_dns_nothing(self):
        router = self.router(delivery__smarthost="[192.0.2.99]:2526")
        hops = yield router.hops(router.destination("pref.test"))
        self.assertEqual(hops, [Hop("192.0.2.99", "192.0.2.99", 2526)])
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_ipv6_smarthost(self):
        router = self.router(delivery__smarthost="[2001:db8::99]")
        destination = router.destination("pref.test")
        self.assertEqual(destination.label, "[2001:db8::99]:25")
        hops = yield router.hops(destination)
        self.assertEqual(hops, [Hop("2001:db8::99", "2001:db8::99", 25)])

    @defer.inlineCallbacks
    def test_missing_smarthost_defers_rather_than_bounces(self):
        # Our own configuration is wrong, not the recipient's address.
        router = self.router(delivery__smarthost="[nowhere.test]")
        with self.assertRaises(RoutingError) as caught:
            yield router.hops(router.destination("pref.test"))
        self.assert_error(caught.exception, True, None, "4.4.3",
                          "No address found for [nowhere.test]:25: "
                          "nowhere.test: A NXDOMAIN; AAAA NXDOMAIN")

    @defer.inlineCallbacks
    def test_smarthost_domain_not_found_defers(self):
        router = self.router(delivery__smarthost="nowhere.test")
        with self.assertRaises(RoutingError) as caught:
            yield router.hops(router.destination("pref.test"))
        self.assert_error(caught.exception, True, None, "4.4.3",
                          "Host or domain name not found: nowhere.test (NXDOMAIN)")

    @defer.inlineCallbacks
    def test_route_beats_smarthost_beats_mx(self):
        router = self.router(delivery__smarthost="[relay.test]:587",
                             routes={"Route.Example": "[route.test]:2526"})
        self.assertEqual(router.destination("route.example"),
                         Destination("route", "route.test", 2526, False))
        self.assertEqual(router.destination("pref.test"),
                         Destination("smarthost", "relay.test", 587, False))
        self.assertEqual(self.router().destination("pref.test"),
                         Destination("mx", "pref.test", 2525, True))
        hops = yield router.hops(router.destination("route.example"))
        self.assertEqual(hops, [Hop("route.test", "192.0.2.70", 2526)])

    def test_route_with_mx_lookup(self):
        router = self.router(routes={"example.com": "relayed.test"})
        self.assertEqual(router.destination("example.com"),
                         Destination("route", "relayed.test", 25, True))
        # A domain's entry is for the domain alone (.example.com is for
        # its subdomains).
        self.assertEqual(router.destination("sub.example.com"),
                         Destination("mx", "sub.example.com", 2525, True))

    def test_route_tls_is_part_of_the_destination_and_picks_the_client_config(self):
        settings = settings_with(
            delivery__smarthost="[relay.test]:465", delivery__smarthost_tls="wrapper",
            delivery__smarthost_user="u", delivery__smarthost_password_file=__file__,
            routes={"a.example": "[route.test]:465", "b.example": "[route.test]:465"},
            **{"route_tls__a.example": "wrapper"})
        router = self.router(settings=settings)
        a, b = router.destination("a.example"), router.destination("b.example")
        self.assertEqual(a, Destination("route", "route.test", 465, False, "wrapper"))
        self.assertEqual(b, Destination("route", "route.test", 465, False))
        # Same host, different TLS: not one queue, not one connection.
        self.assertNotEqual(a, b)
        config_for = client_configs(settings)
        self.assertEqual((config_for(a).tls, config_for(a).auth_user), ("wrapper", None))
        self.assertEqual((config_for(b).tls, config_for(b).auth_user), ("may", None))
        smarthost = config_for(router.destination("c.example"))
        self.assertEqual((smarthost.tls, smarthost.auth_user), ("wrapper", "u"))
        # Hops the site chose; a recipient's MX is not one.
        self.assertEqual([config_for(a).chosen_hop, config_for(b).chosen_hop, smarthost.chosen_hop],
                         [True, True, True])
        mx = config_for(Destination("mx", "d.example", 25, True))
        self.assertEqual((mx.tls, mx.auth_user, mx.chosen_hop), ("may", None, False))


class DestinationTests(unittest.TestCase):
    """Destination labels, as logs show them."""

    def test_labels(self):
        self.assertEqual(Destination("route", "10.0.0.5", 25, False).label, "[10.0.0.5]:25")
        self.assertEqual(Destination("smarthost", "relay.example", 587, True).label,
                         "relay.example:587")
        self.assertEqual(Destination("smarthost", "::1", 2526, False).label, "[::1]:2526")
        self.assertEqual(Destination("mx", "example.com", 25, True).label, "example.com")

    def test_destination_from_config_smarthost(self):
        settings = settings_with(delivery__smarthost="[10.0.0.5]")
        self.assertEqual(settings.delivery.smarthost, Smarthost("10.0.0.5", 25, False))
        router = Router(settings, resolver=client.Resolver(servers=[("127.0.0.1", 53)]))
        self.assertEqual(router.destination("example.com").label, "[10.0.0.5]:25")

    def test_routing_error_fields(self):
        error = RoutingError(False, 556, "5.1.10", "Recipient address has null MX")
        self.assertEqual(str(error), "Recipient address has null MX")
        self.assertEqual((error.temporary, error.code, error.enhanced),
                         (False, 556, "5.1.10"))


# --- parent-domain routes (.corp.test) -------------------------------------------

def parent_router(routes, route_tls=None):
    settings = settings_with(routes=routes, **{f"route_tls__{key}": value
                                               for key, value in (route_tls or {}).items()})
    return Router(settings, resolver=object())


def test_a_dot_route_matches_every_subdomain_but_not_the_domain_itself():
    router = parent_router({".corp.test": "[10.0.0.7]:25"})
    for subdomain in ("a.corp.test", "x.y.corp.test"):
        assert router.destination(subdomain) == Destination("route", "10.0.0.7", 25, False)
    assert router.destination("corp.test") == Destination("mx", "corp.test", 25, True)
    assert router.destination("notcorp.test") == Destination("mx", "notcorp.test", 25, True)


def test_an_exact_route_wins_over_a_parent_route_and_the_longest_parent_wins():
    router = parent_router({".corp.test": "[10.0.0.1]:25", ".eu.corp.test": "[10.0.0.2]:25",
                            "hq.eu.corp.test": "[10.0.0.3]:25", "corp.test": "[10.0.0.4]:25"})
    assert router.destination("hq.eu.corp.test").host == "10.0.0.3"
    assert router.destination("paris.eu.corp.test").host == "10.0.0.2"
    assert router.destination("eu.corp.test").host == "10.0.0.1"
    assert router.destination("us.corp.test").host == "10.0.0.1"
    assert router.destination("corp.test").host == "10.0.0.4"


def test_a_parent_routes_tls_goes_with_it():
    router = parent_router({".corp.test": "[10.0.0.7]:465"}, {".corp.test": "wrapper"})
    assert router.destination("a.corp.test") == Destination("route", "10.0.0.7", 465, False,
                                                            "wrapper")


def test_an_address_literal_has_no_parent_route():
    router = parent_router({".1": "[10.0.0.7]:25"})
    assert router.destination("[192.0.2.1]").kind == "mx"


@pytest.mark.parametrize("key, problem", [
    ("*.corp.test", "wildcards are not supported; write '.corp.test', which matches every "
                    "subdomain of corp.test (not corp.test itself), as in a Postfix transport map"),
    ("*", "wildcards are not supported; write '.example.com', which matches every subdomain of "
          "example.com (not example.com itself), as in a Postfix transport map"),
    (".", "expected a domain or .domain (its subdomains), got '.'"),
])
def test_a_wildcard_route_is_a_config_error_saying_what_to_write(tmp_path, key, problem):
    from relaymail.config import ConfigError
    path = tmp_path / "relay.ini"
    path.write_text(f"[routes]\n{key} = [10.0.0.7]:25\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: [routes] {key}: {problem}"


def test_a_dot_route_key_is_kept_lower_case_with_its_dot(tmp_path):
    path = tmp_path / "relay.ini"
    path.write_text("[routes]\n.Corp.Test = [10.0.0.7]:25\n[route_tls]\n.corp.test = verify\n")
    settings = load_config(str(path))
    assert list(settings.routes) == [".corp.test"]
    assert settings.route_tls == {".corp.test": "verify"}
