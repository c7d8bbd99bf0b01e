"""The SMTP sessions open in this process, and their orderly end.

On SIGTERM, and in the old workers after SIGHUP, the listeners stop
accepting and :meth:`OpenSessions.end` asks every session to finish: one
waiting for its next command gets ``421 4.3.2`` at once; one in DATA (or
waiting for its 250 from the queue) reads the rest of its message, gets its
reply, then the 421 instead of its next command.  After ``[server]
shutdown_grace`` seconds the sessions still open are cut; a message whose
final dot had not come is not queued (its file in ``tmp/`` is removed), so
each message is either queued with its 250 or not at all.
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="relaymail.smtp")

#: After the grace, a session waiting for the queue's answer to its final
#: dot (an fsync) gets this much longer: cutting it then would queue a
#: message whose client never heard 250, and send it twice.
COMMIT_EXTRA = 5.0


class OpenTransactions:
    """How many of the process's sessions are between an accepted MAIL and
    their final dot (or RSET, or the end of the connection): messages that
    may soon be committed.  The commit thread reads :attr:`count` to decide
    whether waiting for one more commit before a sync is worth it
    (relaymail.queue.batch); a plain int, read and written under the GIL."""

    def __init__(self):
        self.count = 0

    def opened(self):
        self.count += 1

    def closed(self):
        self.count -= 1


class OpenSessions:
    """Every SMTPServerProtocol between connectionMade and connectionLost."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._open = set()
        #: Shared by the dialogues of all this process's listeners.
        self.transactions = OpenTransactions()
        self._all_ended = None
        self.ending = False
        #: Set for a worker replaced after SIGHUP: its sessions may go on
        #: (Postfix's smtpd likewise serves its client to the end after a
        #: reload) until the grace runs out, and only then get the 421.
        self.patient = False

    def __len__(self):
        return len(self._open)

    def add(self, session):
        self._open.add(session)
        if self.ending:
            session.end_politely()

    def remove(self, session):
        self._open.discard(session)
        if not self._open and self._all_ended is not None:
            ended, self._all_ended = self._all_ended, None
            ended.callback(None)

    def end(self, grace):
        """Ask every session to finish; cut what is left after ``grace``
        seconds.  The Deferred fires once none is open."""
        count = len(self._open)
        calls = []
        if self.patient:
            if count:
                log.info("Replaced: {count} SMTP sessions open may go on for up to {grace:g}s",
                         count=count, grace=grace)
            calls.append(self._reactor.callLater(grace, self._end_politely))
            grace += COMMIT_EXTRA
        else:
            if count:
                log.info("Stopping: {count} SMTP sessions open; those in DATA get up to "
                         "{grace:g}s to finish", count=count, grace=grace)
            self._end_politely()
        if not self._open:
            return defer.succeed(None)
        self._all_ended = defer.Deferred()
        ended = self._all_ended
        calls.append(self._reactor.callLater(grace, self._cut, committing_too=False))
        calls.append(self._reactor.callLater(grace + COMMIT_EXTRA, self._cut,
                                             committing_too=True))

        def done(result):
            for call in calls:
                if call.active():
                    call.cancel()
            return result
        return ended.addBoth(done)

    def hurry(self):
        """A patient end becomes an ordinary one: the sessions between
        commands get their 421 now rather than at the end of the grace."""
        if self.patient and not self.ending:
            self.patient = False
            self._end_politely()

    def _end_politely(self):
        self.ending = True
        for session in list(self._open):
            session.end_politely()

    def _cut(self, committing_too):
        left = [s for s in self._open if committing_too or not s.waiting_for_queue]
        if left:
            log.warn("{count} SMTP sessions still open after [server] shutdown_grace: cut; "
                     "messages without their 250 were not queued", count=len(left))
        for session in left:
            session.cut()


class EndSessions(service.Service):
    """The inbound side of an orderly stop (relaymail.lifecycle): its drain
    stops the listener services, then ends the sessions they fed."""

    def __init__(self, listeners, sessions):
        self._listeners = listeners
        self.sessions = sessions

    def drain(self, grace):
        # Waited for: a listener whose stopListening is still under way when
        # the orderly stop's second step comes is still running, and a
        # second stopService would cancel the first (a critical line on
        # every stop with workers = 0).
        stopping = [defer.maybeDeferred(listener.stopService) for listener in self._listeners]
        ended = self.sessions.end(grace)
        return defer.gatherResults(stopping + [ended], consumeErrors=True)
