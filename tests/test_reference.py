"""README.rst's configuration reference and recipes: the reference is what
relaymail.tools.reference generates from the schema (so it cannot drift),
and each recipe is a configuration the relay accepts and acts on."""

import pathlib
import re
import smtplib
import subprocess

from relaymail.auth import passwords
from relaymail.tools import reference
from tests.certs import CertificateAuthority
from tests import relay_process
from tests.relay_process import RelayProcess, _env

REPO = pathlib.Path(relay_process.REPO)
README = REPO / "README.rst"
CHECK = REPO / ".venv" / "bin" / "relaymail-check"


def readme():
    return README.read_text(encoding="utf-8")


def test_the_readme_reference_is_the_generated_one():
    text = readme()
    assert reference.readme_with(text, reference.reference()) == text, (
        "README.rst's configuration reference is out of date: run `make reference`")


def test_the_reference_names_every_key_with_its_default():
    generated = reference.reference()
    for section, keys in reference.SCHEMA.items():
        assert f"``[{section}]``" in generated
        for name in keys:
            assert re.search(rf"``{name}``", generated), (section, name)
    assert "``message_size``\n" in generated
    assert "    Default: ``10M``" in generated.split("``message_size``\n", 1)[1].split("\n\n")[1]


def test_a_key_without_a_comment_in_the_sample_is_an_error(tmp_path):
    lines = (REPO / "etc" / "relaymail.ini").read_text().splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("hops = "))
    start = at
    while lines[start - 1].startswith("#"):
        start -= 1
    (tmp_path / "relaymail.ini").write_text("\n".join(lines[:start] + lines[at:]) + "\n")
    try:
        reference.reference(str(tmp_path / "relaymail.ini"))
    except reference.Undocumented as error:
        assert str(error) == f"{tmp_path / 'relaymail.ini'}: no comment for [limits] hops"
    else:
        raise AssertionError("an undocumented key passed")


def recipe(title):
    """The first literal block after the recipe's bold title."""
    after = readme().split(f"**{title}**", 1)[1]
    block = re.search(r"::\n\n((?:    [^\n]*\n|\n)+)", after).group(1)
    return "\n".join(line[4:] for line in block.splitlines()) + "\n"


def site_files(tmp_path):
    """What the recipes' files name, under tmp_path instead of /etc/relaymail."""
    pair = CertificateAuthority().issue("relay.test")
    (tmp_path / "cert.pem").write_bytes(pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    (tmp_path / "smarthost.password").write_text("secret\n")
    passwords.set_password(str(tmp_path / "passwd"), "alice", "correct horse")
    (tmp_path / "recipients").write_text("alice@example.com\n")
    (tmp_path / "plugins").mkdir()
    plugin = re.search(r"``/etc/relaymail/plugins/hr_only\.py``\)\. .*?::\n\n((?:    [^\n]*\n|\n)+)",
                       readme(), re.S).group(1)
    (tmp_path / "plugins" / "hr_only.py").write_text(
        "\n".join(line[4:] for line in plugin.splitlines()) + "\n")


def checked(tmp_path, text):
    config = tmp_path / "relaymail.ini"
    config.write_text(text.replace("/etc/relaymail/", f"{tmp_path}/")
                      + f"\n[queue]\npath = {tmp_path / 'spool'}\n")
    return subprocess.run([str(CHECK), "config", str(config)], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=60)


def test_the_smarthost_and_inbound_recipes_are_accepted(tmp_path):
    site_files(tmp_path)
    for title in ("Outbound smarthost for an office or app servers.",
                  "Inbound relay in front of an internal mail server."):
        result = checked(tmp_path, recipe(title))
        assert (result.returncode, result.stderr) == (0, ""), (title, result.stderr)
        assert result.stdout == f"{tmp_path / 'relaymail.ini'}: ok\n"


def test_the_site_plugin_recipe_refuses_hr_to_clients_not_logged_in(tmp_path):
    site_files(tmp_path)
    enable = recipe("A site recipient plugin.").split("Enable it")[0]
    assert enable.startswith("from twisted.plugin import IPlugin")
    plugins = re.search(r"Enable it ahead of the built-in ones::\n\n((?:    [^\n]*\n)+)",
                        readme()).group(1)
    lines = [line.strip() for line in plugins.splitlines()[1:]]
    keys = dict(line.split(" = ", 1) for line in lines)
    keys["path"] = str(tmp_path / "plugins")
    relay = RelayProcess(tmp_path, {"plugins": keys, "relay": {"domains": "example.com"}})
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.ehlo("client.test")
            client.mail("someone@example.org")
            assert client.rcpt("hr@example.com") == (550, b"5.7.1 hr@ takes mail from staff only")
            assert client.rcpt("alice@example.com") == (250, b"2.1.5 Ok")
    finally:
        relay.stop()
