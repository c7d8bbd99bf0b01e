"""The ``domains`` plugin: accept any recipient in ``[relay] domains``.

This is the default recipient check.  It knows nothing about mailboxes, so
it accepts every local part in those domains and leaves VRFY to others.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator


@implementer(IRecipientValidator)
class RelayDomains:
    """Accepts recipients whose domain is one this relay takes mail for."""

    name = "domains"

    def __init__(self, domains):
        self._domains = frozenset(domain.lower() for domain in domains)

    def check_recipient(self, recipient, context):
        """Accept a recipient in one of the domains; no opinion otherwise."""
        if recipient.domain_key in self._domains:
            return Decision.accept()
        return Decision.NO_OPINION

    def verify(self, address, context):
        """No opinion: a domain list cannot tell whether a mailbox exists."""
        return Decision.NO_OPINION


@implementer(IPlugin, IPluginFactory)
class RelayDomainsFactory:
    """Builds :class:`RelayDomains` from ``[relay] domains``."""

    name = "domains"
    description = "accepts every recipient in [relay] domains"
    hooks = ("recipients",)

    def build(self, context):
        """Make the plugin; ``[plugin:domains]`` takes no options."""
        for key in context.options:
            raise context.config_error(key, "unknown option; [plugin:domains] takes none")
        return RelayDomains(context.settings.relay.domains)


domains = RelayDomainsFactory()
