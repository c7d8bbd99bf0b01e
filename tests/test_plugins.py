"""The built-in plugins: domains, static and aliases (dkim: tests/test_dkim_plugin.py)."""

import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from twisted.plugin import IPlugin

from relaymail.config import ConfigError
from relaymail.interfaces import (
    Decision, IListExpander, IPluginFactory, IRecipientValidator)
from relaymail.plugins.aliases import aliases, parse_aliases
from relaymail.plugins.callout import callout
from relaymail.plugins.dkim import dkim as dkim_signer
from relaymail.plugins.domains import domains
from relaymail.plugins.pipe import pipe
from relaymail.plugins.ratelimit import ratelimit
from relaymail.plugins.sql import sql
from relaymail.plugins.static import USER_UNKNOWN, parse_static_list, static
from relaymail.policy.loader import PluginContext
from relaymail.address import parse_forward_path

CONTEXT = SimpleNamespace(client_ip="192.0.2.1", client_port=4000, helo="client.example",
                          sender=None, trusted=False, authenticated_user=None)


def build(factory, options=None, relay_domains=("example.com", "xn--bcher-kva.example")):
    settings = SimpleNamespace(
        source="test.ini", relay=SimpleNamespace(domains=list(relay_domains)),
        plugin_options={factory.name: dict(options or {})})
    return factory.build(PluginContext(factory.name, dict(options or {}), settings))


def rcpt(address):
    return parse_forward_path(f"<{address}>", smtputf8=True)


def write(tmp_path, text, name="list"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


BUILT_INS = [domains, static, aliases, dkim_signer, pipe, callout, sql, ratelimit]


@pytest.mark.parametrize("factory", BUILT_INS)
def test_builtins_are_plugins_named_like_their_module_and_attribute(factory):
    assert IPlugin.providedBy(factory)
    assert IPluginFactory.providedBy(factory)
    assert factory.__module__ == f"relaymail.plugins.{factory.name}"
    # The loader finds a built-in by that attribute without importing it.
    assert getattr(sys.modules[factory.__module__], factory.name) is factory


def test_the_loaders_table_names_every_built_in_twisted_finds():
    import relaymail.plugins
    from twisted.plugin import getPlugins
    from relaymail.policy.loader import BUILT_IN
    found = {factory.name: factory.__module__
             for factory in getPlugins(IPluginFactory, relaymail.plugins)}
    assert found == BUILT_IN
    assert sorted(BUILT_IN) == sorted(factory.name for factory in BUILT_INS)


def test_a_built_in_that_does_not_import_is_a_config_error_naming_it(tmp_path, monkeypatch):
    from relaymail.policy.listing import listing
    from relaymail.policy.loader import build_hooks, find_plugins
    from tests.support import make_settings
    # dkimpy missing: the import of relaymail.plugins.dkim fails.
    monkeypatch.delitem(sys.modules, "relaymail.plugins.dkim")
    monkeypatch.setitem(sys.modules, "dkim", None)
    assert "dkim" in find_plugins(make_settings(tmp_path))
    with pytest.raises(ConfigError) as info:
        build_hooks(make_settings(tmp_path, plugins__filters="dkim"))
    assert str(info.value).startswith(
        "<defaults>: [plugins]: built-in plugin 'dkim' (relaymail.plugins.dkim) does not load: "
        "ModuleNotFoundError: ")
    # Not enabled, it does not stop anything; --list-plugins says what is wrong.
    build_hooks(make_settings(tmp_path, plugins__recipients="domains"))
    text = listing(make_settings(tmp_path))
    assert re.search(r"^dkim\n  from: \S+/relaymail/plugins/dkim\.py\n  not loaded: "
                     r"built-in plugin 'dkim' .* ModuleNotFoundError: ", text, re.M)
    assert "domains\n  from: " in text


def test_every_built_in_is_found_and_imported_only_when_looked_up(tmp_path):
    # A fresh interpreter: this one has imported every plugin already.
    program = textwrap.dedent(f"""
        import pathlib, sys
        from relaymail.policy.loader import build_hooks, find_plugins
        from tests.support import make_settings
        found = find_plugins(make_settings(pathlib.Path({str(tmp_path)!r})))
        print(sorted(found))
        print(sorted(m for m in sys.modules if m.startswith("relaymail.plugins.")))
        hooks = build_hooks(make_settings(pathlib.Path({str(tmp_path)!r}), plugins__recipients="domains"))
        print(sorted(m for m in sys.modules if m.startswith("relaymail.plugins.")))
        print(type(found["dkim"]).__name__, "dkim" in sys.modules)
        print(all(name == factory.name for name, factory in found.items()))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", program], cwd=root, check=True, text=True,
                         capture_output=True, env=dict(os.environ, PYTHONPATH=root)).stdout
    names, before, built, looked_up, items = out.splitlines()
    assert names == str(sorted(factory.name for factory in BUILT_INS))
    assert before == "[]"
    assert built == "['relaymail.plugins.domains']"
    assert looked_up == "DKIMSignerFactory True"
    # Looking each up while iterating (items()) moves it, and breaks nothing.
    assert items == "True"


# -- domains -----------------------------------------------------------------

def test_domains_accepts_relay_domains_in_any_case():
    plugin = build(domains)
    assert IRecipientValidator.providedBy(plugin)
    assert plugin.check_recipient(rcpt("anyone@Example.COM"), CONTEXT) == Decision.accept()


def test_domains_compares_idn_domains_as_a_labels():
    plugin = build(domains)
    assert plugin.check_recipient(rcpt("anna@bücher.example"), CONTEXT) == Decision.ACCEPT


def test_domains_has_no_opinion_on_other_domains_and_subdomains():
    plugin = build(domains)
    for address in ("user@example.org", "user@mail.example.com", "postmaster"):
        assert plugin.check_recipient(rcpt(address), CONTEXT) is Decision.NO_OPINION


def test_domains_has_no_opinion_on_vrfy():
    assert build(domains).verify("user@example.com", CONTEXT) is Decision.NO_OPINION


def test_domains_refuses_any_option():
    with pytest.raises(ConfigError) as info:
        build(domains, {"file": "x"})
    assert str(info.value) == (
        "test.ini: [plugin:domains] file: unknown option; [plugin:domains] takes none")


# -- static ------------------------------------------------------------------

STATIC_LIST = """\
    # Mailboxes we know.
    alice@example.net
    Bob.Smith@Example.NET    # trailing comment after white space

    whole.example.org
    @other.example
    anna@bücher.example
"""


def test_static_file_forms(tmp_path):
    plugin = build(static, {"file": write(tmp_path, STATIC_LIST)})
    for address in ("alice@example.net", "bob.smith@example.net", "ALICE@EXAMPLE.NET",
                    "anyone@whole.example.org", "anyone@OTHER.example",
                    "anna@xn--bcher-kva.example"):
        assert plugin.check_recipient(rcpt(address), CONTEXT) == Decision.accept(), address
    for address in ("carol@example.net", "user@sub.whole.example.org", "user@example.com"):
        assert plugin.check_recipient(rcpt(address), CONTEXT) is Decision.NO_OPINION, address


def test_static_reject_unlisted_refuses_unknown_users_in_listed_domains(tmp_path):
    plugin = build(static, {"file": write(tmp_path, STATIC_LIST), "reject_unlisted": "yes"})
    decision = plugin.check_recipient(rcpt("carol@example.net"), CONTEXT)
    assert decision == Decision(Decision.REJECT_KIND, 550, "5.1.1",
                                "Recipient address rejected: User unknown")
    assert decision == USER_UNKNOWN
    # Domains listed whole, and domains the file does not mention, are not affected.
    assert plugin.check_recipient(rcpt("x@whole.example.org"), CONTEXT) == Decision.accept()
    assert plugin.check_recipient(rcpt("x@example.com"), CONTEXT) is Decision.NO_OPINION
    assert plugin.check_recipient(rcpt("alice@example.net"), CONTEXT) == Decision.accept()


def test_static_verify_answers_with_the_listed_spelling(tmp_path):
    plugin = build(static, {"file": write(tmp_path, STATIC_LIST)})
    assert plugin.verify("bob.smith@example.net", CONTEXT) == Decision.accept(
        text="Bob.Smith@Example.NET")
    for address in ("carol@example.net", "anyone@whole.example.org", "alice", "not an address"):
        assert plugin.verify(address, CONTEXT) is Decision.NO_OPINION, address


def test_static_needs_a_file():
    with pytest.raises(ConfigError) as info:
        build(static)
    assert (info.value.section, info.value.key) == ("plugin:static", "file")


def test_static_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(static, {"file": str(tmp_path / "absent")})
    assert info.value.key == "file"
    assert "cannot read" in info.value.problem
    assert "No such file or directory" in info.value.problem


def test_static_unknown_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(static, {"file": write(tmp_path, STATIC_LIST), "reject": "yes"})
    assert info.value.key == "reject"
    assert info.value.problem == "unknown option; [plugin:static] takes file, reject_unlisted"


def test_static_bad_boolean_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(static, {"file": write(tmp_path, STATIC_LIST), "reject_unlisted": "maybe"})
    assert info.value.key == "reject_unlisted"


@pytest.mark.parametrize("text, problem", [
    ("ok@example.com\nalice bob@example.com\n", "line 2: one address or domain per line"),
    ("# fine\n\nbad..dots@example.com\n", "line 3: bad address or domain"),
    ("alice@-example.com\n", "line 1: bad address or domain"),
])
def test_static_bad_lines_are_named(text, problem):
    with pytest.raises(ValueError) as info:
        parse_static_list(text.splitlines())
    assert str(info.value).startswith(problem)


def test_static_bad_line_is_a_config_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, "alice@example.com\nnot a domain\n")
    with pytest.raises(ConfigError) as info:
        build(static, {"file": path})
    assert info.value.problem.startswith(f"{path}: line 2: ")


# -- aliases -----------------------------------------------------------------

ALIASES = """\
    # Lists for example.com and the other relay domains.
    staff: alice@example.com, bob@example.org
    Postmaster: root@example.com

    sales@example.org: carol@example.net,
        dave@example.net,
    \t  erin
    # A comment between entries does not end the list above.
    solo@example.com: frank@example.net
"""


def test_aliases_parsing_continuations_and_comments():
    bare, full = parse_aliases(textwrap.dedent(ALIASES).splitlines())
    assert bare == {"staff": ["alice@example.com", "bob@example.org"],
                    "postmaster": ["root@example.com"]}
    assert full == {("sales", "example.org"): ["carol@example.net", "dave@example.net", "erin"],
                    ("solo", "example.com"): ["frank@example.net"]}


@pytest.mark.parametrize("text, problem", [
    ("staff: a@example.com\njust words\n", "line 2: expected 'name: member, member, ...'"),
    ("  a@example.com\nstaff: b@example.com\n", "line 1: continuation line with no entry"),
    ("staff:\n", "line 1: 'staff' has no members"),
    ("staff: a@example.com\n# x\nSTAFF: b@example.com\n", "line 3: 'STAFF' is defined twice"),
    (": a@example.com\n", "line 1: expected 'name: member"),
    ("big staff: a@example.com\n", "line 1: a name cannot contain white space"),
    ("staff: |/usr/bin/procmail\n", "line 1: '|/usr/bin/procmail': relaymail relays mail"),
    ('staff: "|/bin/sh -c x"\n', "line 1: '\"|/bin/sh -c x\"': relaymail relays mail"),
    ("staff: /var/mail/staff\n", "line 1: '/var/mail/staff': relaymail relays mail"),
    ("staff: :include:/etc/staff\n", "line 1: ':include:/etc/staff': relaymail relays mail"),
    ("staff: a@example.com, b@@example.com\n", "line 1: bad member 'b@@example.com'"),
    ("staff: \"unbalanced@example.com\n", "line 1: unbalanced quote"),
    ("st..aff: a@example.com\n", "line 1: bad name 'st..aff'"),
])
def test_aliases_bad_lines_are_named(text, problem):
    with pytest.raises(ValueError) as info:
        parse_aliases(text.splitlines())
    assert str(info.value).startswith(problem)


def test_aliases_quoted_member_may_hold_a_comma():
    bare, _ = parse_aliases(['staff: "smith, john"@example.com, a@example.com'])
    assert bare["staff"] == ['"smith, john"@example.com', "a@example.com"]


def test_aliases_bad_line_is_a_config_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, "staff: a@example.com\n\nnonsense\n")
    with pytest.raises(ConfigError) as info:
        build(aliases, {"file": path})
    assert (info.value.section, info.value.key) == ("plugin:aliases", "file")
    assert info.value.problem == (
        f"{path}: line 3: expected 'name: member, member, ...'")


def test_aliases_needs_a_readable_file_and_no_other_option(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        build(aliases)
    with pytest.raises(ConfigError, match="cannot read"):
        build(aliases, {"file": str(tmp_path / "absent")})
    with pytest.raises(ConfigError) as info:
        build(aliases, {"file": write(tmp_path, ALIASES), "database": "x"})
    assert info.value.key == "database"


@pytest.fixture
def alias_plugin(tmp_path):
    return build(aliases, {"file": write(tmp_path, ALIASES)})


def test_aliases_provides_both_jobs(alias_plugin):
    assert IRecipientValidator.providedBy(alias_plugin)
    assert IListExpander.providedBy(alias_plugin)


def test_aliases_bare_names_match_in_every_relay_domain(alias_plugin):
    for address in ("staff@example.com", "STAFF@Example.Com", "staff@bücher.example",
                    "postmaster", "postmaster@example.com"):
        assert alias_plugin.check_recipient(rcpt(address), CONTEXT) == Decision.accept(), address


def test_aliases_bare_names_do_not_match_other_domains(alias_plugin):
    for address in ("staff@example.org", "alice@example.com", "sales@example.com"):
        assert alias_plugin.check_recipient(rcpt(address), CONTEXT) is Decision.NO_OPINION, \
            address


def test_aliases_full_names_match_that_address_only(alias_plugin):
    # example.org is not a relay domain: the full name still matches.
    assert alias_plugin.check_recipient(rcpt("Sales@EXAMPLE.org"), CONTEXT) == Decision.accept()
    assert alias_plugin.check_recipient(rcpt("solo@example.com"), CONTEXT) == Decision.accept()
    assert alias_plugin.check_recipient(rcpt("solo@example.org"), CONTEXT) is Decision.NO_OPINION


def test_aliases_expand_gives_members_as_written(alias_plugin):
    assert alias_plugin.expand("staff", CONTEXT) == ["alice@example.com", "bob@example.org"]
    assert alias_plugin.expand("Staff@example.com", CONTEXT) == [
        "alice@example.com", "bob@example.org"]
    assert alias_plugin.expand("sales@example.org", CONTEXT) == [
        "carol@example.net", "dave@example.net", "erin"]


def test_aliases_expand_unknown_is_none(alias_plugin):
    for address in ("alice", "staff@example.org", "sales", "not an address@x"):
        assert alias_plugin.expand(address, CONTEXT) is None, address


def test_aliases_expand_returns_a_copy(alias_plugin):
    alias_plugin.expand("staff", CONTEXT).append("mallory@example.net")
    assert alias_plugin.expand("staff", CONTEXT) == ["alice@example.com", "bob@example.org"]


def test_aliases_verify(alias_plugin):
    assert alias_plugin.verify("postmaster", CONTEXT) == Decision.accept(text="root@example.com")
    assert alias_plugin.verify("staff@example.com", CONTEXT) == Decision.accept(
        text="staff@example.com is a list of 2 members")
    assert alias_plugin.verify("alice@example.com", CONTEXT) is Decision.NO_OPINION

