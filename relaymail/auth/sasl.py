"""The server side of SASL PLAIN and LOGIN for SMTP AUTH, without I/O.

The SMTP dialogue turns ``AUTH MECH [initial-response]`` into
:func:`start`, then alternates::

    exchange = sasl.start("PLAIN", None)
    kind, value = exchange.next()     # ('challenge', '') -> send "334 "
    exchange.respond(line)            # the client's next line
    kind, value = exchange.next()     # ('credentials', UsernamePassword)

and logs ``value`` in through the Portal.  Any step may raise
:class:`SASLError` (or :class:`Cancelled`), whose ``reply_code``,
``enhanced`` and ``text`` are the reply to send; the exchange is over then.

RFC 4954 4 sets the wire rules: challenges and responses are base64
(RFC 4648 4); an empty initial response is sent as ``=``; a response of
``*`` cancels.  PLAIN is RFC 4616; LOGIN, obsolete but still sent by old
clients, is draft-murchison-sasl-login-00.  User names and passwords are
UTF-8 (RFC 4616 2) and handed on as str.
"""

import base64
import binascii

from twisted.cred.credentials import UsernamePassword

#: The mechanisms :func:`start` knows, for the EHLO ``AUTH`` keyword.
MECHANISMS = ("PLAIN", "LOGIN")

#: Longest response line taken, in octets of base64.  RFC 4954 4 asks a
#: server to accept AUTH response lines of at least 12288 octets.
MAX_RESPONSE = 12288



class SASLError(Exception):
    """The AUTH command failed; the attributes are the reply to send."""

    def __init__(self, reply_code, enhanced, text):
        super().__init__(reply_code, enhanced, text)
        self.reply_code = reply_code
        self.enhanced = enhanced
        self.text = text

    def __str__(self):
        return f"{self.reply_code} {self.enhanced} {self.text}"


class Cancelled(SASLError):
    """The client answered a challenge with ``*`` (RFC 4954 4: the server
    MUST reject the AUTH command with a 501 reply)."""

    def __init__(self):
        super().__init__(501, "5.0.0", "Authentication cancelled")


def _cannot_decode():
    # RFC 4954 4: a response that cannot be base64-decoded is 501 5.5.2.
    return SASLError(501, "5.5.2", "Cannot decode response")


def _bad_syntax():
    return SASLError(501, "5.5.2", "Bad SASL syntax")


def _not_utf8():
    return SASLError(501, "5.5.2", "Response is not valid UTF-8")


def _too_long():
    # RFC 4954 6: 500 5.5.6, "Authentication Exchange line is too long".
    return SASLError(500, "5.5.6", "Authentication exchange line is too long")


def _unknown_mechanism():
    # RFC 4954 4 and 6: an unsupported mechanism is 504 5.5.4.
    return SASLError(504, "5.5.4", "Unrecognized authentication type")


def _no_proxy():
    # We do not let one user act for another (RFC 4616 2 leaves that to
    # the server's policy); RFC 4954 6 has 535 5.7.8 for credentials that
    # do not let the client in.
    return SASLError(535, "5.7.8", "Authentication credentials invalid")


def start(mechanism, initial_response=None):
    """Begin an exchange for ``mechanism`` (any case) with the AUTH
    command's initial response, or None if it had none.

    For LOGIN an initial response is taken as the user name, as deployed
    servers do for clients that send ``AUTH LOGIN <user>``; the exchange
    then goes on with the password challenge.

    Raises SASLError for an unknown mechanism or a bad initial response.
    """
    name = mechanism.upper()
    if name == "PLAIN":
        exchange = Exchange(name, _PLAIN_STEPS, _plain_credentials)
    elif name == "LOGIN":
        exchange = Exchange(name, _LOGIN_STEPS, _login_credentials)
    else:
        raise _unknown_mechanism()
    if initial_response is not None:
        exchange._take(initial_response, initial=True)
    return exchange


class Exchange:
    """One AUTH exchange: challenges out, responses in, then credentials.

    Calls must alternate as the module docstring shows; calling out of
    turn, or after a SASLError, is a programming error (RuntimeError).
    """

    def __init__(self, mechanism, steps, finish):
        """Use :func:`start` rather than this.

        :param steps: one ``(prompt, parse)`` per response the mechanism
            takes: the challenge text, to be base64-encoded, and a function
            from the decoded response (bytes) to a value, raising SASLError
            if the response is bad, so that the reply answers the line
            that was wrong.
        :param finish: turns the list of values into UsernamePassword, or
            raises SASLError.
        """
        self.mechanism = mechanism
        self._steps = steps
        self._finish = finish
        self._values = []
        self._credentials = None
        self._awaiting = False
        self._failed = False

    def next(self):
        """What to send: ``('challenge', text)`` with ``text`` the base64
        for a ``334`` reply (possibly empty), after which :meth:`respond`
        takes the client's line; or ``('credentials', UsernamePassword)``
        when the exchange is complete.
        """
        self._check(awaiting=False)
        if self._credentials is not None:
            return "credentials", self._credentials
        prompt, _parse = self._steps[len(self._values)]
        self._awaiting = True
        return "challenge", base64.b64encode(prompt.encode("ascii")).decode("ascii")

    def respond(self, line):
        """The client's line answering the last challenge, without its
        CRLF: base64 (empty for an empty response) or ``*`` to cancel.

        Raises :class:`Cancelled` or SASLError; the exchange is over then.
        """
        self._check(awaiting=True)
        self._awaiting = False
        self._take(line, initial=False)

    def _take(self, line, initial):
        _prompt, parse = self._steps[len(self._values)]
        try:
            if initial and line == "=":
                # RFC 4954 4: an initial response of zero length.
                response = b""
            elif line == "*" and not initial:
                # RFC 4954 4; an initial "*" cancels nothing, so it is
                # taken as the bad base64 it is.
                raise Cancelled()
            else:
                response = _decode(line)
            self._values.append(parse(response))
            if len(self._values) == len(self._steps):
                self._credentials = self._finish(self._values)
                # The credentials hold the password now; drop the copy.
                self._values = []
        except SASLError:
            self._failed = True
            self._values = []
            raise

    def _check(self, awaiting):
        if self._failed:
            raise RuntimeError("SASL exchange already failed")
        if self._awaiting != awaiting:
            raise RuntimeError("SASL exchange called out of turn")


def _decode(line):
    """Bytes from a base64 response line; SASLError if too long or not
    strict base64 (no white space, correct padding)."""
    if len(line) > MAX_RESPONSE:
        raise _too_long()
    if not line.isascii():
        raise _cannot_decode()
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise _cannot_decode() from None


def _utf8(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8() from None


def _parse_plain(message):
    """RFC 4616 2: ``[authzid] NUL authcid NUL passwd``, authcid and
    passwd non-empty."""
    fields = message.split(b"\0")
    if len(fields) != 3:
        raise _bad_syntax()
    authzid, authcid, passwd = (_utf8(field) for field in fields)
    if not authcid or not passwd:
        raise _bad_syntax()
    if authzid and authzid != authcid:
        raise _no_proxy()
    return UsernamePassword(authcid, passwd)


def _plain_credentials(values):
    return values[0]


def _login_credentials(values):
    user, password = values
    return UsernamePassword(user, password)


# PLAIN: one response, after an empty challenge when the AUTH command had
# no initial response (RFC 4954 4).
_PLAIN_STEPS = (("", _parse_plain),)

# LOGIN: the user name, then the password, each a bare UTF-8 response.
# The draft suggests the challenges "User Name" and "Password", but notes
# that widely deployed clients wait for exactly these strings.
_LOGIN_STEPS = (("Username:", _utf8), ("Password:", _utf8))
