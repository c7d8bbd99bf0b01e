"""The envelope of one message: what MAIL and RCPT said, and who said it."""

from dataclasses import dataclass, field, fields


@dataclass
class Envelope:
    """Sender and recipients as address strings (``local@domain``; the
    sender is ``""`` for the null sender ``<>``), plus what the queue and
    delivery need to know about how the message arrived."""

    sender: str
    recipients: list = field(default_factory=list)
    #: ``"7BIT"``, ``"8BITMIME"`` or ``"BINARYMIME"`` (MAIL BODY=; the last
    #: comes only by BDAT, RFC 3030 3); delivery checks the next hop.
    body: str = "7BIT"
    #: MAIL ... SMTPUTF8 was given: addresses or headers may be UTF-8.
    smtputf8: bool = False
    client_ip: str = ""
    helo: str = ""
    authenticated_user: str = None
    #: Seconds since the epoch when the message was accepted.
    received_at: float = 0.0
    #: A notice to the postmaster about a bounce that could not be
    #: delivered: if it fails too, it is discarded, never bounced again.
    double_bounce: bool = False
    #: DSN requests (RFC 3461, relaymail.dsn): MAIL's RET (``FULL`` or
    #: ``HDRS``) and ENVID (xtext as sent), or None when not given ...
    dsn_ret: str = None
    dsn_envid: str = None
    #: ... and RCPT's, by recipient: ``{address: [notify, orcpt]}`` (each
    #: None when not given), for the recipients that had any; None for none.
    dsn_recipients: dict = None
    #: Recipients that were lists or aliases of several addresses and asked
    #: NOTIFY=SUCCESS: ``[[address, orcpt], ...]``, owed an "expanded"
    #: notice (RFC 3461 6.2.7.3), which the first delivery attempt sends.
    dsn_expanded: list = None
    #: MAIL said REQUIRETLS (RFC 8689 4.2.1): every hop onward must be
    #: authenticated TLS that offers REQUIRETLS, else the message bounces.
    requiretls: bool = False
    #: The header section had "TLS-Required: No" (RFC 8689 5): DANE and
    #: MTA-STS are not enforced for it (and REQUIRETLS was not given).
    tls_optional: bool = False

    def to_dict(self):
        # What dataclasses.asdict gives (containers copied all the way
        # down), at a seventh of its cost: it runs for every message.
        return {name: _copied(getattr(self, name)) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data):
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


_FIELD_NAMES = tuple(item.name for item in fields(Envelope))


def _copied(value):
    kind = type(value)
    if kind is list or kind is tuple:
        return kind(_copied(item) for item in value)
    if kind is dict:
        return {key: _copied(item) for key, item in value.items()}
    return value
