"""A correct login's latency, and the relay's memory, under an AUTH flood.

::

    python benchmarks/auth_flood.py [--sessions 150] [--logins 5] [--seconds 5]
                                    [--interval 0] [--hashes N] [--per-minute N] [--no-limits]

Starts the real relay (``twistd -n relaymail``) with a password file hashed
at the production scrypt parameters (32 MiB, ~0.2 s), AUTH in plain text
(what is measured is hashing, not TLS) and no connection limits.  From
127.0.0.1 it runs SESSIONS sessions, niced, each sending a wrong
``AUTH PLAIN`` as soon as the previous reply came, or INTERVAL seconds
after its previous guess if that is later (tests/auth_flood.py).  Once
every one has sent a guess and one guess was hashed, it times LOGINS
correct logins, one after another, from 127.0.0.2, keeps flooding for
SECONDS more, and reports the relay's VmRSS (idle, and the peak sampled
every 50 ms), the flood's replies, and how long the relay took to exit.

Measured on the 2-core development machine (2026-12-02, 150 sessions,
other engineers' tests running): before the limits, at INTERVAL 0.5, a
correct login took 68-79 s and RSS went from 51 to 373 MiB, and the relay
took over 15 s to exit on SIGTERM (every queued hash ran first); with
them (2 slots), 0.16-0.30 s and a 116 MiB peak, at INTERVAL 0.5 or 0.
Unpaced, with the machine loaded (load average 3-4), logins took up to
1.2 s: the 454s come back at once and the flood's commands, not its
hashes, keep a core busy.

``--no-limits`` writes neither ``max_concurrent_hashes`` nor
``attempts_per_minute``, so the script also runs against a relay that
predates them; ``--per-minute`` defaults to 0 (off) so that the hash limit
alone is measured.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from relaymail.auth import passwords  # noqa: E402
from tests.auth_flood import FloodProcess, RSSSampler, rss_kib, timed_login  # noqa: E402
from tests.relay_process import RelayProcess  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=150)
    parser.add_argument("--logins", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--hashes", default="auto")
    parser.add_argument("--per-minute", default="0")
    parser.add_argument("--no-limits", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relaymail-auth-flood-") as workdir:
        path = os.path.join(workdir, "passwd")
        passwords.set_password(path, "alice", "correct horse")
        auth = {"passwords": path, "allow_plaintext": "yes"}
        if not args.no_limits:
            auth.update(max_concurrent_hashes=args.hashes, attempts_per_minute=args.per_minute)
        relay = RelayProcess(workdir, {
            "server": {"trusted_networks": "10.9.9.0/24"},
            "auth": auth,
            "limits": {"connections_per_ip": "0", "connection_rate_per_ip": "0"},
        }).start()
        try:
            idle = rss_kib(relay.process.pid)
            flood = FloodProcess(relay.port, args.sessions, args.interval)
            try:
                with RSSSampler(relay.process.pid) as rss:
                    flood.wait_until_flooding()
                    logins = [timed_login(relay.port, "alice", "correct horse", "127.0.0.2",
                                          timeout=120)
                              for _ in range(args.logins)]
                    time.sleep(args.seconds)
            finally:
                flood.stop()
        finally:
            stopping = time.monotonic()
            try:
                relay.stop()
            except subprocess.TimeoutExpired:
                # Hashes queued in the reactor's pool are all run first.
                relay.process.kill()
                relay.process.wait()
            stopped = time.monotonic() - stopping
    print(f"sessions {args.sessions}, a guess each at most every {args.interval} s, "
          "max_concurrent_hashes "
          f"{'(none)' if args.no_limits else args.hashes}")
    print(f"RSS idle {idle / 1024:.1f} MiB, peak during the flood {rss.peak / 1024:.1f} MiB")
    for line, seconds in logins:
        print(f"correct login: {seconds:.3f} s  {line.decode().strip()}")
    print(f"SIGTERM to exit: {stopped:.1f} s")
    for reply, count in sorted(flood.replies.items(), key=lambda item: -item[1]):
        print(f"flood: {count:6d}  {reply}")


if __name__ == "__main__":
    main()
