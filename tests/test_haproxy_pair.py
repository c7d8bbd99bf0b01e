"""Two real relays behind Debian's HAProxy, run from etc/haproxy.cfg
(docs/scaling.rst).

HAProxy (installed by ``make test-tools``) passes each connection on with
a PROXY v2 header; each relay, on its own spool, delivers to a capture
server of its own.  Under load from ten concurrent clients one relay is
stopped with SIGTERM: nothing that got a 250 may be lost or found twice,
the clients it cut see a 4xx or a dropped connection, and HAProxy's
health checks send the rest of the load to the other relay."""

import email
import os
import re
import signal
import smtplib
import subprocess
import threading
import time

import pytest

from relaymail.config import load_config
from tests.nexthop import NextHop
from tests.relay_process import REPO, free_port
from tests.test_delivery import queue_empty, wait_until
from tests.test_processes import relay_with
from tests.test_stop_and_reload import no_alarming_lines

HAPROXY = "/usr/sbin/haproxy"
SHIPPED = os.path.join(REPO, "etc", "haproxy.cfg")

# The clients come from these loopback addresses, HAProxy from 127.0.0.1:
# a relay that logged 127.0.0.1 for a message would have logged HAProxy.
CLIENT_SOURCES = ("127.0.0.2", "127.0.0.3")
CLIENTS = 10
MESSAGES_PER_CLIENT = 20
# SIGTERM to the first relay once this many messages got their 250.
STOP_AFTER = 70


def haproxy():
    # Never a skip: `make test-tools` installs it, and a test run without
    # it has not tested the scale-out at all.
    assert os.access(HAPROXY, os.X_OK), f"{HAPROXY} is missing: apt-get install haproxy (make test-tools)"
    return HAPROXY


def seconds(value):
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 0.001}[unit]


def test_shipped_haproxy_config_is_valid_and_outwaits_the_relays_own_timeouts():
    result = subprocess.run([haproxy(), "-c", "-f", SHIPPED], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(SHIPPED) as f:
        text = f.read()
    limits = load_config(None).limits
    for side in ("client", "server"):
        timeout = seconds(re.search(rf"^\s*timeout {side} (\S+)$", text, re.M).group(1))
        assert timeout > max(limits.command_timeout, limits.data_timeout), side
    assert re.search(r"^\s*mode tcp$", text, re.M)
    assert re.search(r"^\s*balance leastconn$", text, re.M)
    assert re.search(r"^\s*option smtpchk EHLO \S+$", text, re.M)
    assert re.search(r"^\s*option redispatch", text, re.M)
    assert re.search(r"^\s*default-server check .*send-proxy-v2$", text, re.M)


def haproxy_config_for_the_test(frontend_port, nodes):
    """etc/haproxy.cfg for the test: loopback addresses, short intervals,
    the log on standard output, no chroot or user (the test may not be
    root).  Every line replaced must be there exactly once, so the test
    runs the shipped file and not a copy that drifted from it."""
    with open(SHIPPED) as f:
        text = f.read()
    servers = "".join(f"    server {name} 127.0.0.1:{port}\n" for name, port in nodes)
    for pattern, replacement in [
        (r"    log /dev/log local0\n", "    log stdout format raw local0\n"),
        (r"    chroot \S+\n", ""),
        (r"    user haproxy\n", ""),
        (r"    group haproxy\n", ""),
        (r"    bind :25\n", f"    bind 127.0.0.1:{frontend_port}\n"),
        (r"timeout connect 5s", "timeout connect 1s"),
        (r"timeout client 330s", "timeout client 20s"),
        (r"timeout server 330s", "timeout server 20s"),
        (r"timeout check 5s", "timeout check 1s"),
        (r"inter 2s fall 2 rise 3", "inter 100ms fall 1 rise 2"),
        (r"(    server \S+ \S+\n)+", servers),
    ]:
        text, count = re.subn(pattern, lambda _: replacement, text)
        assert count == 1, f"etc/haproxy.cfg no longer has {pattern!r} once"
    return text


class Outcomes:
    """What every client session ended with, as the clients saw it."""

    def __init__(self):
        self.queued = []        # (message_id, source, queue_id, started)
        self.deferred = []      # (message_id, what, started): a 4xx or a dropped connection
        self.wrong = []         # anything else: a 5xx, a hang, a traceback
        self.changed = threading.Condition()

    def add(self, kind, entry):
        with self.changed:
            getattr(self, kind).append(entry)
            self.changed.notify_all()


class Deferred(Exception):
    pass


def _expect(reply, code):
    got, text = reply
    if got == code:
        return text
    if 400 <= got < 500:
        raise Deferred(f"{got} {text.decode()}")
    raise AssertionError(f"{got} {text!r}, not {code}")


def send_one(port, source, message_id, outcomes):
    """One session through HAProxy from ``source``, one message."""
    started = time.monotonic()
    body = (f"Message-ID: <{message_id}>\r\nSubject: through haproxy\r\n\r\n"
            f"{message_id}\r\n" + "x" * 76 + "\r\n").encode()
    client = None
    try:
        client = smtplib.SMTP(timeout=15, source_address=(source, 0))
        _expect(client.connect("127.0.0.1", port), 220)
        _expect(client.ehlo("client.test"), 250)
        _expect(client.mail("alice@example.org"), 250)
        _expect(client.rcpt("bob@example.net"), 250)
        text = _expect(client.data(body), 250)
        queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]{16})", text).group(1).decode()
        outcomes.add("queued", (message_id, source, queue_id, started))
    except Deferred as error:
        outcomes.add("deferred", (message_id, str(error), started))
    except smtplib.SMTPResponseException as error:
        # smtplib raises for a DATA answered with anything but 354.
        kind = "deferred" if 400 <= error.smtp_code < 500 else "wrong"
        outcomes.add(kind, (message_id, f"{error.smtp_code} {error.smtp_error.decode()}", started))
    except (smtplib.SMTPServerDisconnected, ConnectionResetError, BrokenPipeError) as error:
        outcomes.add("deferred", (message_id, f"dropped: {error!r}", started))
    except Exception as error:      # reported by the test, not lost in a thread
        outcomes.add("wrong", (message_id, repr(error), started))
        return
    finally:
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                pass        # after the 250 a stopping relay says 421 and closes


def message_ids(relay, hop):
    """Message-IDs a relay holds: delivered to its capture server, or
    still in its spool."""
    found = [email.message_from_bytes(message["data"])["Message-ID"] for message in hop.messages]
    for directory in ("active", "hold"):
        path = os.path.join(relay.spool, directory)
        for name in sorted(os.listdir(path)):
            if name.endswith(".msg"):
                with open(os.path.join(path, name), "rb") as f:
                    found.append(email.message_from_bytes(f.read())["Message-ID"])
    return [value.strip("<>") for value in found]


@pytest.fixture
def hops():
    servers = [NextHop(), NextHop()]
    yield servers
    for server in servers:
        server.stop()


def node(tmp_path, name, hop):
    """A relay with a PROXY listener that believes only 127.0.0.1 (HAProxy)."""
    workdir = tmp_path / name
    workdir.mkdir()
    proxy_port = free_port()
    relay = relay_with(workdir, hop.port, inbound=1, delivery=1,
                       server={"proxy_listen": f"tcp:{proxy_port}:interface=127.0.0.1",
                               "proxy_trusted": "127.0.0.1/32", "shutdown_grace": "5"},
                       limits={"command_timeout": "10", "data_timeout": "10"})
    relay.proxy_port = proxy_port
    return relay


def test_two_relays_behind_haproxy_lose_nothing_when_one_stops_under_load(tmp_path, hops):
    relays = [node(tmp_path, "relay1", hops[0]), node(tmp_path, "relay2", hops[1])]
    frontend = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config_for_the_test(frontend, [("relay1", relays[0].proxy_port),
                                             ("relay2", relays[1].proxy_port)]))
    haproxy_log = tmp_path / "haproxy.log"
    balancer = None
    outcomes = Outcomes()
    try:
        for relay in relays:
            relay.start()
        with open(haproxy_log, "wb") as log:
            balancer = subprocess.Popen([haproxy(), "-db", "-f", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_until(lambda: _answers(frontend), what="haproxy to pass a session on")
        # Both relays seen healthy before the load, so both can take it.
        wait_until(lambda: all(re.search(r"unknown\[127\.0\.0\.1\]:\d+: connect trusted=yes",
                                         r.log())
                               for r in relays), what="a health check on each relay")

        def client(number):
            source = CLIENT_SOURCES[number % 2]
            for sequence in range(MESSAGES_PER_CLIENT):
                send_one(frontend, source, f"{number}.{sequence}@load.test", outcomes)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        with outcomes.changed:
            assert outcomes.changed.wait_for(lambda: len(outcomes.queued) >= STOP_AFTER, 30), \
                (len(outcomes.queued), outcomes.deferred, outcomes.wrong)
        relays[0].process.send_signal(signal.SIGTERM)
        relays[0].process.wait(20)
        stopped = time.monotonic()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        # The relay left running delivers everything it took.
        wait_until(lambda: queue_empty(relays[1]), timeout=30, what="relay2's queue to empty")
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for relay in relays:
            if relay.process is not None:
                relay.stop()
    # Every client session ended in a 250, or in a 4xx or a dropped
    # connection at the stop; none in anything else.
    assert outcomes.wrong == []
    assert len(outcomes.queued) + len(outcomes.deferred) == CLIENTS * MESSAGES_PER_CLIENT
    # A client meets the stop at most twice: the session it is in gets its
    # 421, and the next one may already sit in the closing listener's
    # backlog, handed over by HAProxy before it saw the port close.
    assert len(outcomes.deferred) <= 2 * CLIENTS, outcomes.deferred
    assert relays[0].process.returncode == -signal.SIGTERM
    # Once the stopped relay had gone, HAProxy sent every session to the
    # other one: none of them failed.
    assert [d for d in outcomes.deferred if d[2] > stopped] == []
    with open(haproxy_log, errors="replace") as f:
        balancer_log = f.read()
    assert re.search(r"Server relaymail/relay1 is DOWN", balancer_log), balancer_log
    assert "relaymail/relay2 is DOWN" not in balancer_log, balancer_log
    # Every message that got its 250 is held by exactly one relay, the one
    # that logged it queued, with the client's own address.
    held = [message_ids(relay, hop) for relay, hop in zip(relays, hops)]
    logs = [relay.log() for relay in relays]
    everything = held[0] + held[1]
    assert sorted(everything) == sorted(m for m, _, _, _ in outcomes.queued)
    for message_id, source, queue_id, _ in outcomes.queued:
        holder = 0 if message_id in held[0] else 1
        assert re.search(rf"\] [A-Z2-7]{{8}} unknown\[{re.escape(source)}\]:\d+: {queue_id}: "
                         r"queued from=<alice@example\.org> to=<bob@example\.net> size=\d+ ",
                         logs[holder]), queue_id
    assert len(held[0]) > 0 and len(held[1]) > 0
    for log in logs:
        clients = set(re.findall(r"\] [A-Z2-7]{8} unknown\[([^]]+)\]:\d+: \S+: queued from=", log))
        assert clients == set(CLIENT_SOURCES), clients
        # Health checks (a LOCAL header: HAProxy's own address stands) are
        # a connect and a disconnect line each, and nothing worse.
        from_balancer = re.findall(r"relaymail\.smtp#info\] [A-Z2-7]{8} "
                                   r"unknown\[127\.0\.0\.1\]:\d+: (\w+)", log)
        assert set(from_balancer) == {"connect", "disconnect"}, set(from_balancer)
        assert not re.search(r"bad PROXY header|not in proxy_trusted", log), log
        assert no_alarming_lines(log), log


def _answers(port):
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=5)
    except (OSError, smtplib.SMTPException):
        return False
    client.quit()
    return True
