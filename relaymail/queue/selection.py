"""Which queued messages an administrator's filter names.

``relaymail-queue list --domain example.com``, ``hold ALL --sender
x@example.org`` and ``flush --domain example.com`` (the last done by the
scheduler, which owns the queue while the relay runs) all ask the same
question of a queue record; this module is the one answer, so that the
listing shows exactly what the change will touch.

A filter looks at the sender and at the recipients still to do (neither
sent nor bounced): a message whose only recipient at example.com has
been delivered is no longer example.com's mail.  Comparisons ignore case
(an administrator types ``Example.COM`` as readily as the client did),
and a domain in U-labels (``bücher.example``) and its A-label form
(``xn--bcher-kva.example``) are the same domain, as they are for routing
(:attr:`relaymail.address.Mailbox.domain_key`).
"""

from relaymail.queue import record as records
from relaymail.address import AddressError, parse_forward_path

_FINAL = frozenset((records.SENT, records.BOUNCED))

#: What ``--sender`` takes for the null reverse-path of a bounce.
NULL_SENDER = ("", "<>")


class BadFilter(ValueError):
    """A filter value that names no domain or address; the text says why."""


def domain_key(text):
    """The comparison form of a domain: lower case, A-labels.

    :raise BadFilter: when ``text`` is not a domain (or address literal).
    """
    # Lower case first: IDNA 2008 has no upper-case U-labels to map.
    domain = text.strip().lower()
    try:
        return parse_forward_path(f"<postmaster@{domain}>", smtputf8=True).domain_key
    except AddressError as error:
        raise BadFilter(f"not a domain: {text!r} ({error})") from None


def address_key(text):
    """The comparison form of an address: in lower case, the domain in
    A-labels as :func:`domain_key` gives it.

    :raise BadFilter: when ``text`` is not an address.
    """
    address = text.strip().lower()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    try:
        mailbox = parse_forward_path(f"<{address}>", smtputf8=True)
        return f"{mailbox.local_part}@{mailbox.domain_key}"
    except AddressError as error:
        raise BadFilter(f"not an address: {text!r} ({error})") from None


def stored_address_key(address):
    """:func:`address_key` of an address from a record, never raising: a
    record is what our server accepted, but a hand-edited one may hold
    anything, and one odd address must not stop a listing."""
    try:
        return address_key(address)
    except BadFilter:
        return address.lower()


def pending(record):
    """The record's recipient entries still to deliver to, in order."""
    return [entry for entry in record["recipients"] if entry.get("status") not in _FINAL]


class Selection:
    """A filter on sender, recipient and recipient domain; each given
    value must match (an empty selection takes every message).

    :param sender: an address, or ``""``/``"<>"`` for the null sender.
    :param recipient: an address one of the recipients still to do has.
    :param domain: a domain one of the recipients still to do is in.
    :raise BadFilter: for a value that is not an address or a domain.
    """

    def __init__(self, sender=None, recipient=None, domain=None):
        if sender is None or sender.strip() in NULL_SENDER:
            self.sender = None if sender is None else ""
        else:
            self.sender = address_key(sender)
        self.recipient = None if recipient is None else address_key(recipient)
        self.domain = None if domain is None else domain_key(domain)

    def __bool__(self):
        return not (self.sender is None and self.recipient is None and self.domain is None)

    def matches(self, record):
        """Whether the checked queue record ``record`` is selected."""
        if self.sender is not None:
            sender = str(record["envelope"].get("sender") or "")
            if (stored_address_key(sender) if sender else "") != self.sender:
                return False
        if self.recipient is None and self.domain is None:
            return True
        keys = [stored_address_key(entry["address"]) for entry in pending(record)]
        if self.recipient is not None and self.recipient not in keys:
            return False
        if self.domain is not None:
            return any(key.rpartition("@")[2] == self.domain for key in keys)
        return True

    def describe(self):
        """The filter as the tool's options spell it, for messages."""
        words = []
        for option, value in (("--sender", self.sender), ("--recipient", self.recipient),
                              ("--domain", self.domain)):
            if value is not None:
                words.append(f"{option} {value or '<>'}")
        return " ".join(words)


def matching_ids(spool, queue_ids, selection):
    """The ids among ``queue_ids`` (in ``active/`` of ``spool``, a
    :class:`relaymail.queue.spool.Spool`) whose records ``selection``
    matches, in the order given.  A record that cannot be read now is
    left out: the message's own attempt sets a bad one aside."""
    return [queue_id for queue_id, record, error in spool.read_records(queue_ids)
            if error is None and selection.matches(record)]
