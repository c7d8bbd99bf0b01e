"""The SMTP client as a transport: ``smtp`` on the ITransport contract.

Every transport a Route names is an :class:`~relaymail.interfaces.ITransport`
in one :class:`~relaymail.delivery.transports.TransportRegistry`; this is
the built-in one for ``smtp`` (the smarthost, ``[routes]`` and MX, through
:class:`~relaymail.delivery.destinations.DestinationPool`).

It is used two ways:

- The queue hands it whole jobs (:meth:`SMTPTransport.submit`): one
  message's recipients for one Destination, as the scheduler grouped them.
  The pool runs them under its per-destination and total connection caps
  and reuses connections between jobs for the same destination, which a
  runner that calls ``deliver()`` per message, ``transport_concurrency``
  at a time, could not do.  The transports that take jobs this way say so
  by providing :class:`ITakesJobs`.
- Anyone holding the transport may call :meth:`SMTPTransport.deliver` as
  the contract says (a site transport that sends on by SMTP after doing
  its own work, a test).  That path submits the same jobs to the same
  pool, and answers with RecipientOutcome values that keep what the
  queue's path keeps: the reply code, the host that answered and the TLS
  of the session.
"""

import os
import shutil
import tempfile

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from relaymail import logline
from relaymail.delivery import tls_policy
from relaymail.delivery.destinations import BOUNCED, DEFERRED, SENT, Job, Outcome, in_groups
from relaymail.delivery.router import SMTP
from relaymail.interfaces import ITransport, RecipientOutcome
from relaymail.queue.message_view import mailbox_of, whole_file

log = Logger(namespace="relaymail.delivery")


class ITakesJobs(Interface):
    """A transport that runs its own connections and queues, and so takes
    the queue's jobs (relaymail.delivery.destinations.Job) whole instead
    of one ``deliver()`` call each; the TransportRunner passes them on."""

    busy = Attribute("True while a job is queued or running.")

    answering = Attribute(
        "How many ``deliver()`` calls are waiting on jobs: a stop lets the "
        "callers (site transports that send on through this one) hear what "
        "their jobs delivered before it cancels them.")

    def submit(job):
        """Run ``job``; call its ``on_done(job, outcomes)`` or
        ``on_abandoned(job)`` once (with ``decided=``, the Outcomes of
        those delivered, when a stop cut the job after some were)."""

    def drain():
        """Start no more jobs: :return: the jobs that will not run."""

    def stop():
        """Cut the jobs running; they are left to the next start."""


_KINDS = {SENT: RecipientOutcome.DELIVERED, DEFERRED: RecipientOutcome.DEFERRED,
          BOUNCED: RecipientOutcome.BOUNCED}


@implementer(ITransport, ITakesJobs)
class SMTPTransport:
    """:param pool: the DestinationPool that runs the SMTP sessions.
    :param router: the :class:`relaymail.delivery.router.BuiltinRouter`,
        which turns a Route's next hop into the pool's Destination.
    :param reactor: runs the copy of a message that is not a queue file.
    :param recipients_per_transaction: at most this many recipients in one
        job (None: no limit), as the queue's jobs have ([delivery]
        recipients_per_transaction).
    """

    name = SMTP

    def __init__(self, pool, router, reactor, recipients_per_transaction=None):
        self.pool = pool
        self.router = router
        self._reactor = reactor
        self._group_size = recipients_per_transaction
        self.answering = 0

    # -- the queue's way in ---------------------------------------------------

    @property
    def busy(self):
        return self.pool.busy

    def submit(self, job):
        self.pool.submit(job)

    def drain(self):
        return self.pool.drain()

    def stop(self):
        self.pool.stop()

    # -- the contract ---------------------------------------------------------

    def deliver(self, message, recipients, next_hop):
        """Send ``message`` to ``recipients`` by ``next_hop`` (a
        ``[routes]`` value, a Destination, or None for the built-in
        choice per recipient domain); see ITransport.

        A next hop that does not parse defers every recipient (4.3.5) as
        the queue does for a router's bad smtp next hop; a stop that cuts
        the delivery, or a cancel of the Deferred, defers the recipients
        still open (4.4.2) and keeps what the rest decided."""
        recipients = list(recipients)
        try:
            groups = self._destinations(recipients, next_hop)
        except ValueError as error:
            problem = f"bad smtp next hop {next_hop!r}: {error}"
            return defer.succeed({address: RecipientOutcome.deferred(problem, "4.3.5")
                                  for address in recipients})
        self.answering += 1
        d = self._message_file(message)
        d.addCallback(self._send, message, groups)
        return d.addBoth(self._answered)

    def _answered(self, result):
        self.answering -= 1
        return result

    def _destinations(self, recipients, next_hop):
        """``[(destination, addresses)]``: the jobs to submit."""
        by_destination = {}
        for address in recipients:
            destination = self.router.smtp_destination(next_hop, mailbox_of(address))
            by_destination.setdefault(destination, []).append(address)
        if self._group_size is None:
            return list(by_destination.items())
        return [(destination, group) for destination, addresses in by_destination.items()
                for group in in_groups(addresses, self._group_size)]

    def _message_file(self, message):
        """``(path, is a copy)``: the queue file itself when ``message`` is
        one read whole from it, else a private copy made in a thread (the
        client streams from a file it can stat and seek); None when the
        delivery was cancelled while the copy was being made."""
        path = whole_file(message)
        if path is not None:
            return defer.succeed((path, False))
        copying = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                            _copy, message)
        # Cancelled while copying: answered at once (_send of None), and
        # the copy, when it is made, removed.
        file = defer.Deferred(lambda d: d.callback(None))

        def copied(result):
            if file.called:
                _removing(None, result[0])
            else:
                file.callback(result)

        copying.addCallbacks(copied, lambda f: None if file.called else file.errback(f))
        return file

    def _send(self, file, message, groups):
        if file is None:
            return {address: RecipientOutcome.deferred(NOT_SENT, "4.4.2")
                    for _destination, addresses in groups for address in addresses}
        path, copied = file
        try:
            answers = self._answers(path, copied, message, groups)
        except BaseException:
            # A site's IMessage the jobs cannot be made of: nothing was
            # submitted, and the copy goes.
            if copied:
                _removing(None, path)
            raise
        asked = []
        for answer in answers:
            self.pool.submit(answer.job)
            asked.append(answer.outcomes)
        # A cancelled deliver() cancels every job's Deferred, which answers
        # (_Answer); consumeErrors for a failure all the same, so that it
        # is not logged as unhandled once for each.
        d = defer.gatherResults(asked, consumeErrors=True)
        d.addCallback(lambda lists: {o.address: recipient_outcome(o) for ol in lists for o in ol})
        if copied:
            d.addBoth(_removing, path)
        return d

    def _answers(self, path, copied, message, groups):
        """An :class:`_Answer` with its Job for each group."""
        envelope = message.envelope
        sender = str(message.sender) if message.sender is not None else ""
        record = envelope.to_dict()
        answers = []
        for destination, addresses in groups:
            answer = _Answer(self.pool)
            destination = tls_policy.with_demand(destination, record)
            answer.job = Job(queue_id=message.queue_id, destination=destination, sender=sender,
                             recipients=addresses, message_path=path,
                             # A private copy is the message whole, whatever
                             # a site's IMessage says its size is.
                             message_size=None if copied else message.size,
                             body=envelope.body,
                             smtputf8=envelope.smtputf8, envelope=record,
                             on_done=answer.done, on_abandoned=answer.abandoned)
            answers.append(answer)
        return answers


def recipient_outcome(outcome):
    """The RecipientOutcome saying what the pool's Outcome says."""
    return RecipientOutcome(_KINDS[outcome.status], outcome.enhanced, outcome.text,
                            code=outcome.code, remote=outcome.remote, tls=outcome.tls)


class _Answer:
    """One job that :meth:`SMTPTransport.deliver` gave the pool, and the
    Deferred (``outcomes``) of its Outcomes.

    Cancelled (the caller's caller gave up: the TransportRunner's
    ``transport_timeout``, or a stop after its wait), it answers at once
    with every recipient deferred (4.4.2), so that the deliver() answers
    with what its other jobs decided, as the transport contract asks.  The
    pool gives the job up first (DestinationPool.give_up): sent after its
    recipients were reported deferred, it would be sent again at the
    retry.  One waiting for a connection or for its next host is not
    sent, one under way whose message has not begun to go has its
    connection dropped ("not sent"); one whose message went goes on, and
    what it does reaches only the log ("may have been delivered"): twice
    rather than never.  (A caller whose callbacks wait on more after that
    answer is ended by the runner, TransportRunner._not_ended.)"""

    def __init__(self, pool):
        self.pool = pool
        self.job = None
        self.outcomes = defer.Deferred(self._cancelled)
        #: Set when cancelled after its message began to go: it goes on.
        self.went_on = False

    def done(self, job, outcomes):
        if not self.outcomes.called:
            self.outcomes.callback(outcomes)
        elif self.went_on:
            # Nobody hears this answer: the log does, so that whoever
            # sees the message come twice (or not) can find out why.
            said = "; ".join(f"{o.address} {o.status} {o.enhanced} {o.text}" for o in outcomes)
            logline.info(log, f"{job.queue_id}: the delivery given up while its message went "
                              f"ended: {said}", queue_id=job.queue_id)

    def abandoned(self, job, decided=()):
        self.done(job, _cut(job, decided))

    def _cancelled(self, outcomes):
        unsent = self.pool.give_up(self.job)
        self.went_on = not unsent
        if not outcomes.called:
            # (A session whose drop ended its delivery at once answered it.)
            outcomes.callback(_cut(self.job, (), NOT_SENT if unsent else GIVEN_UP))


#: Why the recipients of a job that smtp's deliver() gave up are deferred.
CUT_BY_A_STOP = "delivery cut by a stop"
NOT_SENT = "not sent: the delivery was given up before its message went"
GIVEN_UP = "delivery given up while under way: it may have been delivered"


def _cut(job, decided, why=CUT_BY_A_STOP):
    """A job cut short: ``decided`` (what it delivered before), the rest
    deferred, saying ``why``."""
    done = {outcome.address for outcome in decided}
    return list(decided) + [Outcome(address, DEFERRED, None, "4.4.2", why)
                            for address in job.recipients if address not in done]


def _copy(message):
    handle, path = tempfile.mkstemp(prefix="relaymail-smtp-")
    try:
        with os.fdopen(handle, "wb") as out, message.open() as source:
            shutil.copyfileobj(source, out, 1 << 20)
    except BaseException:
        os.unlink(path)
        raise
    return path, True


def _removing(result, path):
    try:
        os.unlink(path)
    except OSError:
        pass
    return result
