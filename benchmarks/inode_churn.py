"""What making and freeing files costs the kernel, per queued message.

::

    python benchmarks/inode_churn.py [--rate N] [--seconds S] [DIRECTORY]

Runs the file system side of a relay under steady load, without the
relay: messages arrive at ``--rate`` a second (default 800, about what
compare.py's accept round reaches), each written into ``tmp/``, synced in
batches of 20 with one syncfs(2), renamed into ``active/`` and removed 200
messages later, as delivery would.  It does it twice, with the two-file
queue entry (a 4 KiB message file and a 400-byte record file) and with
the one-file entry (both in one file), 35 s apart, and prints the system
and user CPU time per message of each.

Why it matters here: on ext4 without a journal, each inode allocation
walks past every inode of the group freed in the last 30 s
(``recently_deleted()``), so the cost of a file grows with the rate of
files freed, and two files per message cost more than twice one.
Measured on the development machine, 2026-12-04, at 800 messages/s for
60 s: two files 541 us of system time per message, one file 196 us.
"""

import argparse
import collections
import ctypes
import os
import resource
import shutil
import tempfile
import time

BATCH = 20
IN_FLIGHT = 200
MESSAGE = b"x" * 4096
RECORD = b"r" * 400

_libc = ctypes.CDLL(None, use_errno=True)


def churn(base, files, rate, seconds):
    """Run the load with ``files`` (1 or 2) per message; return
    ``(messages, system seconds, user seconds)``."""
    tmp, active = os.path.join(base, "tmp"), os.path.join(base, "active")
    for directory in (tmp, active):
        os.makedirs(directory, exist_ok=True)
    contents = [MESSAGE + RECORD] if files == 1 else [MESSAGE, RECORD]
    suffixes = [".msg", ".json"][:files]
    directory_fd = os.open(active, os.O_RDONLY | os.O_DIRECTORY)
    waiting = collections.deque()
    count = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            ahead = count / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            batch = []
            for _ in range(BATCH):
                count += 1
                name = f"{count:016d}"
                for suffix, data in zip(suffixes, contents):
                    fd = os.open(os.path.join(tmp, name + suffix),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    os.write(fd, data)
                    os.close(fd)
                batch.append(name)
            if _libc.syncfs(directory_fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
            for name in batch:
                for suffix in suffixes:
                    os.rename(os.path.join(tmp, name + suffix), os.path.join(active, name + suffix))
            os.fsync(directory_fd)
            waiting.extend(batch)
            while len(waiting) > IN_FLIGHT:
                name = waiting.popleft()
                for suffix in suffixes:
                    os.unlink(os.path.join(active, name + suffix))
    finally:
        os.close(directory_fd)
    after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(base)
    return count, after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default=None,
                        help="where to make the files (default: a new directory in the "
                             "current one, so on its file system)")
    parser.add_argument("--rate", type=float, default=800.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quiet", type=float, default=35.0,
                        help="seconds to wait before each run, for the last frees to age")
    args = parser.parse_args()
    parent = args.directory or os.getcwd()
    for files in (2, 1):
        time.sleep(args.quiet)
        base = tempfile.mkdtemp(prefix="inode-churn-", dir=parent)
        count, system, user = churn(base, files, args.rate, args.seconds)
        print(f"{files} file{'s' if files > 1 else ''} per message: {count} messages, "
              f"{count / args.seconds:.0f}/s, system {system / count * 1e6:.0f} us and "
              f"user {user / count * 1e6:.0f} us per message")


if __name__ == "__main__":
    main()
