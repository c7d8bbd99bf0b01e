"""The values a label may take: each metric's labels come from a small
fixed set, never from what a client or a remote server wrote, so that
a hostile peer cannot make a time series per string it sends."""

#: The SMTP verbs relaymail knows (RFC 5321 4.1, 3207, 4954); anything else
#: is counted as "other".
VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
                   "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH"})

#: Why a recipient was refused, from the subject and detail of its RFC 3463
#: enhanced code (the class, 4 or 5, is the reply's own business).
REJECTION_REASONS = {
    "1.1": "unknown_mailbox",       # bad destination mailbox address
    "1.2": "unknown_domain",        # bad destination system address
    "1.3": "bad_address",           # bad destination mailbox address syntax
    "5.2": "bad_address",           # syntax error
    "5.4": "bad_address",           # invalid command arguments
    "6.7": "bad_address",           # non-ASCII address without SMTPUTF8
    "7.1": "relay_denied",          # delivery not authorized (Relay access denied)
    "5.1": "out_of_sequence",       # invalid command (RCPT before MAIL)
    "5.3": "too_many_recipients",
    "3.0": "local_error",           # a plugin failed or timed out
    "3.1": "local_error",           # mail system full
}
OTHER = "other"

#: TLS versions as OpenSSL names them, and the label each gets.
TLS_VERSIONS = {"TLSv1": "1.0", "TLSv1.1": "1.1", "TLSv1.2": "1.2", "TLSv1.3": "1.3"}


def verb(line):
    """The verb label of a command line (bytes)."""
    word = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
    return word if word in VERBS else OTHER


def reply_class(code):
    """``2xx``, ``3xx``, ``4xx`` or ``5xx`` for a reply code."""
    return f"{code // 100}xx" if 200 <= code < 600 else OTHER


def rejection_reason(enhanced):
    """The reason label for a refused recipient's enhanced code (or None)."""
    if not enhanced or enhanced.count(".") != 2:
        return OTHER
    subject_and_detail = enhanced.split(".", 1)[1]
    return REJECTION_REASONS.get(subject_and_detail, OTHER)


def tls_version(name):
    """The version label for OpenSSL's protocol name (``TLSv1.3``)."""
    return TLS_VERSIONS.get(name, OTHER)
