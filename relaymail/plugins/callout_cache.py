"""Where the ``callout`` plugin remembers the next hop's answers.

An inbound worker remembers them in the master's shared region
(:class:`relaymail.process.shared_counts.SharedVerdicts`), so that an
address one worker asked about is known to every worker: Postfix's smtpd
processes likewise share the one verify(8) cache.  Without the sharing a
relay with four inbound workers would ask the internal server up to four
times about each address, and a client could have it asked again by
reconnecting until it lands on a worker that has not.  Any other process
(``[server] workers = 0``, relaymail-check) keeps its answers to itself.

What is remembered is the hop's reply code and enhanced code; the answer
the client hears is made from them (relaymail.plugins.callout), so every
worker gives the same one.  A shared table holds ``cache_entries`` answers
of each kind a worker; when a worker's row is full of answers still young,
a new answer is not remembered until old ones run out (a local cache
forgets its least recently used instead).
"""

from relaymail.policy.answer_cache import MISS, AnswerCache
from relaymail.process.shared_counts import pack_enhanced, unpack_enhanced

#: The most ``cache_entries``: each inbound worker's share of the shared
#: tables is sized by it (relaymail.process.shared_counts), 64 MiB a kind
#: at this bound, and walked whole when it fills.
MAX_CACHE_ENTRIES = 1_000_000

#: The shared tables this process remembers answers in
#: (share_between_workers): ``(known, unknown)``, or None.
_shared_tables = None

# AnswerCache keys by method, then address.
_ASKED = "check_recipient"


def share_between_workers(known, unknown):
    """Make the callout plugins this process builds from now on remember
    answers in ``known`` and ``unknown`` (SharedVerdicts), with the other
    inbound workers: called by an inbound worker before it builds its
    plugins."""
    global _shared_tables
    _shared_tables = (known, unknown)


def answer_caches(options):
    """``(known, unknown)``: where a callout plugin with ``options``
    (CalloutSettings) remembers each kind of answer."""
    if _shared_tables is not None:
        known, unknown = _shared_tables
        return (SharedAnswers(known, options.positive_ttl),
                SharedAnswers(unknown, options.negative_ttl))
    return (LocalAnswers(options.positive_ttl, options.cache_entries),
            LocalAnswers(options.negative_ttl, options.cache_entries))


class LocalAnswers:
    """Answers of one kind, remembered in this process for ``ttl`` s."""

    def __init__(self, ttl, size):
        self._cache = AnswerCache(ttl, size)

    def get(self, recipient, now):
        """``(code, enhanced)`` remembered for ``recipient``, or None."""
        remembered = self._cache.get(_ASKED, recipient, now)
        return None if remembered is MISS else remembered

    def put(self, recipient, code, enhanced, now):
        self._cache.put(_ASKED, recipient, (code, enhanced), now)


class SharedAnswers:
    """Answers of one kind in a shared table, for ``ttl`` s."""

    def __init__(self, table, ttl):
        self._table = table
        self._ttl = ttl

    def get(self, recipient, now):
        found = self._table.get(_name(recipient), now, self._ttl)
        if found is None:
            return None
        code, enhanced = found
        return code, unpack_enhanced(enhanced)

    def put(self, recipient, code, enhanced, now):
        self._table.put(_name(recipient), code, pack_enhanced(enhanced), now, self._ttl)


def _name(recipient):
    # As AnswerCache compares addresses: the local part as written, the
    # domain without case.
    return f"callout\0{recipient.local_text}@{recipient.domain_key}"
