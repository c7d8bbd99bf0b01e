"""SIGTERM and SIGHUP on the real ``twistd -n relaymail`` with workers
(relaymail.lifecycle, relaymail.smtp.sessions, relaymail.process.reload).

SIGTERM: the relay stops accepting, idle sessions get 421 4.3.2, a
session in DATA finishes and gets its 250, deliveries in flight finish,
and nothing critical is logged.  SIGHUP: a good config reaches new
sessions while an open one goes on; a bad one is refused in one line."""

import os
import re
import signal
import socket
import threading
import time

import pytest

from tests.test_delivery import queue_empty, send, wait_until
from tests.test_processes import relay_with, wait_for_worker, worker_pids


class Client:
    """One SMTP session, read reply by reply."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self):
        self.file.close()
        self.sock.close()


def start_message(client):
    assert client.reply().startswith(b"220 ")
    assert client.command(b"EHLO client.test").startswith(b"250")
    assert client.command(b"MAIL FROM:<alice@example.org>").startswith(b"250 2.1.0")
    assert client.command(b"RCPT TO:<bob@example.net>").startswith(b"250 2.1.5")
    assert client.command(b"DATA").startswith(b"354 ")
    client.sock.sendall(b"Subject: in flight\r\n\r\nSENT-DURING-THE-STOP\r\n")


def answer_data_when_told(nexthop):
    """The next hop holds its reply to the final dot until ``may_answer``
    is set; ``reached_data`` is set once a message is there."""
    reached_data, may_answer = threading.Event(), threading.Event()

    def data_reply(message):
        reached_data.set()
        may_answer.wait(30)
        return (250, "2.0.0 Ok: queued")
    nexthop.data_reply = data_reply
    return reached_data, may_answer


def no_alarming_lines(log):
    return not re.search(r"#critical|Traceback|Unhandled", log)


def test_sigterm_lets_a_session_in_data_finish_and_turns_idle_ones_away(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=2, delivery=1,
                       server={"workers": "2", "shutdown_grace": "20"}).start()
    in_data, idle = Client(relay.port), Client(relay.port)
    try:
        start_message(in_data)
        assert idle.reply().startswith(b"220 ")
        assert idle.command(b"EHLO idle.test").startswith(b"250")
        relay.process.send_signal(signal.SIGTERM)
        # Between commands: told at once, and closed.
        assert idle.reply() == b"421 4.3.2 relay.test Service shutting down, try again later\r\n"
        assert idle.reply() == b""
        # New clients are refused (every copy of the listener is closed).
        wait_until(lambda: _refused(relay.port), what="the listener to close")
        # In DATA: the message is taken whole, then the 421 comes.
        in_data.sock.sendall(b".\r\n")
        queued = in_data.reply()
        assert re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]{16})\r\n", queued), queued
        assert in_data.command(b"NOOP") == (
            b"421 4.3.2 relay.test Service shutting down, try again later\r\n")
        relay.process.wait(30)
    finally:
        in_data.close()
        idle.close()
        relay.stop()
    queue_id = re.search(rb"as ([0-9A-Z]{16})", queued).group(1).decode()
    # twistd ends by the signal it was stopped with, as its callers expect.
    assert relay.process.returncode == -signal.SIGTERM
    assert b"SENT-DURING-THE-STOP" in relay.message(queue_id)
    log = relay.log()
    assert no_alarming_lines(log), log
    assert os.listdir(os.path.join(relay.spool, "tmp")) == []


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_waits_for_a_delivery_in_flight_and_logs_nothing_critical(tmp_path, nexthop):
    reached_data, may_answer = answer_data_when_told(nexthop)
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1", "shutdown_grace": "20"}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        assert reached_data.wait(20)
        relay.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "messages being delivered get up to 20s to finish" in relay.log(),
                   what="the delivery worker to drain")
        time.sleep(0.3)     # the stop is waiting, not done: prove it below
        assert relay.process.poll() is None
        may_answer.set()
        relay.process.wait(30)
    finally:
        may_answer.set()
        relay.stop()
    log = relay.log()
    assert relay.process.returncode == -signal.SIGTERM
    assert len(nexthop.messages) == 1
    assert re.search(rf"{queue_id}: to=<bob@example\.net>, relay=.*status=sent", log), log
    assert re.search(rf"{queue_id}: removed", log)
    assert os.listdir(os.path.join(relay.spool, "active")) == []
    assert no_alarming_lines(log), log


def reload_as_reloaded_test(relay):
    """Rename the relay reloaded.test in its config, SIGHUP it and wait
    for the reload line (2 inbound and 1 delivery workers)."""
    with open(relay.config) as f:
        text = f.read()
    with open(relay.config, "w") as f:
        f.write(text.replace("hostname = relay.test", "hostname = reloaded.test"))
    relay.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded; 2 inbound and 1 delivery workers replaced" in relay.log(),
               what="the reload")


def test_sighup_reaches_new_sessions_and_an_open_one_goes_on(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=2, delivery=1,
                       server={"workers": "2", "shutdown_grace": "20"}).start()
    old = Client(relay.port)
    try:
        old_delivery = wait_for_worker(relay, "delivery.0")
        assert old.reply() == b"220 relay.test ESMTP relaymail\r\n"
        assert old.command(b"EHLO old.test").startswith(b"250")
        reload_as_reloaded_test(relay)
        # The reload line comes as the old workers are told to stop: one may
        # still take a connection from the shared listener for a moment (as
        # an old Postfix smtpd may after postfix reload).  Soon every new
        # session is the new configuration's.
        deadline = time.monotonic() + 10
        while True:
            new = Client(relay.port)
            try:
                greeting = new.reply()
            finally:
                new.close()
            if greeting == b"220 reloaded.test ESMTP relaymail\r\n":
                break
            assert greeting == b"220 relay.test ESMTP relaymail\r\n", greeting
            assert time.monotonic() < deadline, "new sessions still meet the old configuration"
            time.sleep(0.05)
        # The session opened before goes on, in its old worker, to its end.
        assert old.command(b"MAIL FROM:<alice@example.org>").startswith(b"250 2.1.0")
        assert old.command(b"RCPT TO:<bob@example.net>").startswith(b"250 2.1.5")
        assert old.command(b"DATA").startswith(b"354 ")
        old.sock.sendall(b"Subject: across a reload\r\n\r\nOLD-SESSION\r\n.\r\n")
        assert old.reply().startswith(b"250 2.0.0 Ok: queued as ")
        assert old.command(b"QUIT").startswith(b"221 ")
        messages = nexthop.wait_for(1)
        wait_until(lambda: len(worker_pids(relay, "delivery.0")) == 2,
                   what="a new delivery worker")
        sent = send(relay, "alice@example.org", ["bob@example.net"])
        messages = nexthop.wait_for(2)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        assert relay.process.poll() is None
    finally:
        old.close()
        relay.stop()
    log = relay.log()
    assert worker_pids(relay, "delivery.0")[0] == old_delivery
    assert b"OLD-SESSION" in messages[0]["data"]
    # A new worker wrote the Received line of the message after the reload.
    assert sent.encode() in messages[1]["data"] and b"by reloaded.test" in messages[1]["data"]
    assert no_alarming_lines(log), log


def test_sighup_with_a_bad_config_is_refused_in_one_line_and_the_old_one_stays(tmp_path,
                                                                              nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1"}).start()
    try:
        first = wait_for_worker(relay, "inbound.1")
        session = Client(relay.port)
        assert session.reply().startswith(b"220 relay.test")
        with open(relay.config, "a") as f:
            f.write("[limits]\nmessage_size = lots\n")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in relay.log(), what="the refusal")
        # Still the same workers, still serving the open session and new ones.
        assert session.command(b"NOOP") == b"250 Ok\r\n"
        session.close()
        still_serving(relay, nexthop, first)
    finally:
        relay.stop()
    assert the_one_refusal(relay).endswith(
        f"SIGHUP: reload refused, the running configuration stays: {relay.config}: "
        "[limits] message_size: expected a size in bytes (e.g. 10485760 or 10M), got 'lots'")


def still_serving(relay, nexthop, first):
    """After a refused reload: the first inbound worker, still the only
    one, takes mail and it is delivered."""
    assert send(relay, "alice@example.org", ["bob@example.net"])
    nexthop.wait_for(1)
    assert worker_pids(relay, "inbound.1") == [first]
    assert relay.process.poll() is None


def the_one_refusal(relay):
    refusals = [line for line in relay.log().splitlines() if "reload refused" in line]
    assert len(refusals) == 1, refusals
    return refusals[0]


def test_sighup_keeps_what_needs_a_restart_and_says_so(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1"}).start()
    try:
        with open(relay.config) as f:
            text = f.read()
        with open(relay.config, "w") as f:
            f.write(text.replace("workers = 1\n", "workers = 3\n", 1))
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded; 1 inbound" in relay.log(), what="the reload")
        assert send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(1)
    finally:
        relay.stop()
    assert ("SIGHUP: [server] workers changed: it needs a restart; '1' stays in force "
            "until then") in relay.log()


def test_sighup_with_one_process_reads_the_certificate_and_the_tables_again(tmp_path):
    import smtplib
    from tests.relay_process import RelayProcess
    table = tmp_path / "recipients"
    table.write_text("alice@example.com\n")
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "0", "trusted_networks": "10.9.9.0/24"},
        "plugins": {"recipients": "static"},
        "plugin:static": {"file": str(table)},
    }).start()

    def rcpt(address):
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            return client.rcpt(address)
    try:
        assert rcpt("carol@example.com") == (554, b"5.7.1 Relay access denied")
        table.write_text("alice@example.com\ncarol@example.com\n")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: TLS certificates, the password file and the plugins' "
                           "tables read again" in relay.log(), what="the reload line")
        assert relay.process.poll() is None
        # Built afresh by the signal, not noticed by the table's own look.
        assert rcpt("carol@example.com") == (250, b"2.1.5 Ok")
        assert "changed: read again" not in relay.log()
        table.write_text("not an address at all\n")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: relay.log().count("plugins' tables read again") == 2,
                   what="the second reload line")
        assert "SIGHUP: kept the old contents: " in relay.log()
        assert rcpt("carol@example.com") == (250, b"2.1.5 Ok")
        assert send(relay, "alice@example.org", ["alice@example.com"])
        # A [plugin:*] key changed in the file is read by the next SIGHUP.
        other = tmp_path / "other-recipients"
        other.write_text("dave@example.com\n")
        with open(relay.config) as f:
            text = f.read()
        assert f"file = {table}" in text
        with open(relay.config, "w") as f:
            f.write(text.replace(f"file = {table}", f"file = {other}"))
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: relay.log().count("plugins' tables read again") == 3,
                   what="the third reload line")
        assert rcpt("dave@example.com") == (250, b"2.1.5 Ok")
        assert rcpt("carol@example.com") == (554, b"5.7.1 Relay access denied")
        # A file that no longer validates keeps the plugins as they were.
        with open(relay.config, "w") as f:
            f.write(text.replace(f"file = {table}", f"file = {other}\nno_such_key = 1"))
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: relay.log().count("plugins' tables read again") == 4,
                   what="the fourth reload line")
        assert re.search(r"SIGHUP: kept the old contents: \S+relaymail.ini: \[plugin:static\] no_such_key",
                         relay.log()), relay.log()
        assert rcpt("dave@example.com") == (250, b"2.1.5 Ok")
    finally:
        relay.stop()
    assert relay.process.returncode == -signal.SIGTERM
    # The one process stops its listener once, not twice (a cancelled stop
    # was logged as critical on every SIGTERM).
    assert "#critical" not in relay.log(), relay.log()


def test_a_delivery_cut_at_the_grace_is_left_for_the_next_start_not_counted(tmp_path, nexthop):
    from relaymail.queue.spool import Spool
    reached_data, may_answer = answer_data_when_told(nexthop)
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1", "shutdown_grace": "1"}).start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        assert reached_data.wait(20)
        stopped_at = time.time()
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(30)
    finally:
        may_answer.set()
        relay.stop()
    log = relay.log()
    assert "1 deliveries still under way after [server] shutdown_grace: cut" in log, log
    # The cut is the stop's doing, not the next hop's: no attempt counted,
    # no error recorded, no backoff, and no deferral logged.
    record = Spool(relay.spool).read_record(queue_id)
    assert record["attempts"] == 0
    assert record["recipients"][0]["attempts"] == 0
    assert record["recipients"][0]["last_error"] is None
    assert stopped_at - 1 <= record["next_attempt_at"] <= time.time()
    assert not re.search(rf"{queue_id}: to=<bob@example\.net>.*status=deferred", log), log
    assert no_alarming_lines(log), log


def test_sighup_while_an_inbound_worker_waits_to_restart_replaces_it_once(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1"}).start()
    try:
        # Young deaths back off: 0, 0.5, 1, 2 s before the restart.
        for deaths in range(1, 5):
            os.kill(wait_for_worker(relay, "inbound.1", deaths), signal.SIGKILL)
        wait_until(lambda: "restarting it in 2.0s" in relay.log(), what="the fourth death")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "inbound.1 of the old configuration is not restarted" in relay.log(),
                   what="the dropped restart")
        assert len(worker_pids(relay, "inbound.1")) == 5
        # Not waiting on a worker that will never end: the next reload goes.
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: relay.log().count("reloaded; 1 inbound") == 2, what="the second reload")
        assert send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(1)
    finally:
        relay.stop()
    assert len(worker_pids(relay, "inbound.1")) == 6
    assert no_alarming_lines(relay.log()), relay.log()


def test_sighup_to_a_worker_still_starting_is_taken_once_it_can(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1"}).start()
    try:
        os.kill(wait_for_worker(relay, "inbound.1"), signal.SIGKILL)
        wait_for_worker(relay, "inbound.1", 2)
        # Its successor is importing (half a second): the reload reaches it there.
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "inbound.1 (pid" in relay.log().split("reloaded;")[-1]
                   and "of the old configuration" in relay.log(), what="the old worker's end")
        assert send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(1)
    finally:
        relay.stop()
    log = relay.log()
    ends = re.findall(r"inbound\.1 \(pid \d+\) of the old configuration (.*?);", log)
    assert ends == ["exited with status 0"], log


def test_sigterm_after_sighup_tells_the_sessions_let_go_on_at_once(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1", "shutdown_grace": "20"}).start()
    session = Client(relay.port)
    try:
        assert session.reply().startswith(b"220 ")
        assert session.command(b"EHLO client.test").startswith(b"250")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "Replaced: 1 SMTP sessions open may go on" in relay.log(),
                   what="the old worker to let its session go on")
        assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
        told_at = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        assert session.reply() == b"421 4.3.2 relay.test Service shutting down, try again later\r\n"
        assert time.monotonic() - told_at < 10      # not at the end of the 20 s grace
        relay.process.wait(30)
    finally:
        session.close()
        relay.stop()
    assert no_alarming_lines(relay.log()), relay.log()


def _served_certificate(port):
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), 10) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def test_sighup_with_one_process_renews_an_ssl_listeners_own_certificate(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from tests.certs import CertificateAuthority
    from tests.relay_process import RelayProcess, free_port
    ca = CertificateAuthority()
    first, renewed = ca.issue("relay.test"), ca.issue("relay.test")
    (tmp_path / "cert.pem").write_bytes(first.cert_pem)
    (tmp_path / "key.pem").write_bytes(first.key_pem)
    implicit_port = free_port()
    relay = RelayProcess(tmp_path, {"server": {
        "workers": "0",
        "listen": f"tcp:{free_port()}:interface=127.0.0.1\n"
                  f"    ssl:{implicit_port}:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}"
                  f":certKey={tmp_path / 'cert.pem'}"}})
    relay.port = int(re.search(r"tcp:(\d+)", open(relay.config).read()).group(1))
    relay.start()
    try:
        assert _served_certificate(implicit_port) == x509.load_pem_x509_certificate(
            first.cert_pem).public_bytes(Encoding.DER)
        (tmp_path / "key.pem").write_bytes(renewed.key_pem)
        (tmp_path / "cert.pem").write_bytes(renewed.cert_pem)
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: TLS certificates" in relay.log(), what="the reload line")
        assert _served_certificate(implicit_port) == x509.load_pem_x509_certificate(
            renewed.cert_pem).public_bytes(Encoding.DER)
    finally:
        relay.stop()
    assert "kept the old contents" not in relay.log()


def test_sigterm_closes_the_masters_copy_of_a_listener_without_ending_the_workers(tmp_path,
                                                                                 nexthop):
    # The master closes its copy of each listener at once; it must not
    # shut the shared socket down: that resets every connection in the
    # backlog and fails the workers' accept() with EINVAL (an Unhandled
    # Error) before they have stopped reading it.  A stopped worker keeps
    # the socket listening, so a client still gets in, and is told.
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       server={"workers": "1", "shutdown_grace": "5"}).start()
    inbound = wait_for_worker(relay, "inbound.1")
    client = None
    try:
        os.kill(inbound, signal.SIGSTOP)
        relay.process.send_signal(signal.SIGTERM)
        wait_until(lambda: f"[-] (TCP Port {relay.port} Closed)" in relay.log(),
                   what="the master to close its copy")
        client = Client(relay.port)
        os.kill(inbound, signal.SIGCONT)
        relay.process.wait(30)
        # Greeted and then told (the worker accepted before it began to
        # stop), told at once, or reset when the worker closed the
        # listener: never refused while a worker still held it.
        answer = b""
        try:
            while chunk := client.sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
        # (Before EHLO, no enhanced code: RFC 2034 3.)
        assert re.fullmatch(rb"((220 relay\.test ESMTP relaymail\r\n)?"
                            rb"421 relay\.test Service shutting down, try again later\r\n)?",
                            answer), answer
    finally:
        if relay.process.poll() is None:
            os.kill(inbound, signal.SIGCONT)
        if client is not None:
            client.close()
        relay.stop()
    log = relay.log()
    assert relay.process.returncode == -signal.SIGTERM
    assert no_alarming_lines(log), log


def _expired_certificate(tmp_path):
    import datetime
    from tests import certs
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    ended = now - datetime.timedelta(days=1)
    pair = certs.self_signed("relay.test", valid_from=now - datetime.timedelta(days=90),
                             valid_until=ended)
    return pair, f"{ended:%Y-%m-%d %H:%M:%S} UTC"


@pytest.mark.parametrize("change", ["expired certificate", "endpoint typo"])
def test_sighup_with_an_expired_certificate_or_a_bad_endpoint_is_refused_in_one_line(
        tmp_path, nexthop, change):
    from tests import certs
    good = certs.self_signed("relay.test")
    (tmp_path / "cert.pem").write_bytes(good.cert_pem)
    (tmp_path / "key.pem").write_bytes(good.key_pem)
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1, server={"workers": "1"},
                       tls={"certificate": str(tmp_path / "cert.pem"),
                            "private_key": str(tmp_path / "key.pem")}).start()
    try:
        first = wait_for_worker(relay, "inbound.1")
        if change == "expired certificate":
            expired, ended = _expired_certificate(tmp_path)
            (tmp_path / "cert.pem").write_bytes(expired.cert_pem)
            (tmp_path / "key.pem").write_bytes(expired.key_pem)
            problem = (f"[tls] certificate: the certificate in '{tmp_path}/cert.pem' expired on "
                       f"{ended} (notAfter)")
        else:
            with open(relay.config) as f:
                text = f.read()
            with open(relay.config, "w") as f:
                f.write(text.replace(f"listen = tcp:{relay.port}:interface=127.0.0.1",
                                     f"listen = tcp:{relay.port}:interfce=127.0.0.1"))
            problem = (f"[server] listen: not a valid Twisted server endpoint "
                       f"'tcp:{relay.port}:interfce=127.0.0.1': unknown parameter 'interfce' "
                       "for tcp (did you mean 'interface'?); tcp takes interface, backlog")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in relay.log(), what="the refusal")
        # The old workers go on serving, with the old certificate.
        still_serving(relay, nexthop, first)
        # And one that dies starts again with the file as it is now: an
        # expired certificate on disk must not stop delivery.
        os.kill(wait_for_worker(relay, "delivery.0"), signal.SIGKILL)
        wait_for_worker(relay, "delivery.0", 2)
        assert send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(2)
    finally:
        relay.stop()
    assert the_one_refusal(relay).endswith(
        f"SIGHUP: reload refused, the running configuration stays: {relay.config}: {problem}")


def greeting_of_a_new_session(relay):
    client = Client(relay.port)
    try:
        return client.reply()
    finally:
        client.close()


def old_inbound_workers_ended(relay):
    return len(re.findall(r"inbound\.\d \(pid \d+\) of the old configuration "
                          r"(exited|was killed)", relay.log()))


def test_the_connection_limit_holds_across_a_reload_while_old_sessions_finish(tmp_path,
                                                                            nexthop):
    # The new workers count the old workers' sessions: a reload must not
    # let the relay hold twice [limits] connections for shutdown_grace.
    relay = relay_with(tmp_path, nexthop.port, inbound=2, delivery=1,
                       server={"workers": "2", "shutdown_grace": "20",
                               "trusted_networks": "192.0.2.0/24"},
                       limits={"connections": "3", "trusted_reserve": "0",
                               "connections_per_ip": "0", "stress_threshold": "100%"}).start()
    full = b"421 4.7.0 %s Error: too many connections\r\n"
    old = [Client(relay.port) for _ in range(3)]
    try:
        for client in old:
            assert client.reply() == b"220 relay.test ESMTP relaymail\r\n"
            assert client.command(b"EHLO old.test").startswith(b"250")
        assert greeting_of_a_new_session(relay) == full % b"relay.test"
        reload_as_reloaded_test(relay)
        # Until the new workers take the listener, the old ones refuse.
        deadline = time.monotonic() + 10
        while (greeting := greeting_of_a_new_session(relay)) == full % b"relay.test":
            assert time.monotonic() < deadline, "the new workers never answered"
            time.sleep(0.05)
        assert greeting == full % b"reloaded.test"
        # One old session ends: its place is free for a new one.
        assert old[0].command(b"QUIT").startswith(b"221 ")
        old[0].close()
        wait_until(lambda: greeting_of_a_new_session(relay)
                   == b"220 reloaded.test ESMTP relaymail\r\n", what="a free place")
        # The old sessions still go on in their workers, and take the places
        # they hold with them when their worker is killed.
        assert old[1].command(b"NOOP") == b"250 2.0.0 Ok\r\n"
        for name in ("inbound.1", "inbound.2"):
            try:
                os.kill(worker_pids(relay, name)[0], signal.SIGKILL)
            except ProcessLookupError:
                pass        # it had no session left and ended
        wait_until(lambda: old_inbound_workers_ended(relay) == 2, what="the old workers to end")
        assert old[1].reply() == b""
        held = [Client(relay.port) for _ in range(2)]
        try:
            for client in held:
                assert client.reply() == b"220 reloaded.test ESMTP relaymail\r\n"
        finally:
            for client in held:
                client.close()
        # A second reload gives the first bank back, with nothing left
        # counted in it: three new sessions fit, a fourth does not.
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: relay.log().count("reloaded; 2 inbound") == 2,
                   what="the second reload")
        wait_until(lambda: old_inbound_workers_ended(relay) == 4,
                   what="the second reload's old workers to end")
        newest = [Client(relay.port) for _ in range(3)]
        try:
            for client in newest:
                assert client.reply() == b"220 reloaded.test ESMTP relaymail\r\n"
            assert greeting_of_a_new_session(relay) == full % b"reloaded.test"
        finally:
            for client in newest:
                client.close()
    finally:
        for client in old:
            client.close()
        relay.stop()
    log = relay.log()
    assert "counted afresh" not in log
    assert no_alarming_lines(log), log


def test_a_reload_that_resizes_the_limits_tables_says_what_it_costs(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=2, delivery=1,
                       server={"workers": "2"}).start()
    try:
        with open(relay.config, "a") as f:
            f.write("[limits]\nconnections = 5000\n")
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded; 2 inbound" in relay.log(), what="the reload")
        wait_until(lambda: old_inbound_workers_ended(relay) == 2, what="the old workers to end")
        assert send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(1)
    finally:
        relay.stop()
    log = relay.log()
    assert ("SIGHUP: the new limits size the shared tables anew ([limits] connections, "
            "[plugin:ratelimit] max_keys or [plugin:callout] cache_entries changed): "
            "connections, rates and AUTH attempts are counted afresh, and the old workers' "
            "sessions, while they finish, are not counted against the limits") in log
    assert no_alarming_lines(log), log
