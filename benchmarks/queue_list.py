"""How long ``relaymail-queue list`` takes on a big queue.

::

    python benchmarks/queue_list.py [COUNT] [--held N] [--untried] [--keep DIR]

Writes COUNT small messages (default 100,000) straight into a spool in a
temporary directory, without fsync (the durability of these files is not
what is measured), each tried three times (so with its record beside its
queue file), or with ``--untried`` as just committed (one file, the
record inside: relaymail.queue.queue_file), then times ``relaymail-queue list`` twice: in this
process (reading and formatting only) and as a fresh process the way an
administrator runs it (adding interpreter and import start-up).  The
page cache is warm both times: the files were just written.  With
``--cold`` it then evicts the files' data from the page cache
(posix_fadvise DONTNEED, file by file: nothing else on the machine is
touched) and times the new process once more, which is closer to a
first ``list`` on a busy server; inodes and directory entries stay
cached, so a listing after a reboot is slower still.
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from relaymail.envelope import Envelope  # noqa: E402
from relaymail.queue import queue_file  # noqa: E402
from relaymail.queue import record as records  # noqa: E402
from relaymail.queue.queue_id import new_queue_id  # noqa: E402
from relaymail.tools import queue_tool  # noqa: E402

BODY = b"Subject: benchmark\r\n\r\n" + b"x" * 1000 + b"\r\n"


def fill(spool_path, count, held, tried=True):
    """Write ``count`` messages, the last ``held`` of them on hold; each
    tried three times, or as just committed when not ``tried``."""
    for name in ("tmp", "active", "hold", "corrupt"):
        os.makedirs(os.path.join(spool_path, name), exist_ok=True)
    start = time.time() - count
    for number in range(count):
        queue_id = new_queue_id()
        envelope = Envelope(sender="alice@example.org",
                            recipients=["bob@example.com", "carol@example.net"],
                            client_ip="192.0.2.7", helo="client.example.org",
                            received_at=start + number)
        record = records.new_record(queue_id, envelope, len(BODY), start + number)
        where = "hold" if number >= count - held else "active"
        directory = os.path.join(spool_path, where)
        # As the spool commits it (relaymail.queue.queue_file), then tried
        # three times: the record of the last attempt beside it.
        with open(os.path.join(directory, queue_id + ".msg"), "wb") as file:
            file.write(BODY + queue_file.record_and_trailer(records.encode(record), len(BODY)))
        if not tried:
            continue
        record["attempts"] = 3
        record["last_error"] = "451 4.4.1 connection refused by mx.example.com"
        with open(os.path.join(directory, queue_id + ".json"), "wb") as file:
            file.write(records.encode(record))


def evict(spool_path):
    """Drop the data of the spool's files from the page cache."""
    # Dirty pages cannot be dropped, and their writeback would compete
    # with the listing: write everything out first.
    os.sync()
    for where in ("active", "hold"):
        directory = os.path.join(spool_path, where)
        for name in os.listdir(directory):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_new_process(spool_path):
    environment = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    began = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "relaymail.tools.queue_tool",
         "--spool", spool_path, "list"],
        stdout=subprocess.DEVNULL, env=environment, check=False)
    return time.perf_counter() - began, completed.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=100_000)
    parser.add_argument("--held", type=int, default=100)
    parser.add_argument("--untried", action="store_true",
                        help="messages as just committed, one file each")
    parser.add_argument("--cold", action="store_true",
                        help="also time a list with the files' data evicted "
                             "from the page cache")
    parser.add_argument("--keep", metavar="DIR",
                        help="build the spool here and leave it (default: a "
                             "temporary directory, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        spool_path = os.path.abspath(args.keep or os.path.join(scratch, "spool"))
        began = time.perf_counter()
        fill(spool_path, args.count, args.held, tried=not args.untried)
        print(f"wrote {args.count} messages in {time.perf_counter() - began:.1f} s")

        out, err = io.StringIO(), io.StringIO()
        began = time.perf_counter()
        status = queue_tool.main(["--spool", spool_path, "list"], out=out, err=err)
        elapsed = time.perf_counter() - began
        summary = out.getvalue().splitlines()[-1]
        print(f"list in this process: {elapsed:.2f} s (status {status}: {summary})")

        elapsed, status = time_new_process(spool_path)
        print(f"list as a new process: {elapsed:.2f} s (status {status})")

        if args.cold:
            evict(spool_path)
            elapsed, status = time_new_process(spool_path)
            print(f"list as a new process, file data not cached: {elapsed:.2f} s "
                  f"(status {status})")


if __name__ == "__main__":
    main()
