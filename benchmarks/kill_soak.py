"""Workers killed under load: nothing that got 250 is lost.

::

    python benchmarks/kill_soak.py [--messages N] [--sessions S] [--kill-every SECONDS]
                                   [--min-age SECONDS]

Starts ``twistd -n relaymail`` with two inbound and two delivery workers,
its smarthost a recording next hop on loopback (tests.nexthop.NextHop).
S client threads send N messages with smtplib, one connection each and a
Message-ID each.  Meanwhile a worker picked at random, inbound or
delivery, is SIGKILLed every ``--kill-every`` seconds, and the master
starts another.  Once the clients are done and the queue is empty it
reports:

- accepted: the messages that got 250 at the client;
- lost: accepted, never at the next hop.  Must be 0; the exit status is 1
  otherwise;
- twice: at the next hop more than once.  A delivery worker killed
  between the next hop's 250 and its record's update sends the message
  again after its restart, as any MTA would after a crash there;
- arrived unconfirmed: at the next hop, although the client had no 250 (a
  session killed after its commit, before the reply left).  Delivered, so
  not lost; the client, seeing no 250, would send it again;
- the relay's warning and critical log lines, counted by their text.

The test suite kills workers one at a time at chosen moments
(tests/test_processes.py); this is the crowd of them, at random moments,
for a minute or so.  ``--min-age`` (11 s) keeps each kill a death after
a long life, restarted at once, rather than a crash loop the master slows.
"""

import argparse
import collections
import os
import random
import re
import signal
import smtplib
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.nexthop import NextHop  # noqa: E402
from tests.relay_process import RelayProcess  # noqa: E402

_MESSAGE_ID = re.compile(rb"^Message-ID: <(soak-\d+)@", re.MULTILINE | re.IGNORECASE)


def relay_for(workdir, hop_port):
    return RelayProcess(workdir, {
        "server": {"workers": "2", "shutdown_grace": "5"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{hop_port}", "smarthost_tls": "none",
                     "workers": "2", "connect_timeout": "2", "command_timeout": "5",
                     "data_timeout": "5"},
        # Short backoffs: a delivery cut by a kill is tried again soon.
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    })


def send_all(port, numbers, accepted, failed):
    """Send message ``n`` for each n in ``numbers``; note which got 250."""
    for n in numbers:
        body = (f"Message-ID: <soak-{n}@client.test>\r\nSubject: soak {n}\r\n\r\n"
                + ("x" * 76 + "\r\n") * 26).encode()
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                              timeout=30) as client:
                client.sendmail("a@example.org", [f"r{n % 7}@example.com"], body)
            accepted.add(n)
        except (smtplib.SMTPException, OSError) as error:
            failed[type(error).__name__] += 1


def live_workers(relay):
    """``{pid: name}`` of the workers started and not yet reported gone."""
    log = relay.log()
    started = dict((int(pid), name) for name, pid in
                   re.findall(r"Started (\S+) \(pid (\d+)\)", log))
    for pid in list(started):
        if not os.path.exists(f"/proc/{pid}"):
            del started[pid]
    return started


def kill_workers(relay, every, min_age, stop, killed):
    """Every ``every`` seconds, SIGKILL one worker that has run at least
    ``min_age`` seconds.  Younger deaths would only test the master's
    restart backoff: from the second death within 10 s of a start
    (relaymail.process.master YOUNG) the successor waits, up to 30 s, and
    clients wait in the listen queue meanwhile."""
    rng = random.Random(1)
    first_seen = {}
    while not stop.wait(every):
        now = time.monotonic()
        workers = live_workers(relay)
        for pid in workers:
            first_seen.setdefault(pid, now)
        old = sorted(pid for pid in workers if now - first_seen[pid] >= min_age)
        if not old:
            continue
        pid = rng.choice(old)
        try:
            os.kill(pid, signal.SIGKILL)
            killed[workers[pid].split(".")[0]] += 1
        except ProcessLookupError:
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=1.0)
    parser.add_argument("--min-age", type=float, default=11.0,
                        help="kill only workers that have run this long (seconds)")
    args = parser.parse_args()

    hop = NextHop()
    workdir = tempfile.mkdtemp(prefix="kill-soak-")
    relay = relay_for(workdir, hop.port).start()
    accepted, failed, killed = set(), collections.Counter(), collections.Counter()
    stop = threading.Event()
    killer = threading.Thread(target=kill_workers, args=(relay, args.kill_every, args.min_age, stop,
                                                        killed))
    started = time.monotonic()
    try:
        killer.start()
        clients = [threading.Thread(target=send_all, args=(
            relay.port, range(i, args.messages, args.sessions), accepted, failed))
            for i in range(args.sessions)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        stop.set()
        killer.join()
        sent_for = time.monotonic() - started
        deadline = time.monotonic() + 120
        while relay.queued_ids() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = len(relay.queued_ids())
        log = relay.log()
    finally:
        stop.set()
        relay.stop()
        hop.stop()

    arrivals = collections.Counter()
    for message in hop.messages:
        found = _MESSAGE_ID.search(message["data"])
        if found:
            arrivals[int(found.group(1).split(b"-")[1])] += 1
    lost = sorted(n for n in accepted if n not in arrivals)
    twice = sorted(n for n, count in arrivals.items() if count > 1)
    unconfirmed = sorted(n for n in arrivals if n not in accepted)
    alarms = collections.Counter(
        re.sub(r"\b[0-9A-Z]{16}\b|\d+", "N", line.split("#", 1)[-1])[:110]
        for line in log.splitlines() if "#warn]" in line or "#critical]" in line
        or "#error]" in line)

    print(f"sent for {sent_for:.1f} s; killed {dict(killed)}; client failures {dict(failed)}")
    print(f"accepted {len(accepted)} of {args.messages}; lost {len(lost)}; twice {len(twice)}; "
          f"arrived unconfirmed {len(unconfirmed)}; left queued {left}")
    if lost:
        print("lost:", lost[:20])
    for text, count in alarms.most_common(15):
        print(f"{count:6d}  {text}")
    return 1 if lost or left else 0


if __name__ == "__main__":
    sys.exit(main())
