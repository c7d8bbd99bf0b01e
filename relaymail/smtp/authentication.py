"""SMTP AUTH as the dialogue sees it: SASL exchanges and the password check.

The dialogue drives :mod:`relaymail.auth.sasl` exchanges; the credentials
they yield are checked through a twisted.cred portal.  A failed check is
answered only after ``[auth] failure_delay`` seconds, so guessing
passwords costs the guesser time (the errors also count towards
``[limits] errors``).
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task

from relaymail.auth import sasl
from relaymail.auth.checker import IRelayUser


class Authenticator:
    """Starts SASL exchanges and checks their credentials."""

    SASLError = sasl.SASLError

    def __init__(self, portal, failure_delay, reactor):
        self._portal = portal
        self._delay = failure_delay
        self._reactor = reactor

    def start(self, mechanism, initial_response):
        return sasl.start(mechanism, initial_response)

    def check(self, credentials):
        """A Deferred firing with the user name, or None (after the delay)
        when the credentials are wrong."""
        d = self._portal.login(credentials, None, IRelayUser)
        d.addCallback(lambda login: login[1])
        d.addErrback(self._refused)
        return d

    def _refused(self, failure):
        failure.trap(UnauthorizedLogin)
        return task.deferLater(self._reactor, self._delay, lambda: None)
