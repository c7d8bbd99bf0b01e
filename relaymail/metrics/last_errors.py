"""The last delivery error of each destination, for the status page.

A delivery process keeps them in memory (:data:`LAST_ERRORS`); with
workers, each delivery worker also writes its table now and then to a
file of its own in the metrics directory (``last-errors.PID.json``,
replaced by a rename, so a reader never sees half of one), and the master
reads them all.  The table is bounded: past :data:`KEPT` destinations the
longest quiet one is forgotten.  Destinations and error texts come from
DNS and remote servers: the page escapes them, this module only stores.
"""

import json
import os

#: Destinations remembered per process.
KEPT = 200
#: The longest error text kept (a remote reply may be long).
TEXT_LIMIT = 500

PREFIX = "last-errors."


class LastErrors:
    """destination label -> (epoch seconds, error text)."""

    def __init__(self):
        self._errors = {}
        self.changed = False

    def record(self, destination, text, when):
        self._errors.pop(destination, None)
        self._errors[destination] = (when, text[:TEXT_LIMIT])
        while len(self._errors) > KEPT:
            del self._errors[next(iter(self._errors))]
        self.changed = True

    def items(self):
        """``[(destination, when, text)]``, the latest first."""
        return sorted(((d, w, t) for d, (w, t) in self._errors.items()),
                      key=lambda item: item[1], reverse=True)

    def write_to(self, directory):
        """Replace this process's file in ``directory`` if anything changed."""
        if not self.changed:
            return
        self.changed = False
        path = os.path.join(directory, f"{PREFIX}{os.getpid()}.json")
        with open(path + ".new", "w") as f:
            json.dump([list(item) for item in self.items()], f)
        os.replace(path + ".new", path)


LAST_ERRORS = LastErrors()


def read_all(directory):
    """Every delivery worker's table in ``directory``, merged: the latest
    error of each destination, the latest first."""
    merged = {}
    try:
        names = [name for name in os.listdir(directory)
                 if name.startswith(PREFIX) and name.endswith(".json")]
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                items = json.load(f)
        except (OSError, ValueError):
            continue        # gone with its worker, or being replaced
        for destination, when, text in items:
            if destination not in merged or merged[destination][0] < when:
                merged[destination] = (when, text)
    return sorted(((d, w, t) for d, (w, t) in merged.items()),
                  key=lambda item: item[1], reverse=True)
