"""``relaymail-bench --compare``: the side-by-side run against Postfix.

Runs ``compare.py`` of the team's shared benchmarks (default
``../shared/bench/compare.py``, or ``$RELAYMAIL_COMPARE``), which loads
smtp-sink, Postfix and relaymail in turn with Postfix's smtp-source and
prints relaymail's rate over each peer's.  It needs Postfix's tools; without
smtp-source this says so rather than half-running.  The sessions, message
count, size, recipients and ``--reuse`` of this command are passed on;
``--compare-mode relay`` measures delivery end to end.
"""

import os
import shutil
import subprocess
import sys

DEFAULT_SCRIPT = os.path.join("..", "shared", "bench", "compare.py")


class CannotCompare(Exception):
    """The side-by-side run cannot start; the text says why."""


def compare_command(settings, script=None):
    """The command line that runs compare.py for ``settings``."""
    script = script or os.environ.get("RELAYMAIL_COMPARE") or DEFAULT_SCRIPT
    if not os.path.isfile(script):
        raise CannotCompare(f"{script}: no such file (set RELAYMAIL_COMPARE to compare.py)")
    if shutil.which("smtp-source") is None:
        raise CannotCompare("Postfix's smtp-source is not installed (Debian: apt-get install "
                            "postfix); compare.py needs it")
    command = [sys.executable, script, "--targets", "sink,postfix,relaymail",
               "--mode", settings.compare_mode, "--sessions", str(settings.sessions),
               "--messages", str(settings.messages), "--length", str(settings.size),
               "--rcpts", str(settings.recipient_count)]
    if settings.reuse:
        command.append("--reuse")
    return command


def run_compare(settings, out):
    """Run compare.py, its output passed through; return its exit status."""
    completed = subprocess.run(compare_command(settings), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    out.write(completed.stdout)
    return completed.returncode
