"""Every reply the server sends, with its RFC 3463 enhanced status code.

Reply codes follow RFC 5321 4.2 and 4.3.2; enhanced codes RFC 3463 and the
IANA registry.  RFC 2034 says enhanced codes appear once ENHANCEDSTATUSCODES
has been advertised (after EHLO), and never on the greeting or the reply to
HELO/EHLO themselves; :meth:`Reply.encode` leaves them out otherwise.
"""

from relaymail import sanitize


class Reply:
    """One SMTP reply: a three-digit code, an enhanced code (or None) and one
    or more lines of text."""

    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code, enhanced, text):
        self.code = code
        self.enhanced = enhanced
        self.lines = [text] if isinstance(text, str) else list(text)

    @property
    def text(self):
        return "\n".join(self.lines)

    @property
    def is_error(self):
        return self.code >= 400

    def with_text(self, text):
        """The same codes with other text (used for plugin answers)."""
        return Reply(self.code, self.enhanced, text)

    def encode(self, enhanced=True):
        """The reply as bytes on the wire, multi-line replies with ``code-``
        on every line but the last (RFC 5321 4.2.1)."""
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __eq__(self, other):
        return isinstance(other, Reply) and (self.code, self.enhanced, self.lines) == (
            other.code, other.enhanced, other.lines)

    def __repr__(self):
        return f"Reply({self.code}, {self.enhanced!r}, {self.text!r})"


# Greeting and session (the greeting text takes the host name).
def greeting(hostname):
    return Reply(220, None, f"{hostname} ESMTP relaymail")


def closing(hostname):
    return Reply(221, "2.0.0", f"{hostname} Bye")


def timeout(hostname):
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def shutting_down(hostname):
    # RFC 3463 4.3.2: system not accepting network messages.
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, try again later")


def too_many_errors(hostname):
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def http_request(hostname):
    # Postfix hangs up on these too (smtpd_forbidden_commands): a browser or
    # a proxy abuse attempt, never a mail client.
    return Reply(421, "4.7.0", f"{hostname} Error: HTTP request on the SMTP port")


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")


def queued(queue_id):
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# RFC 5321 3.5.3: 252 when the server cannot verify but will try delivery.
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
NOT_A_LIST = Reply(550, "5.1.1", "Not a mailing list I know")
# [server] vrfy/expn (RFC 5321 7.3 lets a site restrict both).  Off for
# everyone is "not implemented" (502, 5.5.1), as Postfix's
# disable_vrfy_command answers; refused to this client is a security
# matter (5.7.0).
VRFY_DISABLED = Reply(502, "5.5.1", "Error: VRFY command is disabled")
EXPN_DISABLED = Reply(502, "5.5.1", "Error: EXPN command is disabled")
VRFY_NOT_ALLOWED = Reply(502, "5.7.0", "Error: VRFY is only for trusted or authenticated clients")
EXPN_NOT_ALLOWED = Reply(502, "5.7.0", "Error: EXPN is only for trusted or authenticated clients")

# Sequence and syntax (RFC 5321 4.3.2; enhanced codes RFC 3463 5.5.x).
COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
EMPTY_COMMAND = Reply(500, "5.5.2", "Error: empty command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
# RFC 4954 4.
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
BAD_CHARACTERS = Reply(501, "5.5.2", "Error: control characters or invalid UTF-8 in command")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: HELO hostname")
EHLO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: EHLO hostname")
BAD_HELO_DOMAIN = Reply(501, "5.5.4", "Error: invalid host name")
# RFC 5321 4.5.3.1.2: a domain name is at most 255 octets.
HELO_TOO_LONG = Reply(501, "5.5.4", "Error: host name longer than 255 octets")
NO_ARGUMENTS_ALLOWED = Reply(501, "5.5.4", "Syntax error: this command takes no arguments")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
EXPN_SYNTAX = Reply(501, "5.5.4", "Syntax: EXPN list")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
# RFC 2920 3.1: DATA after every RCPT failed in a pipelined group.
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
HELP_TOPIC_UNKNOWN = Reply(504, "5.5.1", "HELP topic unknown")
NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress")

# STARTTLS (RFC 3207).
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "Error: command not implemented")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")

# AUTH (RFC 4954 6 for the codes).
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
# RFC 8689 3: REQUIRETLS is offered on TLS sessions only; 530 as RFC 3207
# answers a command that needs TLS first.
REQUIRETLS_WITHOUT_TLS = Reply(530, "5.7.10", "Must issue a STARTTLS command first: "
                                              "REQUIRETLS needs TLS")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Error: cannot decode response")
# RFC 4954 6: 454 4.7.0 "Temporary authentication failure", for a check
# we cannot run now (relaymail.smtp.authentication).
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")


def too_many_auth_attempts(ip):
    # RFC 4954's code for a temporary AUTH failure; the words are Postfix's
    # for smtpd_client_auth_rate_limit, so log searches carry over.
    return Reply(454, "4.7.0", f"Error: too many AUTH commands from {ip}")


def bad_sender(reason):
    return Reply(501, "5.1.7", f"Bad sender address syntax: {reason}")


def bad_recipient(reason):
    return Reply(501, "5.1.3", f"Bad recipient address syntax: {reason}")


def bad_parameter(reason):
    return Reply(501, "5.5.4", f"Syntax error in parameters: {reason}")


def unknown_parameter(keyword):
    return Reply(555, "5.5.4", f"Unsupported parameter {keyword}")


def unknown_lookup_parameter(keyword):
    """For VRFY and EXPN: RFC 5321 4.3.2 lists 555 for MAIL and RCPT only;
    these two get 504, "command parameter not implemented"."""
    return Reply(504, "5.5.4", f"Unsupported parameter {keyword}")


# RFC 6531 3.7.4.1 (and its 553 5.6.7 for non-ASCII without SMTPUTF8).
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
# RFC 1870: a declared SIZE over our limit.
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# RFC 5321 4.2.2 (452: insufficient system storage) and RFC 3463 4.3.1
# (mail system full), the words Postfix uses: the spool is short of space.
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
# RFC 5321 4.5.3.1.10: excess recipients get 452 and the client sends later.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")

# After the final dot.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message too big")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header size exceeds limit")
DATA_TOO_SLOW = "Error: data rate too low"
# A content error, not a command syntax error (so not 500 5.5.2): RFC 3463
# 3.7 X.6.0, other or undefined media error.
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Error: message has a line longer than the limit")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "Error: NUL character in message")
# RFC 5321 6.3 and RFC 3463 3.5 X.4.6, routing loop detected.
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")
# Bare CR or LF: the smuggling defence (SMTP-NOTES attack class 1).
BARE_NEWLINE = Reply(554, "5.6.0", "Error: bare <CR> or <LF> in message; lines must end with <CR><LF>")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")

# BDAT (RFC 3030), in Postfix's words (relaymail.smtp.chunking).
# A count that cannot be read leaves the chunk's end unknown: 521, and the
# connection closes.
BDAT_SYNTAX = Reply(521, "5.5.4", "Syntax: BDAT count [LAST]")
# A chunk of no octets that is not the last says nothing (Postfix's codes).
NULL_BDAT = Reply(551, "5.7.1", "Null BDAT request")
CHUNK_TOO_BIG = Reply(552, "5.3.4", "Chunk exceeds message size limit")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT")
# RFC 3030 3: a BINARYMIME body cannot be dot-stuffed, so only BDAT sends it.
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA")


def chunk_received(total):
    """A chunk that is not the last, stored: the octets so far."""
    return Reply(250, "2.0.0", f"Ok: {total} bytes")


def chunk_discarded(size):
    """RFC 3030 2: a chunk after a failed one is read and thrown away."""
    return Reply(551, "5.0.0", f"Discarded {size} bytes after earlier error")
PLUGIN_FAILED = Reply(451, "4.3.0", "Temporary failure checking recipient, try again later")


def decision_reply(decision, default, utf8=True):
    """Turn a plugin's :class:`~relaymail.interfaces.Decision` into a reply;
    ``default`` gives the codes and text of an accept.

    A plugin's text may carry what it looked up (a directory's answer, the
    address itself): CR or LF in it would forge a reply on the wire, and
    NEL or U+2028 a line in the log, so such characters are escaped
    (:mod:`relaymail.sanitize`).  With ``utf8`` false (a transaction
    without SMTPUTF8, RFC 6531 3.7.4) non-ASCII is escaped the same way,
    and the text is cut to fit RFC 5321 4.5.3.1.5's 512-octet reply line."""
    text = None if decision.text is None else _plugin_text(str(decision.text), utf8)
    if decision.kind == decision.ACCEPT_KIND:
        return default if text is None else default.with_text(text)
    return Reply(decision.code, decision.enhanced, text)


#: The longest plugin text in a reply: 512 octets a line (RFC 5321
#: 4.5.3.1.5) less the code, the enhanced code, spaces and CRLF.
PLUGIN_TEXT_LIMIT = 480


def _plugin_text(text, utf8):
    text = sanitize.escape(text)
    if not utf8 and not text.isascii():
        text = "".join(char if char.isascii() else f"\\x{{{ord(char):X}}}" for char in text)
    if len(text) > PLUGIN_TEXT_LIMIT:
        text = text[:PLUGIN_TEXT_LIMIT - 3] + "..."
    return text


HELP_TEXT = {
    None: ["Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH",
           "See RFC 5321; HELP command gives its syntax"],
    "HELO": ["HELO hostname"],
    "EHLO": ["EHLO hostname"],
    "MAIL": ["MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8]"
             " [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext] [REQUIRETLS]"],
    "RCPT": ["RCPT TO:<address> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] [ORCPT=type;xtext]"],
    "DATA": ["DATA, then the message, ended by a line holding only a dot"],
    "BDAT": ["BDAT count [LAST], then count octets of the message"],
    "RSET": ["RSET: abandon the current transaction"],
    "NOOP": ["NOOP: do nothing"],
    "QUIT": ["QUIT: close the session"],
    "VRFY": ["VRFY address"],
    "EXPN": ["EXPN list"],
    "HELP": ["HELP [command]"],
    "STARTTLS": ["STARTTLS: begin TLS, then EHLO again"],
    "AUTH": ["AUTH PLAIN|LOGIN [initial-response]"],
}


def help_reply(topic):
    lines = HELP_TEXT.get(topic)
    if lines is None:
        return HELP_TOPIC_UNKNOWN
    return Reply(214, "2.0.0", lines)
