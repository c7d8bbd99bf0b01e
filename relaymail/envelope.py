"""The envelope of one message: what MAIL and RCPT said, and who said it."""

from dataclasses import asdict, dataclass, field


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

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)
