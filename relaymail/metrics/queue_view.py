"""The queue as the master sees it at a scrape: how many messages are in
``active/`` and ``hold/``, and the oldest of them.

It lists the two directories and reads no record, except those of the
few oldest messages the status page shows.  A listing of 100,000 messages
takes about 0.1 s, so it is kept for :data:`REFRESH` seconds: scrapes and
page loads between refreshes cost nothing.  The listing runs in a thread
(:class:`relaymail.metrics.web.MetricsService` calls :meth:`QueueView.refresh`
every :data:`REFRESH` seconds), so a scrape never waits for it on the
master's reactor, which also relays the queue tool and watches the workers.  A queue id carries the time it
was minted (relaymail.queue.queue_id), so the oldest message is the
smallest id and its age needs no file either.
"""

import heapq

from relaymail.queue import queue_id as queue_ids
from relaymail.queue.layout import ACTIVE, HOLD

#: Seconds a listing is reused.
REFRESH = 2.0
#: Messages the status page shows, oldest first.
OLDEST = 10


class QueueView:
    def __init__(self, spool):
        self._spool = spool
        self._counts = (0, 0)
        self._oldest = []           # [(queue id, ACTIVE or HOLD)], oldest first

    def refresh(self):
        """List the spool again (in a thread: it reads two directories)."""
        try:
            active = list(self._spool.ids())
            held = list(self._spool.held_ids())
        except OSError:
            active, held = [], []       # no spool yet (or no longer)
        oldest = heapq.nsmallest(
            OLDEST, [(i, ACTIVE) for i in heapq.nsmallest(OLDEST, active)]
            + [(i, HOLD) for i in heapq.nsmallest(OLDEST, held)])
        # Each a whole new object, so the reactor thread reads either the
        # last listing or this one, never half of each.
        self._counts, self._oldest = (len(active), len(held)), oldest


    def counts(self):
        """(messages in active/, messages in hold/) at the last listing."""
        return self._counts

    def oldest_age(self, now):
        """Seconds since the oldest message was queued; 0 for an empty queue."""
        oldest = self._oldest
        if not oldest:
            return 0.0
        return max(0.0, now - queue_ids.minted_at(oldest[0][0]))

    def oldest_messages(self, now):
        """The oldest messages as dicts: id, where, sender, age, last_error."""
        shown = []
        for queue_id, where in self._oldest:
            try:
                record = self._spool.read_record(queue_id, where)
            except Exception:
                continue        # delivered, moved or damaged since the listing
            shown.append({"id": queue_id, "where": where,
                          "sender": record["envelope"].get("sender", ""),
                          "age": max(0.0, now - record.get("created_at", now)),
                          "last_error": record.get("last_error")})
        return shown
