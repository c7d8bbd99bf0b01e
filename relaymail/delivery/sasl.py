"""SASL for the client's AUTH command (RFC 4954): the PLAIN and LOGIN responses.

Only the encodings live here; when and over what they may be sent is the
session's business (never without TLS).
"""

import base64

# Preferred first: PLAIN is a standard (RFC 4616) and takes one round trip;
# LOGIN is a de facto mechanism that old servers offer alone.
SUPPORTED = ("PLAIN", "LOGIN")


def offered_mechanisms(extensions):
    """The mechanisms in the EHLO ``AUTH`` keyword, upper-case."""
    return {name.upper() for name in extensions.get("AUTH", "").split()}


def choose_mechanism(offered):
    """The first of our mechanisms the server offers, or None."""
    for name in SUPPORTED:
        if name in offered:
            return name
    return None


def plain_response(user, password):
    """The PLAIN initial response: base64 of NUL user NUL password, with an
    empty authorisation identity (RFC 4616 2)."""
    message = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
    return _b64(message)


def login_response(value):
    """A LOGIN answer to the user-name or password challenge."""
    return _b64(value.encode("utf-8"))


def _b64(data):
    return base64.b64encode(data).decode("ascii")
