"""relaymail-check rcpt/mail/connect/helo/expn/route: each plugin's answer,
who decided, the reply the server would give (checked against the real
relay over a socket) and the route; twistd relaymail --list-plugins."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.relay_process import REPO, RelayProcess, _env, twistd
from tests.test_hooks import Client

SITE_PLUGINS = textwrap.dedent('''\
    """Site policies as an administrator would write them."""
    import time

    from twisted.internet import defer, reactor
    from twisted.plugin import IPlugin
    from zope.interface import implementer, provider

    from relaymail.interfaces import (
        Decision, IConnectionPolicy, IHeloPolicy, IPluginFactory, IRecipientValidator,
        ISenderPolicy)


    @implementer(IConnectionPolicy)
    class Gatekeeper:
        name = "gatekeeper"

        def check_connection(self, context):
            if context.client_ip == "127.0.0.2":
                return Decision.reject(554, "5.7.1", "Access denied by site policy")
            if context.client_ip == "127.0.0.3":
                return Decision.defer("Busy, come back later", code=421, enhanced="4.7.0")
            if context.client_ip == "127.0.0.4":
                raise RuntimeError("gatekeeper bug")
            return Decision.NO_OPINION


    @implementer(IHeloPolicy)
    class HeloCheck:
        name = "helocheck"

        def check_helo(self, helo, context):
            if helo == "forged.example":
                return Decision.reject(550, "5.7.1", "Helo command rejected: forged")
            return Decision.NO_OPINION


    @implementer(ISenderPolicy)
    class SenderCheck:
        name = "sendercheck"

        def check_sender(self, sender, parameters, context):
            if sender is not None and sender.local_text == "spammer":
                return Decision.reject(550, "5.7.1", "Sender address rejected: spammer")
            if sender is not None and sender.local_text == "grey":
                return Decision.defer("Greylisted, try again", code=450, enhanced="4.7.1")
            if parameters.get("SIZE") == "999":
                return Decision.reject(552, "5.3.4", "Size 999 is unlucky here")
            if sender is None:
                return Decision.accept("Null sender welcome")
            return Decision.NO_OPINION


    @implementer(IRecipientValidator)
    class Broken:
        name = "broken"

        def check_recipient(self, recipient, context):
            if recipient.local_text == "boom":
                raise RuntimeError("broken plugin")
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION


    @implementer(IRecipientValidator)
    class Later:
        """Answers through a Deferred, as a network lookup would."""
        name = "later"

        def check_recipient(self, recipient, context):
            d = defer.Deferred()
            if recipient.local_text == "never":
                return d
            if recipient.local_text == "gone":
                answer = Decision.reject(550, "5.1.1", "Recipient address rejected: gone")
            elif recipient.local_text == "busy":
                answer = Decision.defer("Mailbox busy", code=450, enhanced="4.2.1")
            else:
                answer = Decision.NO_OPINION
            reactor.callLater(0.05, d.callback, answer)
            return d

        def verify(self, address, context):
            return Decision.NO_OPINION


    @implementer(IRecipientValidator)
    class Sleepy:
        """Blocks the way a database driver does, and says so."""
        name = "sleepy"
        blocking = True

        def check_recipient(self, recipient, context):
            time.sleep(0.05)
            if recipient.local_text == "thread":
                return Decision.reject(550, "5.1.1", "answered from a thread")
            if recipient.domain == "partner.example":
                return Decision.accept("Partner ok")
            return Decision.NO_OPINION

        def verify(self, address, context):
            return Decision.NO_OPINION


    def _factory(plugin_class, text):
        @provider(IPlugin, IPluginFactory)
        class Factory:
            name = plugin_class.name
            description = text

            @staticmethod
            def build(context):
                return plugin_class()
        return Factory


    gatekeeper = _factory(Gatekeeper, "refuses some test clients")
    helocheck = _factory(HeloCheck, "refuses forged HELO names")
    sendercheck = _factory(SenderCheck, "refuses some senders")
    broken = _factory(Broken, "raises for boom@")
    later = _factory(Later, "answers through a Deferred")
    sleepy = _factory(Sleepy, "blocks, and says so")
''')

ALIASES = "staff: alice, team\nteam: bob@example.com, carol\n"


def write_site(workdir):
    plugins = workdir / "plugins"
    plugins.mkdir()
    (plugins / "site_policies.py").write_text(SITE_PLUGINS)
    (workdir / "aliases").write_text(ALIASES)
    return plugins


def sections(workdir, plugins):
    return {
        # Two inbound workers: the start-up line must still come once.
        "server": {"trusted_networks": "10.9.9.0/24 127.0.0.7/32", "workers": "2"},
        "relay": {"domains": "example.com"},
        "plugins": {"connect": "gatekeeper", "helo": "helocheck", "senders": "sendercheck",
                    "recipients": "broken, later, sleepy, aliases, domains",
                    "expanders": "aliases", "path": str(plugins), "timeout": "1"},
        "plugin:aliases": {"file": str(workdir / "aliases")},
        "routes": {"routed.example": "[10.0.0.7]:2525"},
    }


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """The configuration the tool reads, and the real relay started with it."""
    workdir = tmp_path_factory.mktemp("dry_run")
    process = RelayProcess(workdir, sections(workdir, write_site(workdir)))
    process.smarthost = process.config and _smarthost(process.config)
    process.start()
    yield process
    process.stop()


def _smarthost(config):
    for line in open(config):
        if line.startswith("smarthost = "):
            return line.split(" = ")[1].strip()


def check(config, *argv):
    """Run relaymail-check as a user does: its own process, its own reactor."""
    result = subprocess.run(
        [sys.executable, "-m", "relaymail.tools.check", "--config", str(config), *argv],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout


UNTRUSTED = "client: 127.0.0.1 trusted=no authenticated=no\n"
SESSION = "helo: localhost\nsender: <>\n"


def test_an_accepted_recipient_shows_each_plugin_in_order_and_the_route(relay):
    assert check(relay.config, "rcpt", "bob@example.com") == (0, (
        UNTRUSTED + SESSION +
        "rcpt: <bob@example.com>\n"
        "plugin broken: no opinion\n"
        "plugin later: no opinion\n"
        "plugin sleepy: no opinion\n"
        "plugin aliases: no opinion\n"
        "plugin domains: accept\n"
        "decided by: domains\n"
        "reply: 250 2.1.5 Ok\n"
        "expands to: bob@example.com\n"
        f"route: smtp {relay.smarthost} (smarthost)\n"))


def test_a_deferred_rejection_stops_the_others_from_being_asked(relay):
    assert check(relay.config, "rcpt", "gone@example.com") == (1, (
        UNTRUSTED + SESSION +
        "rcpt: <gone@example.com>\n"
        "plugin broken: no opinion\n"
        "plugin later: reject 550 5.1.1 Recipient address rejected: gone\n"
        "plugin sleepy: not asked\n"
        "plugin aliases: not asked\n"
        "plugin domains: not asked\n"
        "decided by: later\n"
        "reply: 550 5.1.1 Recipient address rejected: gone\n"))


def test_a_deferral_exits_2(relay):
    status, out = check(relay.config, "rcpt", "busy@example.com")
    assert status == 2
    assert "plugin later: defer 450 4.2.1 Mailbox busy\n" in out
    assert out.endswith("decided by: later\nreply: 450 4.2.1 Mailbox busy\n")


def test_a_blocking_plugin_answers_from_its_thread(relay):
    status, out = check(relay.config, "rcpt", "thread@example.com")
    assert status == 1
    assert out.endswith(
        "plugin later: no opinion\n"
        "plugin sleepy: reject 550 5.1.1 answered from a thread\n"
        "plugin aliases: not asked\n"
        "plugin domains: not asked\n"
        "decided by: sleepy\n"
        "reply: 550 5.1.1 answered from a thread\n")
    # An accept with its own text, outside [relay] domains, routed by [routes].
    assert check(relay.config, "rcpt", "x@partner.example")[1].endswith(
        "plugin sleepy: accept Partner ok\n"
        "plugin aliases: not asked\n"
        "plugin domains: not asked\n"
        "decided by: sleepy\n"
        "reply: 250 2.1.5 Partner ok\n"
        "expands to: x@partner.example\n"
        f"route: smtp {relay.smarthost} (smarthost)\n")


def test_a_plugin_that_raises_shows_the_failure_and_the_451(relay):
    assert check(relay.config, "rcpt", "boom@example.com") == (2, (
        UNTRUSTED + SESSION +
        "rcpt: <boom@example.com>\n"
        "plugin broken: failed: RuntimeError: broken plugin\n"
        "plugin later: not asked\n"
        "plugin sleepy: not asked\n"
        "plugin aliases: not asked\n"
        "plugin domains: not asked\n"
        "decided by: broken\n"
        "reply: 451 4.3.0 Temporary failure checking recipient, try again later\n"))


def test_a_plugin_that_never_answers_times_out(relay):
    status, out = check(relay.config, "rcpt", "never@example.com")
    assert status == 2
    assert ("plugin later: no answer within the [plugins] timeout\n"
            "plugin sleepy: not asked\n") in out
    assert out.endswith(
        "decided by: later\n"
        "reply: 451 4.3.0 Temporary failure checking recipient, try again later\n")


def test_the_relay_rule_untrusted_trusted_and_authenticated(relay):
    denied = check(relay.config, "rcpt", "someone@elsewhere.example")
    assert denied == (1, (
        UNTRUSTED + SESSION +
        "rcpt: <someone@elsewhere.example>\n"
        "plugin broken: no opinion\n"
        "plugin later: no opinion\n"
        "plugin sleepy: no opinion\n"
        "plugin aliases: no opinion\n"
        "plugin domains: no opinion\n"
        "decided by: relay rule (neither trusted nor authenticated: 554 5.7.1)\n"
        "reply: 554 5.7.1 Relay access denied\n"))
    trusted = check(relay.config, "rcpt", "someone@elsewhere.example", "--client", "10.9.9.9")
    assert trusted[0] == 0
    assert trusted[1].startswith("client: 10.9.9.9 trusted=yes authenticated=no\n")
    assert trusted[1].endswith(
        "decided by: relay rule (trusted network: may relay)\n"
        "reply: 250 2.1.5 Ok\n"
        "expands to: someone@elsewhere.example\n"
        f"route: smtp {relay.smarthost} (smarthost)\n")
    authenticated = check(relay.config, "rcpt", "someone@elsewhere.example", "--auth", "joe")
    assert authenticated[0] == 0
    assert authenticated[1].startswith("client: 127.0.0.1 trusted=no authenticated=joe\n")
    assert "decided by: relay rule (authenticated: may relay)\nreply: 250 2.1.5 Ok\n" in (
        authenticated[1])
    # Sender routing in the local part is refused before any plugin.
    assert check(relay.config, "rcpt", "a%b@example.com")[1].endswith(
        "plugin broken: not asked\n"
        "plugin later: not asked\n"
        "plugin sleepy: not asked\n"
        "plugin aliases: not asked\n"
        "plugin domains: not asked\n"
        "decided by: relay rule (neither trusted nor authenticated: 554 5.7.1)\n"
        "reply: 554 5.7.1 Relay access denied\n")


def test_a_list_recipient_expands_as_the_queue_would(relay):
    status, out = check(relay.config, "rcpt", "staff@example.com")
    assert status == 0
    assert out.endswith(
        "plugin aliases: accept\n"
        "plugin domains: not asked\n"
        "decided by: aliases\n"
        "reply: 250 2.1.5 Ok\n"
        "expands to: alice@example.com\n"
        "expands to: bob@example.com\n"
        "expands to: carol@example.com\n"
        f"route: smtp {relay.smarthost} (smarthost)\n"
        f"route: smtp {relay.smarthost} (smarthost)\n"
        f"route: smtp {relay.smarthost} (smarthost)\n")


def test_expn_with_nested_lists(relay):
    assert check(relay.config, "expn", "staff@example.com", "--client", "10.9.9.9") == (0, (
        "client: 10.9.9.9 trusted=yes authenticated=no\n"
        "helo: localhost\n"
        "expn: staff@example.com\n"
        "plugin aliases: staff@example.com: members alice, team\n"
        "reply: 250-2.1.5 <alice@example.com>\n"
        "reply: 250 2.1.5 <team@example.com>\n"
        "expands to: alice@example.com\n"
        "expands to: bob@example.com\n"
        "expands to: carol@example.com\n"))
    # [server] expn = trusted (the default): an outsider is not told.
    assert check(relay.config, "expn", "staff@example.com") == (1, (
        UNTRUSTED + "helo: localhost\nexpn: staff@example.com\n"
        "plugin aliases: not asked\n"
        "reply: 502 5.7.0 Error: EXPN is only for trusted or authenticated clients\n"))


def test_mail_with_parameters(relay):
    base = UNTRUSTED + "helo: localhost\n"
    assert check(relay.config, "mail", "spammer@example.org") == (1, (
        base + "mail: <spammer@example.org>\n"
        "plugin sendercheck: reject 550 5.7.1 Sender address rejected: spammer\n"
        "decided by: sendercheck\n"
        "reply: 550 5.7.1 Sender address rejected: spammer\n"))
    assert check(relay.config, "mail", "grey@example.org") == (2, (
        base + "mail: <grey@example.org>\n"
        "plugin sendercheck: defer 450 4.7.1 Greylisted, try again\n"
        "decided by: sendercheck\n"
        "reply: 450 4.7.1 Greylisted, try again\n"))
    assert check(relay.config, "mail", "a@example.org", "--param", "SIZE=999") == (1, (
        base + "mail: <a@example.org> SIZE=999\n"
        "plugin sendercheck: reject 552 5.3.4 Size 999 is unlucky here\n"
        "decided by: sendercheck\n"
        "reply: 552 5.3.4 Size 999 is unlucky here\n"))
    assert check(relay.config, "mail", "<>") == (0, (
        base + "mail: <>\n"
        "plugin sendercheck: accept Null sender welcome\n"
        "decided by: sendercheck\n"
        "reply: 250 2.1.0 Null sender welcome\n"))
    assert check(relay.config, "mail", "a@example.org") == (0, (
        base + "mail: <a@example.org>\n"
        "plugin sendercheck: no opinion\n"
        "decided by: none\n"
        "reply: 250 2.1.0 Ok\n"))


def test_connect_and_helo(relay):
    assert check(relay.config, "connect", "--client", "127.0.0.2") == (1, (
        "client: 127.0.0.2 trusted=no authenticated=no\n"
        "plugin gatekeeper: reject 554 5.7.1 Access denied by site policy\n"
        "decided by: gatekeeper\n"
        "reply: 554 relay.test Access denied by site policy\n"))
    assert check(relay.config, "connect", "--client", "127.0.0.3") == (2, (
        "client: 127.0.0.3 trusted=no authenticated=no\n"
        "plugin gatekeeper: defer 421 4.7.0 Busy, come back later\n"
        "decided by: gatekeeper\n"
        "reply: 421 relay.test Busy, come back later\n"))
    assert check(relay.config, "connect", "--client", "127.0.0.4") == (2, (
        "client: 127.0.0.4 trusted=no authenticated=no\n"
        "plugin gatekeeper: failed: RuntimeError: gatekeeper bug\n"
        "decided by: gatekeeper\n"
        "reply: 421 relay.test Temporary failure checking the client, try again later\n"))
    assert check(relay.config, "connect") == (0, (
        UNTRUSTED + "plugin gatekeeper: no opinion\n"
        "decided by: none\n"
        "reply: 220 relay.test ESMTP relaymail\n"))
    assert check(relay.config, "helo", "forged.example") == (1, (
        UNTRUSTED + "helo: forged.example\n"
        "plugin helocheck: reject 550 5.7.1 Helo command rejected: forged\n"
        "decided by: helocheck\n"
        # RFC 2034: no enhanced code in the reply to EHLO itself.
        "reply: 550 Helo command rejected: forged\n"))
    status, out = check(relay.config, "helo", "client.example")
    assert status == 0
    assert "plugin helocheck: no opinion\ndecided by: none\nreply: 250-relay.test Hello client.example\n" in out


def test_route_smarthost_routes_and_mx(relay, tmp_path):
    assert check(relay.config, "route", "x@routed.example") == (0, (
        UNTRUSTED + "route: smtp [10.0.0.7]:2525 ([routes] routed.example)\n"))
    assert check(relay.config, "route", "x@example.com") == (0, (
        UNTRUSTED + f"route: smtp {relay.smarthost} (smarthost)\n"))
    # The built-in trusted_networks: loopback.
    DEFAULT = "client: 127.0.0.1 trusted=yes authenticated=no\n"
    config = tmp_path / "mx.ini"
    config.write_text("[routes]\nrouted.example = relay.example:587\n")
    assert check(config, "route", "x@Example.ORG") == (0, (
        DEFAULT + "route: smtp MX of example.org, port 25\n"))
    assert check(config, "route", "x@routed.example") == (0, (
        DEFAULT + "route: smtp relay.example:587 ([routes] routed.example)\n"))
    assert check(config, "route", "x@[192.0.2.9]") == (0, (
        DEFAULT + "route: smtp [192.0.2.9]:25 (address literal)\n"))


def test_json_output(relay):
    status, out = check(relay.config, "rcpt", "gone@example.com", "--json")
    assert status == 1
    report = json.loads(out)
    assert report["status"] == 1
    assert ["decided by", "later"] in report["lines"]
    assert report["lines"][-1] == ["reply", "550 5.1.1 Recipient address rejected: gone"]


def test_usage_and_config_errors(relay, tmp_path):
    assert check(relay.config, "rcpt")[0] == 64
    assert check(relay.config, "rcpt", "a@example.com", "--client", "nowhere")[0] == 64
    assert check(relay.config, "route", "not an address") == (64, "")
    # A bad address at RCPT is the server's own 501, not a usage error.
    status, out = check(relay.config, "rcpt", "not an address")
    assert status == 1 and "\nreply: 501 5.1.3 " in out
    bad = tmp_path / "bad.ini"
    bad.write_text("[plugins]\nrecipients = nosuch\n")
    result = subprocess.run(
        [sys.executable, "-m", "relaymail.tools.check", "--config", str(bad), "rcpt", "a@b.c"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert f"{bad}: [plugins] recipients: no plugin named 'nosuch'" in result.stderr


@pytest.mark.parametrize("source, recipient", [
    ("127.0.0.1", "bob@example.com"),
    ("127.0.0.1", "gone@example.com"),
    ("127.0.0.1", "boom@example.com"),
    ("127.0.0.1", "busy@example.com"),
    ("127.0.0.1", "someone@elsewhere.example"),
    ("127.0.0.7", "someone@elsewhere.example"),
    ("127.0.0.1", "thread@example.com"),
])
def test_the_real_relay_gives_the_same_final_reply(relay, source, recipient):
    client = Client(relay.port, source)
    try:
        client.reply()
        client.ask("EHLO localhost")
        assert client.ask("MAIL FROM:<>").startswith("250 ")
        over_the_wire = client.ask(f"RCPT TO:<{recipient}>")
    finally:
        client.close()
    status, out = check(relay.config, "rcpt", recipient, "--client", source)
    replies = "".join(line[len("reply: "):] + "\r\n" for line in out.splitlines()
                      if line.startswith("reply: "))
    assert replies == over_the_wire
    assert status == {"2": 0, "4": 2, "5": 1}[over_the_wire[0]]


def test_list_plugins_through_twistd(relay):
    result = twistd("--config", relay.config, "--list-plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    site = os.path.join(relay.workdir, "plugins", "site_policies.py")
    assert (
        "aliases\n"
        f"  from: {os.path.join(REPO, 'relaymail', 'plugins', 'aliases.py')}\n"
        "  hooks: recipients, expanders\n"
        "  enabled: recipients, expanders\n"
        "  description: lists and aliases from a file in aliases(5) form\n"
        "  blocking: no\n") in out
    assert (
        "domains\n"
        f"  from: {os.path.join(REPO, 'relaymail', 'plugins', 'domains.py')}\n"
        "  hooks: recipients\n"
        "  enabled: recipients\n"
        "  description: accepts every recipient in [relay] domains\n"
        "  blocking: no\n") in out
    assert (
        "sleepy\n"
        f"  from: {site}\n"
        "  hooks: recipients\n"
        "  enabled: recipients\n"
        "  description: blocks, and says so\n"
        "  blocking: yes\n") in out
    assert (
        "sendercheck\n"
        f"  from: {site}\n"
        "  hooks: senders\n"
        "  enabled: senders\n"
        "  description: refuses some senders\n"
        "  blocking: no\n") in out
    # Not enabled here, and not buildable without its file: still listed.
    assert (
        "static\n"
        f"  from: {os.path.join(REPO, 'relaymail', 'plugins', 'static.py')}\n"
        "  hooks: recipients\n"
        "  enabled: no\n"
        "  description: accepts the addresses and domains listed in a file\n"
        "  blocking: unknown\n"
        f"  not built: {relay.config}: [plugin:static] file: missing: name the file of "
        "addresses and domains\n") in out
    names = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == sorted(names)
    assert {"aliases", "broken", "domains", "gatekeeper", "helocheck", "later", "sendercheck",
            "sleepy", "static"} <= set(names)
    # Nothing was started: no listener, no spool lock taken by this run.
    assert "relaymail" not in result.stderr


def test_the_start_up_log_names_the_enabled_plugins_once(relay):
    line = ("plugins: connect = gatekeeper; helo = helocheck; senders = sendercheck; "
            "recipients = broken, later, sleepy, aliases, domains; expanders = aliases")
    assert relay.log().count(line) == 1


def test_no_plugins_is_said_too(tmp_path):
    process = RelayProcess(tmp_path, {"server": {"workers": "0"},
                                      "plugins": {"recipients": ""}})
    process.start()
    try:
        assert "plugins: none" in process.log()
    finally:
        process.stop()


def test_router_plugins_are_asked_first_in_order(tmp_path):
    # [plugins] routers is wired elsewhere (build_hooks still refuses it
    # here), so the hooks are handed over as build_hooks will give them.
    from twisted.internet import defer
    from zope.interface import implementer

    from relaymail.config import load_config
    from relaymail.interfaces import IRouter, Route
    from relaymail.tools.dry_run import _Report, _route

    @implementer(IRouter)
    class Local:
        name = "local"

        def route(self, recipient, context):
            assert context.trusted  # the relay itself, as at delivery
            if recipient.domain_key == "lmtp.example":
                return defer.succeed(Route("lmtp", "/run/dovecot/lmtp"))
            if recipient.domain_key == "pipe.example":
                return Route("pipe")
            return None

    @implementer(IRouter)
    class Confused:
        name = "confused"

        def route(self, recipient, context):
            return "smtp" if recipient.domain_key == "bad.example" else None

    settings = load_config(None, {("delivery", "smarthost"): "[192.0.2.25]:25"})
    hooks = {"routers": [Local(), Confused()]}

    def lines(address):
        report = _Report()
        d = defer.ensureDeferred(_route(settings, hooks, address, report, None))
        assert d.called
        return report.lines, report.status

    assert lines("a@lmtp.example") == ([
        ("router local", "lmtp /run/dovecot/lmtp"),
        ("route", "lmtp /run/dovecot/lmtp (router local)")], 0)
    assert lines("a@pipe.example") == ([
        ("router local", "pipe (the transport's default)"),
        ("route", "pipe (the transport's default) (router local)")], 0)
    assert lines("a@other.example") == ([
        ("router local", "no opinion"),
        ("router confused", "no opinion"),
        ("route", "smtp [192.0.2.25]:25 (smarthost)")], 0)
    assert lines("a@bad.example") == ([
        ("router local", "no opinion"),
        ("router confused", "answered 'smtp' (not a Route)")], 2)
