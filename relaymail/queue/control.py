"""The daemon's end of the queue tool's control channel.

While the daemon runs it owns the spool (it holds :mod:`the spool lock
<relaymail.queue.lock>`), so the queue tool must not move files under the
scheduler's feet: it asks instead, over the UNIX stream socket
``QUEUE/control`` (mode 0600, inside the 0700 spool directory: only the
mail system's user and root may talk to it).  Postfix's postqueue talks
to its daemons the same way, through sockets in the queue directory.

One request per line, one reply per line, in order::

    flush             ok 3 messages due now
    flush DOMAIN      ok 1 message due now           (postqueue -s DOMAIN)
    retry ID          ok ID due now
    delete ID         ok ID deleted
    delete ALL        ok 12 messages deleted
    hold ID           ok ID on hold
    release ID        ok ID released
    pickup            ok 2 messages picked up

(``pickup`` is the master's, not the tool's: after an inbound worker died
it has each delivery worker schedule the messages it was not told of.)

and for anything that went wrong ``error <text>``, for instance
``error no such message ID``.  ``flush DOMAIN`` makes due the messages
with a recipient still to do in DOMAIN, which is given in its comparison
form (lower case, A-labels: :func:`relaymail.queue.selection.domain_key`).
Lines end in LF (a CR before it is ignored) and are ASCII; a request longer than :data:`MAX_REQUEST` bytes
is answered with an error and the connection closed.

The work is done by a *manager*, the scheduler, providing
:class:`IQueueControl`.  :func:`answer` turns one request line into one
reply line with it; the queue tool uses the same function with a manager
that works on the files when no daemon runs, so that both say the same.

Each request on ``QUEUE/control`` and its reply are logged with the user
who sent it (:mod:`relaymail.queue.audit`); the delivery workers' own
control connections, from the master that relays those requests, are not,
so each request is logged once, by the process the tool talked to.
"""

import errno
import os
import stat

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineReceiver
from zope.interface import Interface

from relaymail.queue import audit
from relaymail.queue.layout import CONTROL_NAME
from relaymail.queue.queue_id import is_queue_id
from relaymail.queue.selection import BadFilter, domain_key

#: The longest request is "release " and an id; anything far longer is
#: not from the queue tool.
MAX_REQUEST = 512

_SOCKET_MODE = 0o600

#: The argument of ``delete`` that means every message, as in postsuper -d.
ALL = "ALL"

_log = Logger()


class IQueueControl(Interface):
    """What the control channel asks of the daemon's scheduler.

    Each method may return its result or a Deferred of it, and may raise
    (or fail with) :class:`ControlError` to send its text as the error
    reply.  Queue ids are checked with
    :func:`relaymail.queue.queue_id.is_queue_id` before any call.
    """

    def flush(domain=None):
        """Make every deferred message due now (not the held ones); with
        ``domain``, only those with a recipient still to do there.

        :param domain: a domain in its comparison form
            (:func:`relaymail.queue.selection.domain_key`), or None.
        :return: the number of messages due now.
        """

    def pickup():
        """Schedule the messages in the spool not yet known (relaymail.process).

        :return: the number of messages newly scheduled.
        """

    def retry(queue_id):
        """Make one message due now.

        :return: False when there is no such message.
        """

    def delete(queue_id):
        """Delete one message, active or held, for good.

        :return: False when there is no such message.
        """

    def delete_all():
        """Delete every message, active and held.

        :return: the number deleted.
        """

    def hold(queue_id):
        """Put a message on hold: no delivery until it is released.

        :return: False when there is no such message.
        """

    def release(queue_id):
        """Take a message off hold, due now.

        :return: False when there is no such message.
        """


class ControlError(Exception):
    """A request that cannot be done; the text is sent as the reply."""


def control_path(spool_path):
    """Return the path of the control socket of the spool ``spool_path``."""
    return os.path.join(spool_path, CONTROL_NAME)


def plural(count, noun):
    """``1 message``, ``2 messages``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -- requests to replies ---------------------------------------------------

def _parse(text):
    """Return ``(method name, arguments, ok text maker)`` for a request.

    :raise ControlError: for a request that is not understood.
    """
    words = text.split()
    if not words:
        raise ControlError("empty request")
    command, arguments = words[0].lower(), words[1:]
    if command == "flush" and len(arguments) <= 1:
        if arguments:
            try:
                domain = domain_key(arguments[0])
            except BadFilter as error:
                raise ControlError(str(error))
            if domain != arguments[0]:
                raise ControlError(f"not a domain in lower case A-labels: {arguments[0]!r}")
        return "flush", tuple(arguments), lambda count: f"{plural(count, 'message')} due now"
    if command == "pickup" and not arguments:
        return "pickup", (), lambda count: f"{plural(count, 'message')} picked up"
    if command == "delete" and arguments == [ALL]:
        return "delete_all", (), lambda count: f"{plural(count, 'message')} deleted"
    done = {"retry": "due now", "delete": "deleted", "hold": "on hold",
            "release": "released"}
    if command in done and len(arguments) == 1:
        queue_id = arguments[0]
        if not is_queue_id(queue_id):
            raise ControlError(f"not a queue id: {queue_id!r}")
        return command, (queue_id,), _by_id(queue_id, done[command])
    if command in done or command == "flush":
        raise ControlError(f"wrong arguments for {command}: {text!r}")
    raise ControlError(f"unknown request {command!r}")


def _by_id(queue_id, outcome):
    def describe(found):
        if not found:
            raise ControlError(f"no such message {queue_id}")
        return f"{queue_id} {outcome}"
    return describe


def answer(manager, line):
    """Carry out one request line with ``manager`` (an
    :class:`IQueueControl`).

    :param line: the request, bytes or str, with or without its line end.
    :return: a Deferred that fires with the reply line (``ok ...`` or
        ``error ...``, without a line end) and never fails.  With a
        manager that returns plain values it has fired on return.
    """
    try:
        if isinstance(line, bytes):
            line = line.decode("ascii")
        name, arguments, describe = _parse(line.strip())
    except UnicodeDecodeError:
        return defer.succeed("error the request is not ASCII")
    except ControlError as error:
        return defer.succeed(f"error {error}")
    result = defer.maybeDeferred(getattr(manager, name), *arguments)
    result.addCallback(describe)
    result.addCallbacks(lambda text: f"ok {text}", _failed,
                        errbackArgs=(name, arguments))
    return result


def _failed(failure, name, arguments):
    if failure.check(ControlError):
        return f"error {failure.value}"
    # Not expected: keep the traceback for the log, give the tool a line.
    # At error, not failure()'s default critical: a process that has not
    # begun logging (the queue tool, offline) prints critical events to
    # stderr, and a traceback there would repeat the reply.
    _log.failure("Control request {name} {arguments} failed", failure,
                 level=LogLevel.error, name=name, arguments=" ".join(arguments))
    return f"error {name} failed: {_one_line(failure.value)}"


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


# -- the socket ----------------------------------------------------------------

class ControlProtocol(LineReceiver):
    """One connection from the queue tool: requests in, replies out, in
    the order the requests came even when the manager answers later."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self):
        # Each reply waits for the one before it.
        self._replies = defer.succeed(None)

    def lineReceived(self, line):
        self._replies.addCallback(lambda _: answer(self.factory.manager, line))
        if self.factory.log_requests:
            self._replies.addCallback(self._logged, line)
        self._replies.addCallback(self._send)

    def _logged(self, reply, line):
        # Asked once: the peer is the same for the whole connection.
        if not hasattr(self, "_caller"):
            self._caller = audit.peer_of(self.transport)
        request = line.decode("ascii", "backslashreplace").strip()
        audit.log_action(request, self._caller, reply)
        return reply

    def _send(self, reply):
        self.sendLine(reply.encode("ascii", "replace"))

    def lineLengthExceeded(self, line):
        # Later reads may call this again before the close: answer once.
        if getattr(self, "_refused", False):
            return
        self._refused = True
        self.transport.pauseProducing()
        self._replies.addCallback(
            lambda _: self._send(f"error request longer than {MAX_REQUEST} bytes"))
        self._replies.addCallback(lambda _: self.transport.loseConnection())


class ControlFactory(Factory):
    """Makes a :class:`ControlProtocol` per connection, all asking
    ``manager``, an :class:`IQueueControl`; with ``log_requests``, each request
    is logged with who sent it (the queue tool's socket)."""

    protocol = ControlProtocol

    def __init__(self, manager, log_requests=False):
        self.manager = manager
        self.log_requests = log_requests


def listen_control(reactor, spool_path, manager):
    """Listen on ``QUEUE/control`` for the queue tool.

    Call it only while holding the spool lock: a socket file left there
    is then surely stale (a daemon that crashed) and is removed first,
    and what the tool did while no daemon ran is logged first
    (:func:`relaymail.queue.audit.log_offline_actions`).

    :return: the listening port; ``stopListening()`` removes the socket.
    :raise OSError: when something other than a socket has that name.
    :raise twisted.internet.error.CannotListenError: when it cannot bind.
    """
    path = control_path(spool_path)
    _remove_stale_socket(path)
    audit.log_offline_actions(spool_path)
    # Twisted chmods the socket just after binding it; in between it has
    # the umask's mode, but it is inside the 0700 spool directory.
    return reactor.listenUNIX(path, ControlFactory(manager, log_requests=True), mode=_SOCKET_MODE)


def _remove_stale_socket(path):
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        # Not ours to delete: a typo in a path must not cost a file.
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    os.unlink(path)
