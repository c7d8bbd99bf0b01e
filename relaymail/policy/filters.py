"""The message filters (``[plugins] filters``): ask each in order about a
complete message, and combine their answers into one.

As at every hook, the first decisive answer wins: reject, defer, accept,
hold, discard or redirect ends the filtering.  Header changes
(:meth:`Decision.with_headers`) and a whole new message
(:meth:`Decision.with_message`) are applied as each filter answers, so the
next filter sees the message as changed (its ``headers`` and what
``open()`` reads), and the changes of every filter up to and including the
decisive one are what gets queued.  Postfix's before-queue milters work
the same way: each sees the changes of those before it.

A filter that raises, does not answer within ``[plugins] timeout``, or
answers what the contract does not allow (not a Decision, a reply code of
the wrong class, a redirect to something that is not an address, a header
that could not be written safely, a new message the queue could not hold)
fails the message: the client gets
``451 4.3.0`` and nothing is queued, rather than mail going on unfiltered
(a content filter that may be skipped by making it fail is no filter).
"""

from twisted.internet.defer import inlineCallbacks

from relaymail import address, header_section
from relaymail.interfaces import Decision

#: The answer when a filter failed: the client tries again later.
FILTER_FAILED = Decision.defer(
    code=451, enhanced="4.3.0", text="Temporary failure checking message, try again later")

_KINDS = frozenset({Decision.ACCEPT_KIND, Decision.REJECT_KIND, Decision.DEFER_KIND,
                    Decision.NO_OPINION_KIND}) | Decision.FILTER_KINDS


#: In :attr:`FilterResult.changes`, in place of the removed names: the
#: filter replaced the whole message (Decision.with_message).
REPLACED = "whole message"


class BadFilterAnswer(Exception):
    """A filter answered with something the contract does not allow."""


class FilterResult:
    """What the filters made of a message.

    ``decision`` is the decisive answer (``Decision.NO_OPINION`` when none
    gave one; :data:`FILTER_FAILED` when one failed), ``plugin`` the label
    of the filter that gave it (None for no opinion), ``message`` the
    message with every change applied, ``changes`` one
    ``(plugin, removed names, added names)`` per filter that changed the
    header, in order, and ``(plugin, REPLACED, ())`` for one that replaced
    the whole message.
    """

    __slots__ = ("decision", "plugin", "message", "changes")

    def __init__(self, decision, plugin, message, changes):
        self.decision = decision
        self.plugin = plugin
        self.message = message
        self.changes = changes

    @property
    def failed(self):
        return self.decision is FILTER_FAILED


@inlineCallbacks
def run_filters(policy, filters, message, context, label):
    """Ask ``filters`` in order about ``message``.

    :param policy: the Policy whose ``_call`` runs a plugin method with
        the timeout, and whose ``_log_failure`` logs what went wrong.
    :param message: an IMessage offering ``with_fields(fields)`` and
        ``fields`` (relaymail.queue.message_view.MessageView).
    :param label: ``label(plugin)``, the plugin's name for the log.
    :return: a Deferred firing with a :class:`FilterResult`; it never fails.
    """
    changes = []
    smtputf8 = bool(getattr(message.envelope, "smtputf8", False))
    binary = getattr(message.envelope, "body", None) == "BINARYMIME"
    limits = getattr(policy, "limits", None)
    for plugin in filters:
        try:
            answer = yield policy._call(plugin, "check_message", message, context)
            decision = checked(answer, limits, binary, message)
            if decision.message is not None:
                message = message.with_content(decision.message)
                changes.append((label(plugin), REPLACED, ()))
            if decision.add_headers or decision.remove_headers:
                message = message.with_fields(changed_fields(message.fields, decision, smtputf8))
                changes.append((label(plugin), decision.remove_headers,
                                tuple(name for name, _ in decision.add_headers)))
        except Exception as exc:
            policy._log_failure(exc, plugin, "check_message", message.queue_id)
            return FilterResult(FILTER_FAILED, label(plugin), message, changes)
        if decision.is_final:
            return FilterResult(decision, label(plugin), message, changes)
    return FilterResult(Decision.NO_OPINION, None, message, changes)


def checked(answer, limits=None, binary=False, current=None):
    """``answer`` if it is a Decision a filter may give, else raise
    :class:`BadFilterAnswer`; a new message is held to ``limits`` (see
    :func:`replacement_problem`)."""
    if not isinstance(answer, Decision) or answer.kind not in _KINDS:
        raise BadFilterAnswer(f"returned {answer!r}, not a Decision")
    kind = answer.kind
    if kind == Decision.REJECT_KIND and not _in_class(answer.code, 500):
        raise BadFilterAnswer(f"returned {answer!r}: a rejection needs a 5xx code")
    if kind == Decision.DEFER_KIND and not _in_class(answer.code, 400):
        raise BadFilterAnswer(f"returned {answer!r}: a deferral needs a 4xx code")
    if answer.message is not None:
        problem = replacement_problem(answer.message, limits, binary, current)
        if problem is not None:
            raise BadFilterAnswer(f"replaced the message with {problem}")
    if kind == Decision.REDIRECT_KIND:
        if not answer.recipients:
            raise BadFilterAnswer(f"returned {answer!r}: a redirect to no one")
        for recipient in answer.recipients:
            try:
                address.parse_forward_path(f"<{recipient}>", smtputf8=True)
            except (address.AddressError, TypeError) as exc:
                raise BadFilterAnswer(f"redirect to {recipient!r}, not an address: {exc}") from None
    return answer


def replacement_problem(data, limits=None, binary=False, current=None):
    """What is wrong with ``data`` as a whole new message, or None.

    It must be one the DATA reader would have let in under ``limits``
    (``[limits]``, None for no bounds): at most ``message_size`` octets, a
    header section first, up to its empty line within ``header_size``,
    and lines that end in CRLF and nothing else, none longer than
    ``line_length``, no NUL unless ``allow_nul`` -- in a
    ``BODY=BINARYMIME`` message (``binary``) in its header section only,
    since octets are data in its body (RFC 3030 3).  Both sizes allow for
    the relay's own Received field (the first one of ``current``, the
    message as it stands, a MessageView), which the DATA reader did not
    count, and are never held below ``current``'s (earlier filters' fields
    are not counted either).  Each check is a bytes operation or two, as
    the DATA reader's are, the cheap ones first: this runs on the reactor,
    over messages of many megabytes.
    """
    if not isinstance(data, bytes):
        return f"{type(data).__name__}, not bytes"
    # The header section as the DATA reader scans it: to the empty line.
    cut = data.find(b"\r\n\r\n")
    header_end = len(data) if cut < 0 else cut + 2
    if limits is not None:
        ours = _own_received_length(current)
        most = max(limits.message_size + ours, getattr(current, "size", 0))
        if len(data) > most:
            return f"{len(data)} octets, over [limits] message_size ({limits.message_size})"
        if limits.header_size is not None and header_end > max(
                limits.header_size + ours, len(getattr(current, "header_bytes", b""))):
            return f"a header section over [limits] header_size ({limits.header_size})"
    text = data[:header_end] if binary else data
    if not text.endswith(b"\r\n"):
        return "a last line that does not end in CRLF"
    pairs = text.count(b"\r\n")
    if text.count(b"\r") != pairs or text.count(b"\n") != pairs:
        return "a bare CR or LF (lines end in CRLF)"
    if limits is not None:
        if not limits.allow_nul and b"\x00" in text:
            return "a NUL octet"
        longest = limits.line_length - 2
        if len(text) > longest and max(map(len, text.split(b"\r\n"))) > longest:
            return f"a line over [limits] line_length ({limits.line_length})"
    fields, _ = header_section.parse(data[:header_end], complete=True)
    if not fields:
        return "no header section"
    return None


def _own_received_length(current):
    """The length of the relay's own Received field in ``current`` (the
    first Received field: filters add theirs above it), or 0."""
    for field in getattr(current, "fields", ()):
        if field.name.lower() == "received":
            return len(field.raw)
    return 0


def _in_class(code, base):
    return isinstance(code, int) and base <= code <= base + 99


def changed_fields(fields, decision, smtputf8):
    """The header fields after ``decision``'s changes.

    :raise header_section.BadField: for a field that cannot be written
        (the caller counts the answer as a failure).
    """
    header_section.check_names(decision.remove_headers)
    added = []
    for item in decision.add_headers:
        if not isinstance(item, tuple) or len(item) != 2:
            raise header_section.BadField(f"header {item!r} is not a (name, value) pair")
        added.append(header_section.new_field(*item, smtputf8=smtputf8))
    return header_section.changed(fields, decision.remove_headers, added)
