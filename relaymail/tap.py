"""``twistd relaymail``: command-line options and the service tree."""

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.python import usage

from relaymail.config import ConfigError, load_config
from relaymail.policy.loader import build_plugins
from relaymail.policy.recipients import Policy
from relaymail.queue.spool import Spool
from relaymail.smtp.server import SMTPFactory

# Command-line options that override one config key each.
_OVERRIDES = {
    "listen": ("server", "listen"),
    "hostname": ("server", "hostname"),
    "spool": ("queue", "path"),
    "smarthost": ("delivery", "smarthost"),
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the relaymail SMTP relay.  Settings come from the INI file named by "
        "--config (see etc/relaymail.ini for every key and its default); the other "
        "options override single keys of that file.")
    optParameters = [
        ["config", "c", None, "Configuration file (INI). Without it, the built-in defaults."],
        ["listen", "l", None,
         "Twisted server endpoint to listen on, e.g. tcp:2525:interface=127.0.0.1; "
         "overrides [server] listen."],
        ["hostname", None, None, "Name used in the greeting and Received: headers; "
                                 "overrides [server] hostname."],
        ["spool", None, None, "Queue directory; overrides [queue] path."],
        ["smarthost", None, None,
         "Next hop for all mail: [host]:port (no MX lookup) or host:port (MX of host); "
         "overrides [delivery] smarthost."],
    ]


def _overrides(options):
    return {key: options[name] for name, key in _OVERRIDES.items() if options[name] is not None}


def build_service(settings, reactor=None):
    """The whole relay as a MultiService, from validated settings."""
    if reactor is None:
        from twisted.internet import reactor
    validators, expanders = build_plugins(settings)
    policy = Policy(validators, expanders, settings)
    spool = Spool(settings.queue.path, reactor=reactor)
    top = service.MultiService()
    # Started first: the queue is recovered before any listener accepts mail.
    spool.setServiceParent(top)
    factory = SMTPFactory(settings, policy, spool)
    for description in settings.server.listen:
        endpoint = endpoints.serverFromString(reactor, description)
        listener = StreamServerEndpointService(endpoint, factory)
        # A port we cannot bind stops start-up instead of being logged and ignored.
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
    return top


def makeService(options):
    try:
        settings = load_config(options["config"], _overrides(options))
        return build_service(settings)
    except ConfigError as error:
        # twistd would print a traceback; a bad config deserves one line.
        raise SystemExit(f"relaymail: {error}")
