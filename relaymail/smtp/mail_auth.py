"""The AUTH parameter of MAIL (RFC 4954 5): ``MAIL FROM:<a@b> AUTH=<>``.

A server that offers AUTH must take the parameter: it is how a client that
authenticated says who submitted the message.  Exim's smtp transport sends
it when it logged in and has an authenticated sender (its own submission
clients', or its ``authenticated_sender`` option), curl with
``--mail-auth``; refusing it with 555, as relaymail did, stopped their mail
at MAIL, and Exim bounced it (555 is permanent).

The value is xtext (RFC 3461 4): printable ASCII except ``+`` and ``=``,
which are written ``+2B`` and ``+3D``, each a ``+`` and two hex digits.
RFC 3461 asks for upper-case digits, but Exim writes a non-ASCII sender's
octets in lower case (``AUTH=ren+c3+a9@...``), so either case is taken.
Malformed xtext is a syntax error (501 5.5.4, as for any malformed
parameter).  What it decodes to -- ``<>`` or the submitter's
mailbox -- relaymail does not use: RFC 4954 5 lets a server that does not
trust the claim behave as though ``AUTH=<>`` was given, which for a relay
that passes no AUTH parameter on means doing nothing with it; like
Postfix, relaymail does not look into the mailbox's syntax either.
Non-ASCII characters are taken as they are, as RFC 6533's UTF-8 form of
xtext allows them.

The parameter is taken only where AUTH is available on the session (the
client logged in, or AUTH is offered to it); elsewhere it stays an
unsupported parameter (555 5.5.4), as Postfix answers where SASL is off.
"""

import re

# xchar (33-126 except "+" and "="), hexchar, or a non-ASCII character.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2}|[^\x00-\x7f])+")


def xtext_problem(value):
    """Why ``value`` (the text after ``AUTH=``, or None for a bare
    ``AUTH``) is no valid xtext, or None when it is."""
    if value is None:
        return "AUTH takes a mailbox or <> in xtext"
    if not _XTEXT.fullmatch(value):
        return "AUTH value is not valid xtext"
    return None
