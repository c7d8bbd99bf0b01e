"""The database behind ``[plugin:sql]``: which driver, how to connect, and
the ``twisted.enterprise.adbapi`` pool that runs the queries off the reactor.

Two drivers, one plugin: SQLite through the standard library's ``sqlite3``
(``sqlite:///absolute/path.db``), PostgreSQL through psycopg 3
(``postgresql://user@host:port/dbname`` or a libpq ``key=value`` string;
``pip install 'relaymail[postgresql]'``).

Connections are made lazily, in the pool's threads, at the first lookup:
building the plugin never connects to PostgreSQL.  That is what lets the
relay start while its database is down and answer ``451 4.3.0`` until it is
back (as Postfix's proxymap clients do), and what keeps the master process,
which builds the plugins only to check the configuration, from holding
connections it never uses.  A connection found broken (its rollback
after a failed query fails too) is dropped, and the next lookup in that
thread connects afresh.

The SQLite file is opened read only (``mode=ro``): the relay only reads its
tables, and a mistyped path must not create an empty database that then
answers "not found" for everyone.  Because it is a local file, its
existence and the queries themselves (``EXPLAIN``: parsed and planned,
never run) are checked when the plugin is built.
"""

import math
import os
import sqlite3
import urllib.parse

from twisted.enterprise import adbapi

from relaymail.plugins.sql_queries import PLACEHOLDERS, PYFORMAT, QMARK

#: libpq's ``connect_timeout`` when ``[plugins] timeout`` is off; libpq
#: itself treats values under 2 s as 2 s.
DEFAULT_CONNECT_TIMEOUT = 10

#: The share of ``[plugins] timeout`` a lock wait (SQLite) or a statement
#: (PostgreSQL's statement_timeout) may take: the database then gives up
#: first and says why in its own words ("database is locked", "canceling
#: statement due to statement timeout"), and the connection is free again
#: at once instead of working for a session that has been answered 451.
DRIVER_SHARE = 0.9

# One pool per distinct database and size, shared by every build of the
# plugin in a process: a SIGHUP rebuilds the plugins, and a pool per build
# would leave the previous one's threads and connections behind each time.
_POOLS = {}


class Database:
    """How to reach one database, and its shared pool once used.

    :ivar description: the database for log lines, without any password.
    :ivar paramstyle: the driver's PEP 249 paramstyle.
    """

    def __init__(self, module, paramstyle, args, kwargs, description, connections):
        self.module = module
        self.paramstyle = paramstyle
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self.description = description
        self.connections = connections

    def _pool(self):
        key = (self.module, self._args, tuple(sorted(self._kwargs.items())), self.connections)
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = _Pool(
                self.module, *self._args, cp_min=1, cp_max=self.connections,
                cp_noisy=False, **self._kwargs)
        return pool

    def fetch(self, query, values, every_row):
        """Run ``query`` with ``values`` in the pool.

        :return: a Deferred firing with ``(columns, rows)``: the number of
            columns of the result and its rows (all of them when
            ``every_row``, else at most the first).
        """
        return self._pool().runInteraction(
            _fetch, query.sql, query.parameters(values), every_row)


class _Connection(adbapi.Connection):
    """A pooled connection that drops itself when it is found broken.

    adbapi's own reconnecting rollback logs two tracebacks ("Rollback
    failed") for every connection a database restart breaks, on top of
    the query's error, which the plugin already reports in one line.
    """

    def rollback(self):
        try:
            self._connection.rollback()
            return
        except Exception:
            pass
        # The next lookup in this thread connects afresh.
        self._pool.disconnect(self._connection)


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _Connection


class NoResult(Exception):
    """A query ran but returned no rows at all (an UPDATE, say)."""


def _fetch(cursor, sql, parameters, every_row):
    cursor.execute(sql, parameters)
    if cursor.description is None:
        raise NoResult("the query returns no result set; it must be a SELECT")
    rows = cursor.fetchall() if every_row else cursor.fetchmany(1)
    return len(cursor.description), rows


def parse_database(text, connections, timeout):
    """The :class:`Database` ``[plugin:sql] database`` names.

    :param text: the option's value.
    :param connections: the pool's size.
    :param timeout: ``[plugins] timeout`` in seconds, or None: a connect or
        a statement that takes longer is of no use to anyone waiting.
    :raise ValueError: saying what is wrong with ``text``.
    """
    text = text.strip()
    if text.startswith("sqlite:"):
        return _sqlite(text, connections, timeout)
    if text.startswith(("postgresql://", "postgres://")) or ("=" in text and "://" not in text):
        return _postgresql(text, connections, timeout)
    raise ValueError(
        f"expected sqlite:///absolute/path.db, postgresql://user@host:port/dbname "
        f"or a libpq key=value string, got {text!r}")


def _sqlite(text, connections, timeout):
    if not text.startswith("sqlite:///"):
        raise ValueError(f"expected sqlite:///absolute/path.db (three slashes), got {text!r}")
    path = text[len("sqlite://"):]
    if not os.path.isfile(path):
        raise ValueError(f"no SQLite database file {path}")
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    # check_same_thread: adbapi closes every thread's connection from the
    # reactor thread at shutdown.  timeout: how long a lookup waits while a
    # writer holds the file locked (sqlite3's own default is 5 s).
    kwargs = {"uri": True, "check_same_thread": False,
              "timeout": timeout * DRIVER_SHARE if timeout is not None else 5.0}
    return Database("sqlite3", QMARK, (uri,), kwargs, f"sqlite://{path}", connections)


def _postgresql(text, connections, timeout):
    try:
        import psycopg.conninfo
    except ImportError:
        raise ValueError("PostgreSQL needs psycopg 3: pip install 'relaymail[postgresql]'") from None
    try:
        params = psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.Error as exc:
        raise ValueError(f"not a PostgreSQL connection string: {_one_line(exc)}") from None
    kwargs = {}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = (DEFAULT_CONNECT_TIMEOUT if timeout is None
                                     else max(2, math.ceil(timeout)))
    if "options" not in params and timeout is not None:
        kwargs["options"] = (
            f"-c statement_timeout={max(1, int(timeout * DRIVER_SHARE * 1000))}")
    # The usual keys first, in the order one reads a URL; never the password.
    order = ("host", "hostaddr", "port", "dbname", "user")
    keys = [key for key in order if key in params]
    keys += sorted(key for key in params if key not in order and key != "password")
    shown = " ".join(f"{key}={params[key]}" for key in keys)
    return Database("psycopg", PYFORMAT, (text,), kwargs, f"postgresql {shown}", connections)


def check_queries(database, queries):
    """Have SQLite parse and plan each query (``EXPLAIN``, nothing is run),
    so a typo stops start-up rather than answering 451 to every client.
    PostgreSQL's queries are first seen at the first lookup: the server may
    not be up yet.

    :param queries: a dict from option name to :class:`Query`.
    :raise ValueError: ``(option name, problem)`` as its args.
    """
    if database.module != "sqlite3":
        return
    try:
        connection = sqlite3.connect(database._args[0], uri=True)
    except sqlite3.Error as exc:
        raise ValueError("database", f"cannot open {database.description}: {exc}") from None
    blank = dict.fromkeys(PLACEHOLDERS, "")
    try:
        for key, query in queries.items():
            try:
                connection.execute("EXPLAIN " + query.sql, query.parameters(blank))
            except (sqlite3.Error, sqlite3.Warning) as exc:
                raise ValueError(key, f"SQLite refuses it: {exc}") from None
    finally:
        connection.close()


def _one_line(exc):
    return " ".join(str(exc).split())


def close_pools():
    """Close every pool this process opened (their threads and
    connections) and forget them; the next lookup opens a new one."""
    pools = list(_POOLS.values())
    _POOLS.clear()
    for pool in pools:
        pool.close()
