"""Transports by name, and the runner that hands them jobs.

A Route names a transport (:class:`relaymail.interfaces.Route`), and a
:class:`TransportRegistry` has every one by its ``name``: ``smtp`` (the
SMTP client, :mod:`relaymail.delivery.smtp_transport`), the other built-in
transports of :data:`BUILTIN` (``lmtp``), then the ``[plugins] transports``
plugins (the built-in ``pipe`` plugin among them, and a site's).

The scheduler gives every job to one :class:`TransportRunner`.  A
transport that runs its own connections and queues (smtp: per-destination
caps and connection reuse, ``[delivery] destination_concurrency``) takes
the jobs whole (:class:`~relaymail.delivery.smtp_transport.ITakesJobs`).
For every other one the runner is what the connection pool is to the SMTP
client: it runs at most ``[delivery] transport_concurrency`` deliveries
per transport at once (the rest wait in order), gives the transport the
message as an IMessage read from the spool, bounds each ``deliver()`` by
``[delivery] transport_timeout``, and turns the :class:`RecipientOutcome`
values into the scheduler's
:class:`~relaymail.delivery.destinations.Outcome`.  Retries, bounces, DSNs
and soft_bounce stay the scheduler's, the same for every transport.

A transport cannot lose a message: one that raises, fails its Deferred,
answers anything but a dict of RecipientOutcome, leaves a recipient out
or does not answer in time defers the recipients concerned (4.3.0, the
transport named in the reason), and the message stays queued for the
next attempt.  A transport named by a route but not known (a typo, a
plugin not enabled) defers with 4.3.5, "system incorrectly configured"
(RFC 3463), as Postfix defers mail for a transport missing from master.cf.
"""

import collections
import re
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.logger import Logger

from relaymail import sanitize
from relaymail.config import ConfigError
from relaymail.delivery.destinations import BOUNCED, DEFERRED, SENT, Outcome, abandon
from relaymail.delivery.lmtp import LMTPTransport, parse_next_hop
from relaymail.delivery.router import SMTP
from relaymail.delivery.smtp_transport import CUT_BY_A_STOP, ITakesJobs, SMTPTransport
from relaymail.interfaces import RecipientOutcome
from relaymail.policy.threads import PluginThreads
from relaymail.queue.message_view import queued_message

log = Logger(namespace="relaymail.delivery")

#: The transports built in beside smtp: name -> (a function of
#: ``(reactor, settings)`` building the ITransport, a function checking a
#: route's next hop that raises ValueError naming the problem, or None).
#: Adding one is a line here.
BUILTIN = {
    LMTPTransport.name: (LMTPTransport, parse_next_hop),
}

#: The Destination kind of a job for a transport other than smtp.
KIND = "transport"

#: RFC 3463: 4.3.0 "other or undefined mail system status" for a transport
#: that failed on our side; 4.3.5 "system incorrectly configured".
LOCAL_FAILURE = "4.3.0"
MISCONFIGURED = "4.3.5"

_KINDS = {RecipientOutcome.DELIVERED: (SENT, "2"), RecipientOutcome.DEFERRED: (DEFERRED, "4"),
          RecipientOutcome.BOUNCED: (BOUNCED, "5")}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")

#: The longest reason kept from a transport (log line, queue record, DSN).
MAX_REASON = 500

#: Seconds a stop waits, before it cancels them, for site transports that
#: send on through smtp to pass on what smtp answered them: the pool's
#: cut sessions answer in a few reactor turns, and the scheduler's drain
#: waits DRAIN_EXTRA (5 s) for every outcome after the cut.
STOP_WAIT = 1.0


@dataclass(frozen=True)
class TransportHop:
    """What jobs for a transport other than smtp are grouped by: the
    transport's name and the Route's next hop (a Job's ``destination``)."""

    transport: str
    next_hop: object = None
    kind = KIND

    @property
    def label(self):
        """How logs name it: ``pipe:deliver``, ``lmtp:/run/dovecot/lmtp``."""
        return self.transport if self.next_hop is None else f"{self.transport}:{self.next_hop}"


class TransportRegistry:
    """Every transport a Route may name.

    :param site: the ``[plugins] transports`` plugins, in order.
    :param smtp: the :class:`SMTPTransport`; None where nothing is sent
        (the check of a configuration).
    :raise ConfigError: for a plugin with no usable ``name``, or one that
        takes the name of another transport.
    """

    def __init__(self, reactor, settings, site=(), smtp=None):
        self._settings = settings
        self._builtin = {name: make(reactor, settings) for name, (make, _) in BUILTIN.items()}
        if smtp is not None:
            self._builtin[SMTP] = smtp
        self.use_site(site)

    def use_site(self, site):
        """Use the site transports ``site`` from now on (a SIGHUP rebuilt
        the plugins); deliveries under way finish with the old objects."""
        named = {}
        for transport in site:
            name = getattr(transport, "name", None)
            if not isinstance(name, str) or not name:
                raise self._error(f"transport {transport!r} has no name for routes to give")
            if name == SMTP or name in self._builtin or name in named:
                raise self._error(f"two transports are named '{name}'")
            named[name] = transport
        self._site = named

    def _error(self, problem):
        return ConfigError(self._settings.source, "plugins", "transports", problem)

    def get(self, name):
        """The transport called ``name``, or None."""
        if name in self._builtin:
            return self._builtin[name]
        return self._site.get(name)

    def check_next_hop(self, name, next_hop):
        """Check a route's next hop for the built-in transport ``name``
        (a site transport checks its own when it delivers).

        :raise ValueError: naming the problem."""
        check = BUILTIN.get(name, (None, None))[1]
        if check is not None:
            check(next_hop)

    def names(self):
        """Every name, sorted: for "no transport named X" lines."""
        return sorted({SMTP, *self._builtin, *self._site})

    def taking_jobs(self):
        """The transports that take jobs whole (ITakesJobs)."""
        return [t for t in {*self._builtin.values(), *self._site.values()}
                if ITakesJobs.providedBy(t)]


class _Unreadable(Exception):
    """The spool's copy of the message could not be read."""


class _Running:
    def __init__(self):
        self.jobs = collections.deque()
        self.running = {}           # id(job) -> (job, Deferred)


class TransportRunner:
    """Runs the jobs for every transport (see the module docstring).

    :param registry: a :class:`TransportRegistry`.
    :param message_for: ``message_for(job)``, the job's message as an
        IMessage; it reads the spool, so it is called in a thread.
    :param threads: runs the calls of a transport that says
        ``blocking = True`` (a relaymail.policy.threads.PluginThreads).
    :param concurrency: deliveries at once per transport.
    :param timeout: seconds a ``deliver()`` may take, or None.
    """

    def __init__(self, reactor, registry, message_for, threads, concurrency, timeout):
        self.registry = registry
        self._reactor = reactor
        self._message_for = message_for
        self._threads = threads
        self._concurrency = concurrency
        self._timeout = timeout
        self._transports = {}       # name -> _Running
        self._draining = False
        self._stopping = False
        self._cancelling = None     # the delayed call of a stop's cancel
        #: id(job) -> the delayed call of _not_ended, for a job with a limit
        self._backstops = {}

    @property
    def busy(self):
        return (any(t.jobs or t.running for t in self._transports.values())
                or any(t.busy for t in self.registry.taking_jobs()))

    def knows(self, name):
        return self.registry.get(name) is not None

    def check_next_hop(self, name, next_hop):
        self.registry.check_next_hop(name, next_hop)

    def submit(self, job):
        name = job.destination.transport
        transport = self.registry.get(name)
        if ITakesJobs.providedBy(transport):
            transport.submit(job)
            return
        self._transports.setdefault(name, _Running()).jobs.append(job)
        self._pump()

    def drain(self):
        """Start no more jobs; those running finish.

        :return: the jobs that were waiting and will not run."""
        self._draining = True
        left = []
        for transport in self.registry.taking_jobs():
            left.extend(transport.drain())
        for queue in self._transports.values():
            left.extend(queue.jobs)
            queue.jobs.clear()
        return left

    def stop(self):
        """Give up on the deliveries still running: their jobs are left to
        the next start (a transport may have delivered some of them: the
        queue's contract, twice rather than never).

        A site transport that sends on through smtp (``deliver()`` of a
        transport taking jobs) is not cancelled at once: stopping smtp
        answers it with what its SMTP transactions delivered, and it gets
        up to :data:`STOP_WAIT` seconds to pass that on, or those would be
        sent again at the next start.  A second stop cancels at once."""
        again, self._stopping = self._stopping, True
        taking = self.registry.taking_jobs()
        for transport in taking:
            transport.stop()
        if not again and any(getattr(t, "answering", 0) for t in taking):
            # A transport run in threads cannot be waiting on smtp: it is
            # cut now, as is one still reading its message (_deliver).
            self._cancel_running(self._runs_in_threads)
            if self._running():
                self._cancelling = self._reactor.callLater(STOP_WAIT, self._cancel_running)
                return
        self._cancel_running()

    def _running(self):
        """``[(job, Deferred)]`` of the deliveries under way."""
        return [each for queue in self._transports.values() for each in queue.running.values()]

    def _runs_in_threads(self, job):
        return _in_threads(self.registry.get(job.destination.transport))

    def _cancel_running(self, which=None):
        """Cancel the deliveries under way, or those of them whose job
        ``which(job)`` is true."""
        if which is None and self._cancelling is not None:
            if self._cancelling.active():
                self._cancelling.cancel()
            self._cancelling = None
        for job, running in self._running():
            if which is None or which(job):
                running.cancel()
                if self._still_running(job):
                    # Answering its cancel may take a few turns (lmtp hangs
                    # up first); one that never does is not waited for.
                    self._end_by(job, STOP_WAIT, None)

    def _still_running(self, job):
        queue = self._transports.get(job.destination.transport)
        return queue is not None and id(job) in queue.running

    def _end_by(self, job, delay, limit):
        """End ``job`` in ``delay`` seconds if it is still running then
        (_not_ended), in place of any such call made before."""
        self._drop_backstop(job)
        self._backstops[id(job)] = self._reactor.callLater(delay, self._not_ended, job, limit)

    def _drop_backstop(self, job):
        backstop = self._backstops.pop(id(job), None)
        if backstop is not None and backstop.active():
            backstop.cancel()

    def _not_ended(self, job, limit):
        """The cancel of a delivery by its timeout (``limit``) or by a
        stop (None) has not ended it STOP_WAIT later: it waits on something
        of its own (a callback after its answer returned a Deferred).  Its
        recipients are deferred by the timeout, or left to the next start,
        the transport's slot is free again, and whatever it answers later
        is not taken."""
        self._backstops.pop(id(job), None)
        if not self._still_running(job):
            return
        hop = job.destination
        queue = self._transports[hop.transport]
        if limit is None or self._stopping:
            log.error("{queue_id}: transport {transport} went on after it was cancelled by "
                      "the stop; its recipients are left to the next start",
                      queue_id=job.queue_id, transport=hop.transport)
            self._over(None, queue, job)
            return
        problem = f"transport {hop.transport} did not answer within {limit:g}s"
        log.error("{queue_id}: {problem}, nor when it was cancelled", queue_id=job.queue_id,
                  problem=problem)
        self._over(_all(job, LOCAL_FAILURE, problem, hop), queue, job)

    def _pump(self):
        if self._draining or self._stopping:
            return
        for name, queue in list(self._transports.items()):
            while queue.jobs and len(queue.running) < self._concurrency:
                job = queue.jobs.popleft()
                d = self._run(job)
                queue.running[id(job)] = (job, d)
                d.addBoth(self._over, queue, job)
            if not queue.jobs and not queue.running:
                del self._transports[name]

    def _over(self, outcomes, queue, job):
        if queue.running.pop(id(job), None) is None:
            return      # given up on before it answered (_not_ended, a stop)
        self._drop_backstop(job)
        if self._cancelling is not None and not self._running():
            # Every delivery a stop waited for has answered.
            self._cancel_running()
        if outcomes is None:
            abandon(job)
        elif self._stopping:
            # Cut by the stop, the transport answered all the same (lmtp
            # does): what it delivered stands, the rest is left as it was
            # for the next start, no attempt counted.
            abandon(job, [o for o in outcomes if o.status == SENT])
        elif self._draining and any(_cut_by_drain(o) for o in outcomes):
            # A stop is under way, and a deferral now may be its doing: a
            # site transport's smtp jobs the drain would not start.  Not
            # counted as an attempt (which could bounce a message at the
            # end of its lifetime): the deferred recipients are tried
            # again at the next start, what was decided stands.
            abandon(job, [o for o in outcomes if not _cut_by_drain(o)])
        else:
            _call(job.on_done, job, outcomes)
        # Later, not now: a job that ended at once would recurse.
        self._reactor.callLater(0, self._pump)

    def _run(self, job):
        """One job: a Deferred firing with its Outcomes, or None when a
        stop cut it; it never fails."""
        hop = job.destination
        transport = self.registry.get(hop.transport)
        if transport is None:
            # Known when the job was made; gone since (a SIGHUP).
            return defer.succeed(_all(job, MISCONFIGURED,
                                      f"no transport named {hop.transport}", hop))
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                      self._read, job)
        d.addCallback(self._deliver, transport, job)
        limit = self._limit_for(transport, job)
        if limit is not None:
            d.addTimeout(limit, self._reactor, onTimeoutCancel=_timed_out)
            self._end_by(job, limit + STOP_WAIT, limit)
        return d.addCallbacks(lambda result: self._outcomes(job, result, limit),
                              self._failed, errbackArgs=(job, limit))

    def _outcomes(self, job, result, limit):
        if not isinstance(result, _Cut):
            return outcomes_of(job, result)
        # Cancelled by the timeout, the transport answered all the same:
        # its deliveries and deferrals stand.  Nothing bounces on a cut:
        # whatever else it says is the timeout's deferral.
        hop = job.destination
        problem = f"transport {hop.transport} did not answer within {limit:g}s"
        log.error("{queue_id}: {problem}; keeping what it delivered before it was cut",
                  queue_id=job.queue_id, problem=problem)
        kept = {address: outcome for address, outcome in result.outcomes.items()
                if isinstance(outcome, RecipientOutcome)
                and outcome.kind in (RecipientOutcome.DELIVERED, RecipientOutcome.DEFERRED)}
        return [_converted(address, kept[address], hop) if address in kept
                else _outcome(address, DEFERRED, LOCAL_FAILURE, problem, hop)
                for address in job.recipients]

    def _limit_for(self, transport, job):
        """[delivery] transport_timeout, or more for a transport that says
        a delivery to these recipients takes longer (``time_limit``: pipe,
        one command run per recipient)."""
        if self._timeout is None:
            return None
        own = getattr(transport, "time_limit", None)
        if callable(own):
            try:
                return max(self._timeout, float(own(list(job.recipients),
                                                    job.destination.next_hop)))
            except Exception:
                log.failure("transport {name} time_limit failed", name=job.destination.transport)
        return self._timeout

    def _read(self, job):
        try:
            return self._message_for(job)
        except OSError as exc:
            raise _Unreadable(f"cannot read the message file: {exc.strerror or exc}") from None

    def _deliver(self, message, transport, job):
        if self._stopping:
            # Its message was read while a stop waited (STOP_WAIT) for
            # others: it does not begin now, to be cut a moment later.
            raise defer.CancelledError()
        recipients = list(job.recipients)
        next_hop = job.destination.next_hop
        if _in_threads(transport):
            return self._threads.run(transport.deliver, message, recipients, next_hop)
        return transport.deliver(message, recipients, next_hop)

    def _failed(self, failure, job, limit=None):
        hop = job.destination
        if self._stopping:
            return None
        if failure.check(defer.TimeoutError):
            problem = f"transport {hop.transport} did not answer within {limit:g}s"
            log.error("{queue_id}: {problem}", queue_id=job.queue_id, problem=problem)
        elif failure.check(_Unreadable):
            problem = str(failure.value)
            log.error("{queue_id}: {problem}", queue_id=job.queue_id, problem=problem)
        else:
            problem = f"transport {hop.transport} failed: {_one_line(failure.value)}"
            log.failure("{queue_id}: transport {transport} failed", failure,
                        queue_id=job.queue_id, transport=hop.transport)
        return _all(job, LOCAL_FAILURE, problem, hop)


def outcomes_of(job, result):
    """The Outcome of each of the job's recipients from what its
    transport's ``deliver()`` answered (see the module docstring)."""
    hop = job.destination
    if not isinstance(result, dict):
        problem = (f"transport {hop.transport} answered {_short(repr(result))}, "
                   "not a dict of outcomes")
        log.error("{queue_id}: {problem}", queue_id=job.queue_id, problem=problem)
        return _all(job, LOCAL_FAILURE, problem, hop)
    outcomes = []
    for address in job.recipients:
        value = result.get(address)
        if isinstance(value, RecipientOutcome) and value.kind in _KINDS:
            outcomes.append(_converted(address, value, hop))
            continue
        problem = (f"transport {hop.transport} gave no outcome for this recipient"
                   if value is None else
                   f"transport {hop.transport} answered {_short(repr(value))}, "
                   "not a RecipientOutcome")
        log.error("{queue_id}: <{address}>: {problem}", queue_id=job.queue_id, address=address,
                  problem=problem)
        outcomes.append(_outcome(address, DEFERRED, LOCAL_FAILURE, problem, hop))
    return outcomes


def _converted(address, value, hop):
    """The Outcome for a RecipientOutcome: the class digit of its status
    is its kind's, the reply code and remote kept when it gives them."""
    status, digit = _KINDS[value.kind]
    enhanced = value.status if isinstance(value.status, str) else ""
    if _STATUS.fullmatch(enhanced):
        # The class is the kind's: a "bounced" 4.x.x is a permanent failure.
        enhanced = digit + enhanced[1:]
    else:
        enhanced = f"{digit}.0.0"
    reason = value.reason if isinstance(value.reason, str) else repr(value.reason)
    text = _short(reason, MAX_REASON) or value.kind
    code = value.code if isinstance(value.code, int) and str(value.code)[:1] == digit else None
    if code is None and value.remote is None:
        return _outcome(address, status, enhanced, text, hop)
    remote = _short(str(value.remote)) if value.remote is not None else hop.label
    return Outcome(address, status, code, enhanced, text, remote=remote,
                   remote_name=remote.split("[", 1)[0] if value.remote is not None else None,
                   tls=_short(str(value.tls)) if value.tls is not None else None,
                   diagnostic_type=None if code is not None else _diagnostic_type(hop),
                   notice=FINAL_DELIVERY)


#: The DSN diagnostic type of each built-in transport's reasons: LMTP's
#: are server replies; pipe's a command's exit, as Postfix reports them.
_DIAGNOSTIC_TYPES = {"lmtp": "smtp", "pipe": "x-unix"}


def _diagnostic_type(hop):
    return _DIAGNOSTIC_TYPES.get(hop.transport, "x-relaymail")


#: The success notice of every transport but smtp: the message is
#: delivered on this host's side (a mailbox server, a command, a web
#: hook), so a NOTIFY=SUCCESS gets "delivered" (RFC 3464 2.3.3).
FINAL_DELIVERY = "delivered"


def _outcome(address, status, enhanced, text, hop):
    return Outcome(address, status, None, enhanced, text, remote=hop.label,
                   diagnostic_type=_diagnostic_type(hop), notice=FINAL_DELIVERY)


def _all(job, enhanced, problem, hop):
    return [_outcome(address, DEFERRED, enhanced, problem, hop) for address in job.recipients]


def _timed_out(result, timeout):
    # A transport that answers its cancellation with outcomes (lmtp: what
    # its finished transactions delivered) has its deliveries kept, or
    # those would be sent again at every retry (TransportRunner._outcomes).
    # Whatever else a cancelled transport failed with (its own wrapper of
    # the cancellation, or none), the recipients were deferred by the
    # timeout.
    if isinstance(result, dict):
        return _Cut(result)
    raise defer.TimeoutError(f"no answer within {timeout}s")


class _Cut:
    """What a transport cancelled by the timeout answered: outcomes by
    recipient, of which only deliveries and deferrals are taken."""

    def __init__(self, outcomes):
        self.outcomes = outcomes


def _in_threads(transport):
    """Whether ``transport`` says its calls block (``blocking = True``):
    they run in the plugin threads."""
    return getattr(transport, "blocking", False) is True


def _cut_by_drain(outcome):
    """A deferral smtp's deliver() gave for a job the drain would not start."""
    return outcome.status == DEFERRED and outcome.text == CUT_BY_A_STOP


def _call(function, *args):
    try:
        function(*args)
    except Exception:
        log.failure("recording the outcome of {queue_id} failed", queue_id=args[0].queue_id)


def _short(text, limit=200):
    text = " ".join(text.split())
    return sanitize.escape(text if len(text) <= limit else text[:limit] + "...")


def _one_line(exc):
    text = " ".join(str(exc).split())
    return _short(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def delivery_transports(reactor, settings, pool, router, site=()):
    """The TransportRunner for a delivery process: ``pool`` (the
    DestinationPool) as the smtp transport with ``router`` (the
    BuiltinRouter), the built-in transports, and ``site``, the
    ``[plugins] transports`` plugins."""
    registry = TransportRegistry(reactor, settings, site,
                                 smtp=SMTPTransport(
                                     pool, router, reactor,
                                     settings.delivery.recipients_per_transaction))
    return TransportRunner(reactor, registry, queued_message,
                           PluginThreads(reactor, settings.plugins.threads),
                           settings.delivery.transport_concurrency,
                           settings.delivery.transport_timeout)
