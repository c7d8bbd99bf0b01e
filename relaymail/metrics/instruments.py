"""Every metric relaymail keeps, and one function per event that counts it.

The code where an event happens calls the function named for it (a line
beside its log line); what is counted, under which name and labels, is
decided here.  Names follow Prometheus' conventions: ``relaymail_``, the
unit in the name (``_seconds``), ``_total`` on counters.

This module imports prometheus_client, which picks its storage once, at
import: a worker started with ``PROMETHEUS_MULTIPROC_DIR`` in its
environment (relaymail.metrics.rundir) counts into files there, any other
process in memory.  The master's own counters are in
:data:`MASTER_REGISTRY`, apart from the default registry that the
workers' files stand for, so that a scrape of the master never shows a
worker's metric twice (its files' sum, and the master's own zero).
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet import defer

from relaymail.metrics import labels
from relaymail.metrics.last_errors import LAST_ERRORS

#: Delivered and deferred recipients, bounced and queued messages: as
#: Postfix's log counts them (a status= line per recipient).
SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"

# -- inbound (relaymail.smtp) ---------------------------------------------------

CONNECTIONS_OPEN = Gauge(
    "relaymail_smtp_connections_open", "SMTP connections open now (all inbound processes).",
    multiprocess_mode="livesum")
CONNECTIONS = Counter("relaymail_smtp_connections", "SMTP connections accepted.")
COMMANDS = Counter("relaymail_smtp_commands", "SMTP commands received, by verb.", ["verb"])
REPLIES = Counter("relaymail_smtp_replies", "SMTP replies sent, by code class.", ["code_class"])
RECIPIENTS_ACCEPTED = Counter("relaymail_smtp_recipients_accepted", "RCPT commands accepted.")
RECIPIENTS_REJECTED = Counter(
    "relaymail_smtp_recipients_rejected",
    "RCPT commands refused, by reason (from the reply's enhanced status code).", ["reason"])
AUTH_FAILURES = Counter("relaymail_smtp_auth_failures", "AUTH exchanges whose credentials failed.")
MESSAGES_QUEUED = Counter("relaymail_messages_queued", "Messages received and committed to the queue.")
TLS_SESSIONS = Counter("relaymail_tls_sessions", "TLS handshakes completed, by direction and version.",
                       ["direction", "version"])
PLUGIN_CALL = Histogram(
    "relaymail_plugin_call_duration_seconds", "Time a recipient plugin took to answer.",
    ["plugin", "method"],
    # Built-in plugins answer in microseconds; [plugins] timeout is 10 s.
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10))

# -- delivery (relaymail.queue.scheduler) ---------------------------------------

DELIVERED = Counter("relaymail_messages_delivered",
                    "Deliveries that succeeded (one per recipient).")
DEFERRED_ATTEMPTS = Counter("relaymail_messages_deferred",
                            "Deliveries that failed for now (one per recipient and attempt).")
BOUNCED_RECIPIENTS = Counter("relaymail_messages_bounced",
                             "Deliveries that failed for good (one per recipient).")
DELIVERY_LATENCY = Histogram(
    "relaymail_delivery_latency_seconds",
    "From queued to delivered, per recipient delivered.",
    # Seconds for a relay that works, up to the 5 days of [queue] lifetime.
    buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400))
ATTEMPT_DURATION = Histogram(
    "relaymail_delivery_attempt_duration_seconds",
    "How long one delivery attempt to one destination took.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
QUEUE_DEFERRED = Gauge(
    "relaymail_queue_messages",
    "Messages in the queue, by state.", ["state"], multiprocess_mode="livesum")

# -- the master -----------------------------------------------------------------

MASTER_REGISTRY = CollectorRegistry()
WORKER_RESTARTS = Counter("relaymail_worker_restarts",
                          "Workers started again after an exit nobody asked for.", ["role"],
                          registry=MASTER_REGISTRY)


def connection_opened():
    CONNECTIONS.inc()
    CONNECTIONS_OPEN.inc()


def connection_closed():
    CONNECTIONS_OPEN.dec()


def _child(metric, cache, *values):
    # labels() takes a lock and builds a key each call; a command and its
    # reply are counted for every line a client sends.
    child = cache.get(values)
    if child is None:
        child = cache[values] = metric.labels(*values)
    return child


_COMMAND_CHILDREN, _REPLY_CHILDREN = {}, {}


def command(line, answer):
    """A command line and its answer (a Reply, or a Deferred of one)."""
    verb = labels.verb(line)
    _child(COMMANDS, _COMMAND_CHILDREN, verb).inc()
    if verb != "RCPT":
        return
    if isinstance(answer, defer.Deferred):
        answer.addCallback(_recipient_answered)
    else:
        _recipient_answered(answer)


def _recipient_answered(reply):
    if 200 <= reply.code < 300:
        RECIPIENTS_ACCEPTED.inc()
    else:
        RECIPIENTS_REJECTED.labels(labels.rejection_reason(reply.enhanced)).inc()
    return reply


def reply_sent(reply):
    _child(REPLIES, _REPLY_CHILDREN, labels.reply_class(reply.code)).inc()


def auth_failed():
    AUTH_FAILURES.inc()


def message_queued():
    MESSAGES_QUEUED.inc()


def tls_session(direction, transport):
    """A handshake completed; ``direction`` is ``in`` or ``out``."""
    handle = getattr(transport, "getHandle", lambda: None)()
    name = getattr(handle, "get_protocol_version_name", lambda: None)()
    TLS_SESSIONS.labels(direction, labels.tls_version(name)).inc()


def plugin_answer(plugin, method, started, answer):
    """Time a plugin's answer from ``started`` (time.monotonic()): now, or
    when its Deferred fires.  ``plugin`` is its configured name."""
    def observed(result=None):
        PLUGIN_CALL.labels(plugin, method).observe(time.monotonic() - started)
        return result
    if isinstance(answer, defer.Deferred):
        answer.addBoth(observed)
    else:
        observed()


def recipient_outcome(status, since_queued):
    """One recipient's outcome in an attempt, ``since_queued`` seconds
    after its message was queued."""
    if status == SENT:
        DELIVERED.inc()
        DELIVERY_LATENCY.observe(max(0.0, since_queued))
    elif status == DEFERRED:
        DEFERRED_ATTEMPTS.inc()
    elif status == BOUNCED:
        BOUNCED_RECIPIENTS.inc()


def deferred_now(count):
    """The messages this process's scheduler waits to try again."""
    QUEUE_DEFERRED.labels("deferred").set(count)


def worker_restarted(role):
    WORKER_RESTARTS.labels(role).inc()


def destination_attempt(destination, outcomes, seconds, now):
    """One attempt to one destination ended after ``seconds``: time it, and
    keep its first failure as the destination's last error."""
    ATTEMPT_DURATION.observe(max(0.0, seconds))
    for outcome in outcomes:
        if outcome.status != SENT:
            text = " ".join(str(part) for part in (outcome.code, outcome.enhanced, outcome.text)
                            if part is not None)
            LAST_ERRORS.record(destination, text, now)
            return


# -- off unless [metrics] listen is set -------------------------------------------

#: The functions the relay calls at its events, by name: enable() puts
#: them, or a function that does nothing, in the module's namespace (the
#: callers look them up there at each call), so a relay without metrics
#: pays one empty call per event.
_EVENTS = {name: globals()[name] for name in (
    "connection_opened", "connection_closed", "command", "reply_sent", "auth_failed",
    "message_queued", "tls_session", "plugin_answer", "recipient_outcome", "deferred_now",
    "worker_restarted", "destination_attempt")}


def _nothing(*_args, **_kwargs):
    return None


def enable(on):
    """Count (``on``) or not, in this process, as ``[metrics] listen`` says."""
    for name, function in _EVENTS.items():
        globals()[name] = function if on else _nothing
