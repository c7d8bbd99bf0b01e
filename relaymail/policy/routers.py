"""The routers (``[plugins] routers``): ask each in order where a queued
recipient's mail goes.

The first :class:`~relaymail.interfaces.Route` wins; None passes the
question on, and when every router passes, the built-in router
(:mod:`relaymail.delivery.router`: ``[routes]``, the smarthost, MX) decides.
Routers are asked by the delivery process as each attempt starts, with
the plugins' usual bounds: ``[plugins] timeout``, and the plugin thread
pool for a router that says ``blocking = True``.

A router that raises, does not answer in time or answers something that is
not a Route fails the recipient's routing: the scheduler defers that
recipient (4.3.0, the router named in the reason) rather than let the next
router or the built-in one guess, since mail a site router meant for a
mailbox server must not go out to the Internet because that router was
slow.  The message stays queued and is routed afresh at its next attempt.
"""

from twisted.internet.defer import inlineCallbacks

from relaymail import sanitize
from relaymail.interfaces import Route

#: The longest transport name or next hop a router may give: they go into
#: log lines and the queue record's last error.
_MAX_FIELD = 500


class RouterFailed(Exception):
    """A router raised, timed out or answered what is not a Route.

    ``plugin`` is its label, ``problem`` a one-line reason."""

    def __init__(self, plugin, problem):
        super().__init__(f"router {plugin} failed: {problem}")
        self.plugin = plugin
        self.problem = problem


class BadRoute(Exception):
    """A router answered with something the contract does not allow."""


@inlineCallbacks
def run_routers(policy, routers, recipient, context, label):
    """Ask ``routers`` in order about ``recipient``.

    :param policy: the Policy whose ``_call`` runs a plugin method with the
        timeout, and whose ``_log_failure`` logs what went wrong.
    :param recipient: a :class:`relaymail.address.Mailbox`.
    :param label: ``label(plugin)``, the plugin's name for the log.
    :return: a Deferred firing with ``(route, label)`` from the first router
        that answered with a Route, or ``(None, None)`` when none did; it
        fails with :class:`RouterFailed` (already logged).
    """
    for plugin in routers:
        try:
            answer = yield policy._call(plugin, "route", recipient, context)
            if answer is not None:
                answer = checked(answer)
        except Exception as exc:
            policy._log_failure(exc, plugin, "route", recipient)
            raise RouterFailed(label(plugin), _one_line(exc)) from None
        if answer is not None:
            return answer, label(plugin)
    return None, None


def checked(answer):
    """``answer`` when it is a Route a transport can be looked up by: a
    non-empty name, and a next hop that is None or text, neither holding a
    control character (they reach log lines and the queue record)."""
    if not isinstance(answer, Route):
        raise BadRoute(f"returned {answer!r}, not a Route or None")
    name, hop = answer.transport, answer.next_hop
    if not isinstance(name, str) or not name.strip():
        raise BadRoute(f"returned {answer!r}: the transport must be a non-empty name")
    if hop is not None and not isinstance(hop, str):
        raise BadRoute(f"returned {answer!r}: the next hop must be a str or None")
    for text in (name, hop or ""):
        if sanitize.has_unsafe(text) or len(text) > _MAX_FIELD:
            raise BadRoute(f"returned {_short(repr(answer))}: a control character or "
                           f"more than {_MAX_FIELD} characters")
    return answer


def _short(text, limit=200):
    return sanitize.escape(text if len(text) <= limit else text[:limit] + "...")


def _one_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    # A timeout or a bad answer says what it is; anything else is named
    # by its type ("KeyError: 'x'").
    if type(exc).__name__ not in ("BadRoute", "_PluginTimedOut") and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return _short(text)
