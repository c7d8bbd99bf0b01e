"""When each queued message is tried, and what its results do to it.

The scheduler is the queue's one owner while the daemon runs (Postfix's
qmgr): it knows which messages are due, routes each recipient (the
``[plugins] routers``, else the built-in router of
:mod:`relaymail.delivery.router`), splits each message into one job per
destination for the :class:`~relaymail.delivery.transports.TransportRunner`
(which gives smtp's to the SMTP client's connection pool), records every recipient's outcome in the message's queue record as it
comes, retries deferred recipients with backoff, returns failures to the
sender as DSNs, and removes a message once every recipient is done.

Retry times follow Postfix: the first retry ``min_backoff`` after the
first failure, doubling each time up to ``max_backoff``; after
``lifetime`` the recipients still deferred bounce.  Crash safety: a
recipient is marked sent in the record as soon as its job ends, so after a
restart only the others are tried again; a crash before that write means
that recipient gets the message twice, never none.

A bounce is never silently lost and never loops.  A message from the null
sender ``<>`` (normally one of our DSNs) that fails for good goes once to
``[queue] double_bounce_recipient`` (Postfix 2bounce_notice_recipient), a
notice marked ``double_bounce`` in its record; when that fails too it is
discarded with a log line.  ``[delivery] soft_bounce`` (Postfix's safety
switch of the same name) turns every failure that would bounce at once --
a 5xx from the next hop, a null MX, a domain that does not exist, a message
the next hop cannot take -- into a deferral, logged with the original
reply.  The queue lifetime still ends: soft_bounce keeps mail queued while
a set-up is tried out, not for ever.
"""

import collections
import copy
import heapq
import itertools
import os
import time
from dataclasses import replace

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaymail import dsn, logline
from relaymail.delivery.destinations import (
    BOUNCED, DEFERRED, SENT, Job, Outcome, abandon, in_groups)
from relaymail.delivery import tls_policy
from relaymail.delivery.router import SMTP, BuiltinRouter
from relaymail.delivery.routing import Destination
from relaymail.delivery.transports import KIND as TRANSPORT_KIND, TransportHop, delivery_transports
from relaymail.interfaces import ISessionContext
from relaymail.metrics import instruments
from relaymail.queue import record as records
from relaymail.queue.queue_file import NotRegularFile
from relaymail.queue.control import ControlError
from relaymail.queue.selection import Selection, matching_ids
from relaymail.queue.bounce import FailedRecipient, build_dsn, is_double_bounce, read_header_section
from relaymail.address import AddressError, parse_forward_path
from relaymail.policy.routers import RouterFailed

log = Logger(namespace="relaymail.queue")

_FINAL = (records.SENT, records.BOUNCED)


#: After the grace and the cut, how long a drain waits for the cut
#: deliveries' outcomes to be written before it lets the spool stop.
DRAIN_EXTRA = 5.0

#: Seconds a message committed by an inbound worker is left to its notice
#: by :meth:`Scheduler.pickup`.  A notice takes milliseconds: the commit's
#: callback sends it, the delivery worker reads it at its reactor's next
#: turn.
PICKUP_MIN_AGE = 2.0


def backoff(attempts, minimum, maximum):
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return min(maximum, minimum * 2 ** max(0, attempts - 1))


class _Attempt:
    """One delivery attempt of one message, while its jobs run."""

    def __init__(self, record):
        self.record = record
        self.jobs_left = 0
        self.bounced = []           # Outcomes that bounced in this attempt
        self.writes = defer.succeed(None)
        self.after = None           # "delete" or "hold", asked for meanwhile
        self.abandoned = False      # some jobs will not run: the relay is stopping
        self.shaped_until = None    # some jobs wait for a [delivery_rates] slot till then
        self.failed = False         # some recipient was deferred by a real failure
        self.succeeded = []         # (Outcome, action): success notices owed (NOTIFY=SUCCESS)


class Scheduler(service.Service):
    """Drives delivery of everything in the spool.

    :param spool: the relaymail.queue.spool.Spool.
    :param pool: a DestinationPool that runs the smtp jobs.
    :param router: the built-in router (relaymail.delivery.router), or the
        routing.Router it wraps; the policy's routers are asked first.
    :param policy: a relaymail.policy.recipients.Policy; expands the
        double-bounce recipient (aliases) as the server expands recipients.
        None delivers to it as configured.
    :param rates: a relaymail.delivery.shaping.OutboundRates, or None.
    :param transports: the relaymail.delivery.transports.TransportRunner
        that runs every job, ``pool`` among its transports as smtp; None
        makes one with ``pool`` and the built-in transports.
    """

    def __init__(self, spool, pool, router, settings, reactor, clock=time.time, policy=None,
                 rates=None, transports=None):
        self.spool = spool
        self._rates = rates
        # queue id -> {rate key: time}: the slot a waiting message reserved.
        self._reserved = {}
        # The built-in router: a routing.Router is wrapped (tests give one).
        self.router = router if isinstance(router, BuiltinRouter) else BuiltinRouter(router)
        if transports is None:
            transports = delivery_transports(reactor, settings, pool, self.router)
        self.transports = transports
        self.settings = settings
        self.policy = policy
        self.hostname = settings.server.hostname
        self._reactor = reactor
        self._clock = clock
        self._heap = []
        self._order = itertools.count()
        self._scheduled = {}        # queue id -> time it is due
        self._forced = set()        # due now whatever the record says
        self._attempts = {}         # queue id -> _Attempt in progress
        # Ids being held, released, deleted or set aside in a spool thread
        # (how many such moves are under way): neither scheduled nor in an
        # attempt, and not to be picked up meanwhile.
        self._moving = collections.Counter()
        # queue id -> a record newer in memory than on disk (its write
        # failed), or as fresh (just committed): used instead of reading it.
        self._unsaved = {}
        self._timer = None
        self._running = False
        self._drained = None        # a Deferred while a drain waits for attempts

    # -- life cycle -------------------------------------------------------

    def startService(self):
        super().startService()
        self._running = True
        now = self._clock()
        # Records are read when each message comes due, not all at start-up:
        # a large queue would otherwise hold up the first delivery.
        queued = sorted(self.spool.ids())
        for queue_id in queued:
            self._schedule(queue_id, now)
        log.info("{count} messages scheduled; at most {limit} are delivered at once",
                 count=len(queued), limit=self.settings.queue.active_limit)

    def drain(self, grace):
        """Start no more attempts; let those under way finish for up to
        ``grace`` seconds, then cut their connections.  The Deferred fires
        once every attempt has recorded its outcome (so that the spool,
        stopped after us, has no update left to take)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for job in self.transports.drain():
            # Its own callback: the pool's waiting jobs include those
            # SMTPTransport.deliver made for a site transport, which are
            # not this scheduler's (found by review: one was counted
            # against its message's attempt, which then ended early).
            abandon(job)
        if not self._attempts:
            return defer.succeed(None)
        log.info("Stopping: {count} messages being delivered get up to {grace:g}s to finish",
                 count=len(self._attempts), grace=grace)
        self._drained = defer.Deferred()
        drained = self._drained
        cut = self._reactor.callLater(grace, self._cut_deliveries)
        give_up = self._reactor.callLater(grace + DRAIN_EXTRA, self._stop_waiting)

        def done(result):
            for call in (cut, give_up):
                if call.active():
                    call.cancel()
            return result
        return drained.addBoth(done)

    def _job_abandoned(self, job, decided=()):
        """A job the pool will not run now: its recipients stay as they
        are, due again at the next start (no attempt is counted), but for
        the Outcomes of ``decided``: those a transport the stop cut had
        delivered, recorded so that they are not sent again."""
        attempt = self._attempts.get(job.queue_id)
        if attempt is None:
            return
        for outcome in decided:
            self._record(job.queue_id, attempt, self._soft(outcome))
        attempt.abandoned = True
        attempt.jobs_left -= 1
        if decided and attempt.jobs_left > 0:
            # As _job_done does: durable now, so that a crash before the
            # other jobs end does not send these again.
            self._write(job.queue_id, attempt)
        if attempt.jobs_left <= 0:
            self._conclude(job.queue_id, attempt)

    def _cut_deliveries(self):
        log.warn("{count} deliveries still under way after [server] shutdown_grace: cut; "
                 "they are tried again at the next start", count=len(self._attempts))
        self._stop_pools()

    def _stop_waiting(self):
        if self._drained is not None:
            log.warn("{count} messages' outcomes not recorded in time; they are tried again "
                     "at the next start", count=len(self._attempts))
            drained, self._drained = self._drained, None
            drained.callback(None)

    def stopService(self):
        super().stopService()
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._stop_pools()

    def _stop_pools(self):
        self.transports.stop()

    # -- intake -----------------------------------------------------------

    def message_queued(self, queue_id, record=None):
        """A new message was committed: try it now.  ``record``, its queue
        record as committed, spares reading it back from the disk."""
        if self._exists(queue_id):
            # A scan found it first (a flush between the commit's rename
            # and its callback): it is being delivered, waits for a retry
            # or is being moved.  The notice is news no longer, and its
            # record, as committed, older than the one on disk.
            return
        if record is not None:
            self._unsaved[queue_id] = record
        self._schedule(queue_id, self._clock())

    def deferred_count(self, now):
        """Messages waiting to be tried again (due after ``now``): the
        queue's deferred state, for relaymail.metrics."""
        return sum(1 for when in self._scheduled.values() if when > now)

    def _schedule(self, queue_id, when):
        self._scheduled[queue_id] = when
        heapq.heappush(self._heap, (when, next(self._order), queue_id))
        self._arm()

    def _arm(self):
        if not self._running or not self._heap:
            return
        if len(self._attempts) >= self.settings.queue.active_limit:
            return                  # _ended() arms again as attempts end
        delay = max(0.0, self._heap[0][0] - self._clock())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self._reactor.seconds() <= delay:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(delay, self._run_due)

    def _run_due(self):
        self._timer = None
        now = self._clock()
        limit = self.settings.queue.active_limit
        try:
            while self._heap and self._heap[0][0] <= now and len(self._attempts) < limit:
                when, _, queue_id = heapq.heappop(self._heap)
                if self._scheduled.get(queue_id) != when:
                    continue            # rescheduled since
                del self._scheduled[queue_id]
                if queue_id in self._attempts:
                    continue            # running: its end schedules what is next
                if queue_id in self._moving:
                    # The move decides what comes next: gone, held, or due
                    # again (released, or a move that failed); left in
                    # _scheduled, a message set aside would still exist
                    # to retry and pickup.
                    continue
                try:
                    self._start(queue_id, now)
                except Exception:
                    # One message we cannot handle now (EMFILE, EIO...) must
                    # not stop the others: try it again later.
                    log.failure("{queue_id}: cannot start delivery", queue_id=queue_id)
                    self._attempts.pop(queue_id, None)
                    self._schedule(queue_id, now + self.settings.queue.min_backoff)
        finally:
            self._arm()

    # -- an attempt ---------------------------------------------------------

    def _start(self, queue_id, now):
        try:
            # A record whose last write failed is newer in memory than on
            # disk: using the disk copy would send to recipients again.  It
            # is kept until a write of the record succeeds or the message
            # goes (_write, _remove, _in_thread_or_keep), not just until a
            # start: one too early, or failing, would lose it.
            unsaved = self._unsaved.get(queue_id)
            if unsaved is not None and not self.spool.is_active(queue_id):
                del self._unsaved[queue_id]
                return              # delivered, deleted or held since it was kept
            record = unsaved or self.spool.load(queue_id)
        except FileNotFoundError:
            return                  # deleted or held meanwhile
        except records.CorruptRecord as error:
            # Damaged behind our back: set aside for a person, never fatal.
            self._quarantine(queue_id, f"bad record: {error}")
            return
        except NotRegularFile as error:
            # Put there by hand: a directory or a FIFO would fail, or
            # block, each time it comes due.
            self._quarantine(queue_id, f"{os.path.basename(error.filename)} is {error.strerror}")
            return
        if unsaved is None:
            # A delivery worker checks each message here rather than all of
            # them at start (Spool.recover); a lone lstat(2).
            problem = self.spool.body_problem(queue_id, record)
            if problem is not None:
                self._quarantine(queue_id, problem)
                return
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        if not forced and record["next_attempt_at"] > now + 0.001:
            self._schedule(queue_id, record["next_attempt_at"])
            return
        attempt = _Attempt(record)
        attempt.started = now
        # Registered before routing, which may wait for a router: the
        # message counts as active, and a hold or delete asked for
        # meanwhile is taken as for a message being delivered.
        self._attempts[queue_id] = attempt
        d = defer.maybeDeferred(self._jobs_for, queue_id, record, attempt)
        d.addCallback(self._submit, queue_id, attempt, now)
        d.addErrback(self._routing_failed, queue_id, now)

    def _submit(self, jobs, queue_id, attempt, now):
        if not self._running:
            # A drain began while routers were asked: nothing was tried.
            attempt.abandoned = True
            jobs = []
        elif self._rates:
            jobs = self._within_rates(queue_id, attempt, jobs, now)
        if not jobs:
            self._conclude(queue_id, attempt)
            return
        attempt.jobs_left = len(jobs)
        for job in jobs:
            self.transports.submit(job)

    def _routing_failed(self, failure, queue_id, now):
        # As for a message that cannot be started (see _run_due): try it
        # again later; its recipients are as they were.
        log.failure("{queue_id}: cannot start delivery", failure, queue_id=queue_id)
        self._attempts.pop(queue_id, None)
        self._schedule(queue_id, now + self.settings.queue.min_backoff)

    def _jobs_for(self, queue_id, record, attempt):
        """One Job per destination of the recipients still to do: a
        Deferred firing with the list (at once when no router answers
        later).  Each recipient is routed by the routers, else by the
        built-in router; one whose routing fails is deferred."""
        envelope = record["envelope"]
        context = None
        # Without routers every answer is at hand: no Deferred a recipient
        # on this path, which every delivered message takes.
        asking = self.policy is not None and self.policy.routers_enabled
        routes = []
        for entry in record["recipients"]:
            if entry["status"] in _FINAL:
                continue
            address = entry["address"]
            try:
                mailbox = parse_forward_path(f"<{address}>", smtputf8=True)
            except AddressError as error:
                # Cannot happen for what our server accepted; a hand-edited
                # record could do it.
                self._record(queue_id, attempt, self._soft(Outcome(
                    address, BOUNCED, None, "5.1.3", f"bad recipient address: {error}")))
                continue
            if not asking:
                routes.append(self._destination((None, None), queue_id, address, mailbox))
                continue
            if context is None:
                context = _RelayContext(self.hostname, envelope["sender"], queue_id)
            asked = self.policy.route(mailbox, context)
            routes.append(asked.addBoth(self._destination, queue_id, address, mailbox))
        d = defer.gatherResults(routes, consumeErrors=True) if asking else defer.succeed(routes)

        def grouped(destinations):
            by_destination = {}
            for address, destination, outcome in destinations:
                if outcome is not None:
                    self._record(queue_id, attempt, outcome)
                else:
                    # Recipients under different [delivery_rates] limits
                    # (two domains [routes] sends to one host) go as jobs
                    # of their own, each waiting for its own limit's turn.
                    if isinstance(destination, Destination):
                        destination = tls_policy.with_demand(destination, envelope)
                    key = destination, self._rate_key(destination, address)
                    by_destination.setdefault(key, []).append(address)
            group_size = self.settings.delivery.recipients_per_transaction
            return [
                Job(queue_id=queue_id, destination=destination, sender=envelope["sender"],
                    recipients=group, message_path=self.spool.message_path(queue_id),
                    body=envelope.get("body", "7BIT"), smtputf8=envelope.get("smtputf8", False),
                    on_done=self._job_done, on_abandoned=self._job_abandoned,
                    envelope=envelope, message_size=record["size"])
                for (destination, _rate), addresses in by_destination.items()
                for group in in_groups(addresses, group_size)
            ]
        return d.addCallback(grouped)

    def _rate_key(self, destination, address):
        """The [delivery_rates] limit a recipient counts against, or None."""
        if not self._rates or destination.kind == TRANSPORT_KIND:
            # [delivery_rates] shapes what goes out by SMTP; the other
            # transports are the site's own (a mailbox server, a command,
            # a web hook), bounded by transport_concurrency.
            return None
        return self._rates.key_for(destination, address.rpartition("@")[2].lower())

    def _destination(self, answer, queue_id, address, mailbox):
        """``(address, destination, None)`` for a recipient a router (or
        the built-in one) routed, ``(address, None, Outcome)`` for one
        deferred because its routing failed."""
        if isinstance(answer, Failure):
            problem = (answer.value.problem if answer.check(RouterFailed)
                       else f"{type(answer.value).__name__}: {answer.value}")
            by = answer.value.plugin if answer.check(RouterFailed) else "builtin"
            return address, None, Outcome(address, DEFERRED, None, "4.3.0",
                                          f"router {by} failed: {problem}")
        route, by = answer
        if route is None:
            route, by = self.router.route(mailbox, None), self.router.name
        if route.transport == SMTP:
            try:
                return address, self.router.smtp_destination(route.next_hop, mailbox), None
            except ValueError as error:
                problem = f"router {by}: bad smtp next hop {route.next_hop!r}: {error}"
                log.error("{queue_id}: <{address}>: {problem}", queue_id=queue_id,
                          address=address, problem=problem)
                return address, None, Outcome(address, DEFERRED, None, "4.3.5", problem)
        if not self.transports.knows(route.transport):
            known = ", ".join(self.transports.registry.names())
            problem = f"no transport named {route.transport} (router {by}; known: {known})"
            log.error("{queue_id}: <{address}>: {problem}", queue_id=queue_id, address=address,
                      problem=problem)
            return address, None, Outcome(address, DEFERRED, None, "4.3.5", problem)
        try:
            self.transports.check_next_hop(route.transport, route.next_hop)
        except ValueError as error:
            problem = f"router {by}: bad {route.transport} next hop: {error}"
            log.error("{queue_id}: <{address}>: {problem}", queue_id=queue_id, address=address,
                      problem=problem)
            return address, None, Outcome(address, DEFERRED, None, "4.3.5", problem)
        return address, TransportHop(route.transport, route.next_hop), None

    def _within_rates(self, queue_id, attempt, jobs, now):
        """The jobs whose destination has a free [delivery_rates] slot, each
        taking it; the others wait in the queue for theirs, with no attempt
        counted and nothing logged as a failure."""
        going = []
        reserved = self._reserved.pop(queue_id, {})
        # A message takes one slot of a limit, however many transactions
        # its recipients there need ([delivery] recipients_per_transaction):
        # the jobs after the first under one key go or wait with it.
        goes_by_key = {}
        for job in jobs:
            # One key for all the job's recipients (see _jobs_for).
            key = self._rate_key(job.destination, job.recipients[0])
            if key is None or goes_by_key.get(key):
                going.append(job)
                continue
            if key in goes_by_key:
                continue
            # A slot reserved at an earlier look is this message's own (a
            # flush does not jump the line: it waits for it still).
            until = reserved.pop(key, None)
            if until is not None and until <= now - self._rates.period(key):
                # Reserved long ago (the message was held, or its attempt
                # ran late): that slot's period is over; take a new one.
                until = None
            if until is None:
                until = self._rates.reserve(key, now)
            goes_by_key[key] = until <= now + 0.001
            if goes_by_key[key]:
                going.append(job)
                continue
            if len(self._reserved) > 2 * self.settings.queue.active_limit:
                self._forget_old_reservations(now)
            self._reserved.setdefault(queue_id, {})[key] = until
            attempt.shaped_until = until if attempt.shaped_until is None else min(
                attempt.shaped_until, until)
            logline.info(log, f"{queue_id}: {job.destination.label}: [delivery_rates] {key}: "
                              f"its turn is in {until - now:.1f}s; waiting in the queue",
                         queue_id=queue_id, destination=job.destination.label,
                         wait=until - now)
        return going

    def _forget_old_reservations(self, now):
        """Drop the reservations of messages that never came back for them
        (deleted or held meanwhile): only those whose slot's period is over."""
        for queue_id in list(self._reserved):
            slots = {key: until for key, until in self._reserved[queue_id].items()
                     if until > now - self._rates.period(key)}
            if slots:
                self._reserved[queue_id] = slots
            else:
                del self._reserved[queue_id]

    def _job_done(self, job, outcomes):
        attempt = self._attempts.get(job.queue_id)
        if attempt is None:
            return
        instruments.destination_attempt(job.destination.label, outcomes,
                                        self._clock() - attempt.started, self._clock())
        for outcome in outcomes:
            self._record(job.queue_id, attempt, self._soft(outcome))
        attempt.jobs_left -= 1
        if attempt.jobs_left > 0:
            # Other destinations are still going: make what is done so far
            # durable now, so a crash does not send it again.
            self._write(job.queue_id, attempt)
        else:
            self._conclude(job.queue_id, attempt)

    def _soft(self, outcome):
        """``outcome``, a bounce made a deferral when soft_bounce is on.
        The enhanced code becomes transient (RFC 3463 2) and the reply is
        kept whole in the text, so the log and the record show what would
        have bounced."""
        if outcome.status != BOUNCED or not self.settings.delivery.soft_bounce:
            return outcome
        return replace(outcome, status=DEFERRED, code=None,
                       enhanced="4" + (outcome.enhanced or "5.0.0")[1:],
                       text=f"{_reply_text(outcome)}; soft_bounce = yes: deferred, not bounced")

    def _record(self, queue_id, attempt, outcome):
        now = self._clock()
        for entry in attempt.record["recipients"]:
            if entry["address"] == outcome.address and entry["status"] not in _FINAL:
                entry["status"] = {SENT: records.SENT, DEFERRED: records.DEFERRED,
                                   BOUNCED: records.BOUNCED}[outcome.status]
                entry["attempts"] += 1
                entry["updated_at"] = now
                if outcome.status != SENT:
                    entry["last_error"] = _describe(outcome)
                    attempt.record["last_error"] = entry["last_error"]
                break
        if outcome.status == BOUNCED:
            attempt.bounced.append(outcome)
        elif outcome.status == DEFERRED:
            attempt.failed = True
        elif outcome.notice is not None and dsn.wants(
                _notify_of(attempt.record, outcome.address), dsn.SUCCESS):
            attempt.succeeded.append((outcome, outcome.notice))
        delay = now - attempt.record["created_at"]
        instruments.recipient_outcome(outcome.status, delay)
        relay = outcome.remote or "none"
        tls = f", tls={outcome.tls}" if outcome.tls else ""
        logline.info(
            log, f"{queue_id}: to=<{outcome.address}>, relay={relay}{tls}, delay={delay:.2f}, "
                 f"dsn={outcome.enhanced}, status={outcome.status} ({_reply_text(outcome)})",
            queue_id=queue_id, recipient=outcome.address, relay=relay, tls=outcome.tls,
            delay=delay, dsn=outcome.enhanced, status=outcome.status)

    def _conclude(self, queue_id, attempt):
        """Every job of the attempt is over: bounce, retry or remove."""
        now = self._clock()
        record = attempt.record
        deferred = [e for e in record["recipients"] if e["status"] not in _FINAL]
        if (deferred and not attempt.abandoned
                and now - record["created_at"] >= self.settings.queue.lifetime):
            # (Not for an attempt a stop cut short: it gets its last try.)
            for entry in deferred:
                self._record(queue_id, attempt, Outcome(
                    entry["address"], BOUNCED, None, "4.4.7",
                    f"delivery time expired; last error: {entry['last_error']}"))
        self._notify_success(queue_id, record, attempt, now)
        d = self._bounce(queue_id, record, attempt.bounced, now)

        def after_bounce(sent):
            if not sent:
                # The sender could not be told: keep those recipients to do,
                # so the next attempt bounces them (and queues the DSN) again.
                bounced = {outcome.address for outcome in attempt.bounced}
                for entry in record["recipients"]:
                    if entry["address"] in bounced:
                        entry["status"] = records.DEFERRED
            return self._retry_or_finish(queue_id, attempt, now)
        d.addCallback(after_bounce)

    def _retry_or_finish(self, queue_id, attempt, now):
        record = attempt.record
        deferred = [e for e in record["recipients"] if e["status"] not in _FINAL]
        if not deferred:
            self._finished(queue_id, attempt)
            return None
        waited_only = attempt.shaped_until is not None and not attempt.failed
        if attempt.abandoned:
            # Cut short by a stop, not failed: due at the next start.
            record["next_attempt_at"] = now
        elif waited_only:
            # Only waiting for its turn at a shaped destination: no failure.
            record["next_attempt_at"] = attempt.shaped_until
        else:
            record["attempts"] += 1
            record["next_attempt_at"] = now + backoff(
                record["attempts"], self.settings.queue.min_backoff,
                self.settings.queue.max_backoff)
            if attempt.shaped_until is not None:
                record["next_attempt_at"] = min(record["next_attempt_at"], attempt.shaped_until)
        d = (defer.succeed(None) if attempt.abandoned
             else defer.maybeDeferred(self._maybe_warn, queue_id, record, deferred, now))
        d.addCallback(lambda _: self._write(queue_id, attempt))
        d.addCallback(lambda _: self._reschedule(queue_id, attempt))
        return d

    def _finished(self, queue_id, attempt):
        attempt.writes.addBoth(lambda _: self._remove(queue_id))

    def _remove(self, queue_id):
        # The attempt stays registered until the files are gone, so that a
        # flush, hold or delete asked for meanwhile is taken as for a
        # message being delivered, not started on files about to vanish.
        d = self.spool.remove_soon(queue_id)
        self._unsaved.pop(queue_id, None)

        def removed(_):
            self._ended(queue_id)
            logline.info(log, f"{queue_id}: removed", queue_id=queue_id)

        def failed(failure):
            # Still on disk: delivered again after a restart, which the
            # queue's contract allows; nothing is lost.
            self._ended(queue_id)
            log.failure("{queue_id}: delivered, but its files could not be removed",
                        failure, queue_id=queue_id)
        return d.addCallbacks(removed, failed)

    def _ended(self, queue_id):
        """An attempt is over: make room in the active set for the next."""
        del self._attempts[queue_id]
        if self._drained is not None and not self._attempts:
            drained, self._drained = self._drained, None
            drained.callback(None)
        if self._timer is None:
            self._arm()

    def _reschedule(self, queue_id, attempt):
        def done(_):
            self._ended(queue_id)
            if attempt.after == "delete":
                return self._in_thread_or_keep(queue_id, self.spool.delete)
            if attempt.after == "hold":
                return self._hold_now(queue_id)
            if queue_id in self._forced:
                self._schedule(queue_id, self._clock())
            else:
                self._schedule(queue_id, attempt.record["next_attempt_at"])
        attempt.writes.addBoth(done)

    def _in_thread_or_keep(self, queue_id, operation):
        """Run a spool move or delete; if it fails, the message is still
        queued, so keep scheduling it."""
        def done(result):
            # Out of active/: a record kept for its next attempt is no use.
            self._unsaved.pop(queue_id, None)
            return bool(result)

        def failed(failure):
            log.failure("{queue_id}: {operation} failed", failure, queue_id=queue_id,
                        operation=operation.__name__)
            self._schedule(queue_id, self._clock() + self.settings.queue.min_backoff)
            return False
        return self._moved(queue_id, operation).addCallbacks(done, failed)

    def _hold_now(self, queue_id):
        """Move a message to hold/.  When memory keeps a record of it (its
        last write failed, or a commit notice brought it), that one is
        written first: after a failed write, the one on disk would send
        again, once released, to recipients already sent."""
        unsaved = self._unsaved.get(queue_id)
        if unsaved is None:
            return self._in_thread_or_keep(queue_id, self.spool.hold)
        snapshot = copy.deepcopy(unsaved)

        def hold(queue_id):
            try:
                self.spool.update(queue_id, snapshot)
            except FileNotFoundError:
                pass                # not in active/: the hold says what it is
            return self.spool.hold(queue_id)
        return self._in_thread_or_keep(queue_id, hold)

    def _moved(self, queue_id, operation, *args):
        """Run a spool move or delete of ``queue_id`` in a thread, the id
        counted as being moved until it is done."""
        # Counted rather than a set: the end of one move must never clear
        # the mark of another still running (a person's moves are refused
        # meanwhile, _refuse_while_moving; the relay's own are not asked).
        self._moving[queue_id] += 1

        def done(result):
            self._moving[queue_id] -= 1
            if not self._moving[queue_id]:
                del self._moving[queue_id]
            return result
        return self.spool.call_in_thread(operation, queue_id, *args).addBoth(done)

    def _quarantine(self, queue_id, reason):
        """Set a damaged message aside in ``corrupt/``: two renames and a
        directory sync, so in a thread, not on the reactor's (a sync there
        would wait behind the unlink thread's).  A scan meanwhile does not
        start it, as for any message being moved."""
        def set_aside(_):
            self._forced.discard(queue_id)

        def failed(failure):
            # Still in active/: looked at again later, and set aside then
            # if it is still bad.
            log.failure("{queue_id}: could not be set aside", failure, queue_id=queue_id)
            self._schedule(queue_id, self._clock() + self.settings.queue.min_backoff)
        self._moved(queue_id, self.spool.quarantine, reason).addCallbacks(set_aside, failed)

    def _write(self, queue_id, attempt):
        """Persist the record, after any write already under way."""
        snapshot = copy.deepcopy(attempt.record)

        def write(_):
            d = self.spool.update_in_thread(queue_id, snapshot)
            d.addCallback(lambda _: self._unsaved.pop(queue_id, None))
            d.addErrback(failed)
            return d

        def failed(failure):
            log.failure("{queue_id}: cannot update the queue record", failure, queue_id=queue_id)
            self._unsaved[queue_id] = attempt.record
        attempt.writes.addCallback(write)
        return attempt.writes

    # -- DSNs -------------------------------------------------------------

    def _bounce(self, queue_id, record, bounced, now):
        """Queue the DSN for ``bounced``: a Deferred firing True once it is
        queued (or none is owed), False when it could not be."""
        bounced = self._asking(queue_id, record, bounced, dsn.FAILURE, "bounce",
                               lambda o: o.address)
        if not bounced:
            return defer.succeed(True)
        failed = [FailedRecipient(address=o.address, action="failed", status=_final_status(o),
                                  diagnostic=o.diagnostic, remote_mta=o.remote_name,
                                  last_attempt=now,
                                  diagnostic_type=o.diagnostic_type or "smtp",
                                  orcpt=_orcpt_of(record, o.address))
                  for o in bounced]
        return self._send_dsn(queue_id, record, failed, now, "bounce")

    def _maybe_warn(self, queue_id, record, deferred, now):
        warn_after = self.settings.queue.delay_warning
        if not warn_after or record.get("delay_warned") or now - record["created_at"] < warn_after:
            return None
        record["delay_warned"] = True
        deferred = self._asking(queue_id, record, deferred, dsn.DELAY, "delay warning",
                                lambda e: e["address"])
        if not deferred:
            return None
        delayed = [FailedRecipient(address=e["address"], action="delayed", status=_delay_status(e),
                                   diagnostic=e["last_error"], remote_mta=None, last_attempt=now,
                                   orcpt=_orcpt_of(record, e["address"]))
                   for e in deferred]
        return self._send_dsn(queue_id, record, delayed, now, "delay warning",
                              retry_until=record["created_at"] + self.settings.queue.lifetime)

    def _asking(self, queue_id, record, items, kind, what, address_of):
        """The ``items`` whose recipient's NOTIFY asks for ``kind`` (RFC
        3461 4.1: NEVER, or a list without it, means no notice); a line
        for those left out."""
        wanted = []
        for item in items:
            address = address_of(item)
            notify = _notify_of(record, address)
            if dsn.wants(notify, kind):
                wanted.append(item)
            else:
                log.info("{queue_id}: <{address}>: no {what}: NOTIFY={notify}",
                         queue_id=queue_id, address=address, what=what,
                         notify=",".join(notify))
        return wanted

    def _notify_success(self, queue_id, record, attempt, now):
        """Queue the success notices owed: "delivered" and "relayed" for
        the recipients of this attempt that asked NOTIFY=SUCCESS, and on
        the first attempt "expanded" for the lists that did (RFC 3461
        6.2.7.3).  Not retried: a notice that cannot be queued is logged,
        and the message itself goes on as it would."""
        notices = [FailedRecipient(address=o.address, action=action, status="2.0.0",
                                   diagnostic=o.diagnostic, remote_mta=o.remote_name,
                                   last_attempt=now,
                                   diagnostic_type=o.diagnostic_type or "smtp",
                                   orcpt=_orcpt_of(record, o.address))
                   for o, action in attempt.succeeded]
        expanded = record["envelope"].get("dsn_expanded")
        if expanded and not record.get("dsn_expanded_sent"):
            record["dsn_expanded_sent"] = True
            notices += [FailedRecipient(address=address, action="expanded", status="2.0.0",
                                        diagnostic=None, remote_mta=None, last_attempt=now,
                                        orcpt=orcpt)
                        for address, orcpt in expanded]
        attempt.succeeded = []
        if notices and record["envelope"]["sender"]:
            self._queue_dsn(queue_id, record, notices, now, "success notice", None)

    def _send_dsn(self, queue_id, record, recipients, now, kind, **extra):
        if record["envelope"]["sender"] == "":
            # RFC 5321 6.1 / RFC 3464: never a DSN about a DSN.
            if kind != "bounce":
                log.info("{queue_id}: {kind} not sent: the sender is <>", queue_id=queue_id,
                         kind=kind)
                return defer.succeed(True)
            return self._double_bounce(queue_id, record, recipients, now)
        return self._queue_dsn(queue_id, record, recipients, now, kind, None, **extra)

    def _double_bounce(self, queue_id, record, recipients, now):
        """A failed message from <>: once to the postmaster, then never."""
        failed = ", ".join(f"<{entry.address}>" for entry in recipients)
        if record["envelope"].get("double_bounce"):
            log.warn("{queue_id}: double bounce discarded: undeliverable to the postmaster "
                     "{failed} too", queue_id=queue_id, failed=failed)
            return defer.succeed(True)
        if self._carries_double_bounce_field(queue_id, record):
            log.warn("{queue_id}: double bounce discarded: another relay's notice to the "
                     "postmaster, undeliverable to {failed}", queue_id=queue_id, failed=failed)
            return defer.succeed(True)
        configured = self.settings.queue.double_bounce_recipient
        if configured is None:
            log.warn("{queue_id}: undeliverable bounce to {failed} discarded: "
                     "[queue] double_bounce_recipient is empty", queue_id=queue_id, failed=failed)
            return defer.succeed(True)
        postmaster = self._qualified(configured)
        if self.policy is None:
            expanded = defer.succeed([postmaster])
        else:
            expanded = self.policy.expand_recipients([postmaster], _RelayContext(self.hostname))

        def queue(addresses):
            if not addresses:
                log.warn("{queue_id}: undeliverable bounce to {failed} discarded: "
                         "<{postmaster}> expands to nobody", queue_id=queue_id, failed=failed,
                         postmaster=postmaster)
                return True
            return self._queue_dsn(queue_id, record, recipients, now, "double bounce",
                                   addresses, postmaster=postmaster)

        def not_expanded(failure):
            # Logged by the policy; try again at the next attempt.
            log.info("{queue_id}: double bounce not queued: {problem}", queue_id=queue_id,
                     problem=str(failure.value))
            return False
        return expanded.addCallbacks(queue, not_expanded)

    def _carries_double_bounce_field(self, queue_id, record):
        """A double bounce another relay wrote (see
        :data:`relaymail.queue.bounce.DOUBLE_BOUNCE_FIELD`).  Read only when
        a message from <> has failed, so the cost is off the common path."""
        try:
            section, _cut = read_header_section(self.spool.message_path(queue_id),
                                                length=record["size"])
        except OSError:
            return False        # no header to read: treat it as a bounce
        return is_double_bounce(section)

    def _qualified(self, address):
        """A bare local part in our own domain, as the server reads a bare
        ``RCPT TO:<Postmaster>``: the first relay domain, else this host."""
        if "@" in address:
            return address
        domains = self.settings.relay.domains
        return f"{address}@{domains[0] if domains else self.hostname}"

    def queue_message(self, envelope, message):
        """Write ``message`` (bytes) to the queue with ``envelope`` and
        schedule it, as for mail relaymail writes itself (TLS reports):
        a Deferred firing with its queue id."""
        def queued(queue_id):
            self.message_queued(queue_id)
            return queue_id
        return self._commit_message(envelope, message, self._clock()).addCallback(queued)

    def _commit_message(self, envelope, message, now):
        """Write and commit a message of our own making (a DSN, a report),
        received ``now``; a Deferred firing with its queue id.  The caller
        schedules it.

        :raise Exception: when the spool refused the write (nothing kept).
        """
        writer = self.spool.new_message()
        try:
            writer.write(message)
        except Exception:
            writer.abort()
            raise
        envelope.received_at = now
        return writer.commit(envelope)

    def _queue_dsn(self, queue_id, record, recipients, now, kind, addresses, **extra):
        """Build, write and commit one DSN; ``addresses`` replaces its
        envelope recipients (the expanded postmaster), when given."""
        try:
            envelope, message = build_dsn(record, self.spool.message_path(queue_id), recipients,
                                          self.hostname, now, **extra)
            if addresses is not None:
                envelope.recipients = list(addresses)
            d = self._commit_message(envelope, message, now)
        except Exception:
            log.failure("{queue_id}: cannot build the {kind}", queue_id=queue_id, kind=kind)
            return defer.succeed(False)

        def queued(dsn_id):
            if addresses is None:
                log.info("{queue_id}: sender {kind}: {dsn_id}", queue_id=queue_id, kind=kind,
                         dsn_id=dsn_id)
            else:
                log.info("{queue_id}: postmaster {kind}: {dsn_id} to {to}", queue_id=queue_id,
                         kind=kind, dsn_id=dsn_id, to=",".join(f"<{a}>" for a in addresses))
            self.message_queued(dsn_id)
            return True

        def failed(failure):
            log.failure("{queue_id}: cannot queue the {kind}", failure, queue_id=queue_id, kind=kind)
            return False
        return d.addCallbacks(queued, failed)

    # -- the queue tool's requests (relaymail.queue.control) ---------------

    def flush(self, domain=None):
        if domain is not None:
            # The records say where the recipients are: read in a spool
            # thread, as a large queue's would hold up the reactor.
            matching = self.spool.call_in_thread(
                matching_ids, self.spool, list(self.spool.ids()), Selection(domain=domain))
            return matching.addCallback(self._make_all_due)
        return self._make_all_due(self.spool.ids())

    def _make_all_due(self, queue_ids):
        count = 0
        now = self._clock()
        for queue_id in list(queue_ids):
            count += self._make_due(queue_id, now)
        return count

    def pickup(self):
        """Schedule the messages of the spool this scheduler does not know
        yet (a notice about them was lost with the worker that sent it);
        each is tried when its record says, not forced.

        A message committed in the last :data:`PICKUP_MIN_AGE` seconds is
        left to its notice: a commit's rename into ``active/`` comes before
        its notice (after the directory's sync), so a listing under load
        always finds a few whose notices are on their way, and would count
        them as lost.  The master asks after a worker's end once that time
        has passed.  A directory sync slower than that (a disk in trouble)
        can still have a message picked up before its 250; should that
        sync then fail, the client gets 451 for a message that may go out:
        a duplicate, never a loss."""
        count = 0
        now = self._clock()
        young = time.time() - PICKUP_MIN_AGE
        for queue_id in list(self.spool.ids()):
            if not self._exists(queue_id) and not self._committed_after(queue_id, young):
                self._schedule(queue_id, now)
                count += 1
        return count

    def _committed_after(self, queue_id, moment):
        """True when ``queue_id`` came into ``active/`` after ``moment``
        (its inode's change time is its rename there), or is gone."""
        try:
            return os.lstat(self.spool.message_path(queue_id)).st_ctime > moment
        except FileNotFoundError:
            return True

    def retry(self, queue_id):
        if not self._exists(queue_id):
            if queue_id in set(self.spool.held_ids()):
                raise ControlError(f"{queue_id} is on hold; release it to deliver it")
            return False
        self._make_due(queue_id, self._clock())
        return True

    def _make_due(self, queue_id, now):
        self._forced.add(queue_id)
        if queue_id not in self._attempts:
            self._schedule(queue_id, now)
        return 1

    # Moving and deleting files waits for fsync: done in the spool's
    # threads, never in the reactor.  A message being delivered is dealt
    # with when its attempt ends.

    def delete(self, queue_id):
        if self._left_to_its_attempt(queue_id, "delete"):
            return True
        return self._in_thread_or_keep(queue_id, self.spool.delete)

    def delete_all(self):
        for attempt in self._attempts.values():
            attempt.after = "delete"
        self._scheduled.clear()
        self._forced.clear()

        def deleted(count):
            # Gone from the disk; those being delivered keep theirs until
            # their attempts end (and are deleted then).
            for queue_id in [q for q in self._unsaved if q not in self._attempts]:
                del self._unsaved[queue_id]
            return count
        return self.spool.call_in_thread(self.spool.delete_all).addCallback(deleted)

    def hold(self, queue_id):
        if self._left_to_its_attempt(queue_id, "hold"):
            return True
        return self._hold_now(queue_id)

    def _left_to_its_attempt(self, queue_id, after):
        """A person's delete or hold (``after``): True for a message being
        delivered, done when its attempt ends; else the message is taken
        off the schedule for the move to run now (refused while another
        move of it runs)."""
        if queue_id in self._attempts:
            self._attempts[queue_id].after = after
            return True
        self._refuse_while_moving(queue_id)
        self._scheduled.pop(queue_id, None)
        self._forced.discard(queue_id)
        return False

    def release(self, queue_id):
        attempt = self._attempts.get(queue_id)
        if attempt is not None and attempt.after == "hold":
            # Held while being delivered: not in hold/ yet, only asked for
            # when the attempt ends.  Releasing it takes that back.
            attempt.after = None
            self._make_due(queue_id, self._clock())
            return True
        if attempt is not None:
            # Whatever hold/ has of it is what a failed move left, and goes
            # when the message is delivered; moving that copy into active/
            # now would race the attempt's removal of the files there.
            raise ControlError(f"{queue_id} is not on hold: it is being delivered")
        self._refuse_while_moving(queue_id)
        if not self.spool.is_held(queue_id) and self._exists(queue_id):
            raise ControlError(f"{queue_id} is not on hold")

        def released(done):
            if done:
                self._make_due(queue_id, self._clock())
            return bool(done)

        def failed(failure):
            # Cut after its copy into active/ perhaps: looked at there (a
            # message still held is not found and left alone).
            self._schedule(queue_id, self._clock())
            return failure
        return self._moved(queue_id, self.spool.release).addCallbacks(released, failed)

    def _refuse_while_moving(self, queue_id):
        """One move of a message at a time: a hold and a release running
        together in two spool threads could each remove the copy the
        other kept."""
        if queue_id in self._moving:
            raise ControlError(f"{queue_id} is being moved; try again in a moment")

    def _exists(self, queue_id):
        return (queue_id in self._attempts or queue_id in self._scheduled
                or queue_id in self._moving)


@implementer(ISessionContext)
class _RelayContext:
    """The relay itself as the "client" plugins see for mail in the queue
    (routing it, or expanding the address of a notice it writes): trusted,
    with no network peer; ``sender`` the message's, when there is one."""

    def __init__(self, hostname, sender="", queue_id=None):
        self.client_ip = ""
        self.client_port = None
        self.helo = hostname
        self.sender = _mailbox_or_none(sender)
        self.trusted = True
        self.authenticated_user = None
        # No session: a plugin that logs says which message it was.
        self.session_id = None
        self.queue_id = queue_id
        self.client = "relaymail"
        self.tls = None


def _mailbox_or_none(sender):
    if not sender:
        return None
    try:
        return parse_forward_path(f"<{sender}>", smtputf8=True)
    except AddressError:
        return None


def _describe(outcome):
    where = f" (from {outcome.remote})" if outcome.remote else ""
    if outcome.code is not None:
        return f"{outcome.code} {outcome.enhanced} {outcome.text}{where}"
    return f"{outcome.enhanced} {outcome.text}{where}"


def _reply_text(outcome):
    if outcome.code is not None:
        return f"{outcome.code} {outcome.enhanced} {outcome.text}"
    return outcome.text


def _dsn_request(record, address):
    requests = record["envelope"].get("dsn_recipients") or {}
    return requests.get(address) or (None, None)


def _notify_of(record, address):
    """The recipient's NOTIFY (relaymail.dsn), None when it gave none."""
    return _dsn_request(record, address)[0]


def _orcpt_of(record, address):
    return _dsn_request(record, address)[1]


def _final_status(outcome):
    """A bounced recipient's DSN Status: the enhanced code, made permanent
    when it expired after temporary failures."""
    code = outcome.enhanced or "5.0.0"
    return "5" + code[1:] if code.startswith("4") else code


def _delay_status(entry):
    error = entry.get("last_error") or ""
    first = error.split(" ", 2)
    for word in first:
        if len(word) >= 5 and word[0] == "4" and word[1] == ".":
            return word
    return "4.0.0"
