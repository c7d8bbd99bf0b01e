"""The ``sql`` plugin: recipients, lists and routes from a database.

The tables stay the site's own: each lookup is a query written in the
configuration, as Postfix's pgsql_table(5) and sqlite_table(5) do it.  The
queries run in a ``twisted.enterprise.adbapi`` pool, off the reactor
(:mod:`relaymail.plugins.sql_database`), so the plugin answers with
Deferreds and is not ``blocking``.

``[plugin:sql]`` takes:

``database``
    ``sqlite:///absolute/path.db`` (the standard library's sqlite3; the
    file must exist and is opened read only), or PostgreSQL as
    ``postgresql://user@host:port/dbname`` or a libpq ``key=value`` string
    (``host=/run/postgresql dbname=mail``), through psycopg 3:
    ``pip install 'relaymail[postgresql]'``.  Required.
``recipient_query``
    Finds a recipient: any row means the address exists, and RCPT gets
    ``250 2.1.5``.  Example:
    ``SELECT 1 FROM mailbox WHERE address = lower({address})``.
``alias_query``
    The members of a list or alias, one address per row in the first
    column (a bare name is the same name in the list's domain); no row
    means not a list.  EXPN answers with it and the queue replaces a list
    by its members (nested lists and loops are relaymail's job,
    :mod:`relaymail.policy.recipients`).  A list's address is a valid
    recipient too.
``route_query``
    The route of a recipient: one row of two columns, the transport
    (``smtp``, ``lmtp``, ...) and its next hop (``[10.0.0.5]:25``; NULL for
    the transport's default).  No row: no opinion, the built-in routing
    decides.
``verify_query``
    Optional: what VRFY answers for a recipient, the first column of the
    first row (``SELECT name || ' <' || address || '>' ...``).  Without it
    VRFY asks ``recipient_query`` and names the address as asked.
    ``[server] vrfy`` still decides who gets real answers.
``connections``
    The pool's size: at most this many queries at once per relay process,
    the rest wait their turn.  Default 4: a lookup by key takes well under
    a millisecond, and on a small machine more connections only cost the
    database a process each.
``reject_unlisted``
    ``yes`` refuses a recipient no query finds with ``550 5.1.1`` when its
    domain is in ``[relay] domains``, as Postfix's
    smtpd_reject_unlisted_recipient does; other domains still get no
    opinion.  Default ``no``: the next plugin (or the relay rule) decides.

Each query is one SELECT and names what it is given with placeholders:
``{address}`` (``local@domain``), ``{local_part}`` and ``{domain}`` (lower
case, IDNs as A-labels); ``{{`` and ``}}`` are literal braces.  They
become bound parameters, never text (:mod:`relaymail.plugins.sql_queries`).
Each hook the plugin is listed at needs its query: ``recipients`` needs
``recipient_query`` or ``alias_query``, ``expanders`` ``alias_query``,
``routers`` ``route_query``.

A database that is down, an error in a query, or an answer slower than
``[plugins] timeout`` gives the client ``451 4.3.0`` (the policy runner's
fail-soft answer) and one log line naming the query, the database and the
error.  The database is told to give up a little before that timeout
(PostgreSQL's ``statement_timeout``, SQLite's lock wait, both at 90% of
it; libpq's ``connect_timeout`` at the timeout, 2 s at least), so it says
why in its own words and no connection stays busy for a session already
answered.  The relay starts with its PostgreSQL down, answers 451
meanwhile, and uses it as soon as it is back; no restart is needed.  A
``connect_timeout`` or ``options`` in the connection string is kept as
given.
"""

from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.address import AddressError, parse_forward_path
from relaymail.config import boolean, integer
from relaymail.interfaces import (
    Decision, IListExpander, IPluginFactory, IRecipientValidator, IRouter, Route)
from relaymail.plugins.options import reject_unknown
from relaymail.plugins.sql_database import check_queries, parse_database
from relaymail.plugins.sql_queries import Query, address_values
from relaymail.plugins.static import USER_UNKNOWN

log = Logger()

QUERIES = ("recipient_query", "alias_query", "route_query", "verify_query")
_OPTIONS = ("database", *QUERIES, "connections", "reject_unlisted")
DEFAULT_CONNECTIONS = 4

#: The query each [plugins] hook needs, when the plugin is listed there.
_NEEDED = (
    ("recipients", ("recipient_query", "alias_query")),
    ("expanders", ("alias_query",)),
    ("routers", ("route_query",)),
)


class LookupFailed(Exception):
    """A query could not be answered: the database or the query failed."""


@implementer(IRecipientValidator, IListExpander, IRouter)
class SQLTables:
    """Answers from the configured queries (see the module docstring)."""

    name = "sql"
    description = "recipients, lists and routes from an SQL database"

    def __init__(self, database, queries, reject_unlisted=False, relay_domains=()):
        """
        :param database: a :class:`~relaymail.plugins.sql_database.Database`.
        :param queries: a dict from option name (:data:`QUERIES`) to
            :class:`~relaymail.plugins.sql_queries.Query`; absent ones are
            not configured.
        :param reject_unlisted: refuse unfound recipients of ``relay_domains``.
        :param relay_domains: domain keys (lower case, A-labels).
        """
        self._database = database
        self._queries = dict(queries)
        self._reject_unlisted = reject_unlisted
        self._relay_domains = frozenset(relay_domains)

    # -- RCPT and VRFY ------------------------------------------------------

    @inlineCallbacks
    def check_recipient(self, recipient, context):
        """Accept an address a query finds; refuse or pass on the others."""
        values = address_values(recipient)
        for key in ("recipient_query", "alias_query"):
            if key in self._queries:
                _, rows = yield self._fetch(key, values)
                if rows:
                    return Decision.accept()
        if self._reject_unlisted and values["domain"] in self._relay_domains:
            return USER_UNKNOWN
        return Decision.NO_OPINION

    @inlineCallbacks
    def verify(self, address, context):
        """Name the mailbox ``verify_query`` (or ``recipient_query``)
        finds; a list names its one member or counts them."""
        values = _argument_values(address)
        if values is None:
            return Decision.NO_OPINION
        key = "verify_query" if "verify_query" in self._queries else "recipient_query"
        if key in self._queries:
            _, rows = yield self._fetch(key, values)
            if rows:
                named = rows[0][0] if key == "verify_query" else address
                return Decision.accept(text=address if named is None else str(named))
        if "alias_query" in self._queries:
            members = yield self._members(values)
            if members:
                if len(members) == 1:
                    return Decision.accept(text=members[0])
                return Decision.accept(text=f"{address} is a list of {len(members)} members")
        return Decision.NO_OPINION

    # -- EXPN and queue-time expansion ---------------------------------------

    def expand(self, address, context):
        """The members ``alias_query`` gives, or None when it has no row."""
        values = _argument_values(address)
        if values is None or "alias_query" not in self._queries:
            return None
        return self._members(values).addCallback(lambda members: members or None)

    def _members(self, values):
        def members(answer):
            # A NULL member is a row that names no one: skip it rather
            # than deliver to the string "None".
            return [str(row[0]) for row in answer[1] if row[0] is not None]
        return self._fetch("alias_query", values, every_row=True).addCallback(members)

    # -- routing -------------------------------------------------------------

    def route(self, recipient, context):
        """The Route in ``route_query``'s first row, or None."""
        if "route_query" not in self._queries:
            return None
        values = address_values(recipient)

        def routed(answer):
            columns, rows = answer
            if columns != 2:
                raise self._failure(
                    "route_query", values,
                    f"returns {columns} columns; it must return two: transport, next hop")
            if not rows:
                return None
            transport, next_hop = rows[0]
            if not transport:
                raise self._failure("route_query", values,
                                    f"returned no transport (next hop {next_hop!r})")
            return Route(str(transport), None if next_hop in (None, "") else str(next_hop))
        return self._fetch("route_query", values).addCallback(routed)

    # -- running queries -----------------------------------------------------

    def _fetch(self, key, values, every_row=False):
        d = self._database.fetch(self._queries[key], values, every_row)

        def failed(failure):
            if failure.check(CancelledError):
                # [plugins] timeout ran out; the runner answers 451 and
                # says so, but only this line names the database.
                log.error("sql: {key} for {address!r} on {database}: no answer within "
                          "[plugins] timeout", key=key, address=values["address"],
                          database=self._database.description)
                return failure
            raise self._failure(key, values, f"{type(failure.value).__name__}: "
                                f"{' '.join(str(failure.value).split())}")
        return d.addErrback(failed)

    def _failure(self, key, values, problem):
        log.error("sql: {key} for {address!r} on {database}: {problem}", key=key,
                  address=values["address"], database=self._database.description,
                  problem=problem)
        return LookupFailed(f"{key} on {self._database.description}: {problem}")


def _argument_values(address):
    """The placeholders' values for a VRFY or EXPN argument: a full
    address, or a bare name (``domain`` empty); None when it is neither."""
    if "@" not in address:
        return {"address": address, "local_part": address, "domain": ""}
    try:
        return address_values(parse_forward_path(f"<{address}>", smtputf8=True))
    except AddressError:
        return None


@implementer(IPlugin, IPluginFactory)
class SQLTablesFactory:
    """Builds :class:`SQLTables` from ``[plugin:sql]``."""

    name = "sql"

    def build(self, context):
        """Check every option and the queries; every problem is a
        ConfigError naming its key.  PostgreSQL is not connected to yet."""
        options = context.options
        settings = context.settings
        reject_unknown(context, _OPTIONS)
        connections = _option(context, "connections", integer(minimum=1),
                              str(DEFAULT_CONNECTIONS))
        reject_unlisted = _option(context, "reject_unlisted", boolean, "no")
        if not options.get("database", "").strip():
            raise context.config_error(
                "database", "missing: name the database (sqlite:///path.db or postgresql://...)")
        timeout = getattr(getattr(settings, "plugins", None), "timeout", None)
        try:
            database = parse_database(options["database"], connections, timeout)
        except ValueError as exc:
            raise context.config_error("database", str(exc)) from None
        queries = {}
        for key in QUERIES:
            if key not in options:
                continue
            try:
                queries[key] = Query(options[key], database.paramstyle)
            except ValueError as exc:
                raise context.config_error(key, str(exc)) from None
        _check_hooks(context, queries)
        try:
            check_queries(database, queries)
        except ValueError as exc:
            raise context.config_error(*exc.args) from None
        relay_domains = [domain.lower() for domain in settings.relay.domains]
        return SQLTables(database, queries, reject_unlisted, relay_domains)


sql = SQLTablesFactory()


def _option(context, key, parse, default):
    try:
        return parse(context.options.get(key, default))
    except ValueError as exc:
        raise context.config_error(key, str(exc)) from None


def _check_hooks(context, queries):
    if not queries:
        raise context.config_error(
            "recipient_query", "no query is set; the plugin needs at least one of "
            + ", ".join(QUERIES))
    hooks = getattr(context.settings, "plugins", None)
    for hook, keys in _NEEDED:
        if context.name in (getattr(hooks, hook, None) or ()) and not any(
                key in queries for key in keys):
            raise context.config_error(
                keys[0], f"missing: [plugins] {hook} lists {context.name}, which needs "
                + " or ".join(keys))
