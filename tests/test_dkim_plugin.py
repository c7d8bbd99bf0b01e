"""The dkim plugin: the relay signs, a next hop receives, and dkimpy's own
verifier passes on the exact bytes received, with the public key served
by a DNS stand-in (no real DNS)."""

import base64
import io
import re
import smtplib
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relaymail.auth.passwords import set_password
from relaymail.config import ConfigError
from relaymail.interfaces import IMessageFilter
from relaymail.plugins.dkim import author_domain
from relaymail.plugins.dkim import dkim as dkim_signer
from relaymail.policy.loader import PluginContext
from tests.relay_process import RelayProcess
from tests.test_filters import send, queued_id

BODY = (b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: signed\r\n"
        b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <1@example.org>\r\n"
        b"\r\n"
        b"hello  \r\n"
        b"world\r\n")


def rsa_key(tmp_path, name="rsa.pem"):
    """A 2048-bit RSA key written as PKCS#8 PEM; returns (path, DNS record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return str(path), b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def ed25519_key(tmp_path, name="ed25519.key", pem=False):
    """An Ed25519 key, as the base64 of its seed (dknewkey's form) or PEM."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / name
    if pem:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    else:
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        path.write_bytes(base64.b64encode(seed) + b"\n")
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return str(path), b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


def dns(records):
    """A dnsfunc for dkim.verify: TXT records by name, nothing else."""
    asked = []

    def lookup(name, timeout=5):
        asked.append(name)
        return records.get(name)
    lookup.asked = asked
    return lookup


@pytest.fixture
def signing_relay(tmp_path, nexthop):
    started = []

    def start(dkim_options, server=(), auth=None, sections=()):
        config = {
            "server": {"workers": "0", **dict(server)},
            "relay": {"domains": "example.com"},
            "delivery": {"smarthost": f"[127.0.0.1]:{nexthop.port}", "smarthost_tls": "none"},
            "plugins": {"filters": "dkim"},
            "plugin:dkim": dkim_options,
        }
        if auth:
            config["auth"] = auth
        config.update(dict(sections))
        relay = RelayProcess(tmp_path, config).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


EIGHT_BIT = (b"From: Alice <alice@example.org>\r\n"
             b"To: Bob <bob@example.net>\r\n"
             b"Subject: menu\r\n"
             b"MIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n"
             b"\r\n"
             b"caf\xc3\xa9 cr\xc3\xa8me br\xc3\xbbl\xc3\xa9e\r\n")


@pytest.mark.parametrize("eight_bit_hop", [True, False])
def test_8bit_mail_is_signed_in_7_bits_so_no_hop_breaks_the_signature(
        tmp_path, nexthop, signing_relay, eight_bit_hop):
    if not eight_bit_hop:
        # A hop without 8BITMIME: delivery would convert an 8-bit message
        # (relaymail.delivery.downgrade), after the signature was made.
        nexthop.extensions = ["PIPELINING", "ENHANCEDSTATUSCODES"]
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path})
    queue_id = queued_id(send(relay, EIGHT_BIT))
    [message] = nexthop.wait_for(1)
    data = message["data"]
    assert dkim.verify(data, dnsfunc=dns({b"s._domainkey.example.org.": record})) is True
    # Signed and queued as RFC 6376 5.3 asks: converted before signing,
    # the same bytes to either hop.
    assert data.isascii()
    assert data.endswith(b"\r\nFrom: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
                         b"Subject: menu\r\nMIME-Version: 1.0\r\n"
                         b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                         b"caf=C3=A9 cr=C3=A8me br=C3=BBl=C3=A9e\r\n")
    log = relay.log()
    assert f"{queue_id}: filter dkim: replaced the message" in log
    assert re.search(rf"\] \w{{8}} unknown\[127\.0\.0\.1\]:\d+: {queue_id}: dkim: 8-bit body "
                     rf"converted to 7 bits and signed so \(RFC 6376 5\.3\)", log)


def test_with_convert_8bit_no_the_8bit_form_is_signed(tmp_path, nexthop, signing_relay):
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path,
                           "convert_8bit": "no"})
    queued_id(send(relay, EIGHT_BIT))
    [message] = nexthop.wait_for(1)
    assert message["data"].endswith(b"\r\n" + EIGHT_BIT)
    assert dkim.verify(message["data"],
                       dnsfunc=dns({b"s._domainkey.example.org.": record})) is True


def test_8bit_mail_is_not_converted_past_the_message_size_limit(tmp_path, nexthop, signing_relay):
    # 1,500 octets of Cyrillic: about 2,050 in base64, over the limit.
    cyrillic = EIGHT_BIT.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + ("я".encode() * 75 + b"\r\n") * 10
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path},
                          sections={"limits": {"message_size": "2000"}})
    queue_id = queued_id(send(relay, cyrillic))
    [message] = nexthop.wait_for(1)
    assert message["data"].endswith(b"\r\n" + cyrillic)
    assert dkim.verify(message["data"],
                       dnsfunc=dns({b"s._domainkey.example.org.": record})) is True
    assert re.search(rf"{queue_id}: dkim: 8-bit body signed as it is: its 7-bit form would "
                     rf"have \d+ octets, over \[limits\] message_size \(2000\)", relay.log())


def test_binarymime_and_8bit_headers_are_signed_as_they_are(tmp_path):
    path, _ = rsa_key(tmp_path)
    signer = build({"domain": "example.org", "selector": "s", "private_key": path})
    header_only = (b"From: Alice <alice@example.org>\r\nSubject: caf\xc3\xa9\r\n\r\nascii\r\n")
    for data, body in ((EIGHT_BIT, "BINARYMIME"), (header_only, "8BITMIME")):
        message = SimpleNamespace(
            headers=[("From", "Alice <alice@example.org>")], queue_id="Q",
            envelope=SimpleNamespace(body=body), open=lambda data=data: io.BytesIO(data))
        context = SimpleNamespace(trusted=True, authenticated_user=None, label="S c")
        decision = signer.check_message(message, context)
        assert decision.message is None
        assert [name for name, _ in decision.add_headers] == ["DKIM-Signature"]


def test_8bit_mail_that_cannot_be_converted_is_signed_as_it_is(tmp_path, nexthop, signing_relay):
    # 8-bit content inside multipart/signed: converting it would break that
    # signature, and delivery refuses to (relaymail.delivery.downgrade).
    signed = (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
              b"Subject: signed twice\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/signed; boundary=b; protocol=\"application/pgp-signature\"\r\n"
              b"\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
              b"--b\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--b--\r\n")
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path})
    queue_id = queued_id(send(relay, signed))
    [message] = nexthop.wait_for(1)
    assert message["data"].endswith(b"\r\n" + signed)
    assert dkim.verify(message["data"],
                       dnsfunc=dns({b"s._domainkey.example.org.": record})) is True
    assert re.search(rf"{queue_id}: dkim: 8-bit body signed as it is: .*multipart/signed",
                     relay.log())


def signature_tags(data):
    field = re.search(rb"^DKIM-Signature: (.*?)\r\n(?=\S)", data, re.S | re.M).group(1)
    unfolded = re.sub(rb"\s+", b"", field).decode()
    return dict(tag.split("=", 1) for tag in unfolded.split(";") if tag)


@pytest.mark.parametrize("make_key, algorithm", [
    (rsa_key, "rsa-sha256"),
    (ed25519_key, "ed25519-sha256"),
    (lambda tmp_path: ed25519_key(tmp_path, pem=True), "ed25519-sha256"),
])
def test_the_next_hop_gets_a_signature_dkimpy_verifies(
        tmp_path, nexthop, signing_relay, make_key, algorithm):
    path, record = make_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "mail2026", "private_key": path})
    queue_id = queued_id(send(relay, BODY))
    [message] = nexthop.wait_for(1)
    data = message["data"]
    # On top, above our Received field.
    assert data.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert re.search(rb"\r\nReceived: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby relay\.test "
                     rb"\(relaymail\) with ESMTP id " + queue_id.encode(), data)
    assert data.endswith(BODY)
    tags = signature_tags(data)
    assert (tags["a"], tags["d"], tags["s"], tags["c"]) == (
        algorithm, "example.org", "mail2026", "relaxed/relaxed")
    assert tags["h"].split(":") == ["from", "to", "subject", "date", "message-id", "from"]
    lookup = dns({b"mail2026._domainkey.example.org.": record})
    assert dkim.verify(data, dnsfunc=lookup) is True
    assert lookup.asked == [b"mail2026._domainkey.example.org."]
    assert re.search(rf"{queue_id}: filter dkim: added DKIM-Signature", relay.log())


def test_a_message_changed_after_signing_fails_verification(tmp_path, nexthop, signing_relay):
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path})
    queued_id(send(relay, BODY))
    [message] = nexthop.wait_for(1)
    data = message["data"]
    lookup = dns({b"s._domainkey.example.org.": record})
    assert dkim.verify(data, dnsfunc=lookup) is True
    assert dkim.verify(data.replace(b"world\r\n", b"w0rld\r\n"), dnsfunc=lookup) is False
    assert dkim.verify(data.replace(b"Subject: signed", b"Subject: changed"),
                       dnsfunc=lookup) is False
    # And a signature checked against another key fails.
    _, other = rsa_key(tmp_path, "other.pem")
    assert dkim.verify(data, dnsfunc=dns({b"s._domainkey.example.org.": other})) is False


def test_per_domain_keys_sign_for_the_from_domain(tmp_path, nexthop, signing_relay):
    org, org_record = rsa_key(tmp_path, "org.pem")
    net, net_record = ed25519_key(tmp_path, "net.key")
    relay = signing_relay({"domain": "example.org", "selector": "a", "private_key": org,
                           "key.Example.NET": f"b2026:{net}"})
    queued_id(send(relay, BODY.replace(b"alice@example.org", b"alice@example.net")))
    [message] = nexthop.wait_for(1)
    tags = signature_tags(message["data"])
    assert (tags["d"], tags["s"], tags["a"]) == ("example.net", "b2026", "ed25519-sha256")
    assert dkim.verify(message["data"],
                       dnsfunc=dns({b"b2026._domainkey.example.net.": net_record})) is True


def signatures(data):
    """Each DKIM-Signature field's tags, top first."""
    fields = re.findall(rb"^DKIM-Signature: (.*?)\r\n(?=\S)", data, re.S | re.M)
    return [dict(tag.split("=", 1) for tag in re.sub(rb"\s+", b"", field).decode().split(";")
                 if tag) for field in fields]


def test_an_rsa_and_an_ed25519_key_sign_each_message_twice(tmp_path, nexthop, signing_relay):
    rsa_path, rsa_record = rsa_key(tmp_path)
    ed_path, ed_record = ed25519_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "r2026", "private_key": rsa_path,
                           "key.example.org": f"e2026:{ed_path}",
                           "key.example.net": f"r:{rsa_path}, e:{ed_path}"})
    bodies = {"example.org": BODY,
              "example.net": BODY.replace(b"alice@example.org", b"alice@example.net")}
    for body in bodies.values():
        queued_id(send(relay, body))
    records = {b"r2026._domainkey.example.org.": rsa_record,
               b"e2026._domainkey.example.org.": ed_record,
               b"r._domainkey.example.net.": rsa_record, b"e._domainkey.example.net.": ed_record}
    selectors = {"example.org": ("r2026", "e2026"), "example.net": ("r", "e")}
    seen = []
    for message in nexthop.wait_for(2):
        data = message["data"]
        found = signatures(data)
        domain = found[0]["d"]
        seen.append(domain)
        assert [(tags["a"], tags["d"], tags["s"]) for tags in found] == [
            ("rsa-sha256", domain, selectors[domain][0]),
            ("ed25519-sha256", domain, selectors[domain][1])]
        assert data.endswith(bodies[domain])
        # Each verifies on its own, on the bytes the next hop received...
        for index in range(2):
            assert dkim.DKIM(data).verify(idx=index, dnsfunc=dns(records)) is True
        # ...and a receiver that knows only the RSA key passes that one.
        only_rsa = {name: value for name, value in records.items() if b"k=rsa" in value}
        assert dkim.DKIM(data).verify(idx=0, dnsfunc=dns(only_rsa)) is True
        assert dkim.DKIM(data).verify(idx=1, dnsfunc=dns(only_rsa)) is False
    assert sorted(seen) == ["example.net", "example.org"]


def test_subdomains_sign_a_subdomains_mail_with_the_nearest_parent_key(
        tmp_path, nexthop, signing_relay):
    path, record = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path,
                           "subdomains": "yes"})
    queued_id(send(relay, BODY.replace(b"alice@example.org", b"alice@eu.mail.Example.org")))
    queued_id(send(relay, BODY.replace(b"alice@example.org", b"alice@notexample.org")))
    messages = nexthop.wait_for(2)
    signed = [message["data"] for message in messages if b"DKIM-Signature" in message["data"]]
    assert len(signed) == 1 and b"eu.mail.Example.org" in signed[0]
    tags = signature_tags(signed[0])
    assert (tags["d"], tags["s"]) == ("example.org", "s")
    assert dkim.verify(signed[0], dnsfunc=dns({b"s._domainkey.example.org.": record})) is True


def test_without_subdomains_only_the_keyed_domain_itself_is_signed(tmp_path):
    path, _ = rsa_key(tmp_path)
    plugin = build({"domain": "example.org", "selector": "s", "private_key": path})
    assert plugin.signing_domain("example.org") == "example.org"
    assert plugin.signing_domain("eu.example.org") is None
    keyed = build({"domain": "example.org", "selector": "s", "private_key": path,
                   "key.eu.example.org": f"t:{path}", "subdomains": "yes"})
    # The nearest domain with a key, never a top-level domain.
    assert keyed.signing_domain("x.eu.example.org") == "eu.example.org"
    assert keyed.signing_domain("x.example.org") == "example.org"
    assert keyed.signing_domain("org") is None and keyed.signing_domain("example.com") is None


def test_untrusted_clients_and_unknown_domains_go_unsigned(tmp_path, nexthop, signing_relay):
    path, _ = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path},
                          server={"trusted_networks": "192.0.2.0/24"})
    # Not trusted, not logged in: a stranger's From: example.org is not signed.
    queued_id(send(relay, BODY, recipients=("bob@example.com",)))
    [message] = nexthop.wait_for(1)
    assert b"DKIM-Signature" not in message["data"]
    assert message["data"].endswith(BODY)


def test_a_logged_in_client_outside_the_trusted_networks_is_signed(
        tmp_path, nexthop, signing_relay):
    path, record = rsa_key(tmp_path)
    passwords = str(tmp_path / "passwd")
    set_password(passwords, "alice", "correct horse")
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path},
                          server={"trusted_networks": "192.0.2.0/24"},
                          auth={"passwords": passwords, "allow_plaintext": "yes"})
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.login("alice", "correct horse")
        client.sendmail("alice@example.org", ["bob@example.net"], BODY)
    [message] = nexthop.wait_for(1)
    assert signature_tags(message["data"])["d"] == "example.org"
    assert dkim.verify(message["data"], dnsfunc=dns({b"s._domainkey.example.org.": record}))


def test_a_from_domain_without_a_key_goes_unsigned(tmp_path, nexthop, signing_relay):
    path, _ = rsa_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path})
    queued_id(send(relay, BODY.replace(b"alice@example.org", b"alice@example.info")))
    [message] = nexthop.wait_for(1)
    assert b"DKIM-Signature" not in message["data"]


def test_sign_all_signs_for_untrusted_clients_too(tmp_path, nexthop, signing_relay):
    path, record = ed25519_key(tmp_path)
    relay = signing_relay({"domain": "example.org", "selector": "s", "private_key": path,
                           "sign": "all", "headers": "From, Subject", "canonicalization":
                           "simple/simple"},
                          server={"trusted_networks": "192.0.2.0/24"})
    queued_id(send(relay, BODY, recipients=("bob@example.com",)))
    [message] = nexthop.wait_for(1)
    tags = signature_tags(message["data"])
    assert (tags["h"], tags["c"]) == ("from:subject", "simple/simple")
    assert dkim.verify(message["data"],
                       dnsfunc=dns({b"s._domainkey.example.org.": record})) is True


def test_a_bad_key_stops_start_up_naming_the_option(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "0"}, "plugins": {"filters": "dkim"},
        "plugin:dkim": {"domain": "example.org", "selector": "s", "private_key": str(bad)}})
    with pytest.raises(RuntimeError) as info:
        relay.start()
    assert re.search(rf"relaymail\.ini: \[plugin:dkim\] private_key: {re.escape(str(bad))}: "
                     rf"not a PEM RSA or Ed25519 key", str(info.value))


# -- the factory, without a relay ----------------------------------------------

def build(options):
    settings = SimpleNamespace(source="test.ini", plugin_options={"dkim": dict(options)})
    return dkim_signer.build(PluginContext("dkim", dict(options), settings))


def error(options):
    with pytest.raises(ConfigError) as info:
        build(options)
    return str(info.value)


def test_the_plugin_is_a_blocking_message_filter(tmp_path):
    path, _ = rsa_key(tmp_path)
    plugin = build({"domain": "example.org", "selector": "s", "private_key": path})
    assert IMessageFilter.providedBy(plugin)
    assert plugin.blocking is True


def test_key_problems_are_config_errors_naming_the_key(tmp_path):
    missing = str(tmp_path / "absent.pem")
    assert error({"domain": "example.org", "selector": "s", "private_key": missing}) == (
        f"test.ini: [plugin:dkim] private_key: cannot read {missing}: No such file or directory")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("c2hvcnQ=\n")     # base64, but 5 bytes: not an Ed25519 seed
    assert error({"key.example.net": f"s:{garbage}"}).startswith(
        f"test.ini: [plugin:dkim] key.example.net: {garbage}: not a PEM RSA or Ed25519 key")
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert error({"domain": "example.org", "selector": "s", "private_key": str(ec_key)}) == (
        f"test.ini: [plugin:dkim] private_key: {ec_key}: neither an RSA nor an Ed25519 key; "
        f"DKIM signs with those (RFC 6376 3.3, RFC 8463)")


def test_option_problems_are_config_errors(tmp_path):
    path, _ = rsa_key(tmp_path)
    key = {"domain": "example.org", "selector": "s", "private_key": path}
    assert error({}) == ("test.ini: [plugin:dkim] domain: no key: set domain, selector and "
                         "private_key, or key.DOMAIN")
    assert error({"domain": "example.org", "private_key": path}) == (
        "test.ini: [plugin:dkim] selector: missing: domain, selector and private_key go together")
    assert error({**key, "selector": "bad selector"}) == (
        "test.ini: [plugin:dkim] selector: not a selector: 'bad selector'")
    assert error({"key.example.net": path}).startswith(
        "test.ini: [plugin:dkim] key.example.net: expected SELECTOR:PATH")
    assert error({**key, "headers": "Subject, To"}) == (
        "test.ini: [plugin:dkim] headers: must include From (RFC 6376 5.4)")
    assert error({**key, "headers": "From, Received"}) == (
        "test.ini: [plugin:dkim] headers: received should not be signed: it changes in "
        "transit (RFC 6376 5.4)")
    assert error({**key, "sign": "everyone"}) == (
        "test.ini: [plugin:dkim] sign: expected trusted or all, got 'everyone'")
    assert error({**key, "canonicalization": "relaxed"}).startswith(
        "test.ini: [plugin:dkim] canonicalization: expected HEADER/BODY")
    assert error({**key, "selectr": "s"}).startswith(
        "test.ini: [plugin:dkim] selectr: unknown option; [plugin:dkim] takes domain, selector")
    assert error({**key, "key.EXAMPLE.org": f"t:{path}"}) == (
        "test.ini: [plugin:dkim] key.EXAMPLE.org: a second rsa-sha256 key for example.org: "
        "a domain signs once with RSA and once with Ed25519 at most")
    ed, _ = ed25519_key(tmp_path)
    assert error({**key, "key.example.org": f"s:{ed}"}) == (
        "test.ini: [plugin:dkim] key.example.org: two keys for example.org under one "
        "selector, s: a selector names one public key (RFC 6376 3.1)")
    assert error({"key.example.net": f"a:{path}, b"}) == (
        "test.ini: [plugin:dkim] key.example.net: expected SELECTOR:PATH, or two of them, "
        f"got 'a:{path}, b'")
    assert error({**key, "subdomains": "sometimes"}) == (
        "test.ini: [plugin:dkim] subdomains: expected yes or no, got 'sometimes'")
    assert error({**key, "convert_8bit": "maybe"}) == (
        "test.ini: [plugin:dkim] convert_8bit: expected yes or no, got 'maybe'")


@pytest.mark.parametrize("headers, domain", [
    ([("From", "Alice <alice@Example.ORG>")], "example.org"),
    ([("From", "alice@bücher.example")], "xn--bcher-kva.example"),
    ([("from", '"Smith, A" <a@example.org>')], "example.org"),
    ([("From", "a@example.org, b@example.net")], None),
    ([("From", "a@example.org"), ("From", "b@example.org")], None),
    ([("Sender", "a@example.org")], None),
    ([("From", "undisclosed")], None),
])
def test_the_author_domain_is_the_one_from_address(headers, domain):
    assert author_domain(headers) == domain


def test_the_readme_recipe_is_accepted(tmp_path):
    from tests.test_reference import checked, recipe
    (tmp_path / "dkim").mkdir()
    rsa_key(tmp_path / "dkim", "example.org.pem")
    ed25519_key(tmp_path / "dkim", "example.net.key")
    result = checked(tmp_path, recipe("Signing outgoing mail with DKIM."))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"{tmp_path / 'relaymail.ini'}: ok\n"


def test_a_key_domain_may_be_written_in_u_labels_and_capitals(tmp_path):
    path, _ = rsa_key(tmp_path)
    plugin = build({"key.Bücher.EXAMPLE": f"s:{path}"})
    assert list(plugin.keys) == ["xn--bcher-kva.example"]
    assert plugin.signing_domain(author_domain([("From", "a@bücher.example")])) == \
        "xn--bcher-kva.example"
