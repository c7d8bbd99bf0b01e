"""One mail transaction's pure parts: checks before sending, commands, results.

Nothing here does I/O; the session in :mod:`relaymail.delivery.client`
sends what these functions build and feeds back what the server said.
"""

from relaymail import dsn
from relaymail.delivery.outcomes import DeliveryError, RecipientResult
from relaymail.delivery.responses import size_limit

BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")

# An address is data: these would end the command line or worse.
_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0")


def check_message(extensions, size, body, smtputf8, remote):
    """Refuse, before anything is sent, a message the server has told us it
    cannot take.  These are bounces, not retries: the same server will say
    the same thing next time.

    :raise DeliveryError: permanent, with the RFC 3463 code that names the
        problem.
    """
    if body == "BINARYMIME" and not ("CHUNKING" in extensions and "BINARYMIME" in extensions):
        # RFC 3030 3: binary content goes only by BDAT to a server that
        # offers BINARYMIME.  Turning it into 7 or 8 bits would need MIME
        # conversion of arbitrary octets, which we do not do rather than
        # corrupt it: RFC 3463 X.6.3, conversion required but not supported.
        missing = " and ".join(k for k in ("CHUNKING", "BINARYMIME") if k not in extensions)
        raise DeliveryError(temporary=False, code=None, enhanced="5.6.3",
                            text=f"binary message (BODY=BINARYMIME), but {remote} does not offer "
                                 f"{missing}: conversion required but not supported",
                            remote=remote)
    limit = size_limit(extensions)
    if limit is not None and size > limit:
        # RFC 1870 6: a message over the announced limit is not attempted.
        raise DeliveryError(temporary=False, code=None, enhanced="5.3.4",
                            text=f"message size {size} exceeds the limit {limit} of {remote}",
                            remote=remote)
    if body == "8BITMIME" and "8BITMIME" not in extensions:
        # Not reached from the client, which converts such a message first
        # (relaymail.delivery.downgrade); kept as the last line of defence.
        raise DeliveryError(temporary=False, code=None, enhanced="5.6.3",
                            text=f"8-bit message, but {remote} does not offer 8BITMIME",
                            remote=remote)
    if smtputf8 and "SMTPUTF8" not in extensions:
        # RFC 6531 3.4: without SMTPUTF8 at the next hop the message cannot
        # go on.  The client drops the flag first when nothing needs it.
        raise DeliveryError(temporary=False, code=None, enhanced="5.6.7",
                            text=f"message needs SMTPUTF8, but {remote} does not offer it",
                            remote=remote)


def encode_address(address, smtputf8, remote):
    """The bytes of a path for MAIL FROM or RCPT TO.

    :raise DeliveryError: permanent, for an address that cannot be sent.
    """
    if any(char in address for char in _FORBIDDEN_IN_ADDRESS):
        raise DeliveryError(temporary=False, code=None, enhanced="5.1.3",
                            text=f"invalid address {address!r}", remote=remote)
    if smtputf8:
        return address.encode("utf-8")
    try:
        return address.encode("ascii")
    except UnicodeEncodeError:
        raise DeliveryError(temporary=False, code=None, enhanced="5.6.7",
                            text=f"address {address!r} needs SMTPUTF8", remote=remote) from None


def mail_command(sender, extensions, size, body, smtputf8, remote):
    """``MAIL FROM:<sender>`` with the parameters the server understands;
    ``''`` is the null sender ``<>``."""
    parts = [b"MAIL FROM:<" + encode_address(sender, smtputf8, remote) + b">"]
    if "SIZE" in extensions:
        parts.append(b"SIZE=%d" % size)          # RFC 1870 6
    if body in ("8BITMIME", "BINARYMIME"):
        parts.append(b"BODY=" + body.encode())   # RFC 6152 2, RFC 3030 3
    if smtputf8:
        parts.append(b"SMTPUTF8")                # RFC 6531 3.4
    return b" ".join(parts)


def dsn_commands(envelope, mail, rcpts, recipients):
    """MAIL and the RCPTs with the sender's DSN requests (RFC 3461 5.2:
    passed on to a next hop that offers DSN), when the envelope (the queue
    record's, a dict) has any; unchanged otherwise."""
    requests = envelope.get("dsn_recipients") or {}
    if not (requests or envelope.get("dsn_ret") or envelope.get("dsn_envid")):
        return mail, rcpts
    mail += dsn.mail_parameters(envelope).encode("utf-8")
    rcpts = [command + dsn.rcpt_parameters(address, requests.get(address)).encode("utf-8")
             for command, address in zip(rcpts, recipients, strict=True)]
    return mail, rcpts


def rcpt_command(recipient, smtputf8, remote):
    """``RCPT TO:<recipient>``."""
    return b"RCPT TO:<" + encode_address(recipient, smtputf8, remote) + b">"


def result_from(address, reply):
    """A recipient's result from the reply that decided it."""
    return RecipientResult(address, reply.code, reply.enhanced_or_derived, reply.text)


def assemble_results(recipients, rcpt_replies, outcome):
    """Results in the order of ``recipients``: a refused recipient keeps its
    RCPT reply, an accepted one gets ``outcome`` (the reply to DATA when
    that failed, else the final reply after the message)."""
    results = []
    for address, reply in zip(recipients, rcpt_replies, strict=True):
        decided_by = outcome if reply.positive and outcome is not None else reply
        results.append(result_from(address, decided_by))
    return results


def over_the_limit(results):
    """The positions in ``results`` (one transaction's, in RCPT order) of
    the recipients the server refused as more than it takes in one
    transaction, to be sent again at once in another (RFC 5321 4.5.3.1.8:
    a client with many recipients "SHOULD be prepared to transmit" them
    in chunks).

    RFC 5321 4.5.3.1.10 gives that refusal 452, and asks a client to read
    the 552 of RFC 821 servers the same way; RFC 3463 names it X.5.3, "too
    many recipients".  452 also means "insufficient system storage"
    (4.3.1), so a 452 counts only with X.5.3 or no enhanced code of the
    server's own, and only when the same transaction delivered to someone:
    a server that took nobody is in trouble, not counting, and the usual
    retry is the answer.
    """
    if not any(delivered(result) for result in results):
        return []
    return [index for index, result in enumerate(results) if too_many(result)]


def delivered(result):
    """Whether the RecipientResult says delivered (2xx)."""
    return result.code is not None and 200 <= result.code < 300


def too_many(result):
    """Whether the RecipientResult is a "too many recipients" refusal
    (see :func:`over_the_limit`)."""
    code, enhanced = result.code, result.enhanced
    if code == 452:
        # derived_enhanced gives 4.0.0 for a 452 that came without one.
        return enhanced in ("4.5.3", "4.0.0")
    if code is not None and 400 <= code < 500:
        return enhanced == "4.5.3"
    return code == 552 and enhanced == "5.5.3"


def held_back(result, note=None):
    """A "too many recipients" refusal as it stays for the retry: a 552
    made temporary, as RFC 5321 4.5.3.1.10 asks (no reply code of its own
    then: the server's is in the text), with ``note`` on what else was
    tried."""
    text = result.text if note is None else f"{result.text} ({note})"
    if result.code is not None and result.code >= 500:
        return RecipientResult(result.address, None, "4.5.3",
                               f"{result.code} {result.enhanced} {text} "
                               "(taken as temporary: RFC 5321 4.5.3.1.10)")
    return RecipientResult(result.address, result.code, result.enhanced, text)
