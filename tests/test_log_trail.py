"""Logs an admin can follow (relaymail.smtp.session_id, relaymail.logobserver):
every line of a session carries its id and unknown[ip]:port, the queued
line ties the session to the queue id with HELO, Message-ID, AUTH user and
TLS, each delivery line carries the queue id, the relay and TLS, and
``[log] format = json`` writes the same fields one object a line."""

import json
import re
import smtplib
import ssl

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.names import client as names_client

from relaymail import logobserver
from relaymail.auth import passwords
from tests.certs import CertificateAuthority
from tests.test_delivery import wait_until
from tests.test_processes import relay_with

SESSION_ID = r"[A-Z2-7]{8}"


def tls_relay(tmp_path, nexthop, **sections):
    ca = CertificateAuthority()
    pair = ca.issue("relay.test", "127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    passwords.set_password(str(tmp_path / "passwd"), "alice", "correct horse")
    relay = relay_with(tmp_path, nexthop.port, inbound=2, delivery=1,
                       tls={"certificate": str(tmp_path / "cert.pem"),
                            "private_key": str(tmp_path / "key.pem")},
                       auth={"passwords": str(tmp_path / "passwd"), "failure_delay": "0.05"},
                       **sections)
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False
    return relay, context


def message(message_id):
    return f"Subject: trail\r\nMessage-ID: {message_id}\r\n\r\nbody\r\n"


def two_interleaved_sessions(relay, context):
    """Session A (STARTTLS, AUTH, two recipients) and session B (plain)
    from the same address, their commands interleaved; returns for each
    its client port and queue id."""
    a = smtplib.SMTP("127.0.0.1", relay.port)
    b = smtplib.SMTP("127.0.0.1", relay.port)
    a.ehlo("a.client.test")
    b.ehlo("b.client.test")
    a.starttls(context=context)
    a.ehlo("a.client.test")
    a.login("alice", "correct horse")
    a.mail("alice@example.org")
    b.mail("bob@example.org")
    a.rcpt("one@example.net")
    b.rcpt("three@example.net")
    a.rcpt("two@example.net")
    # What follows the id cannot pass for fields of the log line.
    code_b, reply_b = b.data(message("<b-1@client.test> auth=ceo tls=TLSv1.3"))
    code_a, reply_a = a.data(message("<a-1@client.test>"))
    assert code_a == code_b == 250
    ports = a.sock.getsockname()[1], b.sock.getsockname()[1]
    a.quit()
    b.quit()
    ids = [re.search(rb"queued as ([0-9A-Z]{16})", reply).group(1).decode()
           for reply in (reply_a, reply_b)]
    return list(zip(ports, ids))


def test_a_session_is_followed_through_the_log_by_its_id(tmp_path, nexthop):
    relay, context = tls_relay(tmp_path, nexthop)
    relay.start()
    try:
        (port_a, queue_a), (port_b, queue_b) = two_interleaved_sessions(relay, context)
        nexthop.wait_for(2)
        wait_until(lambda: relay.log().count(": removed") == 2, what="both deliveries")
    finally:
        relay.stop()
    log = relay.log()
    [queued_a] = [line for line in log.splitlines() if f"{queue_a}: queued" in line]
    session_a = re.search(rf"\] ({SESSION_ID}) unknown\[127\.0\.0\.1\]:{port_a}: ", queued_a).group(1)
    trail = [line.split("] ", 1)[1] for line in log.splitlines() if session_a in line]
    client_a = f"{session_a} unknown[127.0.0.1]:{port_a}"
    # Every line of the session, in order, each with the id and the client.
    assert [re.sub(r"\b(TLSv1\.3) \S+", r"\1 SUITE", line) for line in trail] == [
        f"{client_a}: connect trusted=yes",
        f"{client_a}: TLS TLSv1.3 SUITE",
        f"{client_a}: AUTH as alice",
        f"{client_a}: rcpt from=<alice@example.org> to=<one@example.net> by=relay-rule: 250 2.1.5 Ok",
        f"{client_a}: rcpt from=<alice@example.org> to=<two@example.net> by=relay-rule: 250 2.1.5 Ok",
        f"{client_a}: {queue_a}: queued from=<alice@example.org> "
        f"to=<one@example.net>,<two@example.net> size={len(message('<a-1@client.test>')) + 0} "
        "helo=<a.client.test> auth=alice tls=TLSv1.3 SUITE message-id=<a-1@client.test>",
        f"{client_a}: disconnect ehlo=2 starttls=1 auth=1 mail=1 rcpt=2 data=1 quit=1 "
        "commands=9",
    ], trail
    # The other session from the same address has its own id, none of A's lines.
    [queued_b] = [line for line in log.splitlines() if f"{queue_b}: queued" in line]
    session_b = re.search(rf"\] ({SESSION_ID}) unknown\[127\.0\.0\.1\]:{port_b}: ", queued_b).group(1)
    assert session_b != session_a
    assert queued_b.endswith(" helo=<b.client.test> message-id=<b-1@client.test>"), queued_b
    assert "auth=" not in queued_b and "tls=" not in queued_b
    # Each delivery line: queue id, relay, TLS (the next hop offers none).
    for queue_id, recipient in ((queue_a, "one"), (queue_a, "two"), (queue_b, "three")):
        assert re.search(rf"\] {queue_id}: to=<{recipient}@example\.net>, relay=127\.0\.0\.1"
                         rf"\[127\.0\.0\.1\]:{nexthop.port}, tls=none, delay=\S+, dsn=2\.0\.0, "
                         r"status=sent", log), log


def test_a_failed_connection_to_the_next_hop_names_the_message(tmp_path):
    from tests.relay_process import free_port
    from tests.test_delivery import send
    nobody = free_port()
    relay = relay_with(tmp_path, nobody, inbound=1, delivery=1)
    relay.start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: "status=deferred" in relay.log(), what="the deferral")
    finally:
        relay.stop()
    assert re.search(rf"\] {queue_id}: connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{nobody}: "
                     r"Connection refused\n", relay.log()), relay.log()


def test_json_lines_carry_the_same_fields(tmp_path, nexthop):
    relay, context = tls_relay(tmp_path, nexthop, log={"format": "json"})
    relay.start()
    try:
        (port_a, queue_a), _ = two_interleaved_sessions(relay, context)
        nexthop.wait_for(2)
        wait_until(lambda: relay.log().count(": removed") == 2, what="both deliveries")
    finally:
        relay.stop()
    records = [json.loads(line) for line in relay.log().splitlines()]
    [queued] = [r for r in records if r.get("queue_id") == queue_a and "helo" in r]
    assert queued["process"] in ("inbound.1", "inbound.2")
    assert queued["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", queued["time"])
    assert re.fullmatch(SESSION_ID, queued["session"])
    assert queued["client"] == f"unknown[127.0.0.1]:{port_a}"
    assert (queued["helo"], queued["message_id"], queued["auth"]) == (
        "a.client.test", "<a-1@client.test>", "alice")
    assert queued["recipients"] == ["one@example.net", "two@example.net"]
    assert queued["text"].startswith(f"{queued['session']} {queued['client']}: {queue_a}: queued ")
    sent = [r for r in records if r.get("queue_id") == queue_a and r.get("status") == "sent"]
    assert sorted(r["recipient"] for r in sent) == ["one@example.net", "two@example.net"]
    assert all(r["process"] == "delivery.0" and r["tls"] == "none"
               and r["relay"] == f"127.0.0.1[127.0.0.1]:{nexthop.port}" for r in sent)
    # The master's own lines are JSON too.
    assert any(r["text"].startswith("Started inbound.1 (pid ") and "process" not in r
               for r in records)


def test_the_resolvers_routine_lines_are_not_written(tmp_path):
    """twisted.names' resolver logs two lines whenever it reads resolv.conf."""
    import io
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    out, seen = io.StringIO(), []
    observer = logobserver.TextObserver(out)
    globalLogPublisher.addObserver(observer)
    globalLogPublisher.addObserver(seen.append)
    try:
        # A clock of its own: the re-read it schedules must not outlive the test.
        names_client.Resolver(resolv=str(conf), reactor=task.Clock())
    finally:
        globalLogPublisher.removeObserver(observer)
        globalLogPublisher.removeObserver(seen.append)
    assert len([e for e in seen if "message" in e]) == 3     # Twisted did log them...
    assert out.getvalue() == ""                             # ...and none is written
