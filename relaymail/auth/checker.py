"""twisted.cred for AUTH: a checker over the password file, and a realm.

The SMTP dialogue logs a client in through :func:`make_portal`'s Portal
with ``IUsernamePassword`` credentials (:mod:`relaymail.auth.sasl` makes
them) and asks for :class:`IRelayUser`; the avatar is the user name, which
is all the relay needs to record who sent the mail.
"""

import collections
import secrets

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import threads
from zope.interface import Interface, implementer

from relaymail.auth import passwords


class IRelayUser(Interface):
    """A client that has passed AUTH.

    The avatar providing it is the user's name (a str), as written in the
    password file.
    """


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks user names and passwords against a password file
    (:mod:`relaymail.auth.passwords`).

    The file is read when the checker is made and again on :meth:`reload`;
    nothing re-reads it behind the daemon's back.  Each check runs scrypt
    in a thread, never on the reactor: one verification takes tens of
    milliseconds, and every client's commands would wait for it.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path, threadpool=None, reactor=None):
        """:param path: the password file; PasswordFileError if it cannot
        be read or is malformed.
        :param threadpool: where to run scrypt; the reactor's own pool if
        None.
        :param reactor: the reactor that pool reports to; the global one
        if None.
        """
        self.path = path
        self._threadpool = threadpool
        self._reactor = reactor
        self._entries = {}
        self._dummy = None
        self.reload()

    def reload(self):
        """Read the file again.

        On PasswordFileError the users already loaded stay in force, so
        that a bad edit does not lock everybody out of a running daemon.
        """
        entries = passwords.load_password_file(self.path)
        # Swap both at once: a check already under way keeps the table it
        # started with.
        self._entries, self._dummy = entries, _dummy_hash(entries.values())

    @property
    def users(self):
        """The user names currently loaded."""
        return frozenset(self._entries)

    def requestAvatarId(self, credentials):
        """A Deferred firing with the user name if ``credentials``' password
        is that user's, failing with UnauthorizedLogin otherwise.

        An unknown user costs the same scrypt run as a known one, against a
        hash that matches nothing, so that the time taken does not tell a
        client which user names exist.
        """
        user = _text(credentials.username)
        encoded = self._entries.get(user) if user is not None else None
        known = encoded is not None
        if not known:
            encoded = self._dummy
        password = credentials.password
        d = self._in_thread(passwords.verify_password, password, encoded)

        def decide(matched):
            if matched and known:
                return user
            raise UnauthorizedLogin()

        return d.addCallback(decide)

    def _in_thread(self, f, *args):
        if self._threadpool is None:
            return threads.deferToThread(f, *args)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return threads.deferToThreadPool(reactor, self._threadpool, f, *args)


@implementer(IRealm)
class RelayRealm:
    """Hands out :class:`IRelayUser` avatars: the user name itself."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        """``(IRelayUser, avatarId, logout)``; NotImplementedError if
        IRelayUser is not among ``interfaces``."""
        if IRelayUser in interfaces:
            return IRelayUser, avatarId, _no_logout
        raise NotImplementedError("RelayRealm only gives IRelayUser avatars")


def make_portal(path, threadpool=None, reactor=None):
    """A Portal checking ``IUsernamePassword`` against the password file at
    ``path`` and giving :class:`IRelayUser` avatars.

    ``portal.checkers[IUsernamePassword]`` is the
    :class:`PasswordFileChecker`, for whoever handles reloads.
    """
    checker = PasswordFileChecker(path, threadpool=threadpool, reactor=reactor)
    return Portal(RelayRealm(), [checker])


def _no_logout():
    pass


def _text(name):
    """The user name as a str: Twisted's own protocols hand over bytes.
    None when they are not UTF-8, and so match no user."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return name


def _dummy_hash(encodeds):
    """A hash that no password matches, with the parameters most of the
    file's hashes use, so that checking it costs what checking a real
    user's would."""
    counts = collections.Counter(passwords.parse_hash(e)[0] for e in encodeds)
    params = counts.most_common(1)[0][0] if counts else passwords.PARAMETERS
    salt = secrets.token_bytes(passwords.SALT_BYTES)
    key = secrets.token_bytes(passwords.KEY_BYTES)
    return passwords.format_hash(params, salt, key)
