"""How long ``relaymail-queue list`` takes on a big queue.

::

    python benchmarks/queue_list.py [COUNT] [--held N] [--keep DIR]

Writes COUNT small messages (default 100,000) straight into a spool in a
temporary directory, without fsync (the durability of these files is not
what is measured), then times ``relaymail-queue list`` twice: in this
process (reading and formatting only) and as a fresh process the way an
administrator runs it (adding interpreter and import start-up).  The
page cache is warm both times: the files were just written.
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
from relaymail.queue import record as records  # noqa: E402
from relaymail.queue.queue_id import new_queue_id  # noqa: E402
from relaymail.tools import queue_tool  # noqa: E402

BODY = b"Subject: benchmark\r\n\r\n" + b"x" * 1000 + b"\r\n"


def fill(spool_path, count, held):
    """Write ``count`` messages, the last ``held`` of them on hold."""
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
        record["attempts"] = 3
        record["last_error"] = "451 4.4.1 connection refused by mx.example.com"
        where = "hold" if number >= count - held else "active"
        directory = os.path.join(spool_path, where)
        with open(os.path.join(directory, queue_id + ".msg"), "wb") as file:
            file.write(BODY)
        with open(os.path.join(directory, queue_id + ".json"), "wb") as file:
            file.write(records.encode(record))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=100_000)
    parser.add_argument("--held", type=int, default=100)
    parser.add_argument("--keep", metavar="DIR",
                        help="build the spool here and leave it (default: a "
                             "temporary directory, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        spool_path = os.path.abspath(args.keep or os.path.join(scratch, "spool"))
        began = time.perf_counter()
        fill(spool_path, args.count, args.held)
        print(f"wrote {args.count} messages in {time.perf_counter() - began:.1f} s")

        out, err = io.StringIO(), io.StringIO()
        began = time.perf_counter()
        status = queue_tool.main(["--spool", spool_path, "list"], out=out, err=err)
        elapsed = time.perf_counter() - began
        summary = out.getvalue().splitlines()[-1]
        print(f"list in this process: {elapsed:.2f} s (status {status}: {summary})")

        environment = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        began = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "relaymail.tools.queue_tool",
             "--spool", spool_path, "list"],
            stdout=subprocess.DEVNULL, env=environment, check=False)
        elapsed = time.perf_counter() - began
        print(f"list as a new process: {elapsed:.2f} s (status {completed.returncode})")


if __name__ == "__main__":
    main()
