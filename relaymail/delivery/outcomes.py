"""What a delivery attempt reports back: a failed session or per-recipient results.

The scheduler reads these and nothing else: :class:`DeliveryError` when the
session failed before per-recipient answers existed, a list of
:class:`RecipientResult` otherwise.  Enhanced status codes follow RFC 3463.
"""

import re
from dataclasses import dataclass

from relaymail import sanitize

# RFC 3463 2: class "." subject "." detail, class 2, 4 or 5, subject and
# detail one to three digits.
# ASCII digits only: a stranger's "5.\u0661.1" is no code (and would put
# other digits in our replies).
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z", re.ASCII)


def is_enhanced_code(text):
    """True when ``text`` is an RFC 3463 status code such as ``'5.1.1'``."""
    return bool(_ENHANCED.match(text))


def derived_enhanced(code):
    """The generic enhanced code for a reply code, for servers that send none
    (``550`` -> ``'5.0.0'``, RFC 3463 3.1: X.0.0 is "other undefined")."""
    return f"{code // 100}.0.0"


class DeliveryError(Exception):
    """The session failed before per-recipient results: connect failure,
    timeout, bad greeting, EHLO/HELO/STARTTLS/AUTH/MAIL refused, TLS policy
    not met, connection lost, or a message the server cannot take.

    :ivar temporary: True to try the next hop or retry later, False to bounce.
    :ivar code: the server's reply code when it said something, else None.
    :ivar enhanced: the RFC 3463 code, the server's or ours.
    :ivar text: for logs and the DSN Diagnostic-Code; the server's reply
        text when the server's reply is the reason.  Never holds credentials,
        nor a character that could break a line or drive a terminal: reply
        texts are escaped as they are read, and so is every other text here
        (a TLS error naming what a server's certificate says, for one).
    :ivar remote: the ``Hop.label`` of the server, when there was one.
    """

    #: True when the failure came after the message content was sent: the
    #: server may have taken it, so it must not be offered to another hop
    #: in the same attempt (that would deliver it twice).
    after_data = False

    def __init__(self, temporary, code, enhanced, text, remote=None):
        text = sanitize.escape(text)
        super().__init__(text)
        self.temporary = temporary
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.remote = remote

    def met_after_data(self):
        """Mark this failure, met once message octets may have gone, as one
        that may follow a delivery the server made (:attr:`after_data`).
        Not a server's 421: that says it closed the channel, its
        transaction aborted, the message not taken (RFC 5321 3.8)."""
        if self.code != 421:
            self.after_data = True

    def __repr__(self):
        return (f"DeliveryError(temporary={self.temporary!r}, code={self.code!r}, "
                f"enhanced={self.enhanced!r}, text={self.text!r}, remote={self.remote!r})")


@dataclass(frozen=True)
class RecipientResult:
    """The server's last word on one recipient.

    ``code`` 2xx means delivered, 4xx deferred, 5xx bounced.  ``enhanced`` is
    the server's enhanced code, or one derived from ``code`` when it sent
    none.  ``text`` is the reply text, its lines joined with a space.
    """

    address: str
    code: int
    enhanced: str
    text: str


def our_side(reply, remote, what):
    """The :class:`DeliveryError` for a refusal that is about our own side
    -- the credentials or the TLS set-up we bring -- rather than about the
    recipient: always temporary, whatever the reply code.

    A 5xx here would bounce every message at once, and the bounce would
    go through the same next hop and fail the same way: one typo in a
    password would lose all mail.  Postfix defers these too
    (``smtp_sasl_auth_soft_bounce = yes``).  The enhanced code is made
    transient (RFC 3463 2: the class digit says it), the server's whole
    reply kept in the text for the log.

    :param what: what was refused, e.g. ``'SASL authentication'``.
    """
    enhanced = reply.enhanced_or_derived
    return DeliveryError(
        temporary=True, code=None, enhanced="4" + enhanced[1:],
        text=f"{what} failed; server {remote} said: {reply.code} {enhanced} {reply.text} "
             "(deferred: a problem on our side, not with the recipient)",
        remote=remote)


def error_from_reply(reply, remote):
    """The :class:`DeliveryError` for a reply that ends the session or the
    transaction: temporary for 4xx, permanent for 5xx.  Any other code where
    a refusal or a success was due means the server is not following the
    protocol; that is temporary, as another hop may be sane."""
    if 400 <= reply.code < 600:
        return DeliveryError(temporary=reply.code < 500, code=reply.code,
                             enhanced=reply.enhanced_or_derived, text=reply.text, remote=remote)
    return DeliveryError(temporary=True, code=reply.code, enhanced="4.5.0",
                         text=f"unexpected reply from {remote}: {reply}", remote=remote)
