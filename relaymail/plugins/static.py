"""The ``static`` plugin: accept the addresses and domains listed in a file.

``[plugin:static]`` takes:

``file``
    The list, one entry a line: ``user@example.com`` accepts that address,
    ``example.org`` or ``@example.org`` the whole domain.  Blank lines and
    lines starting with ``#`` are ignored, as is anything after white space
    and a ``#`` (``#`` alone cannot start a comment: it is a legal character
    in a local part, RFC 5322 3.2.3 atext).
``reject_unlisted``
    ``yes`` refuses (550 5.1.1) an address in a domain the file lists
    addresses for but that is not itself listed, like Postfix's
    ``smtpd_reject_unlisted_recipient``.  Default ``no``: such an address
    gets no opinion, and the next plugin decides.

Local parts are compared without regard to case.  RFC 5321 2.4 lets a host
treat them as case-sensitive, but practically every mail system folds them,
and a list that turns ``John@`` away while accepting ``john@`` only bounces
mail.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.config import absolute_path, boolean
from relaymail.interfaces import Decision, IPluginFactory, IRecipientValidator
from relaymail.address import AddressError, parse_forward_path
from relaymail.plugins.options import read_table, reject_unknown

#: The reply for an address in a listed domain that is not listed itself.
USER_UNKNOWN = Decision.reject(550, "5.1.1", "Recipient address rejected: User unknown")

_OPTIONS = ("file", "reject_unlisted")


@implementer(IRecipientValidator)
class StaticList:
    """Accepts what the list file names."""

    name = "static"

    def __init__(self, addresses, domains, reject_unlisted=False, table=None):
        """
        :param addresses: a dict from :func:`address_key` to the address as
            written in the file.
        :param domains: a set of domain keys accepted whole.
        :param reject_unlisted: refuse unlisted addresses in the domains
            that ``addresses`` covers.
        :param table: the :class:`~relaymail.plugins.table_file.TableFile`
            they were read from, looked at again as lookups come.
        """
        self._reject_unlisted = reject_unlisted
        self._table = table
        self._use(addresses, domains)

    def _use(self, addresses, domains):
        self._addresses = dict(addresses)
        self._domains = frozenset(domains)
        self._address_domains = frozenset(domain for _, domain in self._addresses)

    def _refresh(self):
        if self._table is not None and self._table.refresh():
            self._use(*self._table.value)

    def check_recipient(self, recipient, context):
        """Accept listed addresses and domains; refuse unlisted addresses in
        a domain with listed ones when ``reject_unlisted`` is set."""
        self._refresh()
        key = address_key(recipient)
        if key in self._addresses or key[1] in self._domains:
            return Decision.accept()
        if self._reject_unlisted and key[1] in self._address_domains:
            return USER_UNKNOWN
        return Decision.NO_OPINION

    def verify(self, address, context):
        """A listed address verifies, answered with its spelling in the file
        (never the client's); anything else gets no opinion."""
        self._refresh()
        mailbox = _parse_or_none(address)
        listed = self._addresses.get(address_key(mailbox)) if mailbox else None
        if listed is None:
            return Decision.NO_OPINION
        return Decision.accept(text=listed)


@implementer(IPlugin, IPluginFactory)
class StaticListFactory:
    """Builds :class:`StaticList` from ``[plugin:static]``."""

    name = "static"
    description = "accepts the addresses and domains listed in a file"
    hooks = ("recipients",)

    def build(self, context):
        """Read the list file; every problem is a ConfigError."""
        options = context.options
        reject_unknown(context, _OPTIONS)
        if not options.get("file", "").strip():
            raise context.config_error("file", "missing: name the file of addresses and domains")
        try:
            reject_unlisted = boolean(options.get("reject_unlisted", "no"))
        except ValueError as exc:
            raise context.config_error("reject_unlisted", str(exc)) from None
        path = absolute_path(options["file"])
        table = read_table(context, path, parse_static_list)
        return StaticList(*table.value, reject_unlisted, table=table)


static = StaticListFactory()


def parse_static_list(lines):
    """Read the entries of a list file.

    :param lines: the file's lines.
    :return: ``(addresses, domains)`` as :class:`StaticList` takes them.
    :raise ValueError: naming the line number of the first bad entry.
    """
    addresses = {}
    domains = set()
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 1 and not words[1].startswith("#"):
            raise ValueError(f"line {number}: one address or domain per line")
        entry = words[0]
        try:
            if "@" in entry.lstrip("@"):
                addresses[address_key(parse_forward_path(f"<{entry}>", smtputf8=True))] = entry
            else:
                domains.add(domain_key(entry.lstrip("@")))
        except AddressError as exc:
            raise ValueError(f"line {number}: bad address or domain: {exc}") from None
    return addresses, domains


def address_key(mailbox):
    """What two addresses have in common when they are the same mailbox:
    the unquoted local part folded to lower case, and the domain key."""
    return (mailbox.local_text.lower(), mailbox.domain_key)


def domain_key(domain):
    """A domain written in a file, in the form ``Mailbox.domain_key`` gives
    (lower case, A-labels).

    :raise AddressError: when it is not a domain.
    """
    # The address parser is the one judge of what a domain is; the
    # postmaster local part only completes the address it needs.
    return parse_forward_path(f"<postmaster@{domain}>", smtputf8=True).domain_key


def _parse_or_none(address):
    try:
        return parse_forward_path(f"<{address}>", smtputf8=True)
    except AddressError:
        return None

