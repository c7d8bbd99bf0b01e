"""How the reactor hands a ready socket to its connection: a plain call.

Twisted's epoll reactor wraps every read and write event in
``twisted.python.log.callWithLogger``: it asks the connection for its
log prefix, copies a context dictionary, pushes it for the call and pops
it after, so that a legacy ``log.msg`` made meanwhile is tagged with the
connection (the "system").  relaymail logs through ``twisted.logger``,
which never reads that context, and under compare.py's loads those eight
Python frames an event were 3-4% of each worker's reactor thread in
py-spy's samples (2026-12-08), the largest piece of Twisted's own.

So the relay's reactors poll with a loop of their own that calls
Twisted's ``_doReadOrWrite`` directly.  What the wrapper was for stays:
an exception that escapes an event (a connection's connectionLost
raising) is logged tagged with that connection's prefix, as Twisted
does, and the loop goes on.  One difference remains: an exception
raised by a protocol's dataReceived is logged by Twisted's own handler
(the connection is dropped, as before) with the system ``-`` rather than
the connection's prefix.  relaymail's protocols log their own errors
with the client's address.

Only Twisted's epoll reactor, whose attributes this relies on, is
changed; any other is left as it is.
"""

import errno

from twisted.python import log


def dispatch_plainly(reactor):
    """Have ``reactor`` call its connections without the legacy log
    context.  Call it before the reactor runs.

    :return: True if the reactor was changed, False for a reactor of
        another kind (or a version of Twisted without what this needs).
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:         # not Linux
        return False
    kind = type(reactor)
    if (getattr(kind, "doPoll", None) is not EPollReactor.doPoll
            or getattr(kind, "doIteration", None) is not EPollReactor.doIteration):
        return False        # another kind, or a subclass with a loop of its own
    try:
        poller = reactor._poller
        selectables = reactor._selectables
        handle = reactor._doReadOrWrite
    except AttributeError:
        return False

    def do_poll(timeout):
        # EPollReactor.doPoll, without callWithLogger around each event.
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=_prefix_of(selectable))

    reactor.doIteration = reactor.doPoll = do_poll
    return True


def _prefix_of(selectable):
    try:
        return selectable.logPrefix()
    except BaseException:
        return "(buggy logPrefix method)"
