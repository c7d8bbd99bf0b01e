"""The Policy (plugins in order, timeouts, the relay rule, list expansion)
and the plugin loader (built-in and site plugins by name)."""

import sys
import textwrap
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

from relaymail.config import ConfigError
from relaymail.interfaces import Decision, IListExpander, IRecipientValidator
from relaymail.plugins.domains import RelayDomains
from relaymail.policy.loader import SITE_PACKAGE, build_plugins, find_plugins
from relaymail.policy.recipients import (
    MAX_EXPANSION_DEPTH, ExpansionError, Policy)
from relaymail.address import Mailbox

TIMEOUT = 5.0
RELAY_DENIED = Decision(Decision.REJECT_KIND, 554, "5.7.1", "Relay access denied")
PLUGIN_FAILED = Decision(Decision.DEFER_KIND, 451, "4.3.0",
                         "Temporary failure checking recipient, try again later")


def make_settings(recipients=("domains",), expanders=(), path=(), options=None,
                  domains=("example.com",), timeout=TIMEOUT):
    """A stand-in for relaymail.config.Settings with what plugins read."""
    return SimpleNamespace(
        source="test.ini",
        relay=SimpleNamespace(domains=list(domains)),
        server=SimpleNamespace(trusted_networks=[]),
        plugins=SimpleNamespace(connect=[], helo=[], senders=[], recipients=list(recipients),
                                expanders=list(expanders), filters=[], routers=[],
                                transports=[], path=list(path), timeout=timeout, threads=4),
        plugin_options=dict(options or {}))


def make_context(trusted=False, authenticated_user=None):
    return SimpleNamespace(client_ip="192.0.2.1", client_port=4000, helo="client.example",
                           sender=None, trusted=trusted,
                           authenticated_user=authenticated_user)


@implementer(IRecipientValidator)
class Scripted:
    """Answers every question with ``answer`` (a value, a Deferred, or an
    exception to raise) and records what it was asked."""

    def __init__(self, answer, name=None):
        self.answer = answer
        self.asked = []
        if name is not None:
            self.name = name

    def _reply(self, question):
        self.asked.append(question)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def check_recipient(self, recipient, context):
        return self._reply(str(recipient))

    def verify(self, address, context):
        return self._reply(address)


@implementer(IListExpander)
class Lists:
    """An expander over a dict of list address -> members."""

    def __init__(self, lists):
        self.lists = lists
        self.asked = []

    def expand(self, address, context):
        self.asked.append(address)
        return self.lists.get(address)


@implementer(IListExpander)
class Broken:
    def expand(self, address, context):
        raise RuntimeError("the list server is down")


class PolicyTestCase(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()

    def policy(self, validators=(), expanders=(), timeout=TIMEOUT):
        return Policy(list(validators), list(expanders),
                      make_settings(timeout=timeout), clock=self.clock)


class CheckRecipientTests(PolicyTestCase):

    def check(self, policy, recipient=Mailbox("user", "example.net"), context=None):
        d = policy.check_recipient(recipient, context or make_context())
        return self.successResultOf(d)

    def test_first_decision_that_is_not_no_opinion_wins(self):
        first = Scripted(Decision.NO_OPINION)
        second = Scripted(Decision.reject(550, "5.1.1", "No such user"))
        third = Scripted(Decision.accept())
        decision = self.check(self.policy([first, second, third]))
        self.assertEqual(decision, Decision(Decision.REJECT_KIND, 550, "5.1.1", "No such user"))
        self.assertEqual(first.asked, ["user@example.net"])
        self.assertEqual(second.asked, ["user@example.net"])
        self.assertEqual(third.asked, [])

    def test_plugin_accept_wins_for_untrusted_client(self):
        decision = self.check(self.policy([Scripted(Decision.accept())]))
        self.assertEqual(decision, Decision(Decision.ACCEPT_KIND, 250, "2.1.5", None))

    def test_plugin_defer_is_passed_through(self):
        decision = self.check(self.policy([Scripted(Decision.defer("Mailbox busy"))]))
        self.assertEqual(decision, Decision(Decision.DEFER_KIND, 450, "4.2.0", "Mailbox busy"))

    def test_answer_given_as_deferred(self):
        decision = self.check(self.policy([Scripted(defer.succeed(Decision.accept()))]))
        self.assertEqual(decision, Decision.ACCEPT)

    def test_no_opinion_from_all_is_554_relay_denied_for_untrusted(self):
        decision = self.check(self.policy([Scripted(Decision.NO_OPINION)]))
        self.assertEqual(decision, RELAY_DENIED)

    def test_no_plugins_is_554_relay_denied_for_untrusted(self):
        self.assertEqual(self.check(self.policy()), RELAY_DENIED)

    def test_no_opinion_from_all_is_accepted_for_trusted(self):
        decision = self.check(self.policy([Scripted(Decision.NO_OPINION)]),
                              context=make_context(trusted=True))
        self.assertEqual(decision, Decision.accept())

    def test_no_opinion_from_all_is_accepted_for_authenticated(self):
        decision = self.check(self.policy([Scripted(Decision.NO_OPINION)]),
                              context=make_context(authenticated_user="alice"))
        self.assertEqual(decision, Decision.accept())

    def test_plugin_rejection_holds_for_trusted_client(self):
        rejection = Decision.reject(550, "5.1.1", "No such user")
        decision = self.check(self.policy([Scripted(rejection)]),
                              context=make_context(trusted=True))
        self.assertEqual(decision, rejection)

    def test_domains_plugin_accepts_relay_domain(self):
        policy = self.policy([RelayDomains(["example.com"])])
        self.assertEqual(self.check(policy, Mailbox("user", "Example.COM")), Decision.accept())
        self.assertEqual(self.check(policy, Mailbox("user", "example.org")), RELAY_DENIED)

    def test_routing_characters_refused_from_untrusted_before_plugins(self):
        plugin = Scripted(Decision.accept())
        policy = self.policy([plugin])
        for local_part in ('"user@elsewhere.example"', "user%elsewhere.example",
                           "host!user"):
            decision = self.check(policy, Mailbox(local_part, "example.com"))
            self.assertEqual(decision, RELAY_DENIED, local_part)
        self.assertEqual(plugin.asked, [])

    def test_routing_characters_allowed_from_trusted_and_authenticated(self):
        plugin = Scripted(Decision.NO_OPINION)
        policy = self.policy([plugin])
        recipient = Mailbox("user%elsewhere.example", "example.com")
        for context in (make_context(trusted=True), make_context(authenticated_user="bob")):
            self.assertEqual(self.check(policy, recipient, context), Decision.accept())
        self.assertEqual(len(plugin.asked), 2)

    def test_raising_plugin_is_451_and_later_plugins_not_asked(self):
        later = Scripted(Decision.accept())
        decision = self.check(self.policy([Scripted(KeyError("boom")), later]))
        self.assertEqual(decision, PLUGIN_FAILED)
        self.assertEqual(later.asked, [])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_failed_deferred_is_451(self):
        answer = defer.fail(ValueError("lookup failed"))
        decision = self.check(self.policy([Scripted(answer)]))
        self.assertEqual(decision, PLUGIN_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_answer_that_is_not_a_decision_is_451(self):
        for answer in (True, None, "OK", Decision.ACCEPT_KIND):
            decision = self.check(self.policy([Scripted(answer)]))
            self.assertEqual(decision, PLUGIN_FAILED, repr(answer))

    def test_plugin_without_the_method_is_451(self):
        decision = self.check(self.policy([object()]))
        self.assertEqual(decision, PLUGIN_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_slow_plugin_times_out_with_451(self):
        never = defer.Deferred()
        later = Scripted(Decision.accept())
        d = self.policy([Scripted(never), later]).check_recipient(
            Mailbox("user", "example.com"), make_context())
        self.clock.advance(TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), PLUGIN_FAILED)
        self.assertEqual(later.asked, [])
        # A late answer after the timeout is ignored, not an error.
        never.callback(Decision.accept())

    def test_plugin_answering_within_timeout_is_heard(self):
        answer = defer.Deferred()
        d = self.policy([Scripted(answer)]).check_recipient(
            Mailbox("user", "example.com"), make_context())
        self.clock.advance(TIMEOUT - 1)
        answer.callback(Decision.reject(550, "5.1.1", "No"))
        self.assertEqual(self.successResultOf(d), Decision.reject(550, "5.1.1", "No"))
        self.clock.advance(10)  # The timeout call is gone; nothing fires twice.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_applies_to_each_plugin_separately(self):
        first, second = defer.Deferred(), defer.Deferred()
        d = self.policy([Scripted(first), Scripted(second)]).check_recipient(
            Mailbox("user", "example.com"), make_context(trusted=True))
        self.clock.advance(TIMEOUT - 1)
        first.callback(Decision.NO_OPINION)
        self.clock.advance(TIMEOUT - 1)
        second.callback(Decision.NO_OPINION)
        self.assertEqual(self.successResultOf(d), Decision.accept())


class VerifyTests(PolicyTestCase):

    def verify(self, policy, address="alice@example.com"):
        return self.successResultOf(policy.verify(address, make_context()))

    def test_first_decision_that_is_not_no_opinion_wins(self):
        third = Scripted(Decision.reject())
        decision = self.verify(self.policy([Scripted(Decision.NO_OPINION),
                                            Scripted(Decision.accept("alice@example.com")),
                                            third]))
        self.assertEqual(decision, Decision(Decision.ACCEPT_KIND, 250, "2.1.5",
                                            "alice@example.com"))
        self.assertEqual(third.asked, [])

    def test_no_opinion_from_all_stays_no_opinion(self):
        # The server answers 252; the relay rule has no part in VRFY.
        decision = self.verify(self.policy([Scripted(Decision.NO_OPINION)]))
        self.assertIs(decision, Decision.NO_OPINION)

    def test_bare_name_is_passed_as_given(self):
        plugin = Scripted(Decision.NO_OPINION)
        self.verify(self.policy([plugin]), "postmaster")
        self.assertEqual(plugin.asked, ["postmaster"])

    def test_raising_plugin_is_451(self):
        decision = self.verify(self.policy([Scripted(OSError("db gone"))]))
        self.assertEqual(decision, PLUGIN_FAILED)
        self.flushLoggedErrors(OSError)

    def test_timeout_is_451(self):
        d = self.policy([Scripted(defer.Deferred())]).verify("alice", make_context())
        self.clock.advance(TIMEOUT)
        self.assertEqual(self.successResultOf(d), PLUGIN_FAILED)


class ExpandTests(PolicyTestCase):

    def expand(self, policy, address):
        return self.successResultOf(policy.expand(address, make_context()))

    def test_first_expander_with_a_list_wins(self):
        first = Lists({})
        second = Lists({"staff@example.com": ["alice@example.com", "bob@example.org"]})
        third = Lists({"staff@example.com": ["nobody@example.com"]})
        members = self.expand(self.policy(expanders=[first, second, third]), "staff@example.com")
        self.assertEqual(members, ["alice@example.com", "bob@example.org"])
        self.assertEqual(third.asked, [])

    def test_unknown_list_is_none(self):
        self.assertIsNone(self.expand(self.policy(expanders=[Lists({})]), "staff"))

    def test_no_expanders_is_none(self):
        self.assertIsNone(self.expand(self.policy(), "staff"))

    def test_bare_members_take_the_list_domain(self):
        policy = self.policy(expanders=[Lists({"staff@example.com": ["alice", "bob@example.org"],
                                               "staff": ["carol"]})])
        self.assertEqual(self.expand(policy, "staff@example.com"),
                         ["alice@example.com", "bob@example.org"])
        self.assertEqual(self.expand(policy, "staff"), ["carol"])

    def test_failing_expander_is_the_failed_sentinel(self):
        self.assertIs(self.expand(self.policy(expanders=[Broken()]), "staff"), Policy.FAILED)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_answer_that_is_not_a_list_is_the_failed_sentinel(self):
        for answer in ("alice@example.com", [1, 2], Decision.ACCEPT):
            policy = self.policy(expanders=[Lists({"staff": answer})])
            self.assertIs(self.expand(policy, "staff"), Policy.FAILED, repr(answer))

    def test_member_with_a_control_character_is_the_failed_sentinel(self):
        for member in ("a@example.com>\r\n250 2.1.5 Ok", "a\u2028b@example.com",
                       "a\x85@example.com", "\x1b[2J@example.com"):
            policy = self.policy(expanders=[Lists({"staff": ["ok@example.com", member]})])
            self.assertIs(self.expand(policy, "staff"), Policy.FAILED, repr(member))

    def test_timeout_is_the_failed_sentinel(self):
        policy = self.policy(expanders=[Lists({"staff": defer.Deferred()})])
        d = policy.expand("staff", make_context())
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT)
        self.assertIs(self.successResultOf(d), Policy.FAILED)


class ExpandRecipientsTests(PolicyTestCase):

    def expand(self, lists, recipients):
        policy = self.policy(expanders=[Lists(lists)])
        return self.successResultOf(policy.expand_recipients(recipients, make_context()))

    def test_addresses_that_are_not_lists_stay(self):
        self.assertEqual(self.expand({}, ["a@example.com", "b@example.org"]),
                         ["a@example.com", "b@example.org"])

    def test_without_expanders_each_address_stays_once_in_order(self):
        # The walk is skipped when no plugin expands lists; what it would
        # have kept must still be what is queued.
        policy = self.policy(expanders=[])
        recipients = ["b@example.org", "a@example.com", "b@EXAMPLE.org", "A@example.com",
                      "a@Example.COM", "postmaster"]
        self.assertEqual(
            self.successResultOf(policy.expand_recipients(recipients, make_context())),
            ["b@example.org", "a@example.com", "A@example.com", "postmaster"])
        self.assertEqual(self.expand({}, recipients),
                         ["b@example.org", "a@example.com", "A@example.com", "postmaster"])

    def test_list_is_replaced_by_members_in_order(self):
        lists = {"staff@example.com": ["alice@example.com", "bob@example.com"]}
        self.assertEqual(
            self.expand(lists, ["first@example.net", "staff@example.com", "last@example.net"]),
            ["first@example.net", "alice@example.com", "bob@example.com", "last@example.net"])

    def test_nested_lists_are_expanded(self):
        lists = {"all@example.com": ["staff@example.com", "board@example.com"],
                 "staff@example.com": ["alice@example.com"],
                 "board@example.com": ["bob@example.com", "carol@example.com"]}
        self.assertEqual(self.expand(lists, ["all@example.com"]),
                         ["alice@example.com", "bob@example.com", "carol@example.com"])

    def test_duplicates_removed_domain_without_case_local_part_exactly(self):
        lists = {"staff@example.com": ["alice@EXAMPLE.com", "Alice@example.com"]}
        self.assertEqual(
            self.expand(lists, ["alice@example.com", "staff@example.com", "alice@Example.COM"]),
            ["alice@example.com", "Alice@example.com"])

    def test_loop_stops_and_keeps_the_looping_list_as_an_address(self):
        lists = {"a@example.com": ["alice@example.com", "b@example.com"],
                 "b@example.com": ["bob@example.com", "a@example.com"]}
        self.assertEqual(self.expand(lists, ["a@example.com"]),
                         ["alice@example.com", "bob@example.com", "a@example.com"])

    def test_list_naming_itself_delivers_to_itself(self):
        lists = {"root@example.com": ["root@example.com", "admin@example.org"]}
        self.assertEqual(self.expand(lists, ["root@example.com"]),
                         ["root@example.com", "admin@example.org"])

    def test_list_reached_twice_is_expanded_once(self):
        shared = Lists({"one@example.com": ["shared@example.com"],
                        "two@example.com": ["shared@example.com"],
                        "shared@example.com": ["alice@example.com"]})
        policy = self.policy(expanders=[shared])
        result = self.successResultOf(policy.expand_recipients(
            ["one@example.com", "two@example.com"], make_context()))
        self.assertEqual(result, ["alice@example.com"])
        self.assertEqual(shared.asked.count("shared@example.com"), 1)

    def test_depth_limit_keeps_deeper_members_unexpanded(self):
        # l0 -> l1 -> ... -> l11: only MAX_EXPANSION_DEPTH levels expand.
        lists = {f"l{n}@example.com": [f"l{n + 1}@example.com"] for n in range(12)}
        self.assertEqual(self.expand(lists, ["l0@example.com"]),
                         [f"l{MAX_EXPANSION_DEPTH}@example.com"])

    def test_bare_members_take_the_list_domain(self):
        lists = {"staff@example.com": ["alice", "bob@example.org"]}
        self.assertEqual(self.expand(lists, ["staff@example.com"]),
                         ["alice@example.com", "bob@example.org"])

    def test_expander_failure_fails_the_deferred(self):
        policy = self.policy(expanders=[Broken()])
        failure = self.failureResultOf(
            policy.expand_recipients(["staff@example.com"], make_context()), ExpansionError)
        self.assertEqual(failure.value.address, "staff@example.com")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_expander_timeout_fails_the_deferred(self):
        policy = self.policy(expanders=[Lists({"staff@example.com": defer.Deferred()})])
        d = policy.expand_recipients(["staff@example.com"], make_context())
        self.clock.advance(TIMEOUT)
        self.failureResultOf(d, ExpansionError)


# -- the loader ------------------------------------------------------------

GOOD_SITE_PLUGIN = '''\
from zope.interface import implementer, provider
from twisted.plugin import IPlugin
from relaymail.interfaces import IPluginFactory, IRecipientValidator, Decision


@implementer(IRecipientValidator)
class NoInterns:
    name = "no_interns"

    def __init__(self, prefix):
        self.prefix = prefix

    def check_recipient(self, recipient, context):
        if recipient.local_text.startswith(self.prefix):
            return Decision.reject(550, "5.1.1", "Interns cannot receive mail")
        return Decision.NO_OPINION

    def verify(self, address, context):
        return Decision.NO_OPINION


@provider(IPlugin, IPluginFactory)
class no_interns:
    name = "no_interns"

    @staticmethod
    def build(context):
        unknown = set(context.options) - {"prefix"}
        if unknown:
            raise context.config_error(unknown.pop(), "unknown option")
        return NoInterns(context.options.get("prefix", "intern."))
'''


def write_plugin(directory, filename, text):
    path = directory / filename
    path.write_text(textwrap.dedent(text))
    return path


def test_builtin_plugins_are_found():
    assert {"domains", "static", "aliases"} <= set(find_plugins(make_settings()))


def test_default_configuration_builds_the_domains_plugin():
    validators, expanders = build_plugins(make_settings())
    assert [type(v) for v in validators] == [RelayDomains]
    assert expanders == []


def test_unknown_recipient_plugin_names_the_known_ones():
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(recipients=["domains", "ldap"]))
    assert str(info.value) == (
        "test.ini: [plugins] recipients: no plugin named 'ldap' "
        "(known: aliases, callout, dkim, domains, pipe, ratelimit, sql, static)")


def test_unknown_expander_plugin_is_blamed_on_expanders():
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(expanders=["lists"]))
    assert (info.value.section, info.value.key) == ("plugins", "expanders")
    assert "no plugin named 'lists'" in info.value.problem


def test_plugin_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="listed more than once"):
        build_plugins(make_settings(recipients=["domains", "domains"]))


def test_plugin_without_the_interface_is_refused():
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(expanders=["domains"]))
    assert info.value.key == "expanders"
    assert "does not provide IListExpander" in info.value.problem


def test_plugin_in_both_lists_is_built_once(tmp_path):
    aliases_file = write_plugin(tmp_path, "aliases", "staff: alice@example.com\n")
    settings = make_settings(recipients=["aliases", "domains"], expanders=["aliases"],
                             options={"aliases": {"file": str(aliases_file)}})
    validators, expanders = build_plugins(settings)
    assert validators[0] is expanders[0]


def test_bad_plugin_option_names_the_plugin_section():
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(options={"domains": {"colour": "blue"}}))
    assert (info.value.source, info.value.section, info.value.key) == (
        "test.ini", "plugin:domains", "colour")


def test_site_plugin_found_built_with_options_and_run(tmp_path):
    write_plugin(tmp_path, "no_interns.py", GOOD_SITE_PLUGIN)
    settings = make_settings(recipients=["no_interns", "domains"], path=[str(tmp_path)],
                             options={"no_interns": {"prefix": "trainee."}})
    validators, _ = build_plugins(settings)
    assert [v.name for v in validators] == ["no_interns", "domains"]
    assert type(validators[0]).__module__ == f"{SITE_PACKAGE}.no_interns"

    policy = Policy(validators, [], settings, clock=task.Clock())
    context = make_context()
    refused = []
    policy.check_recipient(Mailbox("trainee.joe", "example.com"), context).addCallback(
        refused.append)
    accepted = []
    policy.check_recipient(Mailbox("joe", "example.com"), context).addCallback(accepted.append)
    assert refused == [Decision.reject(550, "5.1.1", "Interns cannot receive mail")]
    assert accepted == [Decision.accept()]


def test_site_plugin_config_error_names_its_section(tmp_path):
    write_plugin(tmp_path, "no_interns.py", GOOD_SITE_PLUGIN)
    settings = make_settings(recipients=["no_interns"], path=[str(tmp_path)],
                             options={"no_interns": {"colour": "blue"}})
    with pytest.raises(ConfigError) as info:
        build_plugins(settings)
    assert str(info.value) == "test.ini: [plugin:no_interns] colour: unknown option"


def test_site_plugin_appears_among_known_names(tmp_path):
    write_plugin(tmp_path, "no_interns.py", GOOD_SITE_PLUGIN)
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(recipients=["nope"], path=[str(tmp_path)]))
    assert info.value.problem == (
        "no plugin named 'nope' (known: aliases, callout, dkim, domains, no_interns, pipe, ratelimit, sql, static)")


def test_site_plugin_with_syntax_error_is_a_config_error(tmp_path):
    path = write_plugin(tmp_path, "broken.py", "def check(:\n    pass\n")
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(path=[str(tmp_path)]))
    assert (info.value.section, info.value.key) == ("plugins", "path")
    assert str(path) in info.value.problem
    assert "SyntaxError" in info.value.problem


def test_site_plugin_failing_on_import_is_a_config_error(tmp_path):
    path = write_plugin(tmp_path, "needs_ldap.py", "import no_such_module_for_relaymail\n")
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(path=[str(tmp_path)]))
    assert str(path) in info.value.problem
    assert "ModuleNotFoundError" in info.value.problem


def test_site_plugin_with_a_builtin_name_is_refused(tmp_path):
    path = write_plugin(tmp_path, "my_domains.py",
                        GOOD_SITE_PLUGIN.replace('name = "no_interns"', 'name = "domains"'))
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(path=[str(tmp_path)]))
    assert "two plugins are named 'domains'" in info.value.problem
    assert str(path) in info.value.problem
    assert "relaymail/plugins/domains.py" in info.value.problem


def test_site_plugins_are_read_afresh_from_the_directories_given(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    write_plugin(first, "no_interns.py", GOOD_SITE_PLUGIN)
    build_plugins(make_settings(recipients=["no_interns"], path=[str(first)]))
    with pytest.raises(ConfigError, match="no plugin named 'no_interns'"):
        build_plugins(make_settings(recipients=["no_interns"], path=[str(second)]))
    assert f"{SITE_PACKAGE}.no_interns" not in sys.modules


def test_factory_failure_is_a_config_error(tmp_path):
    write_plugin(tmp_path, "crashes.py", GOOD_SITE_PLUGIN.replace(
        "unknown = set", "1 / 0\n        unknown = set"))
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(recipients=["no_interns"], path=[str(tmp_path)]))
    assert info.value.section == "plugin:no_interns"
    assert "ZeroDivisionError" in info.value.problem


def test_missing_plugin_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        build_plugins(make_settings(path=[str(tmp_path / "absent")]))


def test_a_misspelt_plugin_section_is_refused_with_the_close_name(tmp_path):
    write_plugin(tmp_path, "csv_recipients.py",
                 GOOD_SITE_PLUGIN.replace("no_interns", "csv_recipients"))
    settings = make_settings(recipients=["csv_recipients"], path=[str(tmp_path)],
                             options={"csv_recipents": {"prefix": "trainee."}})
    with pytest.raises(ConfigError) as info:
        build_plugins(settings)
    assert str(info.value) == (
        "test.ini: [plugin:csv_recipents]: no plugin named 'csv_recipents' is loaded "
        "([plugins] path); did you mean [plugin:csv_recipients]?")


def test_a_plugin_section_far_from_any_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        build_plugins(make_settings(options={"ldap": {"uri": "ldap://x"}}))
    assert str(info.value) == (
        "test.ini: [plugin:ldap]: no plugin named 'ldap' is loaded ([plugins] path); "
        "known: aliases, callout, dkim, domains, pipe, ratelimit, sql, static")


def test_a_section_for_a_plugin_that_exists_but_is_not_enabled_is_only_a_warning(tmp_path):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        aliases_file = write_plugin(tmp_path, "aliases", "staff: alice@example.com\n")
        build_plugins(make_settings(options={"aliases": {"file": str(aliases_file)}}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [event["log_format"] for event in events if "plugin:" in event["log_format"]] == [
        "{source}: [plugin:{name}] is set but no plugin of that name is enabled in [plugins]"]


@pytest.mark.parametrize("hook, interface", [("routers", "IRouter"),
                                             ("transports", "ITransport")])
def test_a_plugin_without_the_routing_or_transport_contract_is_refused_there(hook, interface):
    settings = make_settings()
    setattr(settings.plugins, hook, ["domains"])
    with pytest.raises(ConfigError, match=f"\\[plugins\\] {hook}: plugin 'domains' cannot "
                                          f"be used here: it does not provide {interface}"):
        build_plugins(settings)


class NewHookTests(PolicyTestCase):
    """connect, HELO and MAIL share the recipients' runner: first decisive
    answer wins, failures are temporary, and the decider is named."""

    def test_the_deciding_plugin_is_named(self):
        first = Scripted(Decision.NO_OPINION, name="first")
        second = Scripted(Decision.reject(550, "5.1.1", "No such user"), name="second")
        policy = self.policy([first, second])
        decision, decider = self.successResultOf(
            policy.decide_recipient(Mailbox("user", "example.net"), make_context()))
        self.assertEqual((decision.code, decider), (550, "second"))
        _, decider = self.successResultOf(
            self.policy([first]).decide_recipient(Mailbox("user", "example.net"),
                                                  make_context()))
        self.assertEqual(decider, "relay-rule")

    def test_filter_only_answers_at_rcpt_are_a_plugin_failure(self):
        for answer in (Decision.hold("why"), Decision.discard(),
                       Decision.redirect(["x@example.com"]),
                       Decision.ACCEPT.with_headers(add=[("X-A", "b")])):
            decision = self.successResultOf(self.policy([Scripted(answer)]).check_recipient(
                Mailbox("user", "example.net"), make_context()))
            self.assertEqual((decision.code, decision.enhanced), (451, "4.3.0"), answer)
        self.flushLoggedErrors()

    def test_sender_plugins_get_the_sender_and_a_copy_of_the_parameters(self):
        seen = []

        class Senders:
            name = "senders"

            def check_sender(self, sender, parameters, context):
                seen.append((sender, parameters))
                parameters["SIZE"] = "0"        # a copy: the dialogue's is untouched
                return Decision.defer("Greylisted", code=450, enhanced="4.7.1")

        policy = Policy([], [], make_settings(), clock=self.clock, senders=[Senders()])
        self.assertTrue(policy.asks_at_mail)
        self.assertFalse(policy.asks_at_helo or policy.asks_at_connect)
        parameters = {"SIZE": "10"}
        decision, decider = self.successResultOf(
            policy.check_sender(None, parameters, make_context()))
        self.assertEqual((decision.code, decision.enhanced, decision.text, decider),
                         (450, "4.7.1", "Greylisted", "senders"))
        self.assertEqual(parameters, {"SIZE": "10"})
        self.assertEqual(seen[0][0], None)

    def test_a_connect_plugin_that_fails_gives_421(self):
        class Broken:
            def check_connection(self, context):
                raise RuntimeError("down")

        policy = Policy([], [], make_settings(), clock=self.clock, connect=[Broken()])
        context = make_context()
        context.client = "unknown[192.0.2.1]:4000"
        decision, _ = self.successResultOf(policy.check_connection(context))
        self.assertEqual((decision.code, decision.enhanced), (421, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AnswerCacheTests(PolicyTestCase):
    """[plugin:NAME] cache_ttl: answers by address, for a while."""

    def test_answers_are_remembered_by_address_until_the_ttl(self):
        from relaymail.policy.answer_cache import AnswerCache
        plugin = Scripted(Decision.reject(550, "5.1.1", "No such user"))
        policy = Policy([plugin], [], make_settings(), clock=self.clock,
                        caches={id(plugin): AnswerCache(60)})
        for address in (Mailbox("user", "example.net"), Mailbox("user", "EXAMPLE.net")):
            decision = self.successResultOf(policy.check_recipient(address, make_context()))
            self.assertEqual(decision.code, 550)
        self.assertEqual(plugin.asked, ["user@example.net"])
        self.successResultOf(policy.check_recipient(Mailbox("User", "example.net"),
                                                    make_context()))
        self.assertEqual(len(plugin.asked), 2)      # local parts keep their case
        self.clock.advance(61)
        self.successResultOf(policy.check_recipient(Mailbox("user", "example.net"),
                                                    make_context()))
        self.assertEqual(len(plugin.asked), 3)

    def test_failures_are_never_remembered(self):
        from relaymail.policy.answer_cache import AnswerCache
        plugin = Scripted(RuntimeError("directory down"))
        policy = Policy([plugin], [], make_settings(), clock=self.clock,
                        caches={id(plugin): AnswerCache(60)})
        for _ in range(2):
            decision = self.successResultOf(
                policy.check_recipient(Mailbox("user", "example.net"), make_context()))
            self.assertEqual(decision.code, 451)
        self.assertEqual(len(plugin.asked), 2)
        self.flushLoggedErrors(RuntimeError)
        # Garbage is a failure too: asked again, not replayed (found in review).
        garbage = Scripted("yes")
        policy = Policy([garbage], [], make_settings(), clock=self.clock,
                        caches={id(garbage): AnswerCache(60)})
        for _ in range(2):
            decision = self.successResultOf(
                policy.check_recipient(Mailbox("user", "example.net"), make_context()))
            self.assertEqual(decision.code, 451)
        self.assertEqual(len(garbage.asked), 2)
        late = Scripted(defer.Deferred())
        policy = Policy([late], [], make_settings(), clock=self.clock,
                        caches={id(late): AnswerCache(60)})
        d = policy.check_recipient(Mailbox("user", "example.net"), make_context())
        self.clock.advance(TIMEOUT + 1)
        self.assertEqual(self.successResultOf(d).code, 451)
        late.answer = Decision.ACCEPT
        self.assertEqual(self.successResultOf(policy.check_recipient(
            Mailbox("user", "example.net"), make_context())), Decision.ACCEPT)


def test_cache_keys_are_the_relays_and_are_checked():
    from relaymail.policy.loader import build_hooks
    hooks = build_hooks(make_settings(options={"domains": {"cache_ttl": "5m",
                                                           "cache_size": "10"}}))
    (plugin,) = hooks["recipients"]
    cache = hooks.caches[id(plugin)]
    assert (cache.ttl, cache.size) == (300, 10)
    with pytest.raises(ConfigError) as info:
        build_hooks(make_settings(options={"domains": {"cache_ttl": "soon"}}))
    assert str(info.value).startswith("test.ini: [plugin:domains] cache_ttl: ")
    with pytest.raises(ConfigError, match=r"\[plugin:domains\] cache_size: set without cache_ttl"):
        build_hooks(make_settings(options={"domains": {"cache_size": "10"}}))
