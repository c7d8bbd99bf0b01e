"""Routers and transports ([plugins] routers, transports) with the real relay
over real sockets: a site router (loaded from a directory, as a site's)
sends example.net to the pipe transport, example.org to the webhook
(etc/plugins/webhook.py, loaded from etc/plugins as a site would, and
routing its own domains), lmtp.test to the real Dovecot, other domains to
smtp; scripted transports and routers fail in every way the contract
allows for.  What each far end got is checked byte for byte, and what each
outcome did to the queue: sent, deferred and tried again, bounced with a
DSN to the sender."""

import http.server
import json
import os
import re
import socket
import smtplib
import stat
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relaymail.delivery.destinations import DEFERRED, SENT, Job
from relaymail.delivery.transports import TransportHop, TransportRunner
from relaymail.interfaces import RecipientOutcome
from tests.dovecot import Dovecot
from tests.nexthop import NextHop
from tests.relay_process import REPO, RelayProcess
from tests.test_delivery import wait_until

BODY = (b"From: Alice <alice@sender.test>\r\n"
        b"Subject: transports\r\n"
        b"\r\n"
        b"First line.\r\n"
        b".a line that starts with a dot\r\n"
        b"last line\r\n")

SENDER = "alice@sender.test"

# The site's router: route.DOMAIN = TRANSPORT [NEXT_HOP], or !raise, !hang,
# !garbage for a router that fails that way.  The site's transports: one
# that raises, one that never answers, one that answers garbage, one that
# blocks (blocking = True) and must run off the reactor thread.
SITE_PLUGINS = '''
import threading

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.interfaces import IPluginFactory, IRouter, ITransport, RecipientOutcome, Route


@implementer(IRouter)
class SiteRouter:
    name = "siterouter"

    def __init__(self, routes):
        self.routes = routes

    def route(self, recipient, context):
        spec = self.routes.get(recipient.domain_key)
        if spec is None:
            return None
        if spec == "!raise":
            raise RuntimeError("the router broke")
        if spec == "!hang":
            return defer.Deferred()
        if spec == "!garbage":
            return "smtp please"
        transport, _, hop = spec.partition(" ")
        return Route(transport, hop or None)


@implementer(IRouter)
class BlockingRouter:
    """Says blocking = True: asked in the plugin threads, never on the reactor."""

    name = "blockingrouter"
    blocking = True

    def __init__(self, hop):
        self.hop = hop

    def route(self, recipient, context):
        if recipient.domain_key != "blocking-router.test":
            return None
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("a blocking router ran on the reactor thread")
        return Route("smtp", self.hop)


@implementer(ITransport)
class Scripted:
    def __init__(self, name):
        self.name = name
        self.blocking = name == "threaded"

    def deliver(self, message, recipients, next_hop):
        if self.name == "raiser":
            raise RuntimeError("the transport broke")
        if self.name == "hanger":
            return defer.Deferred()
        if self.name == "garbage":
            return "yes"
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("a blocking transport ran on the reactor thread")
        with message.open() as f:
            size = len(f.read())
        return {r: RecipientOutcome.delivered(f"read {size} bytes in a thread")
                for r in recipients}


@implementer(IPlugin, IPluginFactory)
class Factory:
    def __init__(self, name, build):
        self.name = name
        self._build = build

    def build(self, context):
        return self._build(self.name, context)


siterouter = Factory("siterouter", lambda name, context: SiteRouter(
    {key[len("route."):]: value for key, value in context.options.items()}))
blockingrouter = Factory("blockingrouter", lambda name, context: BlockingRouter(
    context.options["hop"]))
raiser = Factory("raiser", lambda name, context: Scripted(name))
hanger = Factory("hanger", lambda name, context: Scripted(name))
garbage = Factory("garbage", lambda name, context: Scripted(name))
threaded = Factory("threaded", lambda name, context: Scripted(name))
'''

# The pipe command: writes its argv, stdin and environment to OUT/QUEUE_ID/N.*
# and exits as the recipient's local part says.
COMMAND = '''#!{python}
import json, os, sys, time
base = os.path.join(os.environ["OUT"], sys.argv[1])
os.makedirs(base, exist_ok=True)
n = len([name for name in os.listdir(base) if name.endswith(".argv")])
data = sys.stdin.buffer.read()
with open(os.path.join(base, f"{{n}}.stdin"), "wb") as f:
    f.write(data)
with open(os.path.join(base, f"{{n}}.env"), "w") as f:
    json.dump(dict(os.environ), f)
with open(os.path.join(base, f"{{n}}.argv"), "w") as f:
    json.dump(sys.argv, f)
local = sys.argv[-1].split("@")[0]
if local == "unknown":
    print("mailbox " + local + " unknown\\x1b[2J", file=sys.stderr)
    sys.exit(67)
if local == "busy" and n == 0:
    print("mailbox locked, try later", file=sys.stderr)
    sys.exit(75)
if local == "slow":
    time.sleep(60)
if local == "crash":
    sys.exit(3)
'''


class WebHookServer:
    """An HTTP server in a thread recording each POST; the answer comes
    from the first recipient's local part: ok 200, gone 404, busy 503 the
    first time for a queue id and 200 after, throttled 429."""

    def __init__(self):
        self.requests = []
        self._changed = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recipients = self.headers.get_all("X-Relaymail-Recipient")
                queue_id = self.headers["X-Relaymail-Queue-Id"]
                with server._changed:
                    seen = sum(1 for r in server.requests if r["queue_id"] == queue_id)
                    server.requests.append({"path": self.path, "headers": self.headers,
                                            "body": body, "queue_id": queue_id,
                                            "recipients": recipients})
                    server._changed.notify_all()
                local = recipients[0].split("@")[0]
                code, text = {"gone": (404, b"no such hook\n"),
                              "throttled": (429, b"slow down\n") if seen == 0 else (200, b"ok\n"),
                              "busy": (503, b"busy\n") if seen == 0 else (200, b"ok\n"),
                              }.get(local, (200, b"stored\n"))
                self.send_response(code)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, queue_id, count=1, timeout=20):
        import time
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                got = [r for r in self.requests if r["queue_id"] == queue_id]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(got)} requests for {queue_id}, not {count}")
                self._changed.wait(left)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def far_ends():
    nexthop, other_hop, hook = NextHop(), NextHop(), WebHookServer()
    dovecot = Dovecot()
    try:
        dovecot.start()
        yield nexthop, other_hop, hook, dovecot
    finally:
        dovecot.remove()
        for server in (nexthop, other_hop, hook):
            server.stop()


def site_config(root, far_ends, workers="0"):
    """The relay's config, the site plugin directory and the pipe command
    written under ``root``; returns (config sections, OUT directory)."""
    nexthop, other_hop, hook, dovecot = far_ends
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "site.py").write_text(textwrap.dedent(SITE_PLUGINS))
    out = root / "out"
    out.mkdir()
    command = root / "command.py"
    command.write_text(COMMAND.format(python=sys.executable))
    command.chmod(command.stat().st_mode | stat.S_IXUSR)
    routes = {
        "example.net": "pipe deliver",
        "batch.test": "pipe batch:the-argument",
        "nocommand.test": "pipe nosuch",
        "raise.test": "raiser",
        "hang.test": "hanger",
        "garbage.test": "garbage",
        "threaded.test": "threaded",
        "nosuch.test": "nosuch",
        "lmtp.test": f"lmtp {dovecot.socket_path}",
        "bad-lmtp.test": "lmtp relative/lmtp",
        "other-hop.test": f"smtp [127.0.0.1]:{other_hop.port}",
        "bad-hop.test": "smtp [127.0.0.1]:not-a-port",
        "router-raises.test": "!raise",
        "router-hangs.test": "!hang",
        "router-garbage.test": "!garbage",
    }
    config = {
        "server": {"workers": workers},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{nexthop.port}", "smarthost_tls": "none",
                     "connect_timeout": "2", "command_timeout": "5", "data_timeout": "5",
                     "transport_timeout": "3"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
        "plugins": {"path": f"{plugins} {os.path.join(REPO, 'etc', 'plugins')}",
                    "routers": "siterouter, blockingrouter, webhook",
                    "transports": "pipe, webhook, raiser, hanger, garbage, threaded",
                    "timeout": "1"},
        "plugin:siterouter": {f"route.{domain}": spec for domain, spec in routes.items()},
        "plugin:blockingrouter": {"hop": f"[127.0.0.1]:{other_hop.port}"},
        "plugin:webhook": {"url": f"http://127.0.0.1:{hook.port}/hook", "timeout": "2",
                           "domains": "example.org"},
        "plugin:pipe": {"command.deliver": f"{command} {{queue_id}} -f {{sender}} -- {{recipient}}",
                        "command.batch": f"{command} {{queue_id}} {{sender}} {{nexthop}}",
                        "timeout": "2", "env.OUT": str(out)},
    }
    if workers != "0":
        config["delivery"]["workers"] = "1"
    return config, out


@pytest.fixture(scope="module")
def site(tmp_path_factory, far_ends):
    root = tmp_path_factory.mktemp("transports")
    config, out = site_config(root, far_ends)
    relay = RelayProcess(root, config).start()
    relay.out = str(out)
    try:
        yield relay
    finally:
        relay.stop()


def send(relay, recipients, sender=SENDER, body=BODY):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail(sender)
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, text
        code, text = client.data(body)
    assert code == 250, text
    return re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()


def outcomes(relay, queue_id, recipient):
    """The delivery log lines of one recipient: (relay, dsn, status, text)."""
    return re.findall(rf"{queue_id}: to=<{re.escape(recipient)}>, relay=(\S+)(?:, tls=[^,]*)?, delay=\S+, "
                      r"dsn=(\S+), status=(\w+) \((.*)\)", relay.log())


def wait_for_outcome(relay, queue_id, recipient, status, count=1):
    wait_until(lambda: [o for o in outcomes(relay, queue_id, recipient)
                        if o[2] == status][count - 1:],
               what=f"{recipient} {status} in the log")
    return outcomes(relay, queue_id, recipient)


def queued(relay, queue_id):
    return os.path.exists(os.path.join(relay.spool, "active", queue_id + ".msg"))


def removed(relay, queue_id):
    return f"{queue_id}: removed" in relay.log()


def pipe_runs(relay, queue_id):
    base = os.path.join(relay.out, queue_id)
    runs = []
    for n in range(len([name for name in os.listdir(base) if name.endswith(".argv")])):
        with open(os.path.join(base, f"{n}.argv")) as f:
            argv = json.load(f)
        with open(os.path.join(base, f"{n}.stdin"), "rb") as f:
            stdin = f.read()
        with open(os.path.join(base, f"{n}.env")) as f:
            env = json.load(f)
        runs.append((argv, stdin, env))
    return runs


def split_received(data, newline=b"\r\n"):
    """Our Received field's queue id, and the rest: which must be BODY
    exactly."""
    lines = data.split(newline)
    assert lines[0].startswith(b"Received: from client.test ([127.0.0.1])"), data[:300]
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    field = newline.join(lines[:end])
    our_id = re.search(rb"with ESMTP id ([0-9A-Z]+)", field).group(1).decode()
    return our_id, newline.join(lines[end:])


# -- pipe ------------------------------------------------------------------------

def test_pipe_runs_the_command_per_recipient_with_argv_and_the_message_on_stdin(site):
    queue_id = send(site, ["bob@example.net", "carol@example.net"])
    wait_for_outcome(site, queue_id, "carol@example.net", "sent")
    wait_until(lambda: removed(site, queue_id), what="the message to leave the queue")
    runs = pipe_runs(site, queue_id)
    assert [argv[1:] for argv, _, _ in runs] == [
        [queue_id, "-f", SENDER, "--", "bob@example.net"],
        [queue_id, "-f", SENDER, "--", "carol@example.net"]]
    for _argv, stdin, env in runs:
        # The message as queued, with LF line ends (newline = lf).
        our_id, rest = split_received(stdin, newline=b"\n")
        assert our_id == queue_id
        assert rest == BODY.replace(b"\r\n", b"\n")
        # A minimal environment: PATH, the exported names, env.NAME (and
        # what the Python command sets for itself: PWD, a coerced LC_CTYPE).
        assert set(env) - {"TZ", "LANG", "PWD", "LC_CTYPE"} == {"PATH", "OUT"}
        assert env["PATH"] == "/usr/bin:/bin"
    [(relay, dsn, status, text)] = outcomes(site, queue_id, "bob@example.net")
    assert (relay, dsn, status, text) == (
        "pipe:deliver", "2.0.0", "sent", "delivered via deliver command")


def test_pipe_gives_a_binarymime_message_as_received_crlf_and_all(site):
    # Binary content has no lines: turning its CR LF pairs into LF would
    # change the data (RFC 3030 3), so newline = lf is for text only.
    body = (b"From: Alice <alice@sender.test>\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
            b"\r\n\x00\x01\r\n\xff\r\r\n.\r\n\n\x80")
    with socket.create_connection(("127.0.0.1", site.port), 10) as client:
        reader = client.makefile("rb")
        client.sendall(b"EHLO client.test\r\nMAIL FROM:<%s> BODY=BINARYMIME\r\n"
                       b"RCPT TO:<bob@example.net>\r\nBDAT %d LAST\r\n%s"
                       % (SENDER.encode(), len(body), body))
        replies = []
        # The greeting, then EHLO's, MAIL's, RCPT's and BDAT's replies.
        while len(replies) < 5:
            line = reader.readline()
            if line[3:4] == b" ":
                replies.append(line)
        client.sendall(b"QUIT\r\n")
    assert [reply[:3] for reply in replies] == [b"220", b"250", b"250", b"250", b"250"], replies
    queue_id = re.match(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n", replies[4]).group(1)
    queue_id = queue_id.decode()
    wait_for_outcome(site, queue_id, "bob@example.net", "sent")
    [(_argv, stdin, _env)] = pipe_runs(site, queue_id)
    our_id, rest = split_received(stdin)
    assert (our_id, rest) == (queue_id, body)


def test_pipe_without_a_recipient_field_runs_once_for_all_with_the_next_hop_argument(site):
    queue_id = send(site, ["one@batch.test", "two@batch.test"])
    wait_for_outcome(site, queue_id, "two@batch.test", "sent")
    [(argv, stdin, _env)] = pipe_runs(site, queue_id)
    assert argv[1:] == [queue_id, SENDER, "the-argument"]
    assert split_received(stdin, newline=b"\n")[1] == BODY.replace(b"\r\n", b"\n")
    assert [o[:3] for o in outcomes(site, queue_id, "one@batch.test")] == [
        ("pipe:batch:the-argument", "2.0.0", "sent")]


def test_pipe_exit_67_bounces_5_1_1_and_the_dsn_reaches_the_sender(site, far_ends):
    nexthop = far_ends[0]
    queue_id = send(site, ["unknown@example.net"])
    [(relay, dsn, status, text)] = wait_for_outcome(site, queue_id, "unknown@example.net",
                                                    "bounced")
    assert (relay, dsn, status) == ("pipe:deliver", "5.1.1", "bounced")
    # The command's first line of stderr, its escape sequence made harmless.
    assert text == ("pipe: command deliver: exit 67 (user unknown): mailbox unknown "
                    "unknown\\x{1B}[2J")
    wait_until(lambda: any(queue_id.encode() in m["data"] and m["sender"] == ""
                           for m in nexthop.messages), what="the bounce at the next hop")
    [dsn_message] = [m for m in nexthop.messages
                     if queue_id.encode() in m["data"] and m["sender"] == ""]
    assert dsn_message["recipients"] == [SENDER]
    data = dsn_message["data"]
    assert b"Final-Recipient: rfc822; unknown@example.net" in data
    assert b"Action: failed" in data
    assert b"Status: 5.1.1" in data
    # The command's words, typed as Postfix's pipe(8) types them.
    assert (b"Diagnostic-Code: x-unix; pipe: command deliver: exit 67 (user unknown):\r\n"
            b" mailbox unknown") in data
    assert b"The delivery answered: pipe: command deliver: exit 67 (user\r\n" in data
    wait_until(lambda: removed(site, queue_id), what="the bounced message to leave the queue")


def test_pipe_exit_75_defers_and_the_retry_delivers(site):
    queue_id = send(site, ["busy@example.net"])
    lines = wait_for_outcome(site, queue_id, "busy@example.net", "sent")
    assert [line[1:] for line in lines] == [
        ("4.3.0", "deferred", "pipe: command deliver: exit 75 (temporary failure): mailbox "
                              "locked, try later"),
        ("2.0.0", "sent", "delivered via deliver command")]
    assert len(pipe_runs(site, queue_id)) == 2


def test_pipe_exit_outside_sysexits_bounces_5_3_0_as_postfix(site):
    queue_id = send(site, ["crash@example.net"])
    [line] = wait_for_outcome(site, queue_id, "crash@example.net", "bounced")
    assert line[1:] == ("5.3.0", "bounced", "pipe: command deliver: exit 3 (unknown mail "
                                            "system error 3)")


def test_pipe_command_past_its_time_limit_is_killed_and_deferred(site):
    queue_id = send(site, ["slow@example.net"])
    [line] = wait_for_outcome(site, queue_id, "slow@example.net", "deferred")
    assert line[1:] == ("4.3.0", "deferred",
                        "pipe: command deliver: time limit exceeded")
    assert queued(site, queue_id)


def test_pipe_route_to_an_unknown_command_defers_4_3_5(site):
    queue_id = send(site, ["x@nocommand.test"])
    [line] = wait_for_outcome(site, queue_id, "x@nocommand.test", "deferred")
    assert line[1:] == ("4.3.5", "deferred",
                        "pipe: no command named 'nosuch' ([plugin:pipe] command.nosuch; "
                        "known: batch, deliver)")
    assert queued(site, queue_id)


def test_an_address_starting_with_a_dash_never_reaches_a_command(site):
    queue_id = send(site, ["-oQ/tmp/x@example.net", "bob@example.net"])
    [line] = wait_for_outcome(site, queue_id, "-oQ/tmp/x@example.net", "bounced")
    assert line[1:3] == ("5.1.3", "bounced")
    wait_for_outcome(site, queue_id, "bob@example.net", "sent")
    assert [argv[-1] for argv, _, _ in pipe_runs(site, queue_id)] == ["bob@example.net"]


# -- the webhook (etc/plugins/webhook.py) ------------------------------------------

def test_webhook_gets_the_exact_bytes_and_the_envelope(site, far_ends):
    hook = far_ends[2]
    queue_id = send(site, ["ok@example.org", "second@example.org"])
    [request] = hook.wait_for(queue_id)
    assert request["path"] == "/hook"
    assert request["headers"]["Content-Type"] == "message/rfc822"
    assert request["headers"]["X-Relaymail-Sender"] == SENDER
    assert request["recipients"] == ["ok@example.org", "second@example.org"]
    our_id, rest = split_received(request["body"])
    assert (our_id, rest) == (queue_id, BODY)
    assert int(request["headers"]["Content-Length"]) == len(request["body"])
    [line] = wait_for_outcome(site, queue_id, "second@example.org", "sent")
    assert line == ("webhook", "2.0.0", "sent",
                    f"webhook http://127.0.0.1:{hook.port}/hook said 200 OK: stored"
                    "")


def test_webhook_503_defers_then_200_delivers(site, far_ends):
    hook = far_ends[2]
    queue_id = send(site, ["busy@example.org"])
    lines = wait_for_outcome(site, queue_id, "busy@example.org", "sent")
    assert [line[1:3] for line in lines] == [("4.0.0", "deferred"), ("2.0.0", "sent")]
    assert "said 503 Service Unavailable: busy" in lines[0][3]
    first, second = hook.wait_for(queue_id, 2)
    assert first["body"] == second["body"]
    wait_until(lambda: removed(site, queue_id), what="the message to leave the queue")


def test_webhook_429_defers_rather_than_bounces(site, far_ends):
    queue_id = send(site, ["throttled@example.org"])
    lines = wait_for_outcome(site, queue_id, "throttled@example.org", "sent")
    assert [line[1:3] for line in lines] == [("4.0.0", "deferred"), ("2.0.0", "sent")]
    assert "said 429 Too Many Requests: slow down" in lines[0][3]


def test_webhook_404_bounces(site, far_ends):
    nexthop, hook = far_ends[0], far_ends[2]
    queue_id = send(site, ["gone@example.org"])
    [line] = wait_for_outcome(site, queue_id, "gone@example.org", "bounced")
    assert line[1:] == ("5.0.0", "bounced", f"webhook http://127.0.0.1:{hook.port}/hook said "
                                            "404 Not Found: no such hook")
    wait_until(lambda: any(queue_id.encode() in m["data"] and m["sender"] == ""
                           for m in nexthop.messages), what="the bounce at the next hop")
    [dsn] = [m["data"] for m in nexthop.messages
             if queue_id.encode() in m["data"] and m["sender"] == ""]
    assert b"Diagnostic-Code: x-relaymail; webhook http://127.0.0.1:" in dsn


# -- lmtp to the real Dovecot ------------------------------------------------------

def test_lmtp_route_delivers_into_dovecot(site, far_ends):
    dovecot = far_ends[3]
    queue_id = send(site, ["alice@lmtp.test", "nobody-here@lmtp.test"])
    [line] = wait_for_outcome(site, queue_id, "alice@lmtp.test", "sent")
    assert line[:3] == (f"lmtp:{dovecot.socket_path}", "2.0.0", "sent")
    [refused] = wait_for_outcome(site, queue_id, "nobody-here@lmtp.test", "bounced")
    assert refused[1:3] == ("5.1.1", "bounced")
    stored = [m for m in dovecot.mailbox("alice") if queue_id.encode() in m]
    assert len(stored) == 1
    assert stored[0].endswith(BODY)


def test_a_bad_lmtp_next_hop_from_a_router_defers_4_3_5_naming_the_router(site):
    queue_id = send(site, ["x@bad-lmtp.test"])
    [line] = wait_for_outcome(site, queue_id, "x@bad-lmtp.test", "deferred")
    assert line[1:] == ("4.3.5", "deferred", "router siterouter: bad lmtp next hop: "
                                             "'relative/lmtp': the socket path must be absolute")
    assert re.search(rf"{queue_id}: <x@bad-lmtp\.test>: router siterouter: bad lmtp", site.log())


# -- smtp routes -----------------------------------------------------------------

def test_a_router_may_send_smtp_mail_to_a_next_hop_of_its_choice(site, far_ends):
    other_hop = far_ends[1]
    queue_id = send(site, ["carol@other-hop.test"])
    wait_until(lambda: any(queue_id.encode() in m["data"] for m in other_hop.messages),
               what="the message at the router's next hop")
    [message] = [m for m in other_hop.messages if queue_id.encode() in m["data"]]
    assert message["recipients"] == ["carol@other-hop.test"]
    assert split_received(message["data"])[1] == BODY


def test_a_blocking_router_is_asked_in_the_plugin_threads(site, far_ends):
    other_hop = far_ends[1]
    queue_id = send(site, ["erin@blocking-router.test"])
    [line] = wait_for_outcome(site, queue_id, "erin@blocking-router.test", "sent")
    assert line[0] == f"127.0.0.1[127.0.0.1]:{other_hop.port}"
    assert any(queue_id.encode() in m["data"] for m in other_hop.messages)


def test_other_domains_go_to_the_built_in_router(site, far_ends):
    nexthop = far_ends[0]
    queue_id = send(site, ["dave@elsewhere.test"])
    [line] = wait_for_outcome(site, queue_id, "dave@elsewhere.test", "sent")
    assert line[0] == f"127.0.0.1[127.0.0.1]:{nexthop.port}"
    assert any(queue_id.encode() in m["data"] for m in nexthop.messages)


def test_a_bad_smtp_next_hop_from_a_router_defers_4_3_5(site):
    queue_id = send(site, ["x@bad-hop.test"])
    [line] = wait_for_outcome(site, queue_id, "x@bad-hop.test", "deferred")
    assert line[1] == "4.3.5"
    assert line[3].startswith("router siterouter: bad smtp next hop '[127.0.0.1]:not-a-port'")


# -- failures: deferred, the message kept, the others unaffected ---------------------

@pytest.mark.parametrize("domain, reason", [
    ("raise.test", "transport raiser failed: RuntimeError: the transport broke"),
    ("hang.test", "transport hanger did not answer within 3s"),
    ("garbage.test", "transport garbage answered 'yes', not a dict of outcomes"),
    ("nosuch.test", "no transport named nosuch (router siterouter; known: garbage, hanger, "
                    "lmtp, pipe, raiser, smtp, threaded, webhook)"),
    ("router-raises.test", "router siterouter failed: RuntimeError: the router broke"),
    ("router-hangs.test", "router siterouter failed: no answer within 1.0 seconds"),
    ("router-garbage.test", "router siterouter failed: returned 'smtp please', not a Route "
                            "or None"),
])
def test_a_failing_transport_or_router_defers_and_keeps_the_message(site, far_ends, domain,
                                                                   reason):
    nexthop = far_ends[0]
    queue_id = send(site, [f"x@{domain}", "y@fine.test"])
    [line] = wait_for_outcome(site, queue_id, f"x@{domain}", "deferred")
    assert line[1:3] == ("4.3.5" if domain == "nosuch.test" else "4.3.0", "deferred")
    assert line[3].startswith(reason), line[3]
    # The other recipient of the same message, and other messages, go on.
    wait_for_outcome(site, queue_id, "y@fine.test", "sent")
    other = send(site, ["z@fine.test"])
    wait_for_outcome(site, other, "z@fine.test", "sent")
    assert any(other.encode() in m["data"] for m in nexthop.messages)
    # Tried again later, not lost.
    wait_for_outcome(site, queue_id, f"x@{domain}", "deferred", count=2)
    assert queued(site, queue_id)
    if domain == "nosuch.test":
        assert re.search(rf"{queue_id}: <x@nosuch\.test>: no transport named nosuch", site.log())


def test_a_blocking_transport_runs_in_the_plugin_threads(site):
    queue_id = send(site, ["x@threaded.test"])
    [line] = wait_for_outcome(site, queue_id, "x@threaded.test", "sent")
    assert re.fullmatch(r"read \d+ bytes in a thread", line[3])


# -- the delivery worker builds the plugins too ----------------------------------------

def test_routers_and_transports_work_in_a_delivery_worker(tmp_path, far_ends):
    hook = far_ends[2]
    config, out = site_config(tmp_path, far_ends, workers="1")
    relay = RelayProcess(tmp_path, config).start()
    relay.out = str(out)
    try:
        queue_id = send(relay, ["bob@example.net", "ok@example.org"])
        wait_for_outcome(relay, queue_id, "bob@example.net", "sent")
        wait_for_outcome(relay, queue_id, "ok@example.org", "sent")
        [(argv, _stdin, _env)] = pipe_runs(relay, queue_id)
        assert argv[-1] == "bob@example.net"
        assert hook.wait_for(queue_id)[0]["recipients"] == ["ok@example.org"]
        assert re.search(r"\[delivery\.0 relaymail\.queue#info\] " + queue_id
                         + r": to=<bob@example\.net>, relay=pipe:deliver", relay.log())
    finally:
        relay.stop()


# -- configuration errors name the file, section and key ---------------------------

def pipe_error(tmp_path, options):
    from types import SimpleNamespace
    from relaymail.config import ConfigError
    from relaymail.plugins.pipe import pipe
    from relaymail.policy.loader import PluginContext
    settings = SimpleNamespace(source="relay.ini",
                               delivery=SimpleNamespace(transport_timeout=1000.0))
    with pytest.raises(ConfigError) as info:
        pipe.build(PluginContext("pipe", options, settings))
    return str(info.value)


@pytest.mark.parametrize("options, message", [
    ({}, "relay.ini: [plugin:pipe] command.NAME: no command: define at least one, e.g. "
         "command.deliver = /usr/bin/procmail -f {sender}"),
    ({"command.x": "/bin/true {user}"},
     "relay.ini: [plugin:pipe] command.x: unknown field {user} in '{user}'; the fields are "
     "{recipient}, {local_part}, {domain}, {sender}, {queue_id}, {nexthop} (write {{ and }} "
     "for braces)"),
    ({"command.x": "true {recipient}"},
     "relay.ini: [plugin:pipe] command.x: the command must be an absolute path, not 'true'"),
    ({"command.x": "/bin/true 'unclosed"},
     "relay.ini: [plugin:pipe] command.x: cannot split \"/bin/true 'unclosed\" into words: "
     "No closing quotation"),
    ({"command.x": "/nonexistent/tool"},
     "relay.ini: [plugin:pipe] command.x: /nonexistent/tool is not an executable file"),
    ({"command.x": "/bin/true", "timeout": "soon"},
     "relay.ini: [plugin:pipe] timeout: expected"),
    ({"command.x": "/bin/true", "newline": "cr"},
     "relay.ini: [plugin:pipe] newline: expected lf or crlf, got 'cr'"),
    ({"command.x": "/bin/true", "user": "nobody"},
     "relay.ini: [plugin:pipe] user: unknown option; [plugin:pipe] takes command.NAME, "
     "timeout, directory, path, export_environment, env.NAME, null_sender, newline"),
])
def test_pipe_configuration_errors(tmp_path, options, message):
    assert pipe_error(tmp_path, options).startswith(message)


def test_a_site_transport_may_not_take_a_built_in_name(tmp_path):
    from types import SimpleNamespace
    from twisted.internet import reactor
    from relaymail.config import ConfigError
    from relaymail.delivery.transports import TransportRegistry
    from tests.support import make_settings
    settings = make_settings(tmp_path)
    with pytest.raises(ConfigError) as info:
        TransportRegistry(reactor, settings, [SimpleNamespace(name="lmtp")])
    assert str(info.value).endswith("[plugins] transports: two transports are named 'lmtp'")


def test_outcomes_get_the_status_class_of_their_kind_and_a_safe_reason():
    from relaymail.delivery.destinations import Job
    from relaymail.delivery.transports import TransportHop, outcomes_of
    from relaymail.interfaces import RecipientOutcome
    job = Job(queue_id="Q", destination=TransportHop("site", "x"), sender="", message_path="",
              recipients=["a@x.test", "b@x.test", "c@x.test", "d@x.test"])
    got = outcomes_of(job, {
        "a@x.test": RecipientOutcome.bounced("gone\r\nstatus=sent", "4.1.1"),
        "b@x.test": RecipientOutcome.delivered("ok", "not a status"),
        "c@x.test": "delivered",
    })
    assert [(o.address, o.status, o.enhanced, o.text) for o in got] == [
        ("a@x.test", "bounced", "5.1.1", "gone status=sent"),
        ("b@x.test", "sent", "2.0.0", "ok"),
        ("c@x.test", "deferred", "4.3.0",
         "transport site answered 'delivered', not a RecipientOutcome"),
        ("d@x.test", "deferred", "4.3.0", "transport site gave no outcome for this recipient"),
    ]
    assert {o.remote for o in got} == {"site:x"}


def test_outcomes_keep_a_servers_reply_code_remote_and_tls_when_a_transport_gives_them():
    from relaymail.delivery.destinations import Job
    from relaymail.delivery.transports import TransportHop, outcomes_of
    from relaymail.interfaces import RecipientOutcome
    job = Job(queue_id="Q", destination=TransportHop("site", "x"), sender="", message_path="",
              recipients=["a@x.test", "b@x.test", "c@x.test"])
    got = outcomes_of(job, {
        "a@x.test": RecipientOutcome.bounced("no such user", "5.1.1", code=550,
                                             remote="mx.x.test[192.0.2.1]:25", tls="TLSv1.3"),
        # A code of another class than the kind is no reply to keep.
        "b@x.test": RecipientOutcome.deferred("busy", "4.4.1", code=250),
        "c@x.test": RecipientOutcome.delivered("ok", code=250, remote="hub\r\nfake"),
    })
    assert [(o.status, o.code, o.enhanced, o.text, o.remote, o.remote_name, o.tls,
             o.diagnostic) for o in got] == [
        ("bounced", 550, "5.1.1", "no such user", "mx.x.test[192.0.2.1]:25", "mx.x.test",
         "TLSv1.3", "550 5.1.1 no such user"),
        ("deferred", None, "4.4.1", "busy", "site:x", None, None, "busy"),
        ("sent", 250, "2.0.0", "ok", "hub fake", "hub fake", None, "250 2.0.0 ok"),
    ]


def test_relaymail_check_refuses_a_pipe_without_commands_naming_the_key(tmp_path):
    import subprocess
    from tests.relay_process import _env
    config = tmp_path / "relay.ini"
    config.write_text(f"[queue]\npath = {tmp_path / 'spool'}\n"
                      "[plugins]\ntransports = pipe\n"
                      "[plugin:pipe]\nnewline = lf\n")
    check = os.path.join(REPO, ".venv", "bin", "relaymail-check")
    result = subprocess.run([check, "config", str(config)], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert (f"{config}: [plugin:pipe] command.NAME: no command: define at least one"
            in result.stdout + result.stderr)


def test_sighup_gives_the_new_delivery_worker_the_new_pipe_commands(tmp_path, far_ends):
    import signal
    config, out = site_config(tmp_path, far_ends, workers="1")
    relay = RelayProcess(tmp_path, config)
    relay.out = str(out)
    relay.start()
    try:
        first = send(relay, ["bob@example.net"])
        wait_for_outcome(relay, first, "bob@example.net", "sent")
        command = config["plugin:pipe"]["command.deliver"]
        text = open(relay.config).read().replace(
            f"command.deliver = {command}",
            f"command.deliver = {command.replace('-f', 'reloaded -f')}")
        with open(relay.config, "w") as f:
            f.write(text)
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded; 1 inbound and 1 delivery workers replaced" in relay.log(),
                   what="the reload")
        second = send(relay, ["bob@example.net"])
        wait_for_outcome(relay, second, "bob@example.net", "sent")
        assert pipe_runs(relay, first)[0][0][2:4] == ["-f", SENDER]
        assert pipe_runs(relay, second)[0][0][2:5] == ["reloaded", "-f", SENDER]
    finally:
        relay.stop()


# -- the webhook's own failures, driven directly -------------------------------------

class WebHookFailureTests(unittest.TestCase):
    """A web hook that is down or does not answer: deferred (4.4.1)."""

    timeout = 20

    def hook(self, url, timeout="1", **options):
        import importlib.util
        from types import SimpleNamespace
        from relaymail.policy.loader import PluginContext
        spec = importlib.util.spec_from_file_location(
            "webhook_under_test", os.path.join(REPO, "etc", "plugins", "webhook.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        options = {"url": url, "timeout": timeout, **options}
        return module.webhook.build(PluginContext("webhook", options,
                                                  SimpleNamespace(source="relay.ini")))

    def message(self):
        from relaymail.queue.message_view import MessageView
        from relaymail.envelope import Envelope
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(BODY)
        return MessageView.read("QUEUEID", Envelope(SENDER, ["a@example.org"]), path)

    @defer.inlineCallbacks
    def test_a_refused_connection_defers(self):
        from tests.relay_process import free_port
        url = f"http://127.0.0.1:{free_port()}/hook"
        result = yield self.hook(url).deliver(self.message(), ["a@example.org"], None)
        outcome = result["a@example.org"]
        self.assertEqual((outcome.kind, outcome.status), ("deferred", "4.4.1"))
        self.assertTrue(outcome.reason.startswith(f"webhook {url}: ConnectionRefusedError"),
                        outcome.reason)

    @defer.inlineCallbacks
    def test_a_server_that_never_answers_defers_after_the_timeout(self):
        import socket
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        self.addCleanup(silent.close)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        result = yield self.hook(url).deliver(self.message(), ["a@example.org"], None)
        outcome = result["a@example.org"]
        self.assertEqual((outcome.kind, outcome.status, outcome.reason),
                         ("deferred", "4.4.1", f"webhook {url}: no answer within 1s"))

    def test_domains_in_u_labels_route_the_recipients_of_their_a_labels(self):
        from relaymail.address import parse_forward_path
        hook = self.hook("http://127.0.0.1:1/hook", domains="Bücher.example, .tickets.ÉXAMPLE")
        for address, routed in (("a@xn--bcher-kva.example", True), ("a@bücher.example", True),
                                ("a@eu.xn--tickets-kya.example", False),
                                ("a@eu.tickets.xn--xample-9ua", True),
                                ("a@tickets.xn--xample-9ua", False), ("a@example.org", False)):
            route = hook.route(parse_forward_path(f"<{address}>", smtputf8=True), None)
            self.assertEqual(route is not None, routed, address)

    def test_a_domain_that_is_not_one_is_a_config_error_naming_the_key(self):
        from relaymail.config import ConfigError
        with self.assertRaises(ConfigError) as info:
            self.hook("http://127.0.0.1:1/hook", domains="example.com, bad..domain")
        self.assertTrue(str(info.exception).startswith(
            "relay.ini: [plugin:webhook] domains: not a domain: 'bad..domain'"),
            str(info.exception))

    def test_a_bad_url_is_a_config_error_naming_the_key(self):
        from relaymail.config import ConfigError
        with self.assertRaises(ConfigError) as info:
            self.hook("ftp://example.net/")
        self.assertEqual(str(info.exception), "relay.ini: [plugin:webhook] url: expected an "
                                              "http:// or https:// URL, got 'ftp://example.net/'")


# -- the scheduler with a router that answers later (a fake clock) -------------------

class LateRouter:
    """A policy whose one router answers each recipient when the test says."""

    routers_enabled = True

    def __init__(self):
        self.asked = []

    def route(self, recipient, context):
        d = defer.Deferred()
        self.asked.append((str(recipient), context, d))
        return d


class DrainingPool:
    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)

    def drain(self):
        return []

    def stop(self):
        pass


def late_scheduler(tmp_path):
    from twisted.internet import task
    from relaymail.delivery.routing import Router
    from relaymail.queue.scheduler import Scheduler
    from tests.support import make_settings
    from tests.test_scheduler import T0, Spool
    settings = make_settings(tmp_path, delivery__smarthost="[127.0.0.1]:2526",
                             queue__min_backoff="10", queue__max_backoff="10")
    clock = task.Clock()
    clock.advance(T0)
    spool, pool, policy = Spool(tmp_path), DrainingPool(), LateRouter()
    sched = Scheduler(spool, pool, Router(settings, resolver=object()), settings, clock,
                      clock=clock.seconds, policy=policy)
    return sched, spool, pool, policy, clock


def test_a_message_waiting_for_its_router_is_active_and_goes_once_it_answers(tmp_path):
    from relaymail.interfaces import Route
    sched, spool, pool, policy, clock = late_scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net", "b@example.net"], sender="s@example.org")
    sched.startService()
    clock.advance(0)
    assert [asked[0] for asked in policy.asked] == ["a@example.net", "b@example.net"]
    context = policy.asked[0][1]
    assert (context.trusted, str(context.sender), context.session_id, context.queue_id) == (
        True, "s@example.org", None, "AAAA")
    assert "AAAA" in sched._attempts and pool.jobs == []
    policy.asked[0][2].callback((Route("smtp", "[192.0.2.7]:2525"), "late"))
    assert pool.jobs == []          # the job waits for every recipient's route
    policy.asked[1][2].callback((None, None))
    [routed, built_in] = pool.jobs
    assert (routed.destination.host, routed.destination.port, routed.recipients) == (
        "192.0.2.7", 2525, ["a@example.net"])
    assert (built_in.destination.kind, built_in.recipients) == ("smarthost", ["b@example.net"])


def test_a_router_answering_after_a_drain_began_submits_nothing(tmp_path):
    sched, spool, pool, policy, clock = late_scheduler(tmp_path)
    spool.add("AAAA", ["a@example.net"])
    sched.startService()
    clock.advance(0)
    drained = sched.drain(30)
    assert not drained.called
    policy.asked[0][2].callback((None, None))
    assert pool.jobs == []
    assert drained.called
    record = spool.records["AAAA"]
    assert record["attempts"] == 0 and record["recipients"][0]["status"] != "sent"


def test_a_pipe_job_of_several_runs_may_take_a_timeout_per_run_and_none_is_repeated(
        tmp_path, far_ends):
    # Found in review: two runs of 1.8 s each passed the runner's 3 s
    # transport_timeout, and bob, already delivered, got it again at every
    # retry while carol never did.
    config, _ = site_config(tmp_path, far_ends)
    script = tmp_path / "slow.sh"
    runs = tmp_path / "runs.log"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\nsleep 1.8\necho \"$1\" >> {runs}\n")
    script.chmod(0o755)
    config["plugin:pipe"]["command.deliver"] = f"{script} {{recipient}}"
    config["plugin:pipe"]["timeout"] = "2.5"
    relay = RelayProcess(tmp_path, config).start()
    try:
        queue_id = send(relay, ["bob@example.net", "carol@example.net"])
        for recipient in ("bob@example.net", "carol@example.net"):
            wait_for_outcome(relay, queue_id, recipient, "sent")
        wait_until(lambda: removed(relay, queue_id), what="the message to leave the queue")
    finally:
        relay.stop()
    assert runs.read_text() == "bob@example.net\ncarol@example.net\n"


def test_a_pipe_timeout_kills_what_the_command_started_too(tmp_path):
    # Found in review: only the command's own pid was killed, and a child it
    # had started went on to deliver the message being deferred.  In a
    # process of its own: it runs a reactor of its own.
    mailbox = tmp_path / "mailbox"
    script = tmp_path / "wrapper.sh"
    script.write_text(f"#!/bin/sh\ncat >/dev/null\n/bin/sh -c 'sleep 1; echo late >> {mailbox}'\n")
    script.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import io, time
            from twisted.internet import reactor, task
            from relaymail.delivery.pipe import PipeTransport, Template

            class Message:
                queue_id = "Q1"
                sender = None
                envelope = type("Envelope", (), {{"body": "7BIT"}})
                def open(self):
                    return io.BytesIO(b"Subject: x\\r\\n\\r\\nhi\\r\\n")

            pipe = PipeTransport({{"deliver": Template("{script} {{recipient}}")}},
                                 {{"PATH": "/usr/bin:/bin"}}, timeout=0.3, reactor=reactor)

            async def main(reactor):
                outcome = await pipe.deliver(Message(), ["bob@example.net"], "deliver")
                print(outcome["bob@example.net"].kind, outcome["bob@example.net"].reason)
                await task.deferLater(reactor, 1.5, lambda: None)
            task.react(lambda reactor: __import__("twisted.internet.defer",
                       fromlist=["ensureDeferred"]).ensureDeferred(main(reactor)))
        """)], capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.stdout == "deferred pipe: command deliver: time limit exceeded\n", result.stderr
    assert not mailbox.exists()


def test_pipe_fields_give_the_local_part_unquoted_as_postfix_mailbox():
    from relaymail.delivery.pipe import _recipient_fields
    assert _recipient_fields('"john doe"@example.net') == {
        "recipient": '"john doe"@example.net', "local_part": "john doe",
        "domain": "example.net"}
    # Unquoted, a quoted "-x" is seen for what it is by the dash check.
    assert _recipient_fields('"-x"@example.net')["local_part"] == "-x"


class LimitedLMTP:
    """An LMTP server in a thread that takes two recipients a transaction
    (452 4.5.3 to the rest) and records each message's recipients.  On its
    first connection it stores the second message and then says nothing,
    as a mailbox server stuck after its write would."""

    def __init__(self):
        self.transactions = []      # [(connection number, recipients)]
        self._lock = threading.Lock()
        self._connections = 0
        self._sockets = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock, number):
        try:
            self._dialogue(sock, number)
        except OSError:
            pass        # the relay hung up

    def _dialogue(self, sock, number):
        lines = sock.makefile("rb")
        say = lambda *replies: sock.sendall(b"".join(r + b"\r\n" for r in replies))  # noqa: E731
        say(b"220 lmtp.test LMTP")
        taken, messages = [], 0
        with sock, lines:
            for line in lines:
                verb = line[:4].upper()
                if verb == b"LHLO":
                    say(b"250-lmtp.test", b"250-PIPELINING", b"250 ENHANCEDSTATUSCODES")
                elif verb == b"MAIL":
                    taken = []
                    say(b"250 2.1.0 Ok")
                elif verb == b"RCPT":
                    if len(taken) < 2:
                        taken.append(line.split(b"<")[1].split(b">")[0].decode())
                        say(b"250 2.1.5 Ok")
                    else:
                        say(b"452 4.5.3 Too many recipients")
                elif verb == b"DATA":
                    say(b"354 go ahead")
                    for body_line in lines:
                        if body_line == b".\r\n":
                            break
                    messages += 1
                    with self._lock:
                        self.transactions.append((number, taken))
                    if number == 1 and messages == 2:
                        lines.read()        # stuck: until the relay hangs up
                        return
                    say(*[b"250 2.0.0 Saved"] * len(taken))
                elif verb == b"QUIT":
                    say(b"221 2.0.0 Bye")
                    return
                else:
                    say(b"500 5.5.1 Unknown command")

    def stop(self):
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_an_lmtp_delivery_cut_by_transport_timeout_keeps_what_it_delivered(tmp_path, far_ends):
    # Found in review: the runner's timeout made every recipient deferred,
    # so r1 and r2, stored by the first transaction, were sent again at
    # the retry.  Five recipients, two a transaction; the server stalls
    # after storing the second message, for longer than transport_timeout.
    server = LimitedLMTP()
    config, _ = site_config(tmp_path, far_ends)
    config["plugin:siterouter"]["route.limit.test"] = f"lmtp 127.0.0.1:{server.port}"
    relay = RelayProcess(tmp_path, config).start()
    five = [f"r{n}@limit.test" for n in range(1, 6)]
    try:
        queue_id = send(relay, five)
        for recipient in five:
            wait_for_outcome(relay, queue_id, recipient, "sent")
        wait_until(lambda: removed(relay, queue_id), what="the message to leave the queue")
        log = relay.log()
    finally:
        relay.stop()
        server.stop()
    assert server.transactions == [(1, five[0:2]), (1, five[2:4]), (2, five[2:4]),
                                   (2, five[4:5])]
    for recipient in five[:2]:
        assert [o[2] for o in outcomes(relay, queue_id, recipient)] == ["sent"]
    cut = f"delivery by LMTP to 127.0.0.1:{server.port} cut short by a stop or [delivery] " \
          "transport_timeout"
    # r3 and r4 were sent and never answered, r5 was still waiting its
    # turn: each keeps its refusal from the first transaction, and why
    # it was not tried again.
    for recipient in five[2:]:
        assert outcomes(relay, queue_id, recipient)[0][1:] == (
            "4.5.3", "deferred", f"host 127.0.0.1:{server.port} said: 452 4.5.3 Too many "
                                 f"recipients (in reply to RCPT TO) ({cut})")
    assert f"{queue_id}: {cut}; 2 of 5 recipient(s) delivered" in log
    assert (f"{queue_id}: transport lmtp did not answer within 3s; keeping what it delivered "
            "before it was cut") in log


class CancelledByTheTimeoutTests(unittest.TestCase):
    """What the TransportRunner takes from a site transport that answers
    its cancellation at transport_timeout instead of failing."""

    def run_job(self, answer_on_cancel):
        class Site:
            name = "site"

            def deliver(self, message, recipients, next_hop):
                return defer.Deferred(lambda d: d.callback(answer_on_cancel(recipients)))

        registry = SimpleNamespace(get=lambda name: Site(), taking_jobs=lambda: [])
        runner = TransportRunner(reactor, registry, lambda job: object(), None, 2, 0.2)
        ended = defer.Deferred()
        job = Job(queue_id="Q1", destination=TransportHop("site"), sender="a@example.org",
                  recipients=["a@example.com", "b@example.com"], message_path="/nonexistent",
                  on_done=lambda job, outcomes: ended.callback(outcomes),
                  on_abandoned=lambda job: ended.errback(AssertionError("abandoned")))
        runner.submit(job)
        return ended

    async def test_deliveries_and_deferrals_it_gives_stand(self):
        outcomes = await self.run_job(lambda recipients: {
            "a@example.com": RecipientOutcome.delivered("stored", "2.0.0"),
            "b@example.com": RecipientOutcome.deferred("not yet", "4.2.0")})
        self.assertEqual([(o.address, o.status, o.enhanced, o.text) for o in outcomes], [
            ("a@example.com", SENT, "2.0.0", "stored"),
            ("b@example.com", DEFERRED, "4.2.0", "not yet")])

    async def test_nothing_bounces_on_a_cut(self):
        # Found by review: a transport whose errback turned what it did not
        # know into bounces bounced everyone at the timeout.
        outcomes = await self.run_job(lambda recipients: {
            r: RecipientOutcome.bounced("failed: CancelledError", "5.0.0") for r in recipients})
        self.assertEqual({(o.status, o.enhanced, o.text) for o in outcomes}, {
            (DEFERRED, "4.3.0", "transport site did not answer within 0.2s")})


class StoppedTests(unittest.TestCase):

    async def test_a_stop_with_nothing_delivered_calls_on_abandoned_with_the_job_alone(self):
        # As before the decided= keyword, which only a delivery gives.
        asked = []

        class Site:
            name = "site"

            def deliver(self, message, recipients, next_hop):
                asked.append(recipients)
                return defer.Deferred(lambda d: d.callback(
                    {r: RecipientOutcome.deferred("cut", "4.4.2") for r in recipients}))

        registry = SimpleNamespace(get=lambda name: Site(), taking_jobs=lambda: [])
        runner = TransportRunner(reactor, registry, lambda job: object(), None, 2, None)
        ended = defer.Deferred()
        job = Job(queue_id="Q1", destination=TransportHop("site"), sender="a@example.org",
                  recipients=["a@example.com"], message_path="/nonexistent",
                  on_done=lambda job, outcomes: ended.errback(AssertionError("done")),
                  on_abandoned=lambda job: ended.callback("abandoned"))
        runner.submit(job)
        while not asked:
            await task.deferLater(reactor, 0.01, lambda: None)
        runner.stop()
        self.assertEqual(await ended, "abandoned")


class _MailboxRoutes:
    """Routes example.net to the ``mbox`` transport."""

    routers_enabled = True

    def route(self, recipient, context):
        from relaymail.interfaces import Route
        if recipient.domain_key != "example.net":
            return defer.succeed((None, None))
        return defer.succeed((Route("mbox", None), "site"))


class _Mailbox:
    """A mailbox transport (no smtp behind it) answering as the test says."""

    name = "mbox"

    def __init__(self):
        self.calls = []

    def deliver(self, message, recipients, next_hop):
        d = defer.Deferred()
        self.calls.append(d)
        return d


class DeferredDuringADrainTests(unittest.TestCase):
    """A transport's real deferral during a stop's drain counts as an
    attempt; only smtp's "cut by a stop" for a job the drain would not
    start is left to the next start (found by review: every deferral was,
    so a mailbox that was full at every stop never reached its lifetime)."""

    timeout = 20

    def setUp(self):
        from pathlib import Path
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()

    @defer.inlineCallbacks
    def attempt(self, spool, now, stop, answer):
        """One start of a delivery worker whose ``mbox`` transport answers
        ``answer``, during a stop's drain when ``stop``."""
        from relaymail.delivery.routing import Router
        from relaymail.delivery.transports import TransportRegistry
        from relaymail.policy.threads import PluginThreads
        from relaymail.queue.scheduler import Scheduler
        from tests.support import make_settings
        settings = make_settings(self.tmp, delivery__smarthost="[127.0.0.1]:2526",
                                 queue__lifetime="25", queue__min_backoff="10",
                                 queue__max_backoff="10")
        mailbox = _Mailbox()
        runner = TransportRunner(reactor, TransportRegistry(reactor, settings, [mailbox]),
                                 lambda job: "the message", PluginThreads(reactor, 1), 1, None)
        scheduler = Scheduler(spool, DrainingPool(), Router(settings, resolver=object()),
                              settings, reactor, clock=lambda: now, policy=_MailboxRoutes(),
                              transports=runner)
        scheduler.startService()
        while not mailbox.calls:
            yield task.deferLater(reactor, 0.01, lambda: None)
        drained = scheduler.drain(10) if stop else None
        mailbox.calls[0].callback(answer)
        while scheduler._attempts:
            yield task.deferLater(reactor, 0.01, lambda: None)
        if drained is not None:
            yield drained
        scheduler.stopService()

    @defer.inlineCallbacks
    def test_a_mailbox_full_during_a_drain_is_counted_and_bounces_past_the_lifetime(self):
        from tests.test_scheduler import T0, Spool
        for stop in (False, True):
            (self.tmp / str(stop)).mkdir()
            spool = Spool(self.tmp / str(stop))
            spool.add("AAAA", ["a@example.net"])
            yield self.attempt(spool, T0 + 30, stop, {
                "a@example.net": RecipientOutcome.deferred("452 mailbox full", "4.2.2")})
            # Bounced 4.4.7, the DSN queued, with or without the stop.
            self.assertEqual(("AAAA" in spool.records, "DSN1" in spool.records), (False, True))

    @defer.inlineCallbacks
    def test_smtps_cut_by_the_drain_is_left_to_the_next_start(self):
        from relaymail.delivery.smtp_transport import CUT_BY_A_STOP
        from tests.test_scheduler import T0, Spool
        spool = Spool(self.tmp)
        spool.add("AAAA", ["a@example.net"])
        yield self.attempt(spool, T0 + 30, True, {
            "a@example.net": RecipientOutcome.deferred(CUT_BY_A_STOP, "4.4.2")})
        record = spool.records["AAAA"]
        self.assertEqual((record["attempts"], record["recipients"][0]["status"],
                          "DSN1" in spool.records), (0, "pending", False))
