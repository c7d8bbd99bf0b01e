"""The process model (relaymail.process): a master, inbound workers sharing
its listeners, delivery workers each owning a partition of the queue.

Every test runs the real ``twistd -n relaymail`` with workers, real
sockets and a real spool, and kills real processes."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

from relaymail.queue.partition import partition_of
from relaymail.queue.queue_id import slot_of
from tests.relay_process import REPO, RelayProcess
from tests.test_delivery import queue_empty, send, wait_until

import pytest


def relay_with(tmp_path, nexthop_port, inbound=2, delivery=2, **sections):
    config = {
        "server": {"workers": str(inbound)},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{nexthop_port}", "smarthost_tls": "none",
                     "workers": str(delivery), "connect_timeout": "2",
                     "command_timeout": "5", "data_timeout": "5"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return RelayProcess(tmp_path, config)


def worker_pids(relay, name):
    """Every pid the master has started ``name`` with, oldest first."""
    return [int(pid) for pid in re.findall(rf"Started {re.escape(name)} \(pid (\d+)\)", relay.log())]


def wait_for_worker(relay, name, count=1):
    wait_until(lambda: len(worker_pids(relay, name)) >= count, what=f"{name} started {count} times")
    return worker_pids(relay, name)[count - 1]


def worker_of_session(relay, client, source="127.0.0.1"):
    """The inbound worker (``inbound.N``) that took ``client``'s session,
    from its connect line in the log."""
    found = re.search(rf"\[(inbound\.\d) relaymail\.smtp#info\] \S+ "
                      rf"unknown\[{re.escape(source)}\]:{client.port}: connect", relay.log())
    assert found, f"no connect line for port {client.port}"
    return found.group(1)


def delivered_ids(messages):
    return [re.search(rb"with ESMTP id ([0-9A-Z]{16})", message["data"]).group(1).decode()
            for message in messages]


def test_mail_through_two_inbound_and_two_delivery_workers_arrives_exactly_once(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port).start()
    queued, errors = [], []

    def client():
        try:
            for _ in range(6):
                queued.append(send(relay, "alice@example.org", ["bob@example.net"]))
        except Exception as error:      # reported below, not lost in a thread
            errors.append(error)
    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        messages = nexthop.wait_for(48)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
        procs = {name: wait_for_worker(relay, name) for name in
                 ("inbound.1", "inbound.2", "delivery.0", "delivery.1")}
    finally:
        relay.stop()
    assert sorted(delivered_ids(messages)) == sorted(queued) and len(set(queued)) == 48
    assert len(set(procs.values())) == 4
    # Slots 1 and 2 are the delivery workers', 3 and 4 the inbound ones':
    # each inbound worker mints ids with its own, so no two can collide.
    for queue_id in queued:
        slot = slot_of(queue_id)
        assert slot in (3, 4)
        assert re.search(rf"\[inbound\.{slot - 2} relaymail\.smtp#info\] [A-Z2-7]{{8}} "
                         rf"unknown\[127\.0\.0\.1\]:\d+: {queue_id}: queued", log)
        # ...and the delivery worker of its partition, and no other, sent it.
        owner = partition_of(queue_id, 2)
        assert re.search(rf"\[delivery\.{owner} relaymail\.queue#info\] {queue_id}: "
                         r"to=<bob@example\.net>.*status=sent", log)
        assert not re.search(rf"\[delivery\.{1 - owner} [^\]]*\] {queue_id}", log)


def test_an_inbound_worker_killed_mid_transaction_loses_nothing_that_got_250(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1).start()
    try:
        first = wait_for_worker(relay, "inbound.1")
        accepted = [send(relay, "alice@example.org", ["bob@example.net"]) for _ in range(3)]
        client = socket.create_connection(("127.0.0.1", relay.port), 10)
        client.sendall(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\n"
                       b"RCPT TO:<bob@example.net>\r\nDATA\r\n")
        replies = b""
        while b"354 " not in replies:
            replies += client.recv(4096)
        client.sendall(b"Subject: half\r\n\r\nTHIS-NEVER-GOT-250\r\n")
        tmp = os.path.join(relay.spool, "tmp")
        wait_until(lambda: any(name.endswith(".msg") for name in os.listdir(tmp)),
                   what="the unfinished body in tmp/")
        os.kill(first, signal.SIGKILL)
        # The session ends with the worker, with no reply to the message
        # (a reset: the kernel closed a socket with unread data).
        try:
            assert client.recv(4096) == b""
        except ConnectionResetError:
            pass
        client.close()
        second = wait_for_worker(relay, "inbound.1", count=2)
        assert os.listdir(tmp) == []
        # The successor takes mail on the same listener.
        accepted.append(send(relay, "alice@example.org", ["bob@example.net"]))
        messages = nexthop.wait_for(4)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert second != first
    assert sorted(delivered_ids(messages)) == sorted(accepted)
    assert not any(b"THIS-NEVER-GOT-250" in message["data"] for message in messages)
    assert re.search(rf"inbound\.1 \(pid {first}\) was killed by signal 9 after [\d.]+s; "
                     r"1 unfinished files removed; restarting it in 0\.0s", log)


def test_a_killed_delivery_workers_messages_are_delivered_by_its_successor(tmp_path, nexthop):
    release = threading.Event()

    def stall_until_released(transaction):
        # Every message is in flight, claimed by the delivery worker, when
        # it is killed; the replies it never reads are refusals.
        if not release.wait(20):
            return 451, "4.0.0 test timed out"
        return (451, "4.0.0 too late") if transaction.get("stalled") else (250, "2.0.0 Ok")
    nexthop.data_reply = lambda transaction: stall(transaction)
    stalled = []

    def stall(transaction):
        if not release.is_set():
            transaction["stalled"] = True
            stalled.append(transaction)
        return stall_until_released(transaction)
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1).start()
    try:
        first = wait_for_worker(relay, "delivery.0")
        accepted = [send(relay, "alice@example.org", [f"user{n}@example.net"]) for n in range(3)]
        wait_until(lambda: len(stalled) == 3, what="three deliveries in flight")
        os.kill(first, signal.SIGKILL)
        second = wait_for_worker(relay, "delivery.0", count=2)
        release.set()
        messages = nexthop.wait_for(3)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        release.set()
        relay.stop()
    assert second != first
    assert sorted(delivered_ids(messages)) == sorted(accepted)
    assert re.search(rf"delivery\.0 \(pid {first}\) was killed by signal 9", log)
    for queue_id in accepted:
        assert re.search(rf"\[delivery\.0 relaymail\.queue#info\] {queue_id}: .*status=sent", log)


def queue_tool(relay, *argv):
    return subprocess.run([sys.executable, "-m", "relaymail.tools.queue_tool",
                           "--spool", relay.spool, *argv],
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=20)


def test_the_queue_tool_reaches_the_owner_of_each_message_through_the_master(tmp_path):
    # Nobody listens at the smarthost: the mail stays queued.
    relay = relay_with(tmp_path, socket_port_nobody_uses()).start()
    try:
        # Until both delivery workers own some: ids fall in partitions by
        # chance, and six in one alone came once in 32 runs.
        queued = [send(relay, "alice@example.org", ["bob@example.net"]) for _ in range(6)]
        while {partition_of(queue_id, 2) for queue_id in queued} != {0, 1}:
            assert len(queued) < 40, "forty ids in one partition: partition_of is broken"
            queued.append(send(relay, "alice@example.org", ["bob@example.net"]))
        for queue_id in queued:
            done = queue_tool(relay, "hold", queue_id)
            assert (done.returncode, done.stdout) == (0, f"{queue_id} on hold\n"), done.stderr
        # Each queue file, with the record of its first attempt beside it
        # once that attempt was made.
        held = os.listdir(os.path.join(relay.spool, "hold"))
        assert sorted(name for name in held if name.endswith(".msg")) == sorted(
            f"{queue_id}.msg" for queue_id in queued)
        assert {name[:-5] for name in held if name.endswith(".json")} <= set(queued)
        done = queue_tool(relay, "release", queued[0])
        assert (done.returncode, done.stdout) == (0, f"{queued[0]} released\n")
        done = queue_tool(relay, "flush")
        assert (done.returncode, done.stdout.splitlines()[0]) == (0, "1 message due now")
        done = queue_tool(relay, "delete", "ALL")
        assert (done.returncode, done.stdout) == (0, f"{len(queued)} messages deleted\n")
    finally:
        relay.stop()


def socket_port_nobody_uses():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_of_the_master_takes_every_worker_with_it(tmp_path):
    relay = relay_with(tmp_path, socket_port_nobody_uses()).start()
    names = ("inbound.1", "inbound.2", "delivery.0", "delivery.1")
    pids = [wait_for_worker(relay, name) for name in names]
    relay.stop(signal.SIGKILL)
    for pid in pids:
        wait_until(lambda: not _alive(pid), timeout=10, what=f"worker {pid} to exit")
    # The spool is free again: a new relay starts on it.
    again = RelayProcess(tmp_path, {"server": {"workers": "1"}, "queue": {"path": relay.spool}})
    again.start()
    again.stop()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_delivery_worker_sets_aside_what_it_cannot_trust_when_it_comes_to_it(tmp_path):
    from relaymail.queue.spool import Spool
    from tests.test_spool import spoil_entries
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    good, broken = spoil_entries(spool)
    spool.stop()
    relay = relay_with(tmp_path, socket_port_nobody_uses(), inbound=1, delivery=1)
    assert relay.spool == spool.path
    relay.start()
    corrupt = os.path.join(relay.spool, "corrupt")
    try:
        wait_until(lambda: all(f"{queue_id}.msg" in os.listdir(corrupt) for queue_id in broken),
                   what="every broken entry in corrupt/")
        wait_until(lambda: f"{good}: to=<" in relay.log(), what="the good one tried")
        log = relay.log()
    finally:
        relay.stop()
    for queue_id, (words, names) in broken.items():
        [line] = [line for line in log.splitlines() if f"Moving queue entry {queue_id}" in line]
        assert words in line and line.split()[1] == "[delivery.0"
    assert sorted(os.listdir(corrupt)) == sorted(n for _, names in broken.values() for n in names)
    # Tried, and deferred (no next hop listens): that attempt's record beside it.
    assert sorted(os.listdir(os.path.join(relay.spool, "active"))) == [good + ".json",
                                                                        good + ".msg"]


def test_a_delivery_worker_sets_aside_a_queue_file_name_that_is_no_file(tmp_path, nexthop):
    # Put in active/ by hand: a directory, a FIFO and a symbolic link named
    # like queue files.  Each is moved to corrupt/ when it comes due, as a
    # bad record is: none fails at every retry, blocks delivery on a FIFO
    # or is read through the link; the real message beside them goes.
    from relaymail.queue import queue_id as ids
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1)
    active = os.path.join(relay.spool, "active")
    os.makedirs(active)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not for the queue\n")
    planted = {ids.new_queue_id(): kind for kind in ("a directory", "a FIFO", "a symbolic link")}
    for queue_id, kind in planted.items():
        path = os.path.join(active, f"{queue_id}.msg")
        {"a directory": os.mkdir, "a FIFO": os.mkfifo,
         "a symbolic link": lambda path: os.symlink(victim, path)}[kind](path)
    relay.start()
    corrupt = os.path.join(relay.spool, "corrupt")
    try:
        wait_until(lambda: os.path.isdir(corrupt) and len(os.listdir(corrupt)) == 3,
                   what="the three names in corrupt/")
        sent = send(relay, "alice@example.org", ["bob@example.net"])
        [message] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert delivered_ids([message]) == [sent]
    assert sorted(os.listdir(corrupt)) == sorted(f"{queue_id}.msg" for queue_id in planted)
    for queue_id, kind in planted.items():
        assert (f"Moving queue entry {queue_id} to {corrupt}: {queue_id}.msg is {kind}, "
                "not a regular file") in log
    assert os.path.islink(os.path.join(corrupt, next(q for q, k in planted.items()
                                                      if k == "a symbolic link") + ".msg"))
    assert victim.read_bytes() == b"not for the queue\n"
    assert not re.search(r"#critical|Traceback|Unhandled", log), log


def test_with_a_log_file_the_workers_events_reach_it_through_the_master(tmp_path, nexthop):
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1)
    os.makedirs(os.path.join(relay.spool, "active"))
    open(os.path.join(relay.spool, "active", "stray"), "w").close()
    log_file = os.path.join(relay.workdir, "twistd.log")
    relay.extra_args = ["--logfile", log_file]
    relay.start()
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        nexthop.wait_for(1)
        wait_until(lambda: f"{queue_id}: removed" in open(log_file).read(),
                   what="the delivery in the log file")
    finally:
        relay.stop()
    with open(log_file) as f:
        lines = f.read().splitlines()
    [queued] = [line for line in lines if f"{queue_id}: queued from=<alice@example.org>" in line]
    [sent] = [line for line in lines if f"{queue_id}: to=<bob@example.net>" in line]
    # One timestamp each, and the worker's name in the system.
    assert re.fullmatch(r"\S+ \[inbound\.1 relaymail\.smtp#info\] [A-Z2-7]{8} "
                        r"unknown\[127\.0\.0\.1\]:\d+: " + queue_id + r": queued .*", queued)
    assert re.fullmatch(r"\S+ \[delivery\.0 relaymail\.queue#info\] " + queue_id
                        + r": to=.*status=sent.*", sent)
    # A warning keeps its level and namespace, as in the lines on stdout.
    [warning] = [line for line in lines if "Ignoring unexpected entry 'stray'" in line]
    assert re.fullmatch(r"\S+ \[delivery\.0 relaymail\.queue\.spool\.Spool#warn\] .*", warning)


def test_workers_never_import_a_relaymail_found_in_the_launch_directory(tmp_path, nexthop):
    # A relay started from a directory others can write (/tmp), or from
    # one holding another checkout: a relaymail/ there must not be what
    # the workers, which start as root, import instead of the master's.
    planted = tmp_path / "relaymail"
    planted.mkdir()
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('ran')\n"
        "raise SystemExit('the planted relaymail was imported')\n")
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1)
    relay.start()               # cwd: tmp_path, the launch directory
    try:
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        [message] = nexthop.wait_for(1)
    finally:
        relay.stop()
    assert queue_id.encode() in message["data"]
    assert not marker.exists()
    assert "planted" not in relay.log()


def test_the_start_check_reads_the_files_of_the_config_the_master_read(tmp_path):
    # The check runs a worker's start for real (as the --uid user; here as
    # ourselves) on the text the master read, not on the file as it is now.
    from relaymail.process.launch import Launch
    from relaymail.process.master import WorkersCannotStart, check_workers_can_start
    config = tmp_path / "relaymail.ini"
    config.write_text("[tls]\n")
    text = (f"[tls]\ncertificate = {tmp_path}/gone.pem\nprivate_key = {tmp_path}/gone.pem\n")
    launch = Launch(str(config), {}, text, str(tmp_path))
    with pytest.raises(WorkersCannotStart) as refused:
        check_workers_can_start(launch, os.getuid(), os.getgid())
    assert str(refused.value) == (f"workers cannot start as uid {os.getuid()}: {config}: "
                                  f"[tls] certificate: cannot read '{tmp_path}/gone.pem': "
                                  "No such file or directory")
    check_workers_can_start(Launch(str(config), {}, "[tls]\n", str(tmp_path)),
                            os.getuid(), os.getgid())


def test_workers_use_the_masters_directory_and_config_whatever_happens_after(tmp_path, nexthop):
    # A relative spool, twistd's --rundir elsewhere, and the file edited
    # after the start: the workers still use the master's spool and
    # listeners, even a worker started after the edit.
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1,
                       queue={"path": "spool-relative"})
    rundir = tmp_path / "rundir"
    rundir.mkdir()
    relay.extra_args = ["--rundir", str(rundir)]
    relay.spool = os.path.join(relay.workdir, "spool-relative")
    relay.start()
    try:
        first = wait_for_worker(relay, "inbound.1")
        with open(relay.config, "a") as f:
            f.write(f"[server]\nsubmission_listen = tcp:{socket_port_nobody_uses()}\n"
                    "[queue]\npath = elsewhere\n")
        os.kill(first, signal.SIGKILL)
        wait_for_worker(relay, "inbound.1", count=2)
        queue_id = send(relay, "alice@example.org", ["bob@example.net"])
        [message] = nexthop.wait_for(1)
        log = relay.log()
    finally:
        relay.stop()
    assert queue_id.encode() in message["data"]
    assert not os.path.exists(rundir / "spool-relative")
    assert not os.path.exists(os.path.join(relay.workdir, "elsewhere"))
    assert "listening sockets for" not in log


def test_delivery_starts_once_every_inbound_worker_accepts(tmp_path):
    # Their imports and its scan of the queue would share the cores: the
    # listener is served first.
    relay = relay_with(tmp_path, socket_port_nobody_uses()).start()
    try:
        wait_for_worker(relay, "delivery.1")
        wait_until(lambda: relay.log().count("messages scheduled") == 2,
                   what="both delivery workers to scan their partitions")
        log = relay.log()
    finally:
        relay.stop()
    started = log.index("Started delivery.0")
    for name in ("inbound.1", "inbound.2"):
        assert log.index(f"[{name} -] SMTPFactory starting on") < started
    assert "starting the delivery workers anyway" not in log


SLOW_START = '''
import sys, time
from twisted.plugin import IPlugin
from zope.interface import implementer, provider
from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator

@implementer(IRecipientValidator)
class NoOpinion:
    name = "slowstart"
    def check_recipient(self, recipient, context):
        return Decision.NO_OPINION
    def verify(self, address, context):
        return Decision.NO_OPINION

@provider(IPlugin, IPluginFactory)
class slowstart:
    name = "slowstart"
    description = "an inbound worker that takes 6 s to start"
    @staticmethod
    def build(context):
        if "inbound" in sys.argv:
            time.sleep(6)
        return NoOpinion()
'''


def test_delivery_does_not_wait_for_inbound_workers_that_do_not_start(tmp_path, nexthop):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slowstart.py").write_text(SLOW_START)
    queued = os.path.join(tmp_path, "spool", "active")
    os.makedirs(queued)
    relay = relay_with(tmp_path, nexthop.port, delivery=1,
                       plugins={"path": str(plugins), "recipients": "slowstart, domains"})
    # A message queued before the start is delivered while the inbound
    # workers are still starting.
    from tests.test_spool import BODY, make_envelope, queue_sync
    from relaymail.queue.spool import Spool
    spool = Spool(relay.spool)
    spool.start()
    queue_id = queue_sync(spool, envelope=make_envelope(recipients=["bob@example.net"]))
    spool.stop()
    relay.start(timeout=30)
    try:
        [message] = nexthop.wait_for(1)
        log = relay.log()
    finally:
        relay.stop()
    assert message["data"] == BODY
    sent = re.search(rf"{queue_id}: to=<bob@example\.net>.*status=sent", log)
    waited = re.search(r"inbound\.1, inbound\.2 not accepting after 3s; starting the "
                       r"delivery workers anyway", log)
    assert sent and waited
    # All before either inbound worker accepted.
    assert waited.start() < sent.start() < log.index("SMTPFactory starting on")


def test_a_message_whose_notice_was_lost_is_picked_up_after_an_inbound_workers_death(
        tmp_path, nexthop):
    # A queue file in active/ that no notice told delivery of, as one an
    # inbound worker committed just before it was killed: the master has
    # the delivery worker pick it up once a notice would have come.
    from relaymail.queue.spool import Spool
    from tests.test_spool import BODY, queue_sync
    elsewhere = Spool(str(tmp_path / "elsewhere"))
    elsewhere.start()
    queue_id = queue_sync(elsewhere)
    elsewhere.stop()
    relay = relay_with(tmp_path, nexthop.port, inbound=1, delivery=1).start()
    try:
        wait_until(lambda: "messages scheduled" in relay.log(), what="delivery to start")
        os.rename(os.path.join(elsewhere.path, "active", f"{queue_id}.msg"),
                  os.path.join(relay.spool, "active", f"{queue_id}.msg"))
        os.kill(wait_for_worker(relay, "inbound.1"), signal.SIGKILL)
        [message] = nexthop.wait_for(1)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        log = relay.log()
    finally:
        relay.stop()
    assert message["data"] == BODY
    assert sorted(message["recipients"]) == ["bob@example.com", "carol@example.com"]
    assert f"{queue_id}: to=<bob@example.com>" in log
    assert ("delivery.0 picked up 1 messages it had not been told of (after inbound.1 died)"
            in log)
