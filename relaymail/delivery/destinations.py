"""Connections per destination: concurrency caps and connection reuse.

Jobs (one message's recipients at one destination) wait in a queue per
destination.  Up to ``destination_concurrency`` connections per destination
and ``max_connections`` in all (Postfix default_destination_concurrency_limit
is 20) take jobs from it; a connection that finished a job takes the next
one queued for the same destination, so a burst of mail to one smarthost
shares a few sessions instead of opening one per message.

Hops are tried in order: a connection failure, a refusal before MAIL
(greeting, EHLO, STARTTLS, AUTH, as Postfix does with smtp_skip_5xx_greeting)
or a temporary failure of the transaction before the message content was
sent moves on to the next one.
"""

import collections
import time
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from relaymail import logline
from relaymail.delivery.client import ClientConfig, DeliveryError, connect
from relaymail.delivery.routing import RoutingError

log = Logger(namespace="relaymail.delivery")

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one attempt."""

    address: str
    status: str          # SENT, DEFERRED or BOUNCED
    code: int            # the SMTP reply code, or None when none was had
    enhanced: str
    text: str
    remote: str = None   # Hop.label of the server that answered
    remote_name: str = None
    tls: str = None      # OutboundSession.tls_description, when a session was open
    #: For an outcome with no SMTP reply that still explains itself (a
    #: transport's: a command's exit, a web hook's status): the RFC 3464
    #: diagnostic type its ``text`` is given as in a DSN.
    diagnostic_type: str = None
    #: For a recipient delivered (SENT) that asked NOTIFY=SUCCESS, the
    #: RFC 3464 action of the success notice owed: ``delivered`` (final
    #: delivery: lmtp, pipe, a site transport), ``relayed`` (to an SMTP
    #: next hop without DSN, RFC 3461 6.2.1), or None (one with DSN took
    #: the request on, and will say so itself).
    notice: str = None

    @property
    def diagnostic(self):
        """The reply as a DSN Diagnostic-Code wants it, or None."""
        if self.code is None:
            return self.text if self.diagnostic_type else None
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass
class Job:
    """One message's recipients for one destination."""

    queue_id: str
    destination: object
    sender: str
    recipients: list
    message_path: str
    body: str = "7BIT"
    smtputf8: bool = False
    #: Called with (job, [Outcome]) once, when the job is over.
    on_done: object = None
    #: Called with the job when a stop leaves it undone (its recipients as
    #: they were: neither delivered nor failed), and ``decided``: the
    #: Outcomes of those a delivery cut by the stop had delivered (a
    #: keyword the TransportRunner and the pool give; absent, none).
    on_abandoned: object = None
    queued_at: float = field(default_factory=time.time)
    #: The queue record's envelope (a dict), for transports other than
    #: smtp, which see the message as an IMessage.
    envelope: dict = None
    #: The message's length, from the record in force: how much of the
    #: queue file at ``message_path`` is message (None: the file says,
    #: relaymail.queue.queue_file).
    message_size: int = None
    #: Set when its caller gave up on it (SMTPTransport's cancelled
    #: deliver(), DestinationPool.give_up): it is not tried anew on
    #: another hop, its recipients having been reported deferred.
    given_up: bool = field(default=False, compare=False)


def abandon(job, decided=()):
    """Call ``job.on_abandoned``: with ``decided=`` only when a delivery
    cut by the stop had delivered someone, so that a callback taking the
    job alone still works; a failing callback is logged, not raised."""
    try:
        if decided:
            job.on_abandoned(job, decided=decided)
        else:
            job.on_abandoned(job)
    except Exception:
        log.failure("leaving {queue_id} to the next start failed", queue_id=job.queue_id)


def in_groups(recipients, size):
    """``recipients`` (a list) in order, in lists of at most ``size``:
    one a delivery ([delivery] recipients_per_transaction)."""
    return [recipients[start:start + size] for start in range(0, len(recipients), size)]


class _DestinationQueue:
    def __init__(self, destination):
        self.destination = destination
        self.jobs = collections.deque()
        self.connections = 0


class DestinationPool:
    """Runs delivery jobs with per-destination and global connection caps.

    :param router: a relaymail.delivery.routing.Router.
    :param client_config_for: a function of a Destination giving the
        ClientConfig to use for it (TLS policy and AUTH differ for the
        smarthost).
    """

    def __init__(self, reactor, router, client_config_for, per_destination, total,
                 connect=connect):
        self._reactor = reactor
        self._router = router
        self._config_for = client_config_for
        self._per_destination = per_destination
        self._total = total
        self._connect = connect
        self._queues = {}
        self._connections = 0
        self._sessions = set()
        #: id(job) -> the session carrying it, or None while it waits for
        #: its next host; from its start until it is finished or abandoned.
        self._carrying = {}
        self._stopping = False
        self._draining = False

    @property
    def busy(self):
        return self._connections > 0 or any(q.jobs for q in self._queues.values())

    def submit(self, job):
        if self._stopping or self._draining:
            # No connection will take it: left to the next start at once,
            # as drain() leaves the jobs that were waiting, rather than
            # queued where its caller would wait for it until it gives up.
            self._abandon(job)
            return
        queue = self._queues.get(job.destination)
        if queue is None:
            queue = self._queues[job.destination] = _DestinationQueue(job.destination)
        queue.jobs.append(job)
        self._pump()

    def drain(self):
        """Open no more connections and start no more jobs; connections
        finish the job they carry, then QUIT.

        :return: the jobs that were waiting and will not run (their
            messages stay in the spool as they are)."""
        self._draining = True
        left = []
        for queue in self._queues.values():
            left.extend(queue.jobs)
            queue.jobs.clear()
        return left

    def give_up(self, job):
        """``job``'s caller has given it up and answered for it: it is not
        started, nor moved to another host, nor left running where that
        loses nothing.  One still waiting for a connection is taken back
        (its callbacks are not called); one under way on a connection
        that has not begun to send its message has that connection
        dropped; one whose message has begun to go goes on (the server
        may deliver it) and its outcome reaches its callbacks as before.

        :return: True when surely none of its recipients was delivered to
            (waiting, between hosts, or dropped), False when some of its
            message went."""
        job.given_up = True
        unsent, what, relay = self._give_up(job)
        if what is not None:
            fields = {"relay": relay} if relay is not None else {}
            logline.info(log, f"{job.queue_id}: {what}", queue_id=job.queue_id, **fields)
        return unsent

    def _give_up(self, job):
        """give_up() but the log line: ``(unsent, what, relay)``."""
        queue = self._queues.get(job.destination)
        waiting = [] if queue is None else [i for i, each in enumerate(queue.jobs) if each is job]
        if waiting:
            del queue.jobs[waiting[0]]
            return True, "given up while waiting for a connection: not sent", None
        if id(job) not in self._carrying:
            return False, None, None        # over already
        session = self._carrying[id(job)]
        if session is None:
            # Its last host failed it before the message went.
            return True, "given up while waiting for its next host: not sent", None
        if session.drop_before_the_message():
            return True, (f"{session.remote}: given up before its message went: connection "
                          "dropped, not sent"), session.remote
        return False, (f"{session.remote}: given up while its message went: it goes on, and "
                       "what it does is logged"), session.remote

    def stop(self):
        """Drop every session; jobs still queued are left to the next start
        (their messages stay in the spool)."""
        self._stopping = True
        for session in list(self._sessions):
            session.abort()

    def _pump(self):
        """Open connections where jobs wait and the caps allow."""
        if self._stopping or self._draining:
            return
        for queue in list(self._queues.values()):
            # No more connections than jobs waiting: a busy connection takes
            # the next job of its destination when it is free.
            while (queue.jobs and queue.connections < min(self._per_destination, len(queue.jobs))
                   and self._connections < self._total):
                queue.connections += 1
                self._connections += 1
                d = self._run_connection(queue)
                d.addErrback(lambda f: log.failure("delivery connection failed", f))
                d.addBoth(self._connection_over, queue)
            if not queue.jobs and queue.connections == 0:
                self._queues.pop(queue.destination, None)

    def _connection_over(self, _, queue):
        queue.connections -= 1
        self._connections -= 1
        # Later, not now: a connection that ended at once (a cached routing
        # failure) would otherwise recurse through _pump.
        self._reactor.callLater(0, self._pump)

    @defer.inlineCallbacks
    def _run_connection(self, queue):
        """Serve the destination's jobs on one connection at a time, moving
        to the next hop when a hop fails before or during a transaction."""
        destination = queue.destination
        try:
            hops = yield self._router.hops(destination)
        except RoutingError as error:
            self._fail_queued(queue, error)
            return
        except Exception:
            # A bug, or input nobody foresaw (a hostile DNS answer): the
            # jobs wait for the next attempt rather than being pumped
            # again at once, forever.
            log.failure("finding the next hop for {destination} failed",
                        destination=destination.label)
            self._fail_queued(queue, RoutingError(
                True, None, "4.3.0", f"internal error finding the next hop for "
                                     f"{destination.label} (logged)"))
            return
        retry = None        # a job that met a temporary failure on the last hop
        while (retry is not None or queue.jobs) and not self._stopping:
            if self._draining:
                if retry is not None:
                    # Stopping: the next hop is for the next start.
                    self._abandon(retry[0])
                return
            waiting = retry[0] if retry is not None else (queue.jobs[0] if queue.jobs else None)
            session, error, hops = yield self._open_session(
                destination, hops, waiting.queue_id if waiting else "-",
                retry[0] if retry is not None else None)
            if retry is not None and retry[0].given_up:
                # Given up while the next hop was being opened: not sent
                # there; the jobs queued start again at the first hop.
                self._finish_retry(retry)
                if session is not None:
                    session.abort()
                return
            if session is None:
                if self._stopping or self._draining:
                    if retry is not None:
                        self._abandon(retry[0])
                    return
                if retry is not None:
                    self._finish_retry(retry)
                self._fail_queued(queue, error)
                return
            retry = yield self._serve(session, queue, retry[0] if retry else None, bool(hops))
            if retry is None:
                return

    def _finish_retry(self, retry):
        """End the job of ``retry`` (job, error) with that error: no other
        hop is tried for it."""
        job, error = retry
        self._finish(job, [_from_error(address, error, None) for address in job.recipients])

    @defer.inlineCallbacks
    def _serve(self, session, queue, first, more_hops):
        """Deliver jobs on ``session`` until the destination has none left.

        :return: (job, error) when a job failed for now and ``more_hops``
            says another hop may take it, else None.
        """
        self._sessions.add(session)
        served = False
        try:
            job = first
            while not self._stopping and session.is_open():
                if job is None:
                    if not queue.jobs or self._draining:
                        break
                    job = queue.jobs.popleft()
                served = True
                self._carrying[id(job)] = session
                try:
                    results = yield session.deliver(
                        job.sender, job.recipients, job.message_path,
                        body=job.body, smtputf8=job.smtputf8, envelope=job.envelope,
                        size=job.message_size)
                except DeliveryError as error:
                    session.abort()
                    if self._stopping:
                        # Cut by the stop, not refused by the next hop.
                        self._abandon(job)
                        return None
                    if job.given_up:
                        # Its caller answered for it (give_up, which may
                        # have dropped this connection): no other host.
                        self._finish(job, [_from_error(a, error, session) for a in job.recipients])
                        return None
                    # Another hop only when this one surely did not take
                    # the message; after the content went, wait and retry.
                    if error.temporary and more_hops and not error.after_data:
                        log.info("{queue_id}: {remote}: {text}; trying the next host",
                                 queue_id=job.queue_id, remote=session.remote, text=error.text)
                        self._carrying[id(job)] = None
                        return (job, error)
                    self._finish(job, [_from_error(a, error, session) for a in job.recipients])
                    return None
                except Exception as error:
                    if self._stopping:
                        session.abort()
                        self._abandon(job)
                        return None
                    log.failure("delivery of {queue_id} failed", queue_id=job.queue_id)
                    self._finish(job, [Outcome(a, DEFERRED, None, "4.3.0", f"local error: {error}")
                                       for a in job.recipients])
                    session.abort()
                    return None
                outcomes = [_from_result(r, session) for r in results]
                if self._stopping:
                    # Cut by the stop in a further transaction (the client
                    # keeps what the ones before decided): what they
                    # delivered stands, the rest is left as it was for the
                    # next start, no attempt counted.
                    self._abandon(job, [o for o in outcomes if o.status == SENT])
                else:
                    self._finish(job, outcomes)
                job = None
            if job is None and not served and queue.jobs and not self._draining:
                # Closed before it took any job (connect() hands over only
                # sessions that can take one, so a race at most): charge
                # the job it was opened for, or the pool would open this
                # hop again at once, for ever.
                job = queue.jobs.popleft()
            if job is not None:
                # The job this connection was opened for never ran.
                if self._stopping or self._draining:
                    self._abandon(job)
                else:
                    self._finish(job, [Outcome(a, DEFERRED, None, "4.4.2",
                                               f"{session.remote}: connection closed before "
                                               "the transaction") for a in job.recipients])
            if session.is_open():
                yield session.quit()
            else:
                # Unusable is not closed: a server that said 421 and went
                # on would keep the socket for as long as it likes.
                session.abort()
            return None
        finally:
            self._sessions.discard(session)

    @defer.inlineCallbacks
    def _open_session(self, destination, hops, queue_id, retrying=None):
        """Try the hops in order; ``queue_id`` is the message the
        connection is opened for, named in the log line of a failure;
        ``retrying``, the job moving to its next host, for which no
        further host is tried once it is given up.

        :return: (session, None, hops not yet tried) or (None, last error, []).
        """
        config = self._config_for(destination)
        error = None
        hops = list(hops)
        while hops and not (retrying is not None and retrying.given_up):
            hop = hops.pop(0)
            try:
                session = yield _as_delivery_error(self._connect(self._reactor, hop, config),
                                                   hop)
            except DeliveryError as failure:
                # The host once: most texts name it already ("connect to
                # HOST: Connection refused"), a refused greeting does not.
                named = failure.text if hop.label in failure.text else f"{hop.label}: {failure.text}"
                logline.info(log, f"{queue_id}: {named}", queue_id=queue_id, relay=hop.label,
                             error=failure.text)
                error = failure
                continue
            return session, None, hops
        if error is None:
            error = DeliveryError(temporary=True, code=None, enhanced="4.4.4",
                                  text=f"no host to try for {destination.label}", remote=None)
        return None, error, []

    def _fail_queued(self, queue, error):
        """A destination that cannot be reached fails every job waiting for
        it (Postfix likewise defers the whole destination), not just one."""
        while queue.jobs:
            job = queue.jobs.popleft()
            self._finish(job, [_from_error(a, error, None) for a in job.recipients])

    def _abandon(self, job, decided=()):
        self._carrying.pop(id(job), None)
        abandon(job, decided)

    def _finish(self, job, outcomes):
        self._carrying.pop(id(job), None)
        try:
            job.on_done(job, outcomes)
        except Exception:
            log.failure("recording the outcome of {queue_id} failed", queue_id=job.queue_id)


def _status_for(code, enhanced):
    if code is None:
        # A result with no reply code of its own (transaction.held_back):
        # its enhanced code's class says.
        return DEFERRED if enhanced.startswith("4") else BOUNCED
    if 200 <= code < 300:
        return SENT
    if 400 <= code < 500:
        return DEFERRED
    return BOUNCED


def _from_result(result, session):
    return Outcome(result.address, _status_for(result.code, result.enhanced), result.code,
                   result.enhanced, result.text, session.remote, _remote_name(session.remote),
                   session.tls_description,
                   notice=None if "DSN" in session.extensions else "relayed")


def _as_delivery_error(opening, hop):
    """``opening`` (a Deferred session), with any failure that is not a
    DeliveryError logged and made a temporary one for that hop: an
    unforeseen exception (a certificate nobody can parse) must move on to
    the next hop or the next attempt, not loop."""
    def unforeseen(failure):
        if failure.check(DeliveryError, defer.CancelledError):
            return failure
        log.failure("session with {hop} failed", failure, hop=hop.label)
        raise DeliveryError(temporary=True, code=None, enhanced="4.3.0",
                            text=f"internal error in the session with {hop.label} (logged)",
                            remote=hop.label)
    return opening.addErrback(unforeseen)


def _from_error(address, error, session):
    status = DEFERRED if error.temporary else BOUNCED
    remote = getattr(error, "remote", None) or (session.remote if session else None)
    return Outcome(address, status, error.code, error.enhanced, error.text, remote,
                   _remote_name(remote), session.tls_description if session else None)


def _remote_name(label):
    """'mx.example.com[192.0.2.1]:25' -> 'mx.example.com'."""
    if not label:
        return None
    return label.split("[", 1)[0]


def client_configs(settings, tls_report=None):
    """The function DestinationPool uses to pick a ClientConfig: the
    smarthost gets its TLS policy and credentials, a route its [route_tls]
    policy, other hops opportunistic TLS; only the smarthost gets AUTH.
    ``tls_report`` (a TLSReportRecorder) counts the MX sessions."""
    delivery = settings.delivery
    common = dict(
        helo_name=delivery.helo_name or settings.server.hostname,
        ca_file=delivery.tls_ca_file,
        connect_timeout=delivery.connect_timeout,
        command_timeout=delivery.command_timeout,
        data_timeout=delivery.data_timeout,
        mime_nesting_limit=delivery.mime_nesting_limit,
    )
    smarthost = ClientConfig(tls=delivery.smarthost_tls, auth_user=delivery.smarthost_user,
                             auth_password=delivery.smarthost_password, chosen_hop=True, **common)
    mx = ClientConfig(tls="may", tls_report=tls_report, **common)
    routes = {policy: ClientConfig(tls=policy, chosen_hop=True, **common)
              for policy in {"may", *settings.route_tls.values()}}

    def config_for(destination):
        if destination.kind == "smarthost":
            return smarthost
        if destination.kind == "route":
            return routes[destination.tls or "may"]
        return mx
    return config_for
