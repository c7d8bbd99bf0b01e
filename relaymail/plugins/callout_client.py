"""The ``callout`` plugin's sessions: a small pool of open connections per next hop.

A callout costs a connection, a greeting, EHLO and perhaps a TLS handshake
before its one real question; a relay asked about every recipient would
pay that each time.  So sessions stay open between questions (the
relay's own outbound client, :mod:`relaymail.delivery.client`, which
resets the transaction before the next one) and are shared by every SMTP
session of the process, with three bounds:

- at most ``max_sessions`` at once per next hop, busy and idle together;
  a question past that waits for one to come free (the plugin's timeout
  still bounds the wait);
- an idle session is closed with QUIT after ``idle_time`` seconds;
- a session is not reused once it is :data:`REUSE_TIME_LIMIT` old.

A question that fails on a session taken from the pool (the hop closed it
while idle, a 421 between questions) is put once more on a new
connection: that failure says nothing about the hop now.
"""

import dataclasses

from twisted.internet import defer
from twisted.logger import Logger

from relaymail.delivery.client import ClientConfig, DeliveryError, Hop, connect

log = Logger()

#: Postfix's smtp_connection_reuse_time_limit (300 s): a session is not
#: used for new questions past this age, so a hop restarted or reconfigured
#: is met afresh.
REUSE_TIME_LIMIT = 300


@dataclasses.dataclass(frozen=True)
class CalloutHop:
    """A next hop to ask: the host and port to connect to (no MX lookup:
    a name is resolved to its addresses only), and the ClientConfig to
    talk to it with (TLS policy, credentials, HELO name, timeouts)."""

    host: str
    port: int
    config: ClientConfig

    @property
    def label(self):
        """``[host]:port``, as the log lines and [routes] write it."""
        return f"[{self.host}]:{self.port}"


class _Idle:
    __slots__ = ("session", "opened", "timer")

    def __init__(self, session, opened, timer):
        self.session = session
        self.opened = opened
        self.timer = timer


class _HopSessions:
    """One hop's sessions: the idle ones, and a semaphore counting busy ones."""

    def __init__(self, max_sessions):
        self.slots = defer.DeferredSemaphore(max_sessions)
        self.idle = []


class SessionPool:
    """Open sessions per :class:`CalloutHop`, reused between questions.

    :param reactor: for connections and timers.
    :param max_sessions: sessions at once per hop.
    :param idle_time: seconds an unused session stays open.
    :param open_session: ``(reactor, Hop, ClientConfig) -> Deferred of an
        OutboundSession``; :func:`relaymail.delivery.client.connect`.
    """

    def __init__(self, reactor, max_sessions, idle_time, open_session=connect):
        self._reactor = reactor
        self._max_sessions = max_sessions
        self._idle_time = idle_time
        self._open_session = open_session
        self._hops = {}

    def ask(self, hop, recipient):
        """Put ``RCPT TO:<recipient>`` to ``hop``.

        :return: a Deferred firing with the RecipientResult, or failing
            with DeliveryError.  Cancelling it (the plugin's timeout) drops
            the connection the question was on.
        """
        return defer.Deferred.fromCoroutine(self._ask(hop, recipient))

    def idle_sessions(self, hop):
        """How many sessions to ``hop`` are open and unused now."""
        sessions = self._hops.get(hop)
        return len(sessions.idle) if sessions else 0

    def close(self):
        """QUIT every idle session (the plugin is being replaced)."""
        for sessions in self._hops.values():
            while sessions.idle:
                self._close_idle(sessions, sessions.idle[-1])

    async def _ask(self, hop, recipient):
        sessions = self._hops.get(hop)
        if sessions is None:
            sessions = self._hops[hop] = _HopSessions(self._max_sessions)
        await sessions.slots.acquire()     # cancelled here, it holds no slot
        try:
            reused = self._take_idle(sessions)
            if reused is not None:
                try:
                    return await self._put(sessions, reused, recipient)
                except DeliveryError as error:
                    log.debug("callout: a reused session to {hop} failed ({error}); "
                              "asking again on a new one", hop=hop.label, error=error.text)
            opened = self._reactor.seconds()
            session = await self._open_session(
                self._reactor, Hop(hop.host, hop.host, hop.port), hop.config)
            return await self._put(sessions, _Idle(session, opened, None), recipient)
        finally:
            sessions.slots.release()

    async def _put(self, sessions, entry, recipient):
        try:
            result = await entry.session.ask_recipient(recipient)
        except BaseException:
            # Out of step, gone, or cut short by a timeout: not reusable.
            entry.session.abort()
            raise
        self._keep(sessions, entry)
        return result

    def _take_idle(self, sessions):
        while sessions.idle:
            entry = sessions.idle.pop()     # the most recently used: least likely stale
            entry.timer.cancel()
            if entry.session.is_open():
                return entry
        return None

    def _keep(self, sessions, entry):
        age = self._reactor.seconds() - entry.opened
        if not entry.session.is_open() or age >= REUSE_TIME_LIMIT:
            entry.session.quit()
            return
        entry.timer = self._reactor.callLater(self._idle_time, self._close_idle, sessions, entry)
        sessions.idle.append(entry)

    def _close_idle(self, sessions, entry):
        if entry in sessions.idle:
            sessions.idle.remove(entry)
        if entry.timer.active():
            entry.timer.cancel()
        entry.session.quit()
