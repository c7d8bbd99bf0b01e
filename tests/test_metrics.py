"""``[metrics] listen``: the Prometheus exposition at /metrics, scraped
over HTTP from the real relay after real SMTP sessions, with workers (the
master adds up the workers' files) and in one process."""

import base64
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relaymail.auth import passwords
from tests.certs import CertificateAuthority
from tests.nexthop import NextHop
from tests.relay_process import TWISTD, _env, free_port
from tests.test_delivery import send, wait_until
from tests.test_processes import relay_with, wait_for_worker, worker_pids


@pytest.fixture
def nexthop():
    server = NextHop()
    # later@ is refused for now: its message stays deferred.
    server.rcpt_reply = lambda address: ((451, "4.2.0 Try later") if "later@" in address
                                         else (250, "2.1.5 Ok"))
    yield server
    server.stop()


def metrics_relay(tmp_path, nexthop, workers, **sections):
    """A relay that relays only for example.com (the loopback client is
    not trusted), tries a deferred message again only after an hour, and
    serves metrics on a port of its own."""
    port = free_port()
    metrics = {"listen": f"tcp:{port}:interface=127.0.0.1", **sections.pop("metrics", {})}
    relay = relay_with(
        tmp_path, nexthop.port, inbound=workers, delivery=1,
        server={"trusted_networks": "192.0.2.0/24"},
        queue={"min_backoff": "1h", "max_backoff": "2h"}, metrics=metrics, **sections)
    relay.metrics_port = port
    return relay


def scrape(relay):
    """{(sample name, ((label, value), ...)): value} from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics",
                                timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for_value(relay, name, expected, **labels):
    """Scrape until ``name`` has ``expected`` (gauges are refreshed each
    second, the queue's listing every two); the last scrape."""
    return wait_for_scrape(relay, lambda samples: value(samples, name, **labels) == expected,
                           f"{name}{labels} == {expected}")


def wait_for_scrape(relay, predicate, what):
    seen = []

    def matches():
        seen[:] = [scrape(relay)]
        return predicate(seen[0])
    try:
        wait_until(matches, timeout=10, what=what)
    except AssertionError:
        shown = {key: number for key, number in seen[0].items() if "_bucket" not in key[0]}
        raise AssertionError(f"no scrape with {what}: the last had {shown}") from None
    return seen[0]


def wait_for_the_deferred_message(relay):
    """The delivery worker's count and the master's listing both show it."""
    return wait_for_scrape(
        relay, lambda samples: (
            value(samples, "relaymail_queue_messages", state="deferred") == 1
            and value(samples, "relaymail_queue_oldest_message_age_seconds") > 0),
        "one deferred message, listed")


def refused(relay, *recipients):
    """A session whose recipients are all refused; their replies."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("alice@example.com")
        return [client.rcpt(recipient) for recipient in recipients]


def traffic(relay, nexthop):
    """Three sessions besides the start's probe: one delivered message,
    one deferred, and one with two relay refusals and a syntax error."""
    send(relay, "alice@example.org", ["bob@example.com"])
    nexthop.wait_for(1)
    send(relay, "alice@example.org", ["later@example.com"])
    replies = refused(relay, "eve@example.net", "mallory@example.org", "not an address")
    assert [(code, text[:5]) for code, text in replies] == [
        (554, b"5.7.1"), (554, b"5.7.1"), (501, b"5.1.3")]


def traffic_counted(relay, nexthop):
    """Make the traffic, check what it counts; the scrape."""
    traffic(relay, nexthop)
    samples = wait_for_the_deferred_message(relay)
    # The start's probe (relay_process.RelayProcess.start) and three sessions.
    assert value(samples, "relaymail_smtp_connections_total") == 4
    assert value(samples, "relaymail_smtp_commands_total", verb="EHLO") == 3
    assert value(samples, "relaymail_smtp_commands_total", verb="MAIL") == 3
    assert value(samples, "relaymail_smtp_commands_total", verb="RCPT") == 5
    assert value(samples, "relaymail_smtp_commands_total", verb="DATA") == 2
    assert value(samples, "relaymail_smtp_commands_total", verb="QUIT") == 4
    assert value(samples, "relaymail_smtp_replies_total", code_class="5xx") == 3
    assert value(samples, "relaymail_smtp_replies_total", code_class="4xx") is None
    assert value(samples, "relaymail_smtp_recipients_accepted_total") == 2
    assert value(samples, "relaymail_smtp_recipients_rejected_total", reason="relay_denied") == 2
    assert value(samples, "relaymail_smtp_recipients_rejected_total", reason="bad_address") == 1
    assert value(samples, "relaymail_messages_queued_total") == 2
    assert value(samples, "relaymail_messages_delivered_total") == 1
    assert value(samples, "relaymail_messages_deferred_total") == 1
    assert value(samples, "relaymail_messages_bounced_total") == 0
    assert value(samples, "relaymail_delivery_latency_seconds_count") == 1
    assert value(samples, "relaymail_delivery_attempt_duration_seconds_count") == 2
    assert value(samples, "relaymail_queue_messages", state="active") == 0
    assert value(samples, "relaymail_queue_messages", state="hold") == 0
    assert value(samples, "relaymail_smtp_connections_open") == 0
    assert value(samples, "relaymail_queue_oldest_message_age_seconds") > 0
    # The domains plugin answered every RCPT that parsed.
    assert value(samples, "relaymail_plugin_call_duration_seconds_count",
                 plugin="domains", method="check_recipient") == 4
    return samples


def test_workers_metrics_add_up_across_processes_and_survive_a_killed_worker(tmp_path, nexthop):
    relay = metrics_relay(tmp_path, nexthop, workers=2).start()
    try:
        samples = traffic_counted(relay, nexthop)
        assert value(samples, "relaymail_worker_restarts_total", role="inbound") is None

        # A session held open, in whichever inbound worker took it.
        client = socket.create_connection(("127.0.0.1", relay.port), 5)
        assert client.recv(512).startswith(b"220 ")
        wait_for_value(relay, "relaymail_smtp_connections_open", 1)
        port = client.getsockname()[1]
        name = re.search(rf"\[(inbound\.\d) relaymail\.smtp#info\] [A-Z2-7]{{8}} "
                         rf"unknown\[127\.0\.0\.1\]:{port}: connect ", relay.log()).group(1)
        os.kill(worker_pids(relay, name)[-1], signal.SIGKILL)
        wait_for_worker(relay, name, 2)
        client.close()
        samples = wait_for_value(relay, "relaymail_worker_restarts_total", 1, role="inbound")
        # Its live gauge went with it; its counters stay counted.
        assert value(samples, "relaymail_smtp_connections_open") == 0
        assert value(samples, "relaymail_smtp_connections_total") == 5
        assert value(samples, "relaymail_messages_queued_total") == 2
    finally:
        relay.stop()


def test_one_process_serves_the_same_metrics(tmp_path, nexthop):
    relay = metrics_relay(tmp_path, nexthop, workers=0).start()
    try:
        traffic_counted(relay, nexthop)
    finally:
        relay.stop()


def test_a_named_directory_is_emptied_of_an_earlier_runs_files(tmp_path, nexthop):
    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = directory / "counter_99999.db"
    stale.write_bytes(b"\0" * 64)
    relay = metrics_relay(tmp_path, nexthop, workers=1, metrics={"directory": str(directory)})
    relay.start()
    try:
        assert not stale.exists()
        send(relay, "alice@example.org", ["bob@example.com"])
        samples = wait_for_value(relay, "relaymail_messages_delivered_total", 1)
        assert value(samples, "relaymail_messages_queued_total") == 1
        assert any(name.startswith("counter_") for name in os.listdir(directory))
    finally:
        relay.stop()


def test_two_metrics_endpoints_are_refused_in_one_line(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text("[metrics]\nlisten = tcp:9425, tcp:9426\n")
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "relaymail", "--config", str(config)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert (f"relaymail: {config}: [metrics] listen: one endpoint only, not 2"
            in result.stdout + result.stderr)


def test_tls_both_ways_and_a_failed_auth_are_counted(tmp_path):
    ca = CertificateAuthority()
    relay_pair, hop_pair = ca.issue("relay.test", "127.0.0.1"), ca.issue("nexthop.test", "127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(relay_pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(relay_pair.key_pem)
    passwords.set_password(str(tmp_path / "passwd"), "alice", "correct horse")
    hop = NextHop(starttls=hop_pair)
    relay = metrics_relay(
        tmp_path, hop, workers=2,
        tls={"certificate": str(tmp_path / "cert.pem"), "private_key": str(tmp_path / "key.pem")},
        auth={"passwords": str(tmp_path / "passwd"), "failure_delay": "0.05"})
    with open(relay.config) as f:
        text = f.read()
    with open(relay.config, "w") as f:
        # STARTTLS towards the next hop when it offers it.
        f.write(text.replace("smarthost_tls = none", "smarthost_tls = may"))
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
            client.starttls(context=ssl.create_default_context(cadata=ca.cert_pem.decode()))
            client.ehlo()
            wrong = base64.b64encode(b"\0alice\0wrong").decode()
            assert client.docmd("AUTH", f"PLAIN {wrong}") == (
                535, b"5.7.8 Error: authentication failed")
            client.sendmail("alice@example.org", ["bob@example.com"], b"Subject: t\r\n\r\nt\r\n")
        [message] = hop.wait_for(1)
        assert message["tls"]
        samples = wait_for_value(relay, "relaymail_tls_sessions_total", 1,
                                 direction="out", version="1.3")
    finally:
        relay.stop()
        hop.stop()
    assert value(samples, "relaymail_tls_sessions_total", direction="in", version="1.3") == 1
    assert value(samples, "relaymail_smtp_auth_failures_total") == 1


def test_without_a_metrics_listener_the_events_count_nothing():
    from relaymail.metrics import instruments
    before = instruments.CONNECTIONS._value.get()
    try:
        instruments.enable(False)
        instruments.connection_opened()
        assert instruments.CONNECTIONS._value.get() == before
        instruments.enable(True)
        instruments.connection_opened()
        assert instruments.CONNECTIONS._value.get() == before + 1
    finally:
        instruments.connection_closed()
        instruments.enable(True)


def test_a_named_directory_with_other_files_is_refused_and_they_stay(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "inventory.db").write_bytes(b"SQLite format 3\0")
    config = tmp_path / "relaymail.ini"
    config.write_text(f"[metrics]\nlisten = tcp:0:interface=127.0.0.1\ndirectory = {directory}\n"
                      f"[queue]\npath = {tmp_path / 'spool'}\n")
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "relaymail", "--config", str(config)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert (f"relaymail: {config}: [metrics] directory: {directory} holds inventory.db, which "
            "is not a relaymail metrics file: give the metrics a directory of their own") in output
    assert (directory / "inventory.db").read_bytes() == b"SQLite format 3\0"
