"""A plugin's table file, read again when it changes on disk.

An administrator who edits the aliases or a static list expects the next
message to see it, as Postfix's daemons notice a changed lookup table
without ``postfix reload``.  A SIGHUP also rebuilds every plugin (the
workers are replaced, :mod:`relaymail.process.reload`); this covers the
edit nobody signalled.

The file is looked at (one ``stat(2)``) at most once per ``check_every``
seconds, from the plugin's own lookups.  A change is loaded at that look,
unless the file was written within the last ``check_every`` seconds: then
only once it has stayed the same over two looks, so an editor or ``cp``
caught halfway through writing is not read as the new table.  A new text that
does not parse is refused with one error line and the table in use stays:
mail goes on being judged by the last good one.
"""

import os
import time

from twisted.logger import Logger

log = Logger(namespace="relaymail.plugins")

#: Seconds between looks at the file.
CHECK_EVERY = 1.0


class TableFile:
    """The parsed contents of one file.

    :param path: the file.
    :param parse: called with the file's lines; returns the table or raises
        ValueError naming the bad line.
    :param label: what log lines call it (``[plugin:aliases] file``).
    :raise OSError, UnicodeDecodeError, ValueError: at construction, when
        the file cannot be read or parsed: the plugin's build turns these
        into a ConfigError.
    """

    def __init__(self, path, parse, label, clock=time.monotonic, check_every=CHECK_EVERY):
        self.path = path
        self._parse = parse
        self._label = label
        self._clock = clock
        self._check_every = check_every
        self._signature = self._stat()
        self.value = parse(_read_lines(path))
        self._looked_at = clock()
        self._pending = None        # a changed signature seen once, not yet loaded

    def refresh(self):
        """Look at the file if it is time to: True when a new table was
        loaded into :attr:`value`."""
        now = self._clock()
        if now - self._looked_at < self._check_every:
            return False
        self._looked_at = now
        try:
            signature = self._stat()
        except OSError as error:
            if self._pending != "missing":
                self._pending = "missing"
                log.error("{label} {path}: cannot be read ({error}); the table read before "
                          "stays in use", label=self._label, path=self.path,
                          error=error.strerror)
            return False
        if signature == self._signature:
            self._pending = None
            return False
        written_lately = time.time() - signature[2] / 1e9 < self._check_every
        if written_lately and signature != self._pending:
            self._pending = signature        # still being written, perhaps
            return False
        self._pending = None
        try:
            self.value = self._parse(_read_lines(self.path))
        except OSError as error:
            # Not read: tried again at the next look.
            log.error("{label} {path} changed but cannot be read ({error}); the table "
                      "read before stays in use", label=self._label, path=self.path,
                      error=error.strerror or str(error))
            return False
        except (UnicodeDecodeError, ValueError) as error:
            self._signature = signature      # refused until it changes again
            log.error("{label} {path} changed but is refused: {error}; the table read "
                      "before stays in use", label=self._label, path=self.path, error=str(error))
            return False
        self._signature = signature
        log.info("{label} {path} changed: read again", label=self._label, path=self.path)
        return True

    def _stat(self):
        status = os.stat(self.path)
        return (status.st_ino, status.st_size, status.st_mtime_ns)


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()
