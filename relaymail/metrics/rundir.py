"""The run's metrics directory: where each worker's prometheus_client
keeps its counters (one memory-mapped file per metric type and pid) and
each delivery worker its last errors (relaymail.metrics.last_errors).

``[metrics] directory`` names it, or else a new private one is made for
each run (mode 0700, under ``$RUNTIME_DIRECTORY`` when systemd set one,
else the temporary directory) and removed at the end.  Files an earlier
run left in a named one are removed at start: counters summed across runs
would count twice.  The master makes it in startService, after twistd's
``--uid`` switch, so the workers (that user too) may write in it.
"""

import os
import re
import shutil
import tempfile

from relaymail.metrics.last_errors import PREFIX

#: Set in each worker's environment before it starts: prometheus_client
#: reads it once, at import.
VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


# prometheus_client's files (counter_PID.db, gauge_livesum_PID.db, ...):
# only those go at start, whatever else an admin keeps in the directory.
_OURS = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db\Z")


def foreign_files(path):
    """Files in ``path`` that are not relaymail's metrics files.  The
    collector reads every ``*.db`` there as its own, and the start removes
    the last run's: the directory must hold nothing else."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if not (_OURS.match(name) or name.startswith(PREFIX)))


class RunDirectory:
    def __init__(self, configured=None):
        self._configured = configured
        self.path = None

    def prepare(self):
        if self._configured:
            os.makedirs(self._configured, mode=0o700, exist_ok=True)
            for name in os.listdir(self._configured):
                if _OURS.match(name) or name.startswith(PREFIX):
                    os.unlink(os.path.join(self._configured, name))
            self.path = self._configured
        else:
            parent = os.environ.get("RUNTIME_DIRECTORY") or None
            self.path = tempfile.mkdtemp(prefix="relaymail-metrics-", dir=parent)
        return self.path

    def environment(self, env):
        """``env`` for a worker: its metrics go to this directory."""
        env = dict(env)
        env[VARIABLE] = self.path
        return env

    def process_dead(self, pid):
        """A worker ended: its live gauges (connections open, the deferred
        count) no longer count; its counters stay, they are history."""
        from prometheus_client import multiprocess
        if self.path is None:
            return
        multiprocess.mark_process_dead(pid, self.path)
        try:
            os.unlink(os.path.join(self.path, f"{PREFIX}{pid}.json"))
        except FileNotFoundError:
            pass

    def remove(self):
        if self.path is not None and not self._configured:
            shutil.rmtree(self.path, ignore_errors=True)
