"""The examples of docs/plugins.rst, loaded as a site would load them: each
code block that starts with ``# site-plugins/NAME.py`` becomes that file in
a plugin directory, and the relay, run by twistd, is driven over a socket
to do what the page says each does."""

import json
import os
import re
import smtplib
import socket

import pytest

from tests.nexthop import NextHop
from tests.relay_process import REPO, RelayProcess

DOCS = os.path.join(REPO, "docs", "plugins.rst")


def examples():
    """``{file name: source}`` of every site plugin on the page."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    found = {}
    for block in re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text):
        lines = [line[4:] for line in block.splitlines()]
        first = lines[0].strip()
        if first.startswith("# site-plugins/"):
            found[first[len("# site-plugins/"):]] = "\n".join(lines[1:]).strip() + "\n"
    return found


def test_the_page_has_an_example_for_each_policy_hook():
    assert set(examples()) >= {"block_networks.py", "not_our_name.py", "no_spoofing.py",
                               "no_interns.py", "teams.py", "by_department.py"}


@pytest.fixture(scope="module")
def sales_server():
    server = NextHop()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sales_server):
    workdir = tmp_path_factory.mktemp("plugin-docs")
    plugins = workdir / "site-plugins"
    plugins.mkdir()
    for name, source in examples().items():
        (plugins / name).write_text(source)
    (workdir / "teams.json").write_text(json.dumps({
        "ops@example.com": ["alice@example.com", "oncall@example.com"],
        "oncall@example.com": ["bob@example.com"],
    }))
    process = RelayProcess(workdir, {
        # EXPN for everyone, so the example lists can be asked for.
        "server": {"trusted_networks": "10.9.9.0/24", "expn": "anyone"},
        "relay": {"domains": "example.com"},
        "plugins": {"path": str(plugins), "connect": "block_networks",
                    "helo": "not_our_name", "senders": "no_spoofing",
                    "recipients": "no_interns, teams, domains", "expanders": "teams",
                    "routers": "by_department"},
        "plugin:by_department": {"sales_server": f"[127.0.0.1]:{sales_server.port}"},
        "plugin:block_networks": {"networks": "127.0.0.2/32, 192.0.2.0/24"},
        "plugin:teams": {"file": str(workdir / "teams.json")},
    }).start()
    yield process
    process.stop()


def test_block_networks_refuses_the_listed_network(relay):
    with socket.create_connection(("127.0.0.1", relay.port), 10,
                                  source_address=("127.0.0.2", 0)) as sock:
        assert sock.recv(512) == b"554 relay.test Your network is not welcome here\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        assert client.ehlo("client.test")[0] == 250


def test_not_our_name_refuses_a_helo_naming_the_relay(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        assert client.ehlo("RELAY.test") == (550, b"Helo command rejected: you are not me")
        assert client.ehlo("client.test")[0] == 250


def test_no_spoofing_needs_a_login_to_send_as_our_domain(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        assert client.mail("ceo@Example.COM") == (
            550, b"5.7.1 Sender address rejected: log in to send as this domain")
        assert client.mail("someone@example.org") == (250, b"2.1.0 Ok")


def test_no_interns_and_teams_at_rcpt_expn_and_in_the_queue(relay):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        assert client.expn("ops@example.com") == (
            250, b"2.1.5 <alice@example.com>\n2.1.5 <oncall@example.com>")
        client.mail("someone@example.org")
        assert client.rcpt("Intern.Joe@example.com") == (550, b"5.1.1 Interns cannot receive mail")
        assert client.rcpt("ops@example.com") == (250, b"2.1.5 Ok")
        code, text = client.data(b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    record = relay.record(queue_id)
    # Nested: ops -> alice and oncall -> bob.
    assert [r["address"] for r in record["recipients"]] == [
        "alice@example.com", "bob@example.com"]
    assert "to=<Intern.Joe@example.com> by=no_interns: 550 5.1.1" in relay.log()


def test_by_department_routes_sales_to_its_own_server(relay, sales_server):
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.test")
        client.mail("someone@example.org")
        assert client.rcpt("Sales.Bob@example.com") == (250, b"2.1.5 Ok")
        code, _ = client.data(b"Subject: quote\r\n\r\nhow much?\r\n")
    assert code == 250
    sales_server.wait_for(1)
    (message,) = sales_server.messages
    assert message["recipients"] == ["Sales.Bob@example.com"]
    assert message["data"].endswith(b"Subject: quote\r\n\r\nhow much?\r\n")
