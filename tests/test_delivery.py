"""Queue and delivery end to end: the real relay process, a real next hop,
real files, retries, bounces and crashes."""

import email
import email.policy
import functools
import os
import re
import signal
import smtplib
import time

import pytest

from tests import certs
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess, free_port


def relay_with(tmp_path, nexthop_port, **sections):
    config = {
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{nexthop_port}", "smarthost_tls": "none",
                     "connect_timeout": "2", "command_timeout": "5", "data_timeout": "5"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return RelayProcess(tmp_path, config)


def send(relay, sender, recipients, body=b"Subject: test\r\n\r\nhello\r\n"):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail(sender)
        for recipient in recipients:
            client.rcpt(recipient)
        code, text = client.data(body)
    assert code == 250, text
    return re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()


def wait_until(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def queue_empty(relay):
    return not relay.queued_ids()


def test_message_is_relayed_to_the_smarthost_and_leaves_the_queue(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net", "carol@example.com"])
        [message] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert message["sender"] == "alice@example.org"
    assert message["recipients"] == ["bob@example.net", "carol@example.com"]
    assert message["helo"] == "relay.test"
    assert message["mail"].startswith("MAIL FROM:<alice@example.org> SIZE=")
    assert message["data"].startswith(b"Received: from client.test ([127.0.0.1])\r\n"
                                      b"\tby relay.test (relaymail) with ESMTP id " + queue_id.encode())
    assert message["data"].endswith(b"\r\nSubject: test\r\n\r\nhello\r\n")
    assert re.search(queue_id + r": to=<bob@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                     + str(nexthop.port) + r", tls=none, delay=\d+\.\d\d, dsn=2\.0\.0, status=sent "
                     r"\(250 2\.0\.0 Ok: queued\)", log)


def test_temporary_failure_is_retried_after_min_backoff(tmp_path, nexthop):
    replies = iter([(451, "4.3.0 Try again later")])
    nexthop.rcpt_reply = lambda address: next(replies, (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        first = time.monotonic()
        nexthop.wait_for(1)
        waited = time.monotonic() - first
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert waited >= 0.9
    assert re.search(queue_id + r": to=<bob@example\.net>, .*dsn=4\.3\.0, status=deferred "
                     r"\(451 4\.3\.0 Try again later\)", log)
    assert re.search(queue_id + r": to=<bob@example\.net>, .*status=sent", log)


def test_connection_refused_is_retried_until_the_next_hop_is_up(tmp_path):
    port = free_port()
    relay = relay_with(tmp_path, port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: read_record(relay, queue_id)["attempts"] == 1, what="a recorded deferral")
        record = read_record(relay, queue_id)
        assert record["recipients"][0]["status"] == "deferred"
        assert record["attempts"] == 1
        assert "4.4.1" in record["recipients"][0]["last_error"]
        server = NextHop(port=port)
        try:
            [message] = server.wait_for(1)
        finally:
            server.stop()
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
    assert message["recipients"] == ["bob@example.net"]


def read_record(relay, queue_id):
    return relay.record(queue_id)


def dsn_parts(message):
    parsed = email.message_from_bytes(message["data"], policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = list(parsed.iter_parts())
    return parsed, parts


def test_permanent_failure_bounces_to_the_sender_with_a_dsn(tmp_path, nexthop):
    nexthop.rcpt_reply = lambda address: (
        (550, "5.1.1 User unknown") if address.startswith("nobody") else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["nobody@example.net", "bob@example.net"])
        messages = nexthop.wait_for(2)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
    delivered, bounce = messages
    assert delivered["recipients"] == ["bob@example.net"]
    assert bounce["sender"] == "" and bounce["recipients"] == ["alice@example.org"]
    parsed, parts = dsn_parts(bounce)
    assert parsed["To"] == "alice@example.org"
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].get_payload()
    per_recipient = status[1]
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; 127.0.0.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert b"Subject: test" in parts[2].get_payload(decode=True) or "Subject: test" in str(parts[2])
    assert queue_id


def test_a_hostile_reply_cannot_forge_log_lines_or_dsn_fields(tmp_path, nexthop):
    # U+2028 and NEL break a line for str.splitlines(); CR, ESC (an OSC 52
    # clipboard write, a clear screen) and BEL are C0.  The next hop sends
    # them as UTF-8 in its refusals.
    hostile = {"nobody": "5.1.1 no\u2028ID: to=<x>, status=sent",
               "noone": "5.1.1 a\x85b\x1b]52;c;aGk=\x07c\rd\x1b[2J\x9b"}
    nexthop.rcpt_reply = lambda address: (
        (550, hostile[address.split("@")[0]]) if address.endswith(".net") else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["nobody@example.net", "noone@example.net"])
        [bounce] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
    with open(relay.log_path, "rb") as f:
        log = f.read().decode("utf-8")
    lines = log.split("\n")
    assert all(line.splitlines() == [line] for line in lines if line)
    # Each reply is inside its delivery line, and nowhere else.
    [forged] = [line for line in lines if "to=<x>" in line]
    assert f"{queue_id}: to=<nobody@example.net>, relay=127.0.0.1[127.0.0.1]:" in forged
    assert forged.endswith(", dsn=5.1.1, status=bounced "
                           "(550 5.1.1 no\\x{2028}ID: to=<x>, status=sent)")
    [other] = [line for line in lines if "aGk=" in line]
    assert f"{queue_id}: to=<noone@example.net>, relay=127.0.0.1[127.0.0.1]:" in other
    assert other.endswith(", dsn=5.1.1, status=bounced "
                          "(550 5.1.1 a\\x{85}b\\x{1B}]52;c;aGk=\\x{7}c\\x{D}d\\x{1B}[2J\\x{9B})")
    data = bounce["data"]
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n", data)
    assert data.isascii()
    _, parts = dsn_parts(bounce)
    first, second = parts[1].get_payload()[1:]
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 no\\x{2028}ID: to=<x>, status=sent"
    assert second["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 a\\x{85}b\\x{1B}]52;c;aGk=\\x{7}c\\x{D}d\\x{1B}[2J\\x{9B}")


def rcpts(server):
    return [command for command in server.commands if command.startswith("RCPT")]


def test_a_bounce_from_the_null_sender_goes_to_the_postmaster_not_to_null(tmp_path, nexthop):
    nexthop.rcpt_reply = lambda address: (
        (550, "5.1.1 User unknown") if address == "nobody@example.net" else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "<>", ["nobody@example.net"])
        [notice] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert "bounce not sent" not in log
    assert re.search(queue_id + r": postmaster double bounce: [0-9A-Z]+ to <postmaster@example\.com>",
                     log)
    assert (notice["sender"], notice["recipients"]) == ("", ["postmaster@example.com"])
    assert notice["mail"].startswith("MAIL FROM:<> SIZE=")
    parsed, parts = dsn_parts(notice)
    assert parsed["To"] == "postmaster@example.com"
    assert parsed["Subject"] == "Undeliverable Mail Notification (Postmaster Copy)"
    per_recipient = parts[1].get_payload()[1]
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@example.net"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert rcpts(nexthop) == ["RCPT TO:<nobody@example.net>", "RCPT TO:<postmaster@example.com>"]


def test_an_undeliverable_bounce_goes_once_to_the_aliased_postmaster(tmp_path, nexthop):
    aliases = tmp_path / "aliases"
    aliases.write_text("postmaster: ops@example.net\n")
    refused = {"nobody@example.net", "alice@example.org"}
    nexthop.rcpt_reply = lambda address: (
        (550, "5.1.1 User unknown") if address in refused else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port,
                       plugins={"recipients": "aliases domains", "expanders": "aliases"},
                       **{"plugin:aliases": {"file": str(aliases)}}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["nobody@example.net"])
        [notice] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    bounce_id = re.search(queue_id + r": sender bounce: ([0-9A-Z]+)", log).group(1)
    assert re.search(bounce_id + r": postmaster double bounce: [0-9A-Z]+ to <ops@example\.net>", log)
    # The sender's bounce failed; its copy went to the postmaster's alias, once.
    assert rcpts(nexthop) == ["RCPT TO:<nobody@example.net>", "RCPT TO:<alice@example.org>",
                              "RCPT TO:<ops@example.net>"]
    assert (notice["sender"], notice["recipients"]) == ("", ["ops@example.net"])
    assert notice["mail"].startswith("MAIL FROM:<> SIZE=")
    assert len(nexthop.messages) == 1
    parsed, parts = dsn_parts(notice)
    assert parsed["To"] == "postmaster@example.com"
    per_recipient = parts[1].get_payload()[1]
    assert per_recipient["Final-Recipient"] == "rfc822; alice@example.org"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    # The header section returned is the bounce's own: to alice, about nobody.
    returned = parts[2].get_payload(decode=True) or str(parts[2]).encode()
    assert b"To: alice@example.org" in returned


def test_a_failed_double_bounce_is_logged_and_discarded(tmp_path, nexthop):
    nexthop.rcpt_reply = lambda address: (550, "5.1.1 User unknown")
    relay = relay_with(tmp_path, nexthop.port).start()
    try:
        queue_id = send(relay, "alice@example.org", ["nobody@example.net"])
        wait_until(lambda: "double bounce discarded" in relay.log(), what="the discard")
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    bounce_id = re.search(queue_id + r": sender bounce: ([0-9A-Z]+)", log).group(1)
    double_id = re.search(bounce_id + r": postmaster double bounce: ([0-9A-Z]+) to "
                          r"<postmaster@example\.com>", log).group(1)
    assert (f"{double_id}: double bounce discarded: undeliverable to the postmaster "
            "<postmaster@example.com> too") in log
    # Three messages, one try each, then nothing: no loop.
    assert rcpts(nexthop) == ["RCPT TO:<nobody@example.net>", "RCPT TO:<alice@example.org>",
                              "RCPT TO:<postmaster@example.com>"]
    assert nexthop.messages == []
    assert relay.active_files() == []


def test_expired_message_bounces_with_4_4_7(tmp_path):
    port = free_port()
    relay = relay_with(tmp_path, port, queue={"lifetime": "2"}).start()
    try:
        send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: "status=deferred" in relay.log(), what="a deferral")
        server = NextHop(port=port)
        try:
            server.rcpt_reply = lambda address: (
                (451, "4.7.1 Greylisted") if address == "bob@example.net" else (250, "2.1.5 Ok"))
            [bounce] = server.wait_for(1)
        finally:
            server.stop()
    finally:
        relay.stop()
    assert bounce["recipients"] == ["alice@example.org"]
    _, parts = dsn_parts(bounce)
    per_recipient = parts[1].get_payload()[1]
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.4.7"


def test_sigkill_after_250_loses_nothing(tmp_path):
    port = free_port()
    relay = relay_with(tmp_path, port).start()
    queue_id = send(relay, "alice@example.org", ["bob@example.net"], b"Subject: survive\r\n\r\nkeep me\r\n")
    relay.stop(signal.SIGKILL)
    server = NextHop(port=port)
    try:
        restarted = relay_with(tmp_path, port)
        restarted.start()
        try:
            [message] = server.wait_for(1)
            wait_until(lambda: queue_empty(restarted), what="the queue to empty")
        finally:
            restarted.stop()
    finally:
        server.stop()
    assert message["data"].endswith(b"Subject: survive\r\n\r\nkeep me\r\n")
    assert queue_id.encode() in message["data"]


def test_after_a_crash_only_undelivered_recipients_are_tried_again(tmp_path):
    up = NextHop()
    down_port = free_port()
    routes = {"routes": {"example.net": f"[127.0.0.1]:{up.port}",
                         "example.org": f"[127.0.0.1]:{down_port}"}}
    relay = relay_with(tmp_path, down_port, **routes).start()
    try:
        queue_id = send(relay, "alice@example.com", ["bob@example.net", "dave@example.org"])
        up.wait_for(1)

        def recorded():
            statuses = {r["address"]: r["status"] for r in read_record(relay, queue_id)["recipients"]}
            return statuses == {"bob@example.net": "sent", "dave@example.org": "deferred"}
        wait_until(recorded, what="per-recipient state on disk")
        relay.stop(signal.SIGKILL)
        down = NextHop(port=down_port)
        restarted = relay_with(tmp_path, down_port, **routes).start()
        try:
            [second] = down.wait_for(1)
            wait_until(lambda: queue_empty(restarted), what="the queue to empty")
        finally:
            restarted.stop()
            down.stop()
    finally:
        up.stop()
    assert second["recipients"] == ["dave@example.org"]
    assert len(up.messages) == 1


def queue_tool(relay, *args):
    """relaymail-queue against the running relay (through its control socket)."""
    import subprocess
    import sys
    from tests.relay_process import REPO
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "relaymail.tools.queue_tool", "--config", relay.config,
                           *args], capture_output=True, text=True, env=env, timeout=60)


def test_queue_tool_while_the_relay_runs(tmp_path):
    port = free_port()
    relay = relay_with(tmp_path, port, queue={"min_backoff": "3600", "max_backoff": "3600"}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: read_record(relay, queue_id)["attempts"] == 1, what="a recorded deferral")
        listing = queue_tool(relay, "list")
        assert listing.returncode == 0, listing.stderr
        [_header, line, error, recipient, summary] = listing.stdout.splitlines()
        assert line.startswith(f"{queue_id}  deferred ") and line.endswith("  alice@example.org")
        assert error.startswith(" " * 18 + "(") and "4.4.1" in error
        assert recipient == " " * 18 + "bob@example.net"
        assert summary == "-- 1 Kbytes in 1 message, 0 held."

        held = queue_tool(relay, "hold", queue_id)
        assert (held.returncode, held.stdout.strip()) == (0, f"{queue_id} on hold")
        assert relay.queued_ids("hold") == [queue_id]
        assert queue_tool(relay, "list").stdout.splitlines()[1].startswith(f"{queue_id}  hold ")
        retried = queue_tool(relay, "retry", queue_id)
        assert retried.returncode == 1 and "on hold" in retried.stdout + retried.stderr

        # The next hop comes up; release makes the message due at once,
        # although its backoff has an hour to go.
        server = NextHop(port=port)
        try:
            released = queue_tool(relay, "release", queue_id)
            assert (released.returncode, released.stdout.strip()) == (0, f"{queue_id} released")
            [message] = server.wait_for(1)
            assert message["recipients"] == ["bob@example.net"]
            wait_until(lambda: queue_empty(relay), what="the queue to empty")

            # flush: a deferred message is tried again now.
            server.rcpt_reply = lambda address: (451, "4.7.1 Later")
            second = send(relay, "alice@example.org", ["carol@example.net"])
            wait_until(lambda: read_record(relay, second)["attempts"] == 1, what="a deferral")
            server.rcpt_reply = lambda address: (250, "2.1.5 Ok")
            flushed = queue_tool(relay, "flush")
            assert (flushed.returncode, flushed.stdout.strip()) == (0, "1 message due now")
            server.wait_for(2)

            # delete: gone from the queue, never delivered.
            server.rcpt_reply = lambda address: (451, "4.7.1 Later")
            third = send(relay, "alice@example.org", ["dave@example.net"])
            wait_until(lambda: read_record(relay, third)["attempts"] == 1, what="a deferral")
            deleted = queue_tool(relay, "delete", third)
            assert (deleted.returncode, deleted.stdout.strip()) == (0, f"{third} deleted")
            wait_until(lambda: queue_empty(relay), what="the queue to empty")
            missing = queue_tool(relay, "delete", third)
            assert missing.returncode == 1

            # delete ALL, including a held message.
            fourth = send(relay, "alice@example.org", ["erin@example.net"])
            fifth = send(relay, "alice@example.org", ["frank@example.net"])
            wait_until(lambda: read_record(relay, fifth)["attempts"] == 1, what="a deferral")
            assert queue_tool(relay, "hold", fourth).returncode == 0
            everything = queue_tool(relay, "delete", "ALL")
            assert (everything.returncode, everything.stdout.strip()) == (0, "2 messages deleted")
            assert queue_tool(relay, "list").stdout.strip() == "-- 0 Kbytes in 0 messages, 0 held."
        finally:
            server.stop()
    finally:
        relay.stop()


def test_delay_warning_is_sent_once(tmp_path, nexthop):
    nexthop.rcpt_reply = lambda address: (
        (451, "4.2.2 Mailbox full") if address == "bob@example.net" else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port, queue={"delay_warning": "1"}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        [warning] = nexthop.wait_for(1)
        assert (warning["sender"], warning["recipients"]) == ("", ["alice@example.org"])
        parsed, parts = dsn_parts(warning)
        assert parsed["Subject"] == "Delayed Mail (still being retried)"
        per_recipient = parts[1].get_payload()[1]
        assert (per_recipient["Action"], per_recipient["Status"]) == ("delayed", "4.2.2")
        assert per_recipient["Will-Retry-Until"]
        # Further retries send no second warning.
        wait_until(lambda: read_record(relay, queue_id)["attempts"] >= 3, what="more retries")
        assert len(nexthop.messages) == 1
    finally:
        relay.stop()


# -- our own side: credentials, soft_bounce, implicit TLS ---------------------------------

@functools.cache
def authority():
    return certs.CertificateAuthority()


def ca_file(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(authority().cert_pem)
    return str(path)


def queued_ids(relay):
    return relay.queued_ids()


def test_wrong_smarthost_password_defers_until_it_works(tmp_path):
    server = NextHop(starttls=authority().issue("127.0.0.1"), passwords={"relay": "right"})
    password = tmp_path / "password"
    password.write_text("wrnog\n")
    relay = relay_with(tmp_path, server.port, delivery={
        "smarthost_tls": "verify", "tls_ca_file": ca_file(tmp_path),
        "smarthost_user": "relay", "smarthost_password_file": str(password)}).start()
    remote = f"127.0.0.1[127.0.0.1]:{server.port}"
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: read_record(relay, queue_id)["attempts"] >= 1, what="a deferral")
        entry = read_record(relay, queue_id)["recipients"][0]
        assert entry["status"] == "deferred"
        reason = (f"SASL authentication (PLAIN) failed; server {remote} said: 535 5.7.8 "
                  "Authentication credentials invalid (deferred: a problem on our side, "
                  "not with the recipient)")
        assert entry["last_error"] == f"4.7.8 {reason} (from {remote})"
        assert queued_ids(relay) == [queue_id]      # no DSN queued
        assert f"dsn=4.7.8, status=deferred ({reason})" in relay.log()
        assert server.messages == []
        # The provider's password is changed to the one we have.
        server.passwords = {"relay": "wrnog"}
        [message] = server.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
        server.stop()
    assert (message["sender"], message["recipients"]) == ("alice@example.org", ["bob@example.net"])
    assert (message["tls"], message["user"]) == (True, "relay")
    assert "sender bounce" not in log and "status=bounced" not in log


def test_soft_bounce_keeps_a_550_queued(tmp_path, nexthop):
    refusing = [True]
    nexthop.rcpt_reply = lambda address: (
        (550, "5.1.1 User unknown") if refusing[0] else (250, "2.1.5 Ok"))
    relay = relay_with(tmp_path, nexthop.port, delivery={"soft_bounce": "yes"}).start()
    remote = f"127.0.0.1[127.0.0.1]:{nexthop.port}"
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: read_record(relay, queue_id)["attempts"] >= 2, what="two deferrals")
        entry = read_record(relay, queue_id)["recipients"][0]
        assert entry["status"] == "deferred"
        assert entry["last_error"] == ("4.1.1 550 5.1.1 User unknown; soft_bounce = yes: "
                                       f"deferred, not bounced (from {remote})")
        assert queued_ids(relay) == [queue_id]      # no DSN queued
        assert (f"{queue_id}: to=<bob@example.net>, relay={remote}" in relay.log())
        assert re.search(r"dsn=4\.1\.1, status=deferred \(550 5\.1\.1 User unknown; "
                         r"soft_bounce = yes: deferred, not bounced\)", relay.log())
        assert nexthop.messages == []
        refusing[0] = False
        [message] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert message["recipients"] == ["bob@example.net"]
    assert "status=bounced" not in log and "sender bounce" not in log


TRICKY_BODY = (b"Subject: over TLS\r\n\r\n.a line starting with a dot\r\n.\r\n..two dots\r\n"
               + b"x" * 990 + b"\r\n" + "caf\u00e9 \u2603\r\n".encode() + b"last line\r\n")
RECEIVED = (rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby relay\.test \(relaymail\) "
            rb"with E?SMTPS? id %s(?:[^\r\n]|\r\n[ \t])*\r\n")


def test_wrapper_smarthost_and_route_deliver_over_implicit_tls_byte_exact(tmp_path):
    server = NextHop(implicit_tls=authority().issue("127.0.0.1"))
    hop = f"[127.0.0.1]:{server.port}"
    relay = relay_with(tmp_path, server.port,
                       delivery={"smarthost_tls": "wrapper", "tls_ca_file": ca_file(tmp_path)},
                       routes={"example.net": hop}, route_tls={"example.net": "wrapper"}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net", "carol@example.org"],
                        TRICKY_BODY)
        messages = server.wait_for(2)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
        server.stop()
    # One session for the route, one for the smarthost: both TLS from the
    # first byte, no STARTTLS inside.
    assert sorted(m["recipients"][0] for m in messages) == ["bob@example.net", "carol@example.org"]
    assert not [c for c in server.commands if c.upper().startswith("STARTTLS")]
    for message in messages:
        assert message["tls"] is True
        data = message["data"]
        assert data.endswith(TRICKY_BODY)
        assert re.fullmatch(RECEIVED % queue_id.encode(), data[:-len(TRICKY_BODY)]), data[:300]


def test_a_parent_domain_route_delivers_mail_for_a_subdomain_to_its_next_hop(tmp_path):
    server = NextHop()
    # The smarthost is a port where nobody listens: only the route delivers.
    relay = relay_with(tmp_path, free_port(),
                       routes={".corp.test": f"[127.0.0.1]:{server.port}"}).start()
    try:
        queue_id = send(relay, "alice@example.com", ["bob@hq.corp.test"])
        messages = server.wait_for(1)
        wait_until(lambda: not queued_ids(relay), what="the queue to empty")
    finally:
        relay.stop()
        server.stop()
    assert messages[0]["recipients"] == ["bob@hq.corp.test"]
    assert f"with ESMTP id {queue_id}".encode() in messages[0]["data"]


def test_wrapper_route_with_an_untrusted_certificate_defers(tmp_path):
    server = NextHop(implicit_tls=certs.self_signed("127.0.0.1"))
    relay = relay_with(tmp_path, server.port, delivery={"tls_ca_file": ca_file(tmp_path)},
                       routes={"example.net": f"[127.0.0.1]:{server.port}"},
                       route_tls={"example.net": "wrapper"}).start()
    remote = f"127.0.0.1[127.0.0.1]:{server.port}"
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        wait_until(lambda: read_record(relay, queue_id)["attempts"] >= 2, what="two deferrals")
        entry = read_record(relay, queue_id)["recipients"][0]
        log = relay.log()
        files = queued_ids(relay)
    finally:
        relay.stop()
        server.stop()
    assert entry["status"] == "deferred"
    assert entry["last_error"] == (
        f"4.7.5 TLS handshake with {remote} failed: server certificate verification failed: "
        f"untrusted or invalid certificate chain (from {remote})")
    assert files == [queue_id]
    assert "status=bounced" not in log
    assert server.messages == [] and server.commands == []


# -- a next hop without 8BITMIME or SMTPUTF8 (RFC 6152 3, RFC 6531 3.2) -------------------

SEVEN_BIT_EXTENSIONS = ("PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 100000000")


@pytest.fixture
def seven_bit_hop():
    server = NextHop(extensions=SEVEN_BIT_EXTENSIONS)
    yield server
    server.stop()


def send_with(relay, sender, recipients, body, options=()):
    """Like send(), with MAIL parameters (smtplib then sends UTF-8 commands
    when SMTPUTF8 is one of them)."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        code, text = client.mail(sender, options=list(options))
        assert code == 250, text
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, text
        code, text = client.data(body)
    assert code == 250, text
    return re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]+)", text).group(1).decode()


def test_undeclared_8bit_text_arrives_quoted_printable(tmp_path, seven_bit_hop):
    # msmtp and Exim send 8-bit text without BODY=8BITMIME.
    body = "Subject: test\r\n\r\nCafé crème, naïve = ok \r\n.\r\n..end\r\n".encode()
    relay = relay_with(tmp_path, seven_bit_hop.port).start()
    try:
        send_with(relay, "alice@example.org", ["bob@example.net"], body)
        [message] = seven_bit_hop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
    data = message["data"]
    assert message["mail"] == f"MAIL FROM:<alice@example.org> SIZE={len(data)}"
    assert data.isascii()
    assert data.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert data.endswith(b"\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
                         b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                         b"Caf=C3=A9 cr=C3=A8me, na=C3=AFve =3D ok=20\r\n"
                         b"=2E\r\n..end\r\n")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n") == "Café crème, naïve = ok \n.\n..end\n"


SEVEN_BIT_PART = (b"--=_b\r\nContent-Type: text/plain; charset=us-ascii\r\n"
                  b"Content-Transfer-Encoding: 7bit\r\n\r\n"
                  b"plain ASCII,  spaced   and trailing \r\n.leading dot\r\n")


def test_multipart_keeps_its_7bit_part_byte_for_byte(tmp_path, seven_bit_hop):
    body = (b"Subject: parts\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n"
            + SEVEN_BIT_PART +
            b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n\xc3\x9cbergr\xc3\xb6\xc3\x9fe\r\n"
            b"--=_b--\r\n")
    relay = relay_with(tmp_path, seven_bit_hop.port).start()
    try:
        send_with(relay, "alice@example.org", ["bob@example.net"], body)
        [message] = seven_bit_hop.wait_for(1)
    finally:
        relay.stop()
    data = message["data"]
    assert data.isascii()
    assert SEVEN_BIT_PART in data
    assert data.endswith(b"\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
                         b"Content-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n"
                         + SEVEN_BIT_PART +
                         b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                         b"=C3=9Cbergr=C3=B6=C3=9Fe\r\n--=_b--\r\n")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert [part.get_content() for part in parsed.iter_parts()] == [
        "plain ASCII,  spaced   and trailing \r\n.leading dot", "Übergröße"]


def test_8bit_inside_multipart_signed_bounces_5_6_3(tmp_path, seven_bit_hop):
    body = (b"Subject: signed\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed;"
            b" protocol=\"application/pgp-signature\"; micalg=pgp-sha256; boundary=s\r\n\r\n"
            b"--s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nsign\xc3\xa9\r\n"
            b"--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
    relay = relay_with(tmp_path, seven_bit_hop.port).start()
    try:
        queue_id = send_with(relay, "alice@example.org", ["bob@example.net"], body)
        [bounce] = seven_bit_hop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    # Nothing but the bounce reached the next hop.
    assert (bounce["sender"], bounce["recipients"]) == ("", ["alice@example.org"])
    _, parts = dsn_parts(bounce)
    per_recipient = parts[1].get_payload()[1]
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.6.3")
    note = " ".join(parts[0].get_content().split())
    assert ("Reason: the next mail server cannot take the message's 8-bit or binary content, "
            "and the message could not be converted (status 5.6.3).") in note
    assert re.search(
        queue_id + r": to=<bob@example\.net>, .*dsn=5\.6\.3, status=bounced \(message "
        r"has 8-bit content inside a signed part \(multipart/signed\), and "
        r"127\.0\.0\.1\[127\.0\.0\.1\]:" + str(seven_bit_hop.port) + r" does not offer 8BITMIME",
        log)


def test_ascii_smtputf8_mail_arrives_without_smtputf8(tmp_path, seven_bit_hop):
    relay = relay_with(tmp_path, seven_bit_hop.port).start()
    try:
        send_with(relay, "alice@example.org", ["bob@example.net"],
                  b"Subject: test\r\n\r\nhello\r\n", options=["SMTPUTF8"])
        [message] = seven_bit_hop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
    finally:
        relay.stop()
    data = message["data"]
    assert message["mail"] == f"MAIL FROM:<alice@example.org> SIZE={len(data)}"
    assert message["recipients"] == ["bob@example.net"]
    assert b"with UTF8SMTP id" in data
    assert data.endswith(b"\r\nSubject: test\r\n\r\nhello\r\n")


def test_non_ascii_recipient_without_smtputf8_bounces_5_6_7(tmp_path, seven_bit_hop):
    relay = relay_with(tmp_path, seven_bit_hop.port).start()
    try:
        queue_id = send_with(relay, "alice@example.org", ["jürgen@example.net"],
                             b"Subject: test\r\n\r\nhello\r\n", options=["SMTPUTF8"])
        [bounce] = seven_bit_hop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert re.search(
        queue_id + r": to=<jürgen@example\.net>, .*dsn=5\.6\.7, status=bounced \(address "
        r"<jürgen@example\.net> needs SMTPUTF8, and 127\.0\.0\.1\[127\.0\.0\.1\]:"
        + str(seven_bit_hop.port) + r" does not offer SMTPUTF8", log)
    # The DSN names the address in UTF-8, so it too went through the
    # conversion: plain mail, all ASCII, to the same 7-bit hop.
    assert (bounce["sender"], bounce["recipients"]) == ("", ["alice@example.org"])
    assert bounce["mail"] == f"MAIL FROM:<> SIZE={len(bounce['data'])}"
    assert bounce["data"].isascii()
    assert b"\r\nStatus: 5.6.7\r\n" in bounce["data"]
