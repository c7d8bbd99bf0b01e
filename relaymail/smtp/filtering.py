"""After the final dot, with ``[plugins] filters`` set: the filters decide
what becomes of the message before the client hears the reply.

The policy (:mod:`relaymail.policy.filters`) asks the filters and combines
their answers; this module acts on the result, on the message still open in
the queue (the writer):

- reject, defer, or a filter that failed: the message is thrown away and
  the answer is the reply to the DATA content;
- discard: thrown away, but the client hears the same ``250`` as for a
  queued message, with its queue id (as Postfix's DISCARD does), so that
  a sender cannot tell which messages a filter drops; the log says so;
- hold: committed straight into ``hold/`` (never in ``active/``, so no
  delivery starts it), ``250``;
- redirect: the filter's recipients, expanded like any (aliases, lists),
  replace the envelope's;
- header changes: the file is written afresh with them before the commit,
  in the queue's threads (:meth:`relaymail.queue.spool.SpoolWriter.rewrite`).

Every line logged names the filter that decided.  The wire sees only the
queue contract: ``writer.view(envelope)`` gives (a Deferred of) the IMessage the filters
read and ``writer.rewrite(message)`` writes the changes.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from relaymail import logline
from relaymail.interfaces import Decision
from relaymail.policy import filters as policy_filters
from relaymail.smtp import replies

log = Logger(namespace="relaymail.smtp")


@inlineCallbacks
def filter_then_commit(policy, context, writer, envelope, commit):
    """Run the filters over the message in ``writer`` and act on their answer.

    :param envelope: the Envelope the message would be queued with.
    :param commit: ``commit(recipients, size, hold)``, a Deferred of the
        reply once the message is queued (the dialogue's own commit).
    :return: a Deferred of the reply to the DATA content.  It fails when
        the queue does (the caller aborts and answers ``451 4.3.0``).
    """
    queue_id = writer.queue_id
    message = yield writer.view(envelope)
    result = yield policy.check_message(message, context)
    decision, plugin = result.decision, result.plugin
    kind = decision.kind
    where = f"{context.label}: {queue_id}"
    if result.failed or kind in (Decision.REJECT_KIND, Decision.DEFER_KIND):
        writer.abort()
        reply = replies.decision_reply(decision, replies.OK)
        how = "failed" if result.failed else "refused the message"
        _info(f"{where}: filter {plugin} {how}: {reply.code} {reply.enhanced} {reply.text}",
              context, queue_id, plugin, code=reply.code, enhanced=reply.enhanced)
        return reply
    if kind == Decision.DISCARD_KIND:
        writer.abort()
        _info(f"{where}: discarded by {plugin}: {decision.text}", context, queue_id, plugin,
              reason=decision.text)
        return replies.queued(queue_id)
    recipients = envelope.recipients
    if kind == Decision.REDIRECT_KIND:
        recipients = yield policy.expand_recipients(list(decision.recipients), context)
        rcpts = ",".join(f"<{r}>" for r in recipients)
        _info(f"{where}: redirected by {plugin} to {rcpts}: {decision.text}", context, queue_id,
              plugin, recipients=recipients, reason=decision.text)
    for changer, removed, added in result.changes:
        if removed == policy_filters.REPLACED:
            _info(f"{where}: filter {changer}: replaced the message", context, queue_id,
                  changer, replaced=True)
            continue
        what = "; ".join(part for part in (
            "removed " + ", ".join(removed) if removed else "",
            "added " + ", ".join(added) if added else "") if part)
        _info(f"{where}: filter {changer}: {what}", context, queue_id, changer,
              removed=list(removed), added=list(added))
    if result.changes:
        yield writer.rewrite(result.message)
    hold = kind == Decision.HOLD_KIND
    reply = yield commit(recipients, result.message.size, hold)
    if hold and reply.code == 250:
        _info(f"{where}: held by {plugin}: {decision.text}", context, queue_id, plugin,
              reason=decision.text)
    elif kind == Decision.ACCEPT_KIND:
        _info(f"{where}: accepted by filter {plugin}", context, queue_id, plugin)
    return reply


def _info(text, context, queue_id, plugin, **fields):
    logline.info(log, text, queue_id=queue_id, plugin=plugin, **fields, **context.log_fields)
