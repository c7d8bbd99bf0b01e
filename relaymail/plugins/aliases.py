"""The ``aliases`` plugin: lists and aliases from a file in aliases(5) form.

``[plugin:aliases] file = PATH`` names the file.  Its format is the one
Postfix documents in aliases(5)::

    # comment
    staff: alice@example.com, bob@example.com
    postmaster: root
    sales@example.org: carol@example.net,
        dave@example.net

* ``name: member, member, ...``; a line starting with white space continues
  the entry above it, and blank lines and lines whose first non-blank
  character is ``#`` are ignored.
* A bare name (``staff``) is that local part in every domain of
  ``[relay] domains`` (and the bare ``<postmaster>``); a full address
  (``sales@example.org``) is that address only.  Names are compared without
  regard to case.
* A member is an address, or a bare name that means the same name in the
  domain of the address being expanded.  Members may be lists themselves;
  relaymail expands them in turn.  Postfix's local-delivery forms
  (``|command``, ``/file``, ``:include:``) are refused: a relay has no
  mailbox to run them as, and a command taken from an address is how mail
  servers get shell injection.

Enable it in ``[plugins] recipients`` to accept mail for the names, and in
``[plugins] expanders`` to answer EXPN and replace them by their members
when a message is queued.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.config import absolute_path
from relaymail.interfaces import Decision, IListExpander, IPluginFactory, IRecipientValidator
from relaymail.plugins.static import address_key
from relaymail.address import AddressError, parse_forward_path
from relaymail.plugins.options import read_table, reject_unknown

_OPTIONS = ("file",)

# RFC 2606 reserves .invalid; it only completes a bare name into an address
# so the address parser can judge the name.
_PLACEHOLDER_DOMAIN = "example.invalid"


@implementer(IRecipientValidator, IListExpander)
class Aliases:
    """Knows the names in an aliases file and their members."""

    name = "aliases"

    def __init__(self, bare, full, relay_domains, table=None):
        """
        :param bare: a dict from lower-case bare name to its members.
        :param full: a dict from :func:`address_key` to its members.
        :param relay_domains: the domain keys bare names apply in.
        :param table: the :class:`~relaymail.plugins.table_file.TableFile`
            they were read from, looked at again as lookups come.
        """
        self._bare = dict(bare)
        self._full = dict(full)
        self._relay_domains = frozenset(relay_domains)
        self._table = table

    def _refresh(self):
        if self._table is not None and self._table.refresh():
            bare, full = self._table.value
            self._bare, self._full = dict(bare), dict(full)

    def check_recipient(self, recipient, context):
        """Accept a recipient that is an alias; no opinion otherwise."""
        self._refresh()
        if self._members_of(recipient) is not None:
            return Decision.accept()
        return Decision.NO_OPINION

    def verify(self, address, context):
        """An alias verifies: one member is named in the reply, a longer
        list only counted (EXPN is there to list it)."""
        members = self._lookup(address)
        if members is None:
            return Decision.NO_OPINION
        if len(members) == 1:
            return Decision.accept(text=members[0])
        return Decision.accept(text=f"{address} is a list of {len(members)} members")

    def expand(self, address, context):
        """The members as written in the file, or None."""
        members = self._lookup(address)
        return list(members) if members is not None else None

    def _lookup(self, address):
        """Members for an address or bare name given as a string."""
        self._refresh()
        if "@" not in address:
            return self._bare.get(address.lower())
        try:
            mailbox = parse_forward_path(f"<{address}>", smtputf8=True)
        except AddressError:
            return None
        return self._members_of(mailbox)

    def _members_of(self, mailbox):
        members = self._full.get(address_key(mailbox))
        if members is None and (mailbox.domain == "" or mailbox.domain_key in self._relay_domains):
            members = self._bare.get(mailbox.local_text.lower())
        return members


@implementer(IPlugin, IPluginFactory)
class AliasesFactory:
    """Builds :class:`Aliases` from ``[plugin:aliases]``."""

    name = "aliases"
    description = "lists and aliases from a file in aliases(5) form"
    hooks = ("recipients", "expanders")

    def build(self, context):
        """Read the aliases file; every problem is a ConfigError."""
        options = context.options
        reject_unknown(context, _OPTIONS)
        if not options.get("file", "").strip():
            raise context.config_error("file", "missing: name the aliases file")
        path = absolute_path(options["file"])
        table = read_table(context, path, parse_aliases)
        return Aliases(*table.value, context.settings.relay.domains, table=table)


aliases = AliasesFactory()


def parse_aliases(lines):
    """Read an aliases file.

    :param lines: the file's lines.
    :return: ``(bare, full)`` as :class:`Aliases` takes them.
    :raise ValueError: naming the line number of the first problem.
    """
    bare = {}
    full = {}
    for number, text in _logical_lines(lines):
        name, colon, value = text.partition(":")
        name = name.strip()
        if not colon or not name:
            raise ValueError(f"line {number}: expected 'name: member, member, ...'")
        if any(c.isspace() for c in name):
            raise ValueError(f"line {number}: a name cannot contain white space")
        try:
            key = _name_key(name)
            members = _split_members(value)
            for member in members:
                _check_member(member)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if not members:
            raise ValueError(f"line {number}: '{name}' has no members")
        table = full if isinstance(key, tuple) else bare
        if key in table:
            # Postfix keeps the first and warns; which one was meant is a
            # guess, so refuse instead.
            raise ValueError(f"line {number}: '{name}' is defined twice")
        table[key] = members
    return bare, full


def _logical_lines(lines):
    """Yield ``(first line number, text)`` per entry, continuations joined."""
    number, parts = None, []
    for index, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if number is None:
                raise ValueError(f"line {index}: continuation line with no entry above it")
            parts.append(stripped)
            continue
        if number is not None:
            yield number, " ".join(parts)
        number, parts = index, [stripped]
    if number is not None:
        yield number, " ".join(parts)


def _name_key(name):
    """A lower-case bare name, or the address key of a full address."""
    try:
        if "@" in name:
            return address_key(parse_forward_path(f"<{name}>", smtputf8=True))
        parse_forward_path(f"<{name}@{_PLACEHOLDER_DOMAIN}>", smtputf8=True)
    except AddressError as exc:
        raise ValueError(f"bad name '{name}': {exc}") from None
    return name.lower()


def _split_members(value):
    """Split at commas outside double quotes (a quoted local part may hold
    one); empty items are dropped."""
    members, start, quoted, i = [], 0, False, 0
    while i < len(value):
        char = value[i]
        if quoted and char == "\\":
            i += 2  # A quoted-pair: the next character is never special.
            continue
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append(value[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise ValueError("unbalanced quote")
    members.append(value[start:])
    return [member.strip() for member in members if member.strip()]


def _check_member(member):
    if member.lstrip('"').startswith(("|", "/", ":include:")):
        raise ValueError(
            f"'{member}': relaymail relays mail and cannot deliver to a command, "
            "a file or an :include: list")
    address = member if "@" in member else f"{member}@{_PLACEHOLDER_DOMAIN}"
    try:
        parse_forward_path(f"<{address}>", smtputf8=True)
    except AddressError as exc:
        raise ValueError(f"bad member '{member}': {exc}") from None
