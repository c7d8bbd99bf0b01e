"""relaymail-check dkim: the records it prints are the ones that verify
the signatures the dkim plugin makes (dkimpy's verifier, with the printed
record served by a DNS stand-in)."""

import io
import json
import re
import subprocess
import sys

import dkim
import pytest

from relaymail.config import load_config
from relaymail.policy.loader import build_hooks
from relaymail.smtp.dialogue import SessionContext
from relaymail.tools.check import main
from tests.relay_process import REPO, RelayProcess, _env
from tests.test_dkim_plugin import BODY, dns, ed25519_key, rsa_key
from tests.test_filters import queued_id, send

# A record line: NAME IN TXT "..." ["..."]...
RECORD = re.compile(r'(\S+) IN TXT ((?:"[^"\\]*")(?: "[^"\\]*")*)\Z')


def check(*argv):
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def parse(line):
    """(name, strings) of a printed record line, as a zone file reads it."""
    match = RECORD.match(line)
    assert match, line
    return match.group(1), re.findall(r'"([^"]*)"', match.group(2))


def served(out):
    """A dnsfunc serving every printed record, its strings joined as a
    verifier joins them (RFC 6376 3.6.2.2)."""
    records = {}
    for line in out.splitlines():
        name, strings = parse(line)
        assert all(len(s.encode()) <= 255 for s in strings), strings
        records[name.encode()] = "".join(strings).encode()
    return dns(records)


def write_config(tmp_path, dkim_options, extra=""):
    lines = ["[relay]", "domains = example.com", "[plugins]", "filters = dkim", "[plugin:dkim]"]
    lines += [f"{key} = {value}" for key, value in dkim_options.items()]
    path = tmp_path / "relaymail.ini"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


class Message:
    """What a message filter reads of a queued message."""

    queue_id = "TEST"

    def __init__(self, data):
        self.data = data
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        self.headers = [tuple(part.strip() for part in line.split(":", 1))
                        for line in head.split("\r\n")]

    def open(self):
        return io.BytesIO(self.data)


def signed_by_the_plugin(config, data):
    """``data`` with the signature the configured dkim plugin adds."""
    [signer] = build_hooks(load_config(config))["filters"]
    decision = signer.check_message(Message(data), SessionContext("127.0.0.1", None,
                                                                  trusted=True))
    [(name, value)] = decision.add_headers
    return f"{name}: {value}\r\n".encode() + data


def test_every_key_gets_its_record_and_the_plugins_signatures_verify_against_it(tmp_path):
    rsa_path, rsa_record = rsa_key(tmp_path)
    ed_path, ed_record = ed25519_key(tmp_path)
    pem_path, pem_record = ed25519_key(tmp_path, "ed.pem", pem=True)
    config = write_config(tmp_path, {
        "domain": "example.org", "selector": "mail2026", "private_key": rsa_path,
        "key.example.net": f"ed1:{ed_path}", "key.Example.EDU": f"s.2026:{pem_path}"})
    status, out, err = check("--config", config, "dkim")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    # By domain; the names absolute (a zone file would append its origin).
    assert [parse(line)[0] for line in lines] == [
        "s.2026._domainkey.example.edu.", "ed1._domainkey.example.net.",
        "mail2026._domainkey.example.org."]
    # What test_dkim_plugin's keys would publish, split where needed.
    edu, net, org = (parse(line)[1] for line in lines)
    assert net == [ed_record.decode()] and edu == [pem_record.decode()]
    assert net[0].startswith("v=DKIM1; k=ed25519; p=")
    # 2048-bit RSA: 410 octets, two strings, the first of exactly 255.
    assert [len(s) for s in org] == [255, len(rsa_record) - 255]
    assert "".join(org) == rsa_record.decode()
    assert lines[2] == f'mail2026._domainkey.example.org. IN TXT "{org[0]}" "{org[1]}"'
    lookup = served(out)
    for author in ("a@example.org", "a@example.net", "a@example.edu"):
        data = BODY.replace(b"alice@example.org", author.encode())
        signed = signed_by_the_plugin(config, data)
        assert dkim.verify(signed, dnsfunc=lookup) is True, author
        # And a changed body fails against the same record: it is checked.
        assert dkim.verify(signed.replace(b"world", b"w0rld"), dnsfunc=lookup) is False
    assert lookup.asked == [b"mail2026._domainkey.example.org.", b"mail2026._domainkey.example.org.",
                            b"ed1._domainkey.example.net.", b"ed1._domainkey.example.net.",
                            b"s.2026._domainkey.example.edu.", b"s.2026._domainkey.example.edu."]


def test_a_domain_with_two_keys_gets_two_records_that_verify_its_two_signatures(tmp_path):
    rsa_path, rsa_record = rsa_key(tmp_path)
    ed_path, ed_record = ed25519_key(tmp_path)
    config = write_config(tmp_path, {"domain": "example.org", "selector": "r", "private_key":
                                     rsa_path, "key.example.org": f"e:{ed_path}"})
    status, out, err = check("--config", config, "dkim")
    assert (status, err) == (0, "")
    assert [parse(line)[0] for line in out.splitlines()] == [
        "e._domainkey.example.org.", "r._domainkey.example.org."]
    [signer] = build_hooks(load_config(config))["filters"]
    decision = signer.check_message(Message(BODY), SessionContext("127.0.0.1", None, trusted=True))
    signed = b"".join(f"{name}: {value}\r\n".encode()
                      for name, value in decision.add_headers) + BODY
    for index in range(2):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=served(out)) is True


def test_a_record_for_another_key_does_not_verify(tmp_path):
    path, _ = rsa_key(tmp_path)
    other, _ = rsa_key(tmp_path, "other.pem")
    config = write_config(tmp_path, {"domain": "example.org", "selector": "s",
                                     "private_key": path})
    (tmp_path / "other").mkdir()
    other_config = write_config(tmp_path / "other", {"domain": "example.org", "selector": "s",
                                                     "private_key": other})
    signed = signed_by_the_plugin(config, BODY)
    assert dkim.verify(signed, dnsfunc=served(check("--config", config, "dkim")[1])) is True
    assert dkim.verify(signed, dnsfunc=served(check("--config", other_config, "dkim")[1])) \
        is False


@pytest.mark.parametrize("make_key", [rsa_key, ed25519_key])
def test_what_the_running_relay_signs_verifies_against_the_printed_record(
        tmp_path, nexthop, make_key):
    path, _ = make_key(tmp_path)
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{nexthop.port}", "smarthost_tls": "none"},
        "plugins": {"filters": "dkim"},
        "plugin:dkim": {"domain": "example.org", "selector": "mail2026", "private_key": path},
    }).start()
    try:
        queued_id(send(relay, BODY))
        [message] = nexthop.wait_for(1)
    finally:
        relay.stop()
    # The installed command, on the relay's own file.
    done = subprocess.run([sys.executable, "-m", "relaymail.tools.check", "--config",
                           relay.config, "dkim"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lookup = served(done.stdout)
    assert message["data"].startswith(b"DKIM-Signature: ")
    assert dkim.verify(message["data"], dnsfunc=lookup) is True
    assert lookup.asked == [b"mail2026._domainkey.example.org."]


def test_keys_configured_before_signing_is_enabled_get_their_records(tmp_path):
    path, record = rsa_key(tmp_path)
    config = tmp_path / "relaymail.ini"
    config.write_text("[relay]\ndomains = example.com\n"
                      f"[plugin:dkim]\ndomain = example.org\nselector = s\nprivate_key = {path}\n")
    status, out, err = check("--config", str(config), "dkim")
    assert (status, err) == (0, "")
    [(name, strings)] = [parse(line) for line in out.splitlines()]
    assert (name, "".join(strings)) == ("s._domainkey.example.org.", record.decode())
    # Its keys are read and tried as a start would.
    config.write_text(config.read_text().replace("selector = s", "selector = -bad"))
    assert check("--config", str(config), "dkim") == (
        78, "", f"relaymail-check: {config}: [plugin:dkim] selector: not a selector: '-bad'\n")


def test_json_lists_each_key(tmp_path):
    path, record = ed25519_key(tmp_path)
    config = write_config(tmp_path, {"domain": "example.org", "selector": "s",
                                     "private_key": path})
    status, out, err = check("--config", config, "dkim", "--json")
    assert (status, err) == (0, "")
    assert json.loads(out) == [{
        "domain": "example.org", "selector": "s", "name": "s._domainkey.example.org.",
        "algorithm": "ed25519-sha256", "value": record.decode(),
        "record": f's._domainkey.example.org. IN TXT "{record.decode()}"'}]


def test_no_dkim_plugin_and_bad_keys_are_config_errors(tmp_path):
    config = tmp_path / "plain.ini"
    config.write_text("[relay]\ndomains = example.com\n")
    assert check("--config", str(config), "dkim") == (
        78, "", f"relaymail-check: {config}: [plugins] filters: no dkim plugin and no "
                "[plugin:dkim]: there is no key to publish\n")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    config = write_config(tmp_path, {"domain": "example.org", "selector": "s",
                                     "private_key": str(bad)})
    status, out, err = check("--config", config, "dkim")
    assert (status, out) == (78, "")
    assert err.startswith(f"relaymail-check: {config}: [plugin:dkim] private_key: {bad}: "
                          "not a PEM RSA or Ed25519 key")
    assert check("--config", config, "dkim", "--bogus")[0] == 64
