"""The built-in router: ``[routes]``, the smarthost, MX, on the IRouter contract.

It answers for every recipient no ``[plugins] routers`` plugin took, and
always with the ``smtp`` transport: its next hop is the
:class:`~relaymail.delivery.routing.Destination` that
:meth:`relaymail.delivery.routing.Router.destination` picks (the choice is
routing.py's, unchanged; this object only wraps it in a Route).

A site router that names ``smtp`` writes its next hop as ``[routes]``
values are written (``[10.0.0.5]:25`` with no MX lookup, ``relay.example``
or ``relay.example:2525`` looked up by MX), or gives None for the built-in
choice; :meth:`BuiltinRouter.smtp_destination` turns either into the
Destination the SMTP client's connection pool groups jobs by.  Such a next
hop gets opportunistic TLS, as a ``[routes]`` entry with no
``[route_tls]`` policy does.
"""

from zope.interface import implementer

from relaymail.config import next_hop as parse_smtp_next_hop
from relaymail.delivery.routing import Destination
from relaymail.interfaces import IRouter, Route

#: The transport of the SMTP client (relaymail.delivery.destinations).
SMTP = "smtp"


@implementer(IRouter)
class BuiltinRouter:
    """:param router: a :class:`relaymail.delivery.routing.Router`."""

    name = "builtin"

    def __init__(self, router):
        self.router = router

    def route(self, recipient, context):
        """The smtp Route to the Destination [routes], the smarthost or
        the recipient domain's MX hosts give ``recipient``."""
        return Route(SMTP, self.router.destination(recipient.domain_key))

    def smtp_destination(self, next_hop, recipient):
        """The Destination for an smtp Route's ``next_hop``: the built-in
        choice for None (or a Destination already), else the next hop
        parsed as a ``[routes]`` value.

        :raise ValueError: for a next hop that is not ``[host]:port``,
            ``host:port`` or ``host``.
        """
        if next_hop is None:
            return self.router.destination(recipient.domain_key)
        if isinstance(next_hop, Destination):
            return next_hop
        hop = parse_smtp_next_hop(next_hop)
        return Destination("route", hop.host, hop.port, hop.mx_lookup)
