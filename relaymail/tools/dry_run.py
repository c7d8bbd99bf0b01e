"""relaymail-check's dry runs: what the relay would answer, and why.

::

    relaymail-check --config FILE connect [--client IP]
    relaymail-check --config FILE helo NAME [--client IP]
    relaymail-check --config FILE mail ADDRESS [--param KEY=VALUE]... [--client IP] [--helo NAME]
    relaymail-check --config FILE rcpt ADDRESS [--sender ADDRESS] [--client IP] [--auth USER]
    relaymail-check --config FILE expn ADDRESS [--client IP] [--auth USER]
    relaymail-check --config FILE route ADDRESS

Every command also takes ``--auth USER`` (the session is logged in as
USER), ``--helo NAME`` (default ``localhost``), ``--sender ADDRESS``
(default the null sender ``<>``) and ``--json``.  As Postfix's ``sendmail
-bv`` and Exim's ``-bt``: nothing is sent and the tool opens no connection
to a next hop (a plugin may: a callout is the plugin's business).  The
session's context says ``dry_run``, so the ratelimit plugin answers as it
would without counting the dry run's MAIL or RCPT.

The configuration and the plugins are loaded as a start loads them
(``build_hooks``), and the answer comes from the server's own session
state machine (:class:`relaymail.smtp.dialogue.Dialogue`) and
:class:`relaymail.policy.recipients.Policy`, with ``[plugins] timeout``
and the plugin threads, under a running reactor: the reply printed is the
one a client would read.  Only the plugins of the hook asked about run;
the commands before it (EHLO, MAIL for ``rcpt``) are answered without
their plugins.  The client's ``trusted`` is decided as the server decides
it, from ``[server] trusted_networks``.

Output, one fact a line, in this order (stable: scripts may parse it)::

    client: 127.0.0.1 trusted=yes authenticated=no
    helo: localhost
    sender: <>
    rcpt: <bob@example.com>
    plugin sleepy: no opinion
    plugin domains: reject 550 5.1.1 Recipient address rejected
    plugin later: not asked
    decided by: domains
    reply: 550 5.1.1 Recipient address rejected
    route: smtp [10.0.0.5]:25 (smarthost)

``plugin NAME:`` lines come once per question asked, in the order asked;
an answer is ``accept``, ``accept TEXT``, ``no opinion``, ``reject CODE
ENHANCED TEXT``, ``defer CODE ENHANCED TEXT``, ``failed: TYPE: MESSAGE``,
``no answer within N s``, ``answered VALUE (not an answer this hook
takes)``, or for an expander ``members A, B`` and ``not a list``; a plugin
of the hook the server did not get to is ``not asked``.  ``decided by:``
names the plugin whose answer the server used, ``relay rule (...)`` at
RCPT when none had an opinion, ``none`` elsewhere.  ``reply:`` lines are
the server's reply as sent, one line each (a multi-line EXPN reply gives
several).  ``expands to:`` lines (``rcpt``, ``expn``) list the recipients
the queue would deliver to after expanding lists in lists, and a
``route:`` line per recipient follows an accepted ``rcpt`` and ``route``:
``route: TRANSPORT NEXT_HOP (WHY)``, preceded by a ``router NAME:`` line
per ``[plugins] routers`` plugin asked.  A command that cannot reach the
step asked about says ``stopped at: COMMAND`` with its reply.

Exit status: 0 when the final reply is 2xx (or the route was found), 1 for
a 5xx, 2 for a 4xx (try again later: a plugin failed, timed out or
deferred), 64 for a usage error, 78 for a configuration error (sysexits.h
EX_USAGE and EX_CONFIG).
"""

import argparse
import ipaddress
import json

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relaymail import address
from relaymail.client_address import in_networks
from relaymail.interfaces import Decision, Route
from relaymail.policy.loader import Hooks
from relaymail.policy.recipients import ExpansionError, Policy, answer_fits, plugin_label
from relaymail.smtp.dialogue import Dialogue, SessionContext

EX_USAGE = 64
EX_CONFIG = 78

#: Each dry-run command and the [plugins] hook whose plugins it runs.
COMMAND_HOOKS = {
    "connect": "connect",
    "helo": "helo",
    "mail": "senders",
    "rcpt": "recipients",
    "expn": "expanders",
    "route": "routers",
}

#: The hooks the dry run's Policy asks (routers are asked directly).
_POLICY_HOOKS = ("connect", "helo", "senders", "recipients", "expanders")


class UsageError(Exception):
    """A bad argument to a dry-run command."""


def add_arguments(commands):
    """Add the dry-run commands to relaymail-check's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--client", default="127.0.0.1", metavar="IP",
                        help="the client's address (default 127.0.0.1)")
    common.add_argument("--auth", default=None, metavar="USER",
                        help="the session is logged in as USER")
    common.add_argument("--helo", default="localhost", metavar="NAME",
                        help="the EHLO name (default localhost)")
    common.add_argument("--sender", default="", metavar="ADDRESS",
                        help="the envelope sender (default the null sender <>)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    helps = {
        "connect": "what the connect plugins answer the --client",
        "helo": "what the helo plugins answer to EHLO NAME",
        "mail": "what the sender plugins answer to MAIL FROM:<ADDRESS>",
        "rcpt": "what the recipient plugins and the relay rule answer, and the route",
        "expn": "what EXPN answers, and the expansion the queue would make",
        "route": "where mail for ADDRESS would go",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, parents=[common], help=text)
        if name != "connect":
            command.add_argument("argument", metavar="NAME" if name == "helo" else "ADDRESS")
        if name == "mail":
            command.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                                 help="a MAIL parameter (SIZE=1000, BODY=8BITMIME, SMTPUTF8)")


def run(settings, hooks, args, out):
    """Run the dry-run command ``args.command`` under a reactor.

    :return: the exit status.
    """
    outcome = []

    def main(reactor):
        d = defer.ensureDeferred(_dry_run(settings, hooks, args, reactor))
        # Kept, not raised: react() would print a traceback for a mere
        # usage error and exit 1, the status of a 5xx.
        return d.addBoth(outcome.append)
    try:
        task.react(main)
    except SystemExit as exit:
        if exit.code:
            raise
    report = outcome[0]
    if isinstance(report, Failure):
        report.raiseException()
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        for key, value in report["lines"]:
            out.write(f"{key}: {value}\n")
    return report["status"]


def check_client(ip):
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise UsageError(f"--client {ip!r} is not an IP address") from None


class _Report:
    def __init__(self):
        self.lines = []
        self.status = 0

    def add(self, key, value):
        self.lines.append((key, value))

    def reply(self, reply, enhanced):
        for line in reply.encode(enhanced).decode("utf-8", "replace").splitlines():
            self.add("reply", line)
        if reply.code >= 500:
            self.status = 1
        elif reply.code >= 400:
            self.status = 2
        else:
            self.status = 0

    def as_dict(self):
        return {"lines": self.lines, "status": self.status}


async def _dry_run(settings, hooks, args, reactor):
    report = _Report()
    command = args.command
    hook = COMMAND_HOOKS[command]
    answers = []
    watched = {key: [] for key in _POLICY_HOOKS}
    if hook in watched:
        watched[hook] = [_Watched(plugin, answers) for plugin in hooks[hook]]
    watched = Hooks(watched, filters=[])
    # A plugin given cache_ttl keeps its cache, as at a start (empty: a
    # dry run is a fresh process).
    watched.caches = {id(w): hooks.caches[id(w.plugin)] for w in watched.get(hook, ())
                      if id(w.plugin) in hooks.caches}
    policy = Policy.from_hooks(watched, settings, reactor=reactor)
    context = SessionContext(args.client, None,
                             trusted=in_networks(args.client, settings.server.trusted_networks))
    context.authenticated_user = args.auth
    context.dry_run = True
    report.add("client", f"{args.client} trusted={'yes' if context.trusted else 'no'} "
                          f"authenticated={args.auth or 'no'}")
    dialogue = Dialogue(settings, policy, _NothingQueued(), context)
    if command == "route":
        await _route(settings, hooks, args.argument, report, reactor)
        return report.as_dict()
    if command == "connect":
        reply = await defer.maybeDeferred(dialogue.connected)
        _explain(report, hook, answers, hooks[hook], "none")
        report.reply(reply, False)
        return report.as_dict()
    # (what the report calls the step, its value, the command line)
    steps = [("helo", args.helo, f"EHLO {args.helo}")]
    if command == "helo":
        steps = [("helo", args.argument, f"EHLO {args.argument}")]
    elif command == "mail":
        params = "".join(f" {param}" for param in args.param)
        steps.append(("mail", _path(args.argument) + params,
                      f"MAIL FROM:{_path(args.argument)}{params}"))
    elif command == "rcpt":
        steps += [("sender", _path(args.sender), f"MAIL FROM:{_path(args.sender)}"),
                  ("rcpt", _path(args.argument), f"RCPT TO:{_path(args.argument)}")]
    else:
        steps.append(("expn", args.argument, f"EXPN {args.argument}"))
    for index, (key, value, line) in enumerate(steps):
        report.add(key, value)
        reply = await defer.maybeDeferred(dialogue.handle, line.encode("utf-8"))
        if index < len(steps) - 1 and reply.code >= 400:
            report.add("stopped at", line.partition(" ")[0])
            report.reply(reply, dialogue.enhanced_codes)
            return report.as_dict()
    rule = _relay_rule(context) if command == "rcpt" else "none"
    _explain(report, hook, answers, hooks[hook], rule)
    report.reply(reply, dialogue.enhanced_codes)
    if reply.code >= 400 or command not in ("rcpt", "expn"):
        return report.as_dict()
    subject = (str(dialogue.transaction.recipients[-1]) if command == "rcpt"
               else args.argument)
    full = Policy.from_hooks(hooks, settings, reactor=reactor)
    try:
        members = await full.expand_recipients([subject], context)
    except ExpansionError as error:
        # The queue would refuse the message at the final dot (451).
        report.add("expands to", f"failed: {error}")
        report.status = 2
        return report.as_dict()
    for member in members:
        report.add("expands to", member)
    if command == "rcpt":
        for member in members:
            status = report.status
            await _route(settings, hooks, member, report, reactor)
            report.status = max(status, report.status)
    return report.as_dict()


def _path(argument):
    """``<address>`` for MAIL and RCPT, whether or not the user wrote the brackets."""
    if argument.startswith("<") and argument.endswith(">"):
        return argument
    return f"<{argument}>"


def _relay_rule(context):
    if context.trusted:
        return "relay rule (trusted network: may relay)"
    if context.authenticated_user:
        return "relay rule (authenticated: may relay)"
    return "relay rule (neither trusted nor authenticated: 554 5.7.1)"


def _explain(report, hook, answers, plugins, nobody):
    """``plugin NAME:`` lines in the order asked, then ``not asked`` for
    the rest, and ``decided by:``."""
    asked = set()
    decider = None
    for answer in answers:
        asked.add(id(answer.plugin))
        report.add(f"plugin {answer.name}", answer.describe())
        if decider is None and answer.decisive:
            decider = answer.name
    for plugin in plugins:
        if id(plugin) not in asked:
            report.add(f"plugin {plugin_label(plugin)}", "not asked")
    if hook != "expanders":
        report.add("decided by", decider or nobody)


async def _route(settings, hooks, recipient_text, report, reactor):
    """``router NAME:`` for each router plugin asked, then ``route:``."""
    try:
        recipient = address.parse_forward_path(_path(recipient_text), smtputf8=True)
    except address.AddressError as error:
        raise UsageError(f"{recipient_text!r} is not an address: {error}") from None
    # At delivery a router sees the relay itself as client (IRouter.route).
    context = SessionContext("127.0.0.1", None, trusted=True)
    for plugin in hooks.get("routers", ()):
        try:
            route = await defer.maybeDeferred(plugin.route, recipient, context)
        except Exception as exc:
            report.add(f"router {plugin_label(plugin)}", f"failed: {type(exc).__name__}: {exc}")
            report.status = 2
            return
        if route is None:
            report.add(f"router {plugin_label(plugin)}", "no opinion")
            continue
        if not isinstance(route, Route):
            report.add(f"router {plugin_label(plugin)}", f"answered {route!r} (not a Route)")
            report.status = 2
            return
        hop = route.next_hop if route.next_hop is not None else "(the transport's default)"
        report.add(f"router {plugin_label(plugin)}", f"{route.transport} {hop}")
        report.add("route", f"{route.transport} {hop} (router {plugin_label(plugin)})")
        return
    from relaymail.delivery.routing import Router, route_key
    # The resolver is never asked: only destination() runs, which reads
    # the configuration.
    destination = Router(settings, resolver=_NoResolver()).destination(recipient.domain_key)
    if destination.kind == "mx":
        report.add("route", f"smtp MX of {destination.host}, port {destination.port}"
                   if destination.mx_lookup else
                   f"smtp {destination.host}:{destination.port} (address literal)")
    elif destination.kind == "smarthost":
        report.add("route", f"smtp {destination.label} (smarthost)")
    else:
        key = route_key(settings.routes, recipient.domain_key)
        report.add("route", f"smtp {destination.label} ([routes] {key})")


class _NoResolver:
    """Stands for the DNS resolver a Router is built with; the dry run
    asks only for destinations, so nothing is looked up."""


class _NothingQueued:
    """The queue a dry run's session has: room always, and no message is
    ever started (the dry run stops before DATA)."""

    def has_room(self, size):
        return True

    def new_message(self):
        raise AssertionError("a dry run queues nothing")


class _Answer:
    """One question a plugin was asked, and what it answered."""

    def __init__(self, plugin, name, method, subject):
        self.plugin = plugin
        self.name = name
        self.method = method
        self.subject = subject
        self.pending = True
        self.value = None
        self.error = None

    @property
    def decisive(self):
        if self.pending or self.error is not None:
            return True
        if self.method == "expand":
            return self.value is not None
        return not (isinstance(self.value, Decision) and not self.value.is_final)

    def describe(self):
        prefix = f"{self.subject}: " if self.method == "expand" else ""
        if self.pending:
            return f"{prefix}no answer within the [plugins] timeout"
        if self.error is not None:
            if isinstance(self.error, defer.CancelledError):
                return f"{prefix}no answer within the [plugins] timeout"
            return f"{prefix}failed: {type(self.error).__name__}: {self.error}"
        value = self.value
        if self.method == "expand":
            if value is None:
                return f"{prefix}not a list"
            if answer_fits("expand", value):
                return f"{prefix}members {', '.join(value)}" if value else f"{prefix}no members"
            return f"{prefix}answered {value!r} (not an answer this hook takes)"
        if not answer_fits(self.method, value):
            return f"answered {value!r} (not an answer this hook takes)"
        if value.kind == Decision.NO_OPINION_KIND:
            return "no opinion"
        if value.kind == Decision.ACCEPT_KIND:
            return "accept" if value.text is None else f"accept {value.text}"
        return f"{value.kind} {value.code} {value.enhanced} {value.text}"


class _Watched:
    """A plugin as the dry run's Policy sees it: the same plugin, every
    question and answer noted on the way through.  ``blocking`` and
    ``name`` are the plugin's, so the Policy runs it exactly as the
    server's would (in the plugin threads when it blocks)."""

    def __init__(self, plugin, answers):
        self.plugin = plugin
        self.name = plugin_label(plugin)
        self.blocking = getattr(plugin, "blocking", False) is True
        self._answers = answers

    def _ask(self, method, subject, *args):
        answer = _Answer(self.plugin, self.name, method, subject)
        self._answers.append(answer)
        try:
            result = getattr(self.plugin, method)(*args)
        except Exception as exc:
            answer.pending, answer.error = False, exc
            raise
        if not isinstance(result, Deferred):
            answer.pending, answer.value = False, result
            return result

        def answered(value):
            answer.pending, answer.value = False, value
            return value

        def failed(failure):
            answer.pending, answer.error = False, failure.value
            return failure
        return result.addCallbacks(answered, failed)

    def check_connection(self, context):
        return self._ask("check_connection", context.client_ip, context)

    def check_helo(self, helo, context):
        return self._ask("check_helo", helo, helo, context)

    def check_sender(self, sender, parameters, context):
        return self._ask("check_sender", sender, sender, parameters, context)

    def check_recipient(self, recipient, context):
        return self._ask("check_recipient", recipient, recipient, context)

    def verify(self, address, context):
        return self._ask("verify", address, address, context)

    def expand(self, address, context):
        return self._ask("expand", address, address, context)
