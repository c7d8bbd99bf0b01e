"""relaymail starting on a big queue: how soon it takes mail, how soon
delivery has the whole queue in hand, and what memory it takes.

::

    python benchmarks/big_queue.py [COUNT] [--watch SECONDS]

Writes COUNT messages (default 100,000) into a fresh spool, all due, as
``benchmarks/queue_list.py`` does, then starts ``twistd -n relaymail`` on
it with its default process model, delivering to Postfix's ``smtp-sink``
when it is installed (else to a loopback port where nobody listens), and
reports:

- the time from start to the first 220 greeting on the listener;
- the time from start to the delivery worker's "N messages scheduled" line
  (its recovery and first scan of the queue);
- the peak resident memory of each process, and of all of them together
  (as VmRSS, and as PSS, which counts the pages the processes share once),
  sampled every 100 ms for ``--watch`` seconds (default 20);
- how long ``relaymail-queue list`` takes, as a new process, while the
  relay delivers.

The page cache is warm: the files were just written.  They are written
back (``sync``) before the start, as a queue that built up over time is,
so that the kernel's writeback of the 800 MB just written does not share
the start with the relay.  ``--no-sync`` starts at once, with that
writeback running (on 2026-12-07 both gave the first 220 after 1.05 s).

The relay runs from this checkout, byte-compiled first, as an installed
copy is by pip: where ``PYTHONDONTWRITEBYTECODE`` is set (as on the
project's machines) each of its processes would otherwise compile every
module it imports, which added 0.1 s to the first 220 on 2026-12-08
(0.70 s against 0.59-0.63 s on an empty queue).
"""

import argparse
import compileall
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

sys.path.insert(0, HERE)
from queue_list import fill, time_new_process  # noqa: E402
from relaymail.tools.bench import process_rss, process_tree  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pss(pid):
    """Proportional set size: shared pages (the interpreter, the libraries
    every worker maps) divided among the processes sharing them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def rss_by_process(pid, measure=None):
    """``{name: bytes}`` for the master (``master``) and each worker:
    VmRSS, or what ``measure(pid)`` says."""
    sizes = {}
    for each in process_tree(pid):
        try:
            with open(f"/proc/{each}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            rss = (measure or process_rss)(each)
        except (OSError, StopIteration):
            continue
        name = "master"
        if b"--name" in argv:
            name = argv[argv.index(b"--name") + 1].decode()
        sizes[name] = rss
    return sizes


def first_greeting(port, deadline):
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as probe:
                if probe.recv(512).startswith(b"220"):
                    probe.sendall(b"QUIT\r\n")
                    return time.monotonic()
        except OSError:
            time.sleep(0.01)
    raise SystemExit("no greeting")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=100_000)
    parser.add_argument("--watch", type=float, default=20.0)
    parser.add_argument("--no-sync", action="store_true",
                        help="start while the files just written are still being written back")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="relaymail-big-queue-")
    sink = None
    try:
        spool = os.path.join(workdir, "spool")
        began = time.perf_counter()
        fill(spool, args.count, held=0)
        print(f"wrote {args.count} messages in {time.perf_counter() - began:.1f} s")
        if not args.no_sync:
            began = time.perf_counter()
            os.sync()
            print(f"written back in {time.perf_counter() - began:.1f} s")
        compileall.compile_dir(os.path.join(ROOT, "relaymail"), quiet=1)
        port, sink_port = free_port(), free_port()
        if shutil.which("smtp-sink"):
            sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = os.path.join(workdir, "relaymail.ini")
        with open(config, "w") as f:
            f.write(f"[server]\nlisten = tcp:{port}:interface=127.0.0.1\n"
                    f"trusted_networks = 127.0.0.0/8\n[queue]\npath = {spool}\n"
                    f"[delivery]\nsmarthost = [127.0.0.1]:{sink_port}\n")
        log_path = os.path.join(workdir, "relaymail.log")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        started = time.monotonic()
        relay = subprocess.Popen([twistd, "-n", "--pidfile=", "relaymail", "--config", config],
                                 cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            greeted = first_greeting(port, started + 60)
            print(f"first 220 after {greeted - started:.2f} s")
            peaks, total_peak, pss_peak, scanned, listed = {}, 0, 0, None, None
            while time.monotonic() < started + args.watch:
                sizes = rss_by_process(relay.pid)
                for name, size in sizes.items():
                    peaks[name] = max(peaks.get(name, 0), size)
                total_peak = max(total_peak, sum(sizes.values()))
                pss_peak = max(pss_peak, sum(rss_by_process(relay.pid, _pss).values()))
                if scanned is None:
                    with open(log_path) as f:
                        if re.search(r"\d+ messages scheduled", f.read()):
                            scanned = time.monotonic()
                            print(f"whole queue scheduled after {scanned - started:.2f} s")
                if scanned is not None and listed is None:
                    elapsed, status = time_new_process(spool)
                    listed = elapsed
                    print(f"relaymail-queue list while delivering: {elapsed:.2f} s "
                          f"(status {status})")
                time.sleep(0.1)
            print("peak RSS: " + ", ".join(f"{name} {size / 2**20:.0f} MiB"
                                           for name, size in sorted(peaks.items()))
                  + f"; all together {total_peak / 2**20:.0f} MiB, or "
                  f"{pss_peak / 2**20:.0f} MiB with shared pages counted once (PSS)")
            left = sum(1 for name in os.listdir(os.path.join(spool, "active"))
                       if name.endswith(".msg"))
            print(f"{args.count - left} of {args.count} delivered in {args.watch:.0f} s")
        finally:
            relay.terminate()
            relay.wait(60)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
