"""Remembered plugin answers: ``[plugin:NAME] cache_ttl`` and ``cache_size``.

Any plugin's lookups by address (RCPT, VRFY, EXPN) may be cached by the
relay, so a plugin that asks a database or a next hop need not keep a
cache of its own.  The key is the address alone (its domain without case),
so it suits plugins whose answer depends on nothing else: a table, a
directory, a callout.  A plugin that judges by the client or the sender
should not be given a ``cache_ttl``.

A failure (an exception, a failed or late Deferred) is never remembered:
the next question asks the plugin again.
"""

import collections

from relaymail.address import Mailbox

#: The methods whose answers are remembered: each is asked about one address.
CACHEABLE = frozenset({"check_recipient", "verify", "expand"})

#: What :meth:`AnswerCache.get` returns for an address not remembered.
MISS = object()

#: Entries kept per plugin when ``cache_size`` is not set.
DEFAULT_SIZE = 10000


class AnswerCache:
    """Answers by ``(method, address)`` for ``ttl`` seconds, the
    ``size`` most recently used ones at most."""

    def __init__(self, ttl, size=DEFAULT_SIZE):
        self.ttl = ttl
        self.size = size
        self._entries = collections.OrderedDict()

    def get(self, method, subject, now):
        key = (method, _key(subject))
        entry = self._entries.get(key)
        if entry is None:
            return MISS
        expires, answer = entry
        if now >= expires:
            del self._entries[key]
            return MISS
        self._entries.move_to_end(key)
        return answer

    def put(self, method, subject, answer, now):
        key = (method, _key(subject))
        self._entries[key] = (now + self.ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)


def _key(subject):
    """An address as the cache compares it: the local part as written (RFC
    5321 2.4), the domain without case."""
    if isinstance(subject, Mailbox):
        return (subject.local_text, subject.domain_key)
    local, at, domain = str(subject).rpartition("@")
    return (local, domain.lower()) if at else (str(subject), "")
