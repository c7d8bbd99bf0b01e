"""The delivery side of one process, assembled: the scheduler, the outbound
connection pool and the transports it drives, and the TLS report recorder
beside them.

Its own module so that only a process that delivers imports the SMTP
client and the rest of :mod:`relaymail.delivery`: an inbound worker never
needs them, and importing them cost each one about 0.09 s at start.
"""

import os

from relaymail.delivery.destinations import DestinationPool, client_configs
from relaymail.delivery.router import BuiltinRouter
from relaymail.delivery.routing import Router
from relaymail.delivery.shaping import OutboundRates
from relaymail.delivery.tls_report import TLSReporter, TLSReportRecorder
from relaymail.delivery.transports import delivery_transports
from relaymail.queue import layout
from relaymail.queue.scheduler import Scheduler


def delivery_scheduler(settings, reactor, spool, policy, rate_share=1, hooks=None):
    """The scheduler, the outbound connection pool and the transport runner
    it drives; ``rate_share`` is how many delivery workers split
    [delivery_rates]; ``hooks`` the plugins :func:`build_hooks` built (its
    ``transports`` join the built-in ones)."""
    recorder = None
    if settings.delivery.tls_report:
        recorder = TLSReportRecorder(os.path.join(settings.queue.path, layout.TLS_REPORTS))
    router = BuiltinRouter(Router(settings, reactor=reactor, tls_report=recorder))
    pool = DestinationPool(reactor, router.router, client_configs(settings, recorder),
                           settings.delivery.destination_concurrency,
                           settings.delivery.max_connections)
    transports = delivery_transports(reactor, settings, pool, router,
                                     (hooks or {}).get("transports", ()))
    scheduler = Scheduler(spool, pool, router, settings, reactor, policy=policy,
                          rates=OutboundRates(settings.delivery_rates, rate_share),
                          transports=transports)
    #: Services the caller starts beside the scheduler.
    scheduler.companions = []
    if recorder is not None:
        contact = settings.delivery.tls_report_contact
        if "@" not in contact:
            contact = f"{contact}@{settings.server.hostname}"
        scheduler.companions.append(TLSReporter(
            recorder, reactor, router.router.resolver, scheduler.queue_message,
            settings.delivery.tls_report_organization or settings.server.hostname, contact))
    return scheduler
