"""The sql plugin against real databases: an SQLite file the test writes
and a PostgreSQL server the test starts (tests/postgres_server.py).

RCPT, VRFY, EXPN and queue-time expansion go over a real socket to the
relay run by twistd; route() is asked of the built plugin directly (the
routers hook is not wired into delivery in this branch), with the reactor
running under trial.  Both backends run the same queries and must give the
same bytes.
"""

import re
import socket
import sqlite3
import time
from types import SimpleNamespace

import psycopg
import pytest
from twisted.internet import defer
from twisted.trial import unittest

from relaymail.address import parse_forward_path
from relaymail.config import ConfigError
from relaymail.interfaces import (
    IListExpander, IPluginFactory, IRecipientValidator, IRouter, Route)
from relaymail.plugins.sql import LookupFailed, sql
from relaymail.plugins.sql_database import close_pools
from relaymail.plugins.sql_queries import PYFORMAT, QMARK, Query
from relaymail.policy.loader import PluginContext
from tests.postgres_server import PostgresServer
from tests.relay_process import RelayProcess, twistd

SCHEMA = (
    "CREATE TABLE mailbox (address TEXT PRIMARY KEY, name TEXT NOT NULL)",
    "CREATE TABLE alias (address TEXT NOT NULL, member TEXT)",
    "CREATE TABLE transport (domain TEXT PRIMARY KEY, transport TEXT, nexthop TEXT)",
)
MAILBOXES = [("alice@example.com", "Alice Liddell"), ("bob@example.com", "Bob Cratchit"),
             ("o'brien@example.com", "Flann O'Brien")]
ALIASES = [("staff@example.com", "alice@example.com"), ("staff@example.com", "bob@example.com"),
           ("team@example.com", "staff@example.com"), ("team@example.com", "carol@example.net"),
           ("team@example.com", None), ("solo@example.com", "bob")]
TRANSPORTS = [("example.net", "smtp", "[10.0.0.5]:25"), ("lmtp.example", "lmtp", None),
              ("broken.example", None, "[10.0.0.6]:25")]

# The same SQL for both databases.  The LIKE's % signs check that a literal
# % reaches PostgreSQL as written (psycopg reads % as a placeholder).
QUERIES = {
    "recipient_query": "SELECT 1 FROM mailbox WHERE address = lower({address}) "
                       "AND address LIKE '%@%'",
    "alias_query": "SELECT member FROM alias WHERE address = lower({address}) ORDER BY member",
    "verify_query": "SELECT name || ' <' || address || '>' FROM mailbox "
                    "WHERE address = lower({address})",
    "route_query": "SELECT transport, nexthop FROM transport WHERE domain = {domain}",
}


def fill(connection, placeholder):
    for statement in SCHEMA:
        connection.execute(statement)
    for table, rows in (("mailbox", MAILBOXES), ("alias", ALIASES),
                        ("transport", TRANSPORTS)):
        marks = ", ".join([placeholder] * len(rows[0]))
        for row in rows:
            connection.execute(f"INSERT INTO {table} VALUES ({marks})", row)


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("sqlite") / "mail.db"
    with sqlite3.connect(path) as connection:
        fill(connection, "?")
    connection.close()
    return f"sqlite://{path}"


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.initdb().start()
    except Exception:
        server.remove()
        raise
    server.execute("CREATE DATABASE mail")
    with psycopg.connect(server.url("mail"), autocommit=True) as connection:
        fill(connection, "%s")
    yield server
    server.remove()


@pytest.fixture(scope="module")
def postgresql_url(postgres):
    return postgres.url("mail")


BACKENDS = ["sqlite", "postgresql"]


def relay_config(url, **extra):
    return {
        "server": {"trusted_networks": "127.0.0.1/32", "workers": "1"},
        "relay": {"domains": "example.com"},
        "plugins": {"recipients": "sql", "expanders": "sql", "timeout": "3"},
        "plugin:sql": {"database": url, **QUERIES, "reject_unlisted": "yes", **extra},
    }


@pytest.fixture(scope="module", params=BACKENDS)
def relay(request, tmp_path_factory):
    url = request.getfixturevalue(f"{request.param}_url")
    process = RelayProcess(tmp_path_factory.mktemp(f"relay-{request.param}"), relay_config(url))
    process.start()
    yield process
    process.stop()


class Client:
    """A raw SMTP client; from 127.0.0.2 it is not trusted, from
    127.0.0.1 it is (VRFY and EXPN answer it for real)."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), 15, source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")
        assert self.ask("EHLO client.test").startswith("250-")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed before a whole reply: " + repr(lines))
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    def ask(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self):
        self.ask("QUIT")
        self.file.close()
        self.sock.close()


def wait_for(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- over the wire, both backends ---------------------------------------------

def test_rcpt_accepts_found_refuses_unlisted_and_leaves_other_domains(relay):
    client = Client(relay.port, "127.0.0.2")
    assert client.ask("MAIL FROM:<sender@example.org>") == "250 2.1.0 Ok\r\n"
    assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
    # The query folds the local part (lower()); the domain arrives folded.
    assert client.ask("RCPT TO:<Alice@EXAMPLE.com>") == "250 2.1.5 Ok\r\n"
    # A list's address is a recipient too.
    assert client.ask("RCPT TO:<staff@example.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("RCPT TO:<carol@example.com>") == (
        "550 5.1.1 Recipient address rejected: User unknown\r\n")
    # Not a [relay] domain: no opinion from sql, so the relay rule refuses.
    assert client.ask("RCPT TO:<carol@example.net>") == "554 5.7.1 Relay access denied\r\n"
    client.close()


def test_quotes_in_addresses_are_parameters_not_sql(relay):
    client = Client(relay.port, "127.0.0.2")
    client.ask("MAIL FROM:<sender@example.org>")
    # A quote in the local part is data: this mailbox exists.
    assert client.ask("RCPT TO:<o'brien@example.com>") == "250 2.1.5 Ok\r\n"
    # Interpolated into the text, each of these would match every row
    # (or comment out the rest of the query); bound, they match none.
    for attempt in ("a'--@example.com", "'or''='@example.com",
                    "\"x' OR '1'='1\"@example.com", "\"x'; DROP TABLE mailbox; --\"@example.com"):
        assert client.ask(f"RCPT TO:<{attempt}>") == (
            "550 5.1.1 Recipient address rejected: User unknown\r\n"), attempt
    # The table is still there.
    assert client.ask("RCPT TO:<bob@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert not re.search(r"sql: \w+_query for", relay.log())  # no query failed


def test_vrfy_names_the_mailbox_or_counts_a_list(relay):
    client = Client(relay.port)
    assert client.ask("VRFY alice@example.com") == "250 2.1.5 Alice Liddell <alice@example.com>\r\n"
    assert client.ask("VRFY <O'Brien@example.com>") == (
        "250 2.1.5 Flann O'Brien <o'brien@example.com>\r\n")
    assert client.ask("VRFY staff@example.com") == (
        "250 2.1.5 staff@example.com is a list of 2 members\r\n")
    assert client.ask("VRFY solo@example.com") == "250 2.1.5 bob\r\n"
    assert client.ask("VRFY nobody@example.com") == (
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n")
    client.close()


def test_expn_lists_the_members_qualified(relay):
    client = Client(relay.port)
    assert client.ask("EXPN staff@example.com") == (
        "250-2.1.5 <alice@example.com>\r\n250 2.1.5 <bob@example.com>\r\n")
    # A NULL member is skipped; members come in the query's order.
    assert client.ask("EXPN team@example.com") == (
        "250-2.1.5 <carol@example.net>\r\n250 2.1.5 <staff@example.com>\r\n")
    # A bare member is qualified with the list's domain.
    assert client.ask("EXPN solo@example.com") == "250 2.1.5 <bob@example.com>\r\n"
    assert client.ask("EXPN alice@example.com") == "550 5.1.1 Not a mailing list I know\r\n"
    client.close()


def test_lists_are_expanded_when_the_message_is_queued(relay):
    client = Client(relay.port)
    client.ask("MAIL FROM:<sender@example.org>")
    assert client.ask("RCPT TO:<team@example.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
    assert client.ask("DATA").startswith("354 ")
    reply = client.ask("Subject: lists\r\n\r\nhello\r\n.")
    queue_id = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r\n", reply).group(1)
    client.close()
    record = relay.record(queue_id)
    # team -> carol, staff -> (alice, bob); alice named twice is kept once.
    assert record["envelope"]["recipients"] == [
        "carol@example.net", "alice@example.com", "bob@example.com"]


# -- PostgreSQL going away and coming back ------------------------------------

FAILED = "451 4.3.0 Temporary failure checking recipient, try again later\r\n"


@pytest.fixture
def pg_relay(postgres, postgresql_url, tmp_path):
    process = RelayProcess(tmp_path, relay_config(postgresql_url))
    yield process
    process.stop()
    if postgres.process is None:        # a failed test left it stopped
        postgres.start()


def test_postgresql_stopping_mid_session_gives_451_and_the_session_goes_on(postgres, pg_relay):
    pg_relay.start()
    client = Client(pg_relay.port)
    client.ask("MAIL FROM:<sender@example.org>")
    assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
    postgres.stop()
    assert client.ask("RCPT TO:<bob@example.com>") == FAILED
    assert client.ask("EXPN staff@example.com") == FAILED
    assert client.ask("NOOP") == "250 2.0.0 Ok\r\n"
    postgres.start()
    # The pool drops the broken connection and connects afresh.
    answers = []
    wait_for(lambda: answers.append(client.ask("RCPT TO:<bob@example.com>"))
             or answers[-1] == "250 2.1.5 Ok\r\n", what="PostgreSQL back: " + repr(answers))
    assert set(answers[:-1]) <= {FAILED}
    assert client.ask("DATA").startswith("354 ")
    assert client.ask("x\r\n.").startswith("250 2.0.0 Ok: queued as ")
    client.close()
    log = pg_relay.log()
    assert re.search(r"sql: recipient_query for 'bob@example\.com' on postgresql "
                     r"host=127\.0\.0\.1 port=\d+ dbname=mail user=postgres: (AdminShutdown|OperationalError): ",
                     log), log
    assert "sql: alias_query for 'staff@example.com' on postgresql" in log


def test_the_relay_starts_with_postgresql_down_and_uses_it_once_up(postgres, pg_relay):
    postgres.stop()
    pg_relay.start()
    client = Client(pg_relay.port)
    client.ask("MAIL FROM:<sender@example.org>")
    assert client.ask("RCPT TO:<alice@example.com>") == FAILED
    assert client.ask("RCPT TO:<alice@example.com>") == FAILED
    postgres.start()
    assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
    client.close()
    assert "Connection refused" in pg_relay.log()


SLOW_QUERY = ("SELECT 1 FROM mailbox WHERE address = lower({address}) OR CASE WHEN "
              "{local_part} = 'slow' THEN pg_sleep(5) IS NULL ELSE false END")


def test_a_slow_postgresql_statement_is_cancelled_and_gives_451(postgres, postgresql_url, tmp_path):
    config = relay_config(postgresql_url, recipient_query=SLOW_QUERY)
    config["plugins"]["timeout"] = "1"
    process = RelayProcess(tmp_path, config).start()
    try:
        client = Client(process.port)
        client.ask("MAIL FROM:<sender@example.org>")
        started = time.monotonic()
        assert client.ask("RCPT TO:<slow@example.com>") == FAILED
        assert time.monotonic() - started < 2
        assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
        client.close()
        # statement_timeout (0.9 s) cancels it on the server before the
        # plugin timeout (1 s): the log says what happened.
        assert ("sql: recipient_query for 'slow@example.com' on postgresql host=127.0.0.1 "
                f"port={postgres.port} dbname=mail user=postgres: QueryCanceled: canceling "
                "statement due to statement timeout") in process.log()
    finally:
        process.stop()


def test_a_database_that_never_answers_gives_451_at_the_plugin_timeout(tmp_path):
    # A listener that accepts (the kernel does, from its backlog) and then
    # says nothing: libpq waits for the server's first message.
    silent = socket.create_server(("127.0.0.1", 0))
    url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/mail"
    config = relay_config(url)
    config["plugins"]["timeout"] = "1"
    process = RelayProcess(tmp_path, config).start()
    try:
        client = Client(process.port)
        client.ask("MAIL FROM:<sender@example.org>")
        started = time.monotonic()
        assert client.ask("RCPT TO:<alice@example.com>") == FAILED
        assert 0.9 < time.monotonic() - started < 1.9
        assert client.ask("NOOP") == "250 2.0.0 Ok\r\n"
        client.close()
        assert ("sql: recipient_query for 'alice@example.com' on postgresql host=127.0.0.1 "
                f"port={silent.getsockname()[1]} dbname=mail user=postgres: no answer within "
                "[plugins] timeout") in process.log()
    finally:
        process.stop()
        silent.close()


def test_a_locked_sqlite_file_gives_451_until_the_writer_is_done(sqlite_url, tmp_path):
    config = relay_config(sqlite_url)
    config["plugins"]["timeout"] = "1"
    process = RelayProcess(tmp_path, config).start()
    writer = sqlite3.connect(sqlite_url[len("sqlite://"):], isolation_level=None)
    try:
        client = Client(process.port)
        client.ask("MAIL FROM:<sender@example.org>")
        writer.execute("BEGIN EXCLUSIVE")
        assert client.ask("RCPT TO:<alice@example.com>") == FAILED
        writer.execute("COMMIT")
        assert client.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok\r\n"
        client.close()
        assert (f"sql: recipient_query for 'alice@example.com' on {sqlite_url}: "
                "OperationalError: database is locked") in process.log()
    finally:
        writer.close()
        process.stop()


# -- configuration errors -----------------------------------------------------

def build(options, hooks=None, timeout=3.0):
    hooks = hooks or {}
    settings = SimpleNamespace(
        source="test.ini", relay=SimpleNamespace(domains=["example.com"]),
        plugins=SimpleNamespace(timeout=timeout, recipients=hooks.get("recipients", []),
                                expanders=hooks.get("expanders", []),
                                routers=hooks.get("routers", [])),
        plugin_options={"sql": dict(options)})
    return sql.build(PluginContext("sql", dict(options), settings))


def test_the_factory_is_a_builtin_plugin_providing_three_hooks(sqlite_url):
    assert IPluginFactory.providedBy(sql) and sql.__module__ == "relaymail.plugins.sql"
    plugin = build({"database": sqlite_url, **QUERIES})
    for interface in (IRecipientValidator, IListExpander, IRouter):
        assert interface.providedBy(plugin)
    assert getattr(plugin, "blocking", False) is False


@pytest.mark.parametrize("options, key, problem", [
    ({"recipient_query": "SELECT 1"}, "database",
     "missing: name the database (sqlite:///path.db or postgresql://...)"),
    ({"database": "mysql://db/mail", "recipient_query": "SELECT 1"}, "database",
     "expected sqlite:///absolute/path.db, postgresql://user@host:port/dbname or a libpq "
     "key=value string, got 'mysql://db/mail'"),
    ({"database": "sqlite://relative.db", "recipient_query": "SELECT 1"}, "database",
     "expected sqlite:///absolute/path.db (three slashes), got 'sqlite://relative.db'"),
    ({"database": "sqlite:///nonexistent/mail.db", "recipient_query": "SELECT 1"}, "database",
     "no SQLite database file /nonexistent/mail.db"),
    ({"database": "host=127.0.0.1 port", "recipient_query": "SELECT 1"}, "database",
     "not a PostgreSQL connection string: "),
    ({"database": "SQLITE", "recipient_query": "SELECT 1 WHERE {user} = 1"},
     "recipient_query", "unknown placeholder {user}; a query may use {address}, "
     "{local_part}, {domain}"),
    ({"database": "SQLITE", "alias_query": "SELECT member FROM alias WHERE address = {}"},
     "alias_query", "unknown placeholder {}; a query may use {address}, {local_part}, {domain}"),
    ({"database": "SQLITE", "route_query": "SELECT 1 WHERE {domain!r} = 1"}, "route_query",
     "placeholder {domain} takes no conversion or format spec: its value is a bound "
     "parameter, never formatted into the text"),
    ({"database": "SQLITE", "verify_query": "SELECT '}' WHERE {address} = 1"}, "verify_query",
     "Single '}' encountered in format string; write a literal brace as {{ or }}"),
    ({"database": "SQLITE", "recipient_query": "  "}, "recipient_query", "empty query"),
    ({"database": "SQLITE", "recipient_query": "SELECT 1 FROM mailboxes WHERE address = {address}"},
     "recipient_query", "SQLite refuses it: no such table: mailboxes"),
    ({"database": "SQLITE", "recipient_query": "SELEC 1"}, "recipient_query",
     "SQLite refuses it: near \"SELEC\": syntax error"),
    ({"database": "SQLITE"}, "recipient_query",
     "no query is set; the plugin needs at least one of recipient_query, alias_query, "
     "route_query, verify_query"),
    ({"database": "SQLITE", "recipient_query": "SELECT 1", "connections": "0"}, "connections",
     "must be at least 1, got '0'"),
    ({"database": "SQLITE", "recipient_query": "SELECT 1", "reject_unlisted": "maybe"},
     "reject_unlisted", "expected yes or no (or true/false, on/off, 1/0), got 'maybe'"),
    ({"database": "SQLITE", "recipient_query": "SELECT 1", "query": "SELECT 1"}, "query",
     "unknown option; [plugin:sql] takes database, recipient_query, alias_query, "
     "route_query, verify_query, connections, reject_unlisted"),
])
def test_bad_options_are_config_errors_naming_the_key(sqlite_url, options, key, problem):
    if options.get("database") == "SQLITE":
        options = {**options, "database": sqlite_url}
    with pytest.raises(ConfigError) as info:
        build(options)
    assert (info.value.section, info.value.key) == ("plugin:sql", key)
    assert info.value.problem.startswith(problem), info.value.problem
    assert str(info.value).startswith(f"test.ini: [plugin:sql] {key}: ")


@pytest.mark.parametrize("hook, key", [
    ("recipients", "recipient_query"), ("expanders", "alias_query"), ("routers", "route_query")])
def test_each_hook_listed_needs_its_query(sqlite_url, hook, key):
    with pytest.raises(ConfigError) as info:
        build({"database": sqlite_url, "verify_query": QUERIES["verify_query"]}, {hook: ["sql"]})
    assert info.value.key == key
    assert info.value.problem.startswith(f"missing: [plugins] {hook} lists sql, which needs ")


def test_a_bad_query_stops_the_relay_with_one_line_naming_the_key(tmp_path, sqlite_url):
    process = RelayProcess(tmp_path, relay_config(
        sqlite_url, alias_query="SELECT member FROM alias WHERE address = {user}"))
    result = twistd("--config", process.config, cwd=str(tmp_path))
    assert result.returncode != 0
    assert (f"relaymail: {process.config}: [plugin:sql] alias_query: unknown placeholder "
            "{user}; a query may use {address}, {local_part}, {domain}") in (
                result.stdout + result.stderr)


def test_placeholders_become_the_drivers_paramstyle():
    text = "SELECT 1 FROM t WHERE a = {address} AND b LIKE '%x' AND c = {{d}} AND e = {address}"
    qmark, pyformat = Query(text, QMARK), Query(text, PYFORMAT)
    assert qmark.sql == "SELECT 1 FROM t WHERE a = ? AND b LIKE '%x' AND c = {d} AND e = ?"
    assert pyformat.sql == ("SELECT 1 FROM t WHERE a = %(address)s AND b LIKE '%%x' "
                            "AND c = {d} AND e = %(address)s")
    values = {"address": "a@b", "local_part": "a", "domain": "b"}
    assert qmark.parameters(values) == ("a@b", "a@b")
    assert pyformat.parameters(values) == {"address": "a@b"}


# -- route(), and the plugin's answers, on the real databases -----------------

@pytest.fixture(scope="class")
def databases(request, sqlite_url, postgresql_url):
    request.cls.urls = {"sqlite": sqlite_url, "postgresql": postgresql_url}


def rcpt(address):
    return parse_forward_path(f"<{address}>", smtputf8=True)


@pytest.mark.usefixtures("databases")
class _DirectLookups:
    """Asked of the plugin itself, with the reactor running (trial)."""

    backend = None

    def setUp(self):
        self.plugin = build({"database": self.urls[self.backend], **QUERIES})
        self.addCleanup(close_pools)

    @defer.inlineCallbacks
    def test_route_gives_transport_and_next_hop_or_none(self):
        route = yield self.plugin.route(rcpt("carol@Example.NET"), None)
        self.assertEqual(route, Route("smtp", "[10.0.0.5]:25"))
        route = yield self.plugin.route(rcpt("dave@lmtp.example"), None)
        self.assertEqual(route, Route("lmtp", None))
        route = yield self.plugin.route(rcpt("erin@elsewhere.example"), None)
        self.assertIsNone(route)

    @defer.inlineCallbacks
    def test_route_without_a_transport_or_with_other_columns_fails(self):
        with self.assertRaises(LookupFailed) as info:
            yield self.plugin.route(rcpt("x@broken.example"), None)
        self.assertIn("route_query on ", str(info.exception))
        self.assertTrue(str(info.exception).endswith(
            "returned no transport (next hop '[10.0.0.6]:25')"))
        plugin = build({"database": self.urls[self.backend],
                        "route_query": "SELECT transport FROM transport WHERE domain = {domain}"})
        with self.assertRaises(LookupFailed) as info:
            yield plugin.route(rcpt("x@example.net"), None)
        self.assertTrue(str(info.exception).endswith(
            "returns 1 columns; it must return two: transport, next hop"))

    @defer.inlineCallbacks
    def test_an_injection_attempt_in_a_bare_name_is_a_parameter(self):
        members = yield self.plugin.expand("' OR ''='", None)
        self.assertIsNone(members)
        members = yield self.plugin.expand("STAFF@example.com", None)
        self.assertEqual(members, ["alice@example.com", "bob@example.com"])

    def execute(self, statement):
        url = self.urls[self.backend]
        if self.backend == "sqlite":
            with sqlite3.connect(url[len("sqlite://"):]) as connection:
                connection.execute(statement)
            connection.close()
        else:
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(statement)

    @defer.inlineCallbacks
    def test_a_query_error_fails_the_deferred_naming_the_query_and_the_error(self):
        self.execute("CREATE TABLE doomed (domain TEXT, nexthop TEXT)")
        plugin = build({"database": self.urls[self.backend],
                        "route_query": "SELECT domain, nexthop FROM doomed WHERE domain = {domain}"})
        self.execute("DROP TABLE doomed")
        with self.assertRaises(LookupFailed) as info:
            yield plugin.route(rcpt("x@example.net"), None)
        self.assertIn(f"route_query on {self.backend}", str(info.exception))
        self.assertIn("doomed", str(info.exception))


class SQLiteLookups(_DirectLookups, unittest.TestCase):
    backend = "sqlite"


class PostgreSQLLookups(_DirectLookups, unittest.TestCase):
    backend = "postgresql"

    @defer.inlineCallbacks
    def test_a_libpq_key_value_string_names_the_database_too(self):
        port = self.urls["postgresql"].rsplit(":", 1)[1].split("/")[0]
        plugin = build({"database": f"dbname=mail host=127.0.0.1 port={port} user=postgres "
                                    "password=not-shown application_name=relaymail",
                        "alias_query": QUERIES["alias_query"]})
        members = yield plugin.expand("staff@example.com", None)
        self.assertEqual(members, ["alice@example.com", "bob@example.com"])
        # The password never reaches a log line.
        self.assertEqual(plugin._database.description,
                         f"postgresql host=127.0.0.1 port={port} dbname=mail user=postgres "
                         "application_name=relaymail")
