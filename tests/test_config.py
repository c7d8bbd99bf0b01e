"""Tests for relaymail.config: the INI file to validated settings."""

import configparser
import dataclasses
import ipaddress
import os
import pathlib

import pytest

from relaymail.config import (
    SCHEMA, TABLES, ConfigError, Smarthost, TLSFileError, boolean, load_config,
    load_server_certificate)
from tests import certs


REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "relaymail.ini"


def write_ini(tmp_path, text, name="relay.ini"):
    """Write ``text`` to a config file and return its path as a string."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_for(tmp_path, text):
    """The one-line message load_config gives for the file ``text``."""
    path = write_ini(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(path, "FILE")


def override_error(overrides):
    """The message load_config gives for command-line ``overrides``."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def load_with(tmp_path, text):
    """Settings from a file holding ``text``."""
    return load_config(write_ini(tmp_path, text))


# --- defaults ---------------------------------------------------------------

def test_defaults_when_path_is_none(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_config()
    assert settings.source == "<defaults>"
    assert settings.server.listen == ["tcp:2525:interface=127.0.0.1"]
    assert settings.server.trusted_networks == [
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert settings.relay.domains == []
    assert settings.queue.path == str(tmp_path / "var" / "spool")
    assert (settings.queue.min_backoff, settings.queue.max_backoff) == (300, 4000)
    assert settings.queue.lifetime == 432000
    assert settings.queue.delay_warning == 0
    assert settings.delivery.smarthost is None
    assert settings.delivery.smarthost_user is None
    assert settings.delivery.smarthost_password_file is None
    assert settings.delivery.smarthost_password is None
    assert settings.delivery.smarthost_tls == "may"
    assert settings.delivery.tls_ca_file is None
    assert settings.delivery.helo_name is None
    assert settings.delivery.connect_timeout == 30.0
    assert settings.delivery.command_timeout == 300.0
    assert settings.delivery.data_timeout == 600.0
    assert settings.delivery.destination_concurrency == 20
    assert settings.delivery.max_connections == 100
    assert settings.delivery.mx_port == 25
    assert settings.routes == {}
    assert settings.tls.certificate is None and settings.tls.private_key is None
    assert settings.limits.message_size == 10485760
    assert settings.limits.recipients == 1000
    assert settings.limits.line_length == 1000
    assert settings.limits.command_timeout == 300.0
    assert settings.limits.data_timeout == 180.0
    assert settings.limits.errors == 20
    assert settings.limits.min_data_rate == 500
    assert settings.limits.connections == 1000
    assert settings.limits.connections_per_ip == 50
    assert settings.limits.connection_rate_per_ip == 120
    assert settings.limits.header_size == 102400
    assert settings.server.submission_listen == []
    assert settings.server.proxy_listen == []
    assert settings.server.proxy_trusted == []
    assert settings.auth.passwords is None
    assert settings.auth.allow_plaintext is False
    assert settings.auth.failure_delay == 1.0
    assert settings.plugins.recipients == ["domains"]
    assert settings.plugins.expanders == []
    assert settings.plugins.path == []
    assert settings.plugins.timeout == 10.0
    assert settings.plugin_options == {}


def test_default_hostname_is_the_fqdn(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "mx1.example.org")
    assert load_config().server.hostname == "mx1.example.org"


def test_settings_are_frozen():
    settings = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.limits.errors = 1


def test_empty_file_gives_defaults(tmp_path):
    settings = load_with(tmp_path, "")
    assert settings.limits == load_config().limits
    assert settings.source.endswith("relay.ini")


# --- the sample file ---------------------------------------------------------

def test_sample_config_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    settings = load_config("etc/relaymail.ini")
    assert settings.server.listen == ["tcp:2525:interface=127.0.0.1"]
    assert settings.server.hostname == "localhost"
    assert settings.queue.path == str(REPO / "var" / "spool")
    assert settings.relay.domains == ["example.com"]
    assert settings.plugins.recipients == ["aliases", "domains"]
    assert settings.plugins.expanders == ["aliases"]
    assert settings.plugin_options == {"aliases": {"file": "etc/aliases"}}
    assert (REPO / "etc" / "aliases").is_file()


def test_sample_config_sets_every_schema_key():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(SAMPLE)
    missing = [f"[{section}] {key}"
               for section, keys in SCHEMA.items() for key in keys
               if not parser.has_option(section, key)]
    assert missing == []


def test_sample_config_documents_every_table_section():
    # [routes] has no fixed keys to list; the sample shows the section
    # and explains its entries in comments.
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SAMPLE)
    assert [section for section in TABLES if not parser.has_section(section)] == []


def test_sample_config_values_match_the_defaults(monkeypatch):
    # The sample says what each default is; apart from the keys `make run`
    # deliberately changes, its values must be those defaults.
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("socket.getfqdn", lambda: "localhost")
    sample = load_config("etc/relaymail.ini")
    defaults = load_config()
    changed = {("relay", "domains"), ("plugins", "recipients"),
               ("plugins", "expanders"), ("metrics", "listen")}
    for section, keys in SCHEMA.items():
        for key in keys:
            if (section, key) not in changed:
                assert (getattr(getattr(sample, section), key)
                        == getattr(getattr(defaults, section), key)), (section, key)
    for section in TABLES:
        assert getattr(sample, section) == getattr(defaults, section) == {}


# --- reading the file ----------------------------------------------------------

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"
    assert (info.value.section, info.value.key) == (None, None)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: cannot read the file: not UTF-8 (byte 5 is 0xe9)")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_syntax_error_names_the_line(tmp_path):
    text = "[limits]\nerrors = 5\nthis line is wrong\n"
    assert error_for(tmp_path, text) == (
        "FILE: line 3: expected '[section]' or 'key = value', got 'this line is wrong'")


def test_key_before_any_section(tmp_path):
    assert error_for(tmp_path, "# hello\nerrors = 5\n") == (
        "FILE: line 2: expected a [section] header before 'errors = 5'")


def test_key_set_twice(tmp_path):
    assert error_for(tmp_path, "[limits]\nerrors = 5\nerrors = 6\n") == (
        "FILE: [limits] errors: line 3: set twice in this section")


def test_unknown_section_with_suggestion(tmp_path):
    assert error_for(tmp_path, "[limit]\nerrors = 5\n") == (
        "FILE: [limit]: unknown section; did you mean [limits]?")


def test_misspelt_plugin_section(tmp_path):
    assert error_for(tmp_path, "[plugins:aliases]\nfile = x\n") == (
        "FILE: [plugins:aliases]: unknown section; did you mean [plugin:aliases]?")


def test_unknown_section_without_suggestion(tmp_path):
    assert error_for(tmp_path, "[zzz]\n") == (
        "FILE: [zzz]: unknown section; expected one of [auth], [delivery], [delivery_rates], "
        "[limits], [log], [metrics], [plugins], [queue], [relay], [route_tls], [routes], [server], [tls], [tls_policy] or [plugin:NAME]")


def test_default_section_is_not_special(tmp_path):
    assert error_for(tmp_path, "[DEFAULT]\nerrors = 5\n") == (
        "FILE: [DEFAULT]: unknown section; expected one of [auth], [delivery], [delivery_rates], "
        "[limits], [log], [metrics], [plugins], [queue], [relay], [route_tls], [routes], [server], [tls], [tls_policy] or [plugin:NAME]")


def test_unknown_key_with_suggestion(tmp_path):
    assert error_for(tmp_path, "[limits]\nmessage_sise = 10M\n") == (
        "FILE: [limits] message_sise: unknown key; did you mean 'message_size'?")


def test_unknown_key_without_suggestion(tmp_path):
    assert error_for(tmp_path, "[tls]\nzzz = 1\n") == (
        "FILE: [tls] zzz: unknown key; [tls] has certificate, private_key")


def test_percent_signs_are_literal(tmp_path):
    settings = load_with(tmp_path, "[plugin:x]\nformat = 100%(x)s\n")
    assert settings.plugin_options == {"x": {"format": "100%(x)s"}}


def test_plugin_sections_are_raw_strings(tmp_path):
    settings = load_with(tmp_path, "[plugin:aliases]\nfile = etc/aliases\n"
                                   "[plugin:empty]\n")
    assert settings.plugin_options == {"aliases": {"file": "etc/aliases"},
                                       "empty": {}}


def test_plugin_section_needs_a_name(tmp_path):
    assert error_for(tmp_path, "[plugin:]\n") == (
        "FILE: [plugin:]: expected a plugin name (letters, digits, '_', '-', '.'), got ''")


# --- value types ---------------------------------------------------------------

def test_bad_int(tmp_path):
    assert error_for(tmp_path, "[limits]\nerrors = many\n") == (
        "FILE: [limits] errors: expected a whole number, got 'many'")


def test_int_below_minimum(tmp_path):
    assert error_for(tmp_path, "[limits]\nline_length = 79\n") == (
        "FILE: [limits] line_length: must be at least 80, got '79'")


def test_bad_size(tmp_path):
    assert error_for(tmp_path, "[limits]\nmessage_size = ten\n") == (
        "FILE: [limits] message_size: expected a size in bytes "
        "(e.g. 10485760 or 10M), got 'ten'")


def test_size_message_from_the_brief(monkeypatch):
    # The exact form the project's documentation shows.
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as info:
        load_config("etc/relaymail.ini", {("limits", "message_size"): "ten"})
    assert str(info.value) == (
        "command line: [limits] message_size: expected a size in bytes "
        "(e.g. 10485760 or 10M), got 'ten'")


@pytest.mark.parametrize("raw, expected", [
    ("10485760", 10485760), ("512K", 512 * 1024), ("10M", 10485760),
    ("10m", 10485760), ("1G", 1 << 30), (" 2 M ", 2 << 20)])
def test_sizes(tmp_path, raw, expected):
    settings = load_with(tmp_path, f"[limits]\nmessage_size = {raw}\n")
    assert settings.limits.message_size == expected


def test_bad_duration(tmp_path):
    assert error_for(tmp_path, "[queue]\nlifetime = soon\n") == (
        "FILE: [queue] lifetime: expected a duration in seconds or with a unit "
        "(e.g. 300, 300s, 5m, 1.5h, 5d), got 'soon'")


def test_fractional_duration_for_whole_seconds_key(tmp_path):
    assert error_for(tmp_path, "[queue]\nmin_backoff = 1.5\n") == (
        "FILE: [queue] min_backoff: expected a whole number of seconds, got '1.5'")


def test_zero_timeout_is_refused(tmp_path):
    assert error_for(tmp_path, "[limits]\ncommand_timeout = 0\n") == (
        "FILE: [limits] command_timeout: must be more than 0, got '0'")


@pytest.mark.parametrize("raw, expected", [
    ("300", 300), ("300s", 300), ("5m", 300), ("1.5h", 5400), ("5d", 432000),
    ("1w", 604800), ("0", 0)])
def test_durations(tmp_path, raw, expected):
    settings = load_with(tmp_path, f"[queue]\nlifetime = {raw}\n")
    assert settings.queue.lifetime == expected
    assert isinstance(settings.queue.lifetime, int)


def test_float_durations(tmp_path):
    settings = load_with(tmp_path, "[limits]\ndata_timeout = 1.5\n"
                                   "[plugins]\ntimeout = 2m\n")
    assert settings.limits.data_timeout == 1.5
    assert settings.plugins.timeout == 120.0


def test_max_backoff_below_min_backoff(tmp_path):
    assert error_for(tmp_path, "[queue]\nmin_backoff = 1h\nmax_backoff = 10m\n") == (
        "FILE: [queue] max_backoff: max_backoff (600) must be at least "
        "min_backoff (3600)")


def test_backoff_conflict_blames_the_key_that_was_set(tmp_path):
    assert error_for(tmp_path, "[queue]\nmin_backoff = 2h\n") == (
        "FILE: [queue] min_backoff: max_backoff (4000) must be at least "
        "min_backoff (7200)")


@pytest.mark.parametrize("raw, expected", [
    ("yes", True), ("On", True), ("TRUE", True), ("1", True),
    ("no", False), ("off", False), ("false", False), ("0", False)])
def test_booleans(raw, expected):
    assert boolean(raw) is expected


def test_bad_boolean():
    with pytest.raises(ValueError) as info:
        boolean("maybe")
    assert str(info.value) == (
        "expected yes or no (or true/false, on/off, 1/0), got 'maybe'")


# --- lists -------------------------------------------------------------------

def test_list_separators(tmp_path):
    settings = load_with(tmp_path, (
        "[relay]\n"
        "domains = Example.COM, example.net  example.org\n"
        "    bücher.example,\n"
        "    example.info.\n"
        "[plugins]\n"
        "recipients = aliases,domains\n"
        "expanders =\n"))
    assert settings.relay.domains == [
        "example.com", "example.net", "example.org", "xn--bcher-kva.example",
        "example.info"]
    assert settings.plugins.recipients == ["aliases", "domains"]
    assert settings.plugins.expanders == []


def test_bad_domain(tmp_path):
    message = error_for(tmp_path, "[relay]\ndomains = example.com, *.example.net\n")
    assert message.startswith(
        "FILE: [relay] domains: expected a domain name, got '*.example.net' (")


def test_networks(tmp_path):
    settings = load_with(tmp_path, (
        "[server]\ntrusted_networks = 192.0.2.0/24, 198.51.100.7\n  2001:db8::/32\n"))
    assert settings.server.trusted_networks == [
        ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.7/32"),
        ipaddress.ip_network("2001:db8::/32")]


def test_empty_networks_trust_nobody(tmp_path):
    settings = load_with(tmp_path, "[server]\ntrusted_networks =\n")
    assert settings.server.trusted_networks == []


def test_bad_cidr(tmp_path):
    assert error_for(tmp_path, "[server]\ntrusted_networks = 10.0.0.0/33\n") == (
        "FILE: [server] trusted_networks: expected a network in CIDR form "
        "(e.g. 192.0.2.0/24 or 2001:db8::/32), got '10.0.0.0/33'")


def test_cidr_with_host_bits(tmp_path):
    assert error_for(tmp_path, "[server]\ntrusted_networks = 10.1.2.3/8\n") == (
        "FILE: [server] trusted_networks: '10.1.2.3/8' has host bits set; "
        "did you mean '10.0.0.0/8'?")


def test_listen_one_per_line_or_comma(tmp_path):
    settings = load_with(tmp_path, (
        "[server]\nlisten = tcp:2525:interface=127.0.0.1\n"
        "    tcp6:2525:interface=\\:\\:1, unix:/tmp/relaymail.sock\n"))
    assert settings.server.listen == [
        "tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\:\\:1",
        "unix:/tmp/relaymail.sock"]


def test_bad_endpoint(tmp_path):
    assert error_for(tmp_path, "[server]\nlisten = tcp:2525\n  bogus:25\n") == (
        "FILE: [server] listen: not a valid Twisted server endpoint 'bogus:25': "
        "unknown endpoint type 'bogus'; known: haproxy, ssl, stdio, systemd, tcp, tcp6, tls, "
        "unix")


def test_endpoint_with_bad_port(tmp_path):
    assert error_for(tmp_path, "[server]\nlisten = tcp:abc\n") == (
        "FILE: [server] listen: not a valid Twisted server endpoint 'tcp:abc': "
        "port must be a number, got 'abc'")


@pytest.mark.parametrize("key", ["listen", "submission_listen", "proxy_listen"])
@pytest.mark.parametrize("endpoint, problem", [
    ("tcp:2590:interfce=127.0.0.1",
     "unknown parameter 'interfce' for tcp (did you mean 'interface'?); tcp takes interface, "
     "backlog"),
    ("tcp:2590:interface=::1",
     "the colons of the IPv6 address in interface=::1 must be escaped: write "
     "interface=\\:\\:1, or use tcp6:2590:interface=\\:\\:1"),
    ("tcp6:2590:interface=2001:db8::1",
     "the colons of the IPv6 address in interface=2001:db8::1 must be escaped: write "
     "interface=2001\\:db8\\:\\:1"),
    ("tpc:2590", "unknown endpoint type 'tpc'; did you mean 'tcp'? known: haproxy, ssl, "
                 "stdio, systemd, tcp, tcp6, tls, unix"),
    ("tcp:70000", "port must be from 0 to 65535, got 70000"),
    ("tcp6:25x", "port must be a number, got '25x'"),
    ("tcp", "tcp needs a port, e.g. tcp:25"),
    ("tcp:2590:backlog=lots", "backlog must be a number, got 'lots'"),
    ("tcp:2590:127.0.0.1", "'127.0.0.1' is one field too many; a ':' inside a value is "
                           "written '\\:'"),
    ("ssl:465:privatekey=key.pem",
     "unknown parameter 'privatekey' for ssl (did you mean 'privateKey'?); ssl takes "
     "privateKey, certKey, interface, backlog"),
    ("unix:/run/relaymail.sock:mod=600",
     "unknown parameter 'mod' for unix (did you mean 'mode'?); unix takes mode, backlog, "
     "lockfile"),
])
def test_endpoint_typos_are_one_line_naming_the_key(tmp_path, key, endpoint, problem):
    text = f"[server]\n{key} = {endpoint}\n"
    if key == "proxy_listen":
        text += "proxy_trusted = 10.0.0.0/8\n"
    assert error_for(tmp_path, text) == (
        f"FILE: [server] {key}: not a valid Twisted server endpoint {endpoint!r}: {problem}")


def test_an_escaped_ipv6_interface_is_taken_by_tcp_and_tcp6(tmp_path):
    settings = load_with(tmp_path, "[server]\nlisten = tcp:2590:interface=\\:\\:1\n"
                                   "  tcp6:2591:interface=\\:\\:1\n  tcp:port=2592\n")
    assert settings.server.listen == ["tcp:2590:interface=\\:\\:1",
                                      "tcp6:2591:interface=\\:\\:1", "tcp:port=2592"]


def test_the_endpoint_check_knows_what_twisteds_parsers_take():
    # relaymail.smtp.endpoint_check lists the parameters of Twisted's
    # parsers; this says so when a Twisted upgrade changes them.
    import inspect
    from twisted.internet import endpoints
    from relaymail.smtp.endpoint_check import TYPES

    def parameters(function, skip):
        return list(inspect.signature(function).parameters)[skip:]
    assert parameters(endpoints._parseTCP, 1) == [TYPES["tcp"].positional, *TYPES["tcp"].options]
    assert parameters(endpoints._parseUNIX, 1) == [TYPES["unix"].positional,
                                                   *TYPES["unix"].options]
    assert sorted(parameters(endpoints._TCP6ServerParser._parseServer, 2)) == sorted(
        [TYPES["tcp6"].positional, *TYPES["tcp6"].options])
    assert set(TYPES["ssl"].options) < set(parameters(endpoints._parseSSL, 1))


def test_bad_hostname(tmp_path):
    assert error_for(tmp_path, "[server]\nhostname = mail_1.example.com\n") == (
        "FILE: [server] hostname: expected a host name such as mail.example.com "
        "(letters, digits, hyphens and dots), got 'mail_1.example.com'")


# --- smarthost -----------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("[relay.example.net]:587", Smarthost("relay.example.net", 587, False)),
    ("[relay.example.net]", Smarthost("relay.example.net", 25, False)),
    ("relay.example.net:2525", Smarthost("relay.example.net", 2525, True)),
    ("Relay.Example.NET", Smarthost("relay.example.net", 25, True)),
    ("[::1]:2526", Smarthost("::1", 2526, False)),
    ("[192.0.2.1]", Smarthost("192.0.2.1", 25, False)),
])
def test_smarthost_forms(tmp_path, raw, expected):
    settings = load_with(tmp_path, f"[delivery]\nsmarthost = {raw}\n")
    assert settings.delivery.smarthost == expected


def test_empty_smarthost_is_none(tmp_path):
    settings = load_with(tmp_path, "[delivery]\nsmarthost =\n")
    assert settings.delivery.smarthost is None


def test_smarthost_prints_like_its_config_form():
    assert str(Smarthost("::1", 2526, False)) == "[::1]:2526"
    assert str(Smarthost("relay.example.net", 25, True)) == "relay.example.net:25"


@pytest.mark.parametrize("raw, problem", [
    ("relay.example.net:99999", "port must be a number from 1 to 65535, got '99999'"),
    ("[relay.example.net]:0", "port must be a number from 1 to 65535, got '0'"),
    ("relay.example.net:smtp", "port must be a number from 1 to 65535, got 'smtp'"),
    ("::1", "expected [host]:port, host:port or host (e.g. [mail.example.net]:587; "
            "an IPv6 address in brackets), got '::1'"),
    ("[relay.example.net", "expected [host]:port, host:port or host "
                           "(e.g. [mail.example.net]:587; an IPv6 address in "
                           "brackets), got '[relay.example.net'"),
    ("192.0.2.1:25", "put an IP address in brackets, e.g. '[192.0.2.1]:25', "
                     "got '192.0.2.1:25'"),
    ("bad_host:25", "expected a host name or IP address, got 'bad_host' "
                    "in 'bad_host:25'"),
])
def test_bad_smarthost(tmp_path, raw, problem):
    assert error_for(tmp_path, f"[delivery]\nsmarthost = {raw}\n") == (
        f"FILE: [delivery] smarthost: {problem}")


# --- TLS and paths ---------------------------------------------------------------

def write_pair(tmp_path, pair, cert="cert.pem", key="key.pem"):
    """Write a certs.KeyPair to two files; their paths as strings."""
    (tmp_path / cert).write_bytes(pair.cert_pem)
    (tmp_path / key).write_bytes(pair.key_pem)
    return str(tmp_path / cert), str(tmp_path / key)


def tls_error(tmp_path, cert, key):
    """The one-line message for [tls] certificate = cert, private_key = key."""
    return error_for(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")


def test_tls_both_files(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    settings = load_with(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
    assert settings.tls.certificate == str(tmp_path / "cert.pem")
    assert settings.tls.private_key == str(tmp_path / "key.pem")


def test_tls_certificate_and_key_in_one_file(tmp_path):
    pair = certs.self_signed("mx.test")
    (tmp_path / "both.pem").write_bytes(pair.key_pem + pair.cert_pem)
    both = str(tmp_path / "both.pem")
    settings = load_with(tmp_path, f"[tls]\ncertificate = {both}\nprivate_key = {both}\n")
    assert settings.tls.certificate == settings.tls.private_key == both


def test_tls_certificate_file_without_a_certificate(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    assert tls_error(tmp_path, cert, key) == (
        "FILE: [tls] certificate: no PEM certificate (-----BEGIN CERTIFICATE-----) "
        f"in '{cert}'")


def test_tls_key_given_as_the_certificate(tmp_path):
    _, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    assert tls_error(tmp_path, key, key) == (
        "FILE: [tls] certificate: no PEM certificate (-----BEGIN CERTIFICATE-----) "
        f"in '{key}'")


def test_tls_certificate_given_as_the_key(tmp_path):
    cert, _ = write_pair(tmp_path, certs.self_signed("mx.test"))
    assert tls_error(tmp_path, cert, cert) == (
        "FILE: [tls] private_key: no PEM private key (-----BEGIN PRIVATE KEY-----) "
        f"in '{cert}'")


def test_tls_damaged_certificate(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    (tmp_path / "cert.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n")
    message = tls_error(tmp_path, cert, key)
    assert message.startswith(
        f"FILE: [tls] certificate: certificate 1 in '{cert}' cannot be read: ")


def test_tls_damaged_key(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    (tmp_path / "key.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nMIIBAAAA\n-----END PRIVATE KEY-----\n")
    message = tls_error(tmp_path, cert, key)
    assert message.startswith(
        f"FILE: [tls] private_key: the private key in '{key}' cannot be read: ")


def test_tls_key_that_does_not_match(tmp_path):
    cert, _ = write_pair(tmp_path, certs.self_signed("mx.test"))
    _, key = write_pair(tmp_path, certs.self_signed("mx.test"), "other.pem", "other.key")
    assert tls_error(tmp_path, cert, key) == (
        "FILE: [tls] private_key: the private key does not match the certificate "
        f"in '{cert}'")


def test_tls_chain_in_the_wrong_order(tmp_path):
    authority = certs.CertificateAuthority()
    pair = authority.issue("mx.test")
    (tmp_path / "cert.pem").write_bytes(authority.cert_pem + pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    assert tls_error(tmp_path, cert, key) == (
        "FILE: [tls] certificate: the private key belongs to certificate 2 in "
        f"'{cert}'; put the server's own certificate first, then its intermediates")


def test_tls_encrypted_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    pair = certs.self_signed("mx.test")
    cert, key = write_pair(tmp_path, pair)
    private = serialization.load_pem_private_key(pair.key_pem, None)
    (tmp_path / "key.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert tls_error(tmp_path, cert, key) == (
        f"FILE: [tls] private_key: the private key in '{key}' is encrypted; give "
        "relaymail an unencrypted key readable only by its user")


def test_tls_key_file_with_two_keys(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    (tmp_path / "key.pem").write_bytes(
        certs.self_signed("a.test").key_pem + certs.self_signed("b.test").key_pem)
    assert tls_error(tmp_path, cert, key) == (
        f"FILE: [tls] private_key: 2 private keys in '{key}'; expected one")


def test_tls_huge_file(tmp_path):
    cert, key = write_pair(tmp_path, certs.self_signed("mx.test"))
    (tmp_path / "cert.pem").write_bytes(b"#" * (1024 * 1024 + 1))
    assert tls_error(tmp_path, cert, key) == (
        f"FILE: [tls] certificate: '{cert}' is larger than 1 MiB; not a PEM file")


def test_tls_error_blames_the_command_line(tmp_path):
    cert, _ = write_pair(tmp_path, certs.self_signed("mx.test"))
    _, key = write_pair(tmp_path, certs.self_signed("mx.test"), "other.pem", "other.key")
    path = write_ini(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {cert}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {("tls", "private_key"): key})
    assert (info.value.source, info.value.section, info.value.key) == (
        "command line", "tls", "private_key")


def test_load_server_certificate_keeps_the_chain_in_order(tmp_path):
    authority = certs.CertificateAuthority()
    pair = authority.issue("mx.test")
    (tmp_path / "cert.pem").write_bytes(
        b"# leaf, then the CA\n" + pair.cert_pem + authority.cert_pem)
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    loaded = load_server_certificate(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    names = [c.subject.rfc4514_string() for c in loaded.chain]
    assert names == ["CN=mx.test", "CN=relaymail test CA"]
    assert loaded.leaf is loaded.chain[0]


def test_load_server_certificate_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError) as info:
        load_server_certificate(str(tmp_path / "none.pem"), str(tmp_path / "none.key"))
    assert isinstance(info.value, TLSFileError)
    assert info.value.key == "certificate"
    assert str(info.value) == (
        f"cannot read '{tmp_path}/none.pem': No such file or directory")


def test_tls_certificate_without_key(tmp_path):
    (tmp_path / "cert.pem").write_text("cert")
    assert error_for(tmp_path, f"[tls]\ncertificate = {tmp_path}/cert.pem\n") == (
        "FILE: [tls] certificate: set but private_key is not; set both or neither")


def test_tls_key_without_certificate(tmp_path):
    (tmp_path / "key.pem").write_text("key")
    assert error_for(tmp_path, f"[tls]\nprivate_key = {tmp_path}/key.pem\n") == (
        "FILE: [tls] private_key: set but certificate is not; set both or neither")


def test_tls_missing_file(tmp_path):
    assert error_for(tmp_path, "[tls]\ncertificate = /nonexistent/cert.pem\n") == (
        "FILE: [tls] certificate: cannot read '/nonexistent/cert.pem': "
        "No such file or directory")


def test_relative_queue_path_resolves_against_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_with(tmp_path, "[queue]\npath = spool/here\n")
    assert settings.queue.path == os.path.join(str(tmp_path), "spool", "here")


def test_plugin_path_directories(monkeypatch, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "more").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = load_with(tmp_path, f"[plugins]\npath = site, {tmp_path}/more\n")
    assert settings.plugins.path == [str(tmp_path / "site"), str(tmp_path / "more")]


def test_plugin_path_must_exist(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert error_for(tmp_path, "[plugins]\npath = nowhere\n") == (
        "FILE: [plugins] path: directory 'nowhere' does not exist")


def test_plugin_path_must_be_a_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert error_for(tmp_path, "[plugins]\npath = afile\n") == (
        "FILE: [plugins] path: directory 'afile' is not a directory")


def test_bad_plugin_name(tmp_path):
    assert error_for(tmp_path, "[plugins]\nrecipients = domains, a/b\n") == (
        "FILE: [plugins] recipients: expected a plugin name "
        "(letters, digits, '_', '-', '.'), got 'a/b'")


# --- command-line overrides ----------------------------------------------------------

def test_overrides_apply_after_the_file(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = write_ini(tmp_path, "[server]\nhostname = file.example.com\n"
                               "[limits]\nerrors = 5\n")
    settings = load_config(path, {
        ("server", "hostname"): "cli.example.com",
        ("server", "listen"): "tcp:2526",
        ("queue", "path"): "cli-spool",
        ("delivery", "smarthost"): "[relay.example.net]:587",
    })
    assert settings.server.hostname == "cli.example.com"
    assert settings.server.listen == ["tcp:2526"]
    assert settings.queue.path == str(tmp_path / "cli-spool")
    assert settings.delivery.smarthost == Smarthost("relay.example.net", 587, False)
    assert settings.limits.errors == 5


def test_override_errors_name_the_command_line():
    assert override_error({("server", "listen"): "bogus:1"}) == (
        "command line: [server] listen: not a valid Twisted server endpoint "
        "'bogus:1': unknown endpoint type 'bogus'; known: haproxy, ssl, stdio, systemd, tcp, "
        "tcp6, tls, unix")
    assert override_error({("delivery", "smarthost"): "relay:0"}) == (
        "command line: [delivery] smarthost: port must be a number from 1 to "
        "65535, got '0'")


def test_override_error_fields():
    with pytest.raises(ConfigError) as info:
        load_config(None, {("server", "listen"): "bogus:1"})
    error = info.value
    assert (error.source, error.section, error.key) == ("command line", "server", "listen")


def test_override_unknown_key():
    assert override_error({("server", "hostnam"): "x"}) == (
        "command line: [server] hostnam: unknown key; did you mean 'hostname'?")


def test_override_conflict_blames_the_command_line(tmp_path):
    path = write_ini(tmp_path, "[queue]\nmin_backoff = 100\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {("queue", "max_backoff"): "50"})
    assert str(info.value) == (
        "command line: [queue] max_backoff: max_backoff (50) must be at least "
        "min_backoff (100)")


# --- outbound delivery keys -------------------------------------------------------

PASSWORD = "s3cret-Pa55"


def password_file(tmp_path, content=PASSWORD + "\n", name="password"):
    """A password file holding ``content`` (str or bytes); its path."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_smarthost_login(tmp_path):
    path = password_file(tmp_path, PASSWORD + "\r\nsecond line\n")
    settings = load_with(tmp_path, "[delivery]\nsmarthost = [relay.example.net]:587\n"
                                   "smarthost_user = relay-user@example.com\n"
                                   f"smarthost_password_file = {path}\n")
    assert settings.delivery.smarthost_user == "relay-user@example.com"
    assert settings.delivery.smarthost_password_file == path
    assert settings.delivery.smarthost_password == PASSWORD


def test_password_may_hold_spaces_and_lack_a_line_end(tmp_path):
    path = password_file(tmp_path, " two words ")
    settings = load_with(tmp_path, "[delivery]\nsmarthost_user = u\n"
                                   f"smarthost_password_file = {path}\n")
    assert settings.delivery.smarthost_password == " two words "


def test_password_is_not_in_the_settings_repr(tmp_path):
    path = password_file(tmp_path)
    settings = load_with(tmp_path, "[delivery]\nsmarthost_user = u\n"
                                   f"smarthost_password_file = {path}\n")
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in repr(settings.delivery)


def test_user_without_password_file(tmp_path):
    assert error_for(tmp_path, "[delivery]\nsmarthost_user = u\n") == (
        "FILE: [delivery] smarthost_user: set but smarthost_password_file is not; "
        "set both or neither")


def test_password_file_without_user(tmp_path):
    path = password_file(tmp_path)
    message = error_for(tmp_path, f"[delivery]\nsmarthost_password_file = {path}\n")
    assert message == (
        "FILE: [delivery] smarthost_password_file: set but smarthost_user is not; "
        "set both or neither")
    assert PASSWORD not in message


def test_missing_password_file(tmp_path):
    assert error_for(tmp_path, "[delivery]\nsmarthost_user = u\n"
                               "smarthost_password_file = /nonexistent/pw\n") == (
        "FILE: [delivery] smarthost_password_file: cannot read '/nonexistent/pw': "
        "No such file or directory")


@pytest.mark.parametrize("content, problem", [
    ("\n" + PASSWORD + "\n", "is empty"),
    ("", "is empty"),
    (PASSWORD.encode() + b"\xff\n", "is not UTF-8"),
    (PASSWORD * 1000, "is longer than 4096 bytes"),
])
def test_bad_password_file_never_shows_the_password(tmp_path, content, problem):
    path = password_file(tmp_path, content)
    message = error_for(tmp_path, "[delivery]\nsmarthost_user = u\n"
                                  f"smarthost_password_file = {path}\n")
    assert message == ("FILE: [delivery] smarthost_password_file: "
                       f"the first line of {path!r} {problem}")
    assert PASSWORD not in message


def test_password_written_in_the_config_is_not_echoed(tmp_path):
    # smarthost_password is not a key: the password belongs in its own file.
    message = error_for(tmp_path, f"[delivery]\nsmarthost_password = {PASSWORD}\n")
    assert message == ("FILE: [delivery] smarthost_password: unknown key; "
                       "did you mean 'smarthost_password_file'?")


@pytest.mark.parametrize("level", ["none", "may", "encrypt", "verify", "Verify"])
def test_smarthost_tls_levels(tmp_path, level):
    settings = load_with(tmp_path, f"[delivery]\nsmarthost_tls = {level}\n")
    assert settings.delivery.smarthost_tls == level.lower()


def test_bad_smarthost_tls(tmp_path):
    assert error_for(tmp_path, "[delivery]\nsmarthost_tls = secure\n") == (
        "FILE: [delivery] smarthost_tls: expected one of none, may, encrypt, "
        "verify, wrapper, got 'secure'")


def test_tls_ca_file(tmp_path):
    (tmp_path / "ca.pem").write_text(
        "# roots\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    settings = load_with(tmp_path, f"[delivery]\ntls_ca_file = {tmp_path}/ca.pem\n")
    assert settings.delivery.tls_ca_file == str(tmp_path / "ca.pem")


def test_tls_ca_file_must_hold_a_pem_certificate(tmp_path):
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    assert error_for(tmp_path, f"[delivery]\ntls_ca_file = {tmp_path}/key.pem\n") == (
        "FILE: [delivery] tls_ca_file: no PEM certificate "
        f"(-----BEGIN CERTIFICATE-----) in '{tmp_path}/key.pem'")


def test_tls_ca_file_must_exist(tmp_path):
    assert error_for(tmp_path, "[delivery]\ntls_ca_file = /nonexistent/ca.pem\n") == (
        "FILE: [delivery] tls_ca_file: cannot read '/nonexistent/ca.pem': "
        "No such file or directory")


def test_helo_name(tmp_path):
    settings = load_with(tmp_path, "[delivery]\nhelo_name = out.example.com\n")
    assert settings.delivery.helo_name == "out.example.com"


def test_bad_helo_name(tmp_path):
    assert error_for(tmp_path, "[delivery]\nhelo_name = out_1.example.com\n") == (
        "FILE: [delivery] helo_name: expected a host name such as mail.example.com "
        "(letters, digits, hyphens and dots), got 'out_1.example.com'")


def test_delivery_timeouts(tmp_path):
    settings = load_with(tmp_path, "[delivery]\nconnect_timeout = 1.5\n"
                                   "command_timeout = 2m\ndata_timeout = 1h\n")
    assert settings.delivery.connect_timeout == 1.5
    assert settings.delivery.command_timeout == 120.0
    assert settings.delivery.data_timeout == 3600.0


@pytest.mark.parametrize("key", ["connect_timeout", "command_timeout", "data_timeout"])
def test_zero_delivery_timeout_is_refused(tmp_path, key):
    assert error_for(tmp_path, f"[delivery]\n{key} = 0\n") == (
        f"FILE: [delivery] {key}: must be more than 0, got '0'")


def test_connection_limits(tmp_path):
    settings = load_with(tmp_path, "[delivery]\ndestination_concurrency = 2\n"
                                   "max_connections = 7\n")
    assert settings.delivery.destination_concurrency == 2
    assert settings.delivery.max_connections == 7


@pytest.mark.parametrize("key", ["destination_concurrency", "max_connections"])
def test_connection_limits_are_at_least_one(tmp_path, key):
    assert error_for(tmp_path, f"[delivery]\n{key} = 0\n") == (
        f"FILE: [delivery] {key}: must be at least 1, got '0'")


def test_mx_port(tmp_path):
    assert load_with(tmp_path, "[delivery]\nmx_port = 2525\n").delivery.mx_port == 2525


@pytest.mark.parametrize("raw", ["0", "65536", "smtp", ""])
def test_bad_mx_port(tmp_path, raw):
    assert error_for(tmp_path, f"[delivery]\nmx_port = {raw}\n") == (
        f"FILE: [delivery] mx_port: port must be a number from 1 to 65535, got {raw!r}")


# --- listeners, AUTH and connection limits ------------------------------------------

def test_submission_and_proxy_listeners(tmp_path):
    (tmp_path / "passwd").write_text("")
    settings = load_with(tmp_path, (
        f"[auth]\npasswords = {tmp_path / 'passwd'}\n"
        "[server]\n"
        "submission_listen = tcp:587\n"
        "proxy_listen =\n    tcp:2526:interface=127.0.0.1\n    tcp6:2526:interface=\\:\\:1\n"
        "proxy_trusted = 10.0.0.0/8, 2001:db8::1\n"))
    assert settings.server.submission_listen == ["tcp:587"]
    assert settings.server.proxy_listen == [
        "tcp:2526:interface=127.0.0.1", "tcp6:2526:interface=\\:\\:1"]
    assert settings.server.proxy_trusted == [
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128")]


@pytest.mark.parametrize("key", ["submission_listen", "proxy_listen"])
def test_bad_listener_endpoint(tmp_path, key):
    message = error_for(tmp_path, f"[server]\n{key} = nonsense:587\n")
    assert message.startswith(
        f"FILE: [server] {key}: not a valid Twisted server endpoint 'nonsense:587': ")


def test_bad_proxy_trusted(tmp_path):
    assert error_for(tmp_path, "[server]\nproxy_trusted = 10.0.0.1/8\n") == (
        "FILE: [server] proxy_trusted: '10.0.0.1/8' has host bits set; "
        "did you mean '10.0.0.0/8'?")


def test_auth_settings(tmp_path):
    (tmp_path / "passwd").write_text("alice:$scrypt$ln=15,r=8,p=1$c2FsdA$aGFzaA\n")
    settings = load_with(tmp_path, (
        f"[auth]\npasswords = {tmp_path}/passwd\nallow_plaintext = yes\n"
        "failure_delay = 0.05\n"))
    assert settings.auth.passwords == str(tmp_path / "passwd")
    assert settings.auth.allow_plaintext is True
    assert settings.auth.failure_delay == 0.05


def test_auth_failure_delay_may_be_zero(tmp_path):
    assert load_with(tmp_path, "[auth]\nfailure_delay = 0\n").auth.failure_delay == 0.0


def test_auth_passwords_must_be_readable(tmp_path):
    assert error_for(tmp_path, "[auth]\npasswords = /nonexistent/passwd\n") == (
        "FILE: [auth] passwords: cannot read '/nonexistent/passwd': "
        "No such file or directory")


def test_bad_allow_plaintext(tmp_path):
    assert error_for(tmp_path, "[auth]\nallow_plaintext = maybe\n") == (
        "FILE: [auth] allow_plaintext: expected yes or no (or true/false, on/off, "
        "1/0), got 'maybe'")


def test_bad_failure_delay(tmp_path):
    assert error_for(tmp_path, "[auth]\nfailure_delay = soon\n").startswith(
        "FILE: [auth] failure_delay: expected a duration in seconds")


def test_connection_and_data_limits(tmp_path):
    settings = load_with(tmp_path, (
        "[limits]\nmin_data_rate = 0\nconnections = 10\nconnections_per_ip = 0\n"
        "connection_rate_per_ip = 0\nheader_size = 64K\n"))
    limits = settings.limits
    assert (limits.min_data_rate, limits.connections, limits.connections_per_ip,
            limits.connection_rate_per_ip, limits.header_size) == (0, 10, 0, 0, 65536)


@pytest.mark.parametrize("key, raw, problem", [
    ("min_data_rate", "-1", "must be at least 0, got '-1'"),
    ("min_data_rate", "fast", "expected a whole number, got 'fast'"),
    ("connections", "0", "must be at least 1, got '0'"),
    ("connections_per_ip", "-5", "must be at least 0, got '-5'"),
    ("connection_rate_per_ip", "1.5", "expected a whole number, got '1.5'"),
    ("header_size", "0", "must be at least 1, got '0'"),
])
def test_bad_connection_and_data_limits(tmp_path, key, raw, problem):
    assert error_for(tmp_path, f"[limits]\n{key} = {raw}\n") == (
        f"FILE: [limits] {key}: {problem}")


# --- routes ----------------------------------------------------------------------

def test_routes(tmp_path):
    settings = load_with(tmp_path, (
        "[routes]\n"
        "example.com = [10.0.0.5]:25\n"
        "Example.ORG = mail.example.net:2525\n"
        "bücher.example = relay.example.net\n"
        "v6.example = [2001:db8::5]\n"))
    assert settings.routes == {
        "example.com": Smarthost("10.0.0.5", 25, False),
        "example.org": Smarthost("mail.example.net", 2525, True),
        "xn--bcher-kva.example": Smarthost("relay.example.net", 25, True),
        "v6.example": Smarthost("2001:db8::5", 25, False),
    }


def test_empty_routes_section(tmp_path):
    assert load_with(tmp_path, "[routes]\n").routes == {}


def test_bad_route_value(tmp_path):
    assert error_for(tmp_path, "[routes]\nexample.com = 10.0.0.5:25\n") == (
        "FILE: [routes] example.com: put an IP address in brackets, "
        "e.g. '[10.0.0.5]:25', got '10.0.0.5:25'")


def test_empty_route_value(tmp_path):
    assert error_for(tmp_path, "[routes]\nexample.com =\n") == (
        "FILE: [routes] example.com: expected a next hop: [host]:port, host:port "
        "or host (e.g. [10.0.0.5]:25), got ''")


def test_bad_route_domain(tmp_path):
    message = error_for(tmp_path, "[routes]\nexa mple.com = [10.0.0.5]\n")
    assert message.startswith(
        "FILE: [routes] exa mple.com: expected a domain name, got 'exa mple.com' (")


def test_route_domain_twice_in_different_case(tmp_path):
    assert error_for(tmp_path, "[routes]\nexample.com = [10.0.0.5]\n"
                               "EXAMPLE.com = [10.0.0.6]\n") == (
        "FILE: [routes] EXAMPLE.com: same domain as 'example.com'")


def test_route_from_the_command_line():
    settings = load_config(None, {("routes", "example.com"): "[10.0.0.5]:2525"})
    assert settings.routes == {"example.com": Smarthost("10.0.0.5", 2525, False)}
    assert override_error({("routes", "example.com"): "[10.0.0.5]:0"}) == (
        "command line: [routes] example.com: port must be a number from 1 to "
        "65535, got '0'")


def test_route_error_fields(tmp_path):
    path = write_ini(tmp_path, "[routes]\nexample.com = bad_host\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert (error.source, error.section, error.key) == (path, "routes", "example.com")


def test_listeners_that_could_serve_nobody_are_refused(tmp_path):
    from relaymail.config import ConfigError, load_config
    import pytest as _pytest
    with _pytest.raises(ConfigError) as caught:
        load_config(None, {("server", "proxy_listen"): "tcp:2526"})
    assert str(caught.value) == (
        "command line: [server] proxy_listen: set but proxy_trusted is empty: no proxy would be believed")
    with _pytest.raises(ConfigError) as caught:
        load_config(None, {("server", "submission_listen"): "tcp:2587"})
    assert str(caught.value) == (
        "command line: [server] submission_listen: set but [auth] passwords is not: "
        "nobody could log in to send")


def test_vrfy_and_expn_access(tmp_path):
    defaults = load_config()
    assert (defaults.server.vrfy, defaults.server.expn) == ("anyone", "trusted")
    settings = load_with(tmp_path, "[server]\nvrfy = Off\nexpn = anyone\n")
    assert (settings.server.vrfy, settings.server.expn) == ("off", "anyone")
    assert error_for(tmp_path, "[server]\nexpn = no\n") == (
        "FILE: [server] expn: expected one of anyone, trusted, off, got 'no'")


def test_min_free_defaults_to_one_and_a_half_message_sizes(tmp_path):
    assert load_config().queue.min_free == 15728640          # 1.5 x 10 MiB
    assert load_config(None, {("limits", "message_size"): "2M"}).queue.min_free == 3145728
    settings = load_with(tmp_path, "[queue]\nmin_free = 100M\n[limits]\nmessage_size = 2M\n")
    assert settings.queue.min_free == 104857600
    assert load_with(tmp_path, "[queue]\nmin_free = 0\n").queue.min_free == 0
    assert error_for(tmp_path, "[queue]\nmin_free = lots\n") == (
        "FILE: [queue] min_free: expected a size in bytes (e.g. 10485760 or 10M), got 'lots'")


# --- TLS per route, soft_bounce, double bounces -----------------------------------

def test_route_tls_and_wrapper(tmp_path):
    settings = load_with(tmp_path, (
        "[delivery]\nsmarthost = [10.0.0.9]:465\nsmarthost_tls = Wrapper\n"
        "[routes]\nexample.com = [10.0.0.5]:465\nexample.org = [10.0.0.6]\n"
        "[route_tls]\nExample.COM = wrapper\n"))
    assert settings.delivery.smarthost_tls == "wrapper"
    assert settings.route_tls == {"example.com": "wrapper"}
    assert load_config().route_tls == {}


def test_route_tls_needs_a_route(tmp_path):
    assert error_for(tmp_path, "[routes]\nexample.com = [10.0.0.5]\n"
                               "[route_tls]\nexample.org = verify\n") == (
        "FILE: [route_tls] example.org: has no [routes] entry: TLS for a route "
        "that does not exist")


def test_bad_route_tls(tmp_path):
    assert error_for(tmp_path, "[routes]\nexample.com = [10.0.0.5]\n"
                               "[route_tls]\nexample.com = starttls\n") == (
        "FILE: [route_tls] example.com: expected one of none, may, encrypt, verify, "
        "wrapper, got 'starttls'")


def test_soft_bounce_and_double_bounce_defaults():
    settings = load_config()
    assert settings.delivery.soft_bounce is False
    assert settings.queue.double_bounce_recipient == "postmaster"


@pytest.mark.parametrize("raw, parsed", [
    ("postmaster", "postmaster"),
    ("hostmaster@Example.ORG", "hostmaster@example.org"),
    ("", None),
])
def test_double_bounce_recipient(raw, parsed):
    settings = load_config(None, {("queue", "double_bounce_recipient"): raw})
    assert settings.queue.double_bounce_recipient == parsed


@pytest.mark.parametrize("raw", ["post master", "<postmaster>", "a..b@example.com", "@example.com",
                                 "x@-bad-.example"])
def test_bad_double_bounce_recipient(raw):
    assert override_error({("queue", "double_bounce_recipient"): raw}).startswith(
        "command line: [queue] double_bounce_recipient: expected ")


# --- connection shares ([limits] trusted_reserve, stress_*, prefixes) -----------

def test_connection_share_defaults():
    limits = load_config().limits
    assert (limits.ipv4_prefix, limits.ipv6_prefix) == (32, 64)
    assert (str(limits.trusted_reserve), limits.trusted_reserve.of(limits.connections)) == ("10%", 100)
    assert (str(limits.stress_threshold), limits.stress_threshold.of(limits.connections)) == ("80%", 800)
    assert (limits.stress_timeout, limits.stress_errors, limits.stress_junk_commands) == (10, 1, 1)
    assert load_config().server.listen_backlog == 1024


@pytest.mark.parametrize("text, message", [
    ("[limits]\nipv6_prefix = 129\n",
     "FILE: [limits] ipv6_prefix: expected a prefix length from 1 to 128, got '129'"),
    ("[limits]\nipv4_prefix = /0\n",
     "FILE: [limits] ipv4_prefix: expected a prefix length from 1 to 32, got '/0'"),
    ("[limits]\ntrusted_reserve = some\n",
     "FILE: [limits] trusted_reserve: expected a whole number or a percentage "
     "(e.g. 50 or 10%), got 'some'"),
    ("[limits]\ntrusted_reserve = 100%\n",
     "FILE: [limits] trusted_reserve: must be at most 99%, got '100%'"),
    ("[limits]\nconnections = 10\ntrusted_reserve = 10\n",
     "FILE: [limits] trusted_reserve: trusted_reserve (10) must be less than connections (10): "
     "clients outside trusted_networks could never connect"),
    ("[limits]\nstress_threshold = 1001\n",
     "FILE: [limits] stress_threshold: stress_threshold (1001) must be from 1 to connections (1000)"),
    ("[limits]\nstress_threshold = 0\n",
     "FILE: [limits] stress_threshold: stress_threshold (0) must be from 1 to connections (1000)"),
    ("[limits]\nstress_timeout = 0\n",
     "FILE: [limits] stress_timeout: must be more than 0, got '0'"),
    ("[server]\nlisten_backlog = 0\n",
     "FILE: [server] listen_backlog: must be at least 1, got '0'"),
])
def test_connection_share_errors(tmp_path, text, message):
    assert error_for(tmp_path, text) == message


def test_lowering_connections_below_a_set_reserve_blames_connections(tmp_path):
    path = write_ini(tmp_path, "[limits]\ntrusted_reserve = 50\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {("limits", "connections"): "40"})
    assert str(info.value) == (
        "command line: [limits] connections: trusted_reserve (50) must be less than "
        "connections (40): clients outside trusted_networks could never connect")


def test_percentages_follow_connections():
    limits = load_config(None, {("limits", "connections"): "5"}).limits
    assert limits.trusted_reserve.of(5) == 0
    assert limits.stress_threshold.of(5) == 4


# --- contradictions: smarthost credentials without TLS ---------------------------

def test_smarthost_credentials_with_smarthost_tls_none_are_refused(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    assert error_for(tmp_path, f"[delivery]\nsmarthost = [10.0.0.5]:587\nsmarthost_user = u\n"
                               f"smarthost_password_file = {tmp_path}/pw\n"
                               "smarthost_tls = none\n") == (
        "FILE: [delivery] smarthost_tls: smarthost_user is set and smarthost_tls = none, but "
        "the password is sent only over TLS: every message to the smarthost would be "
        "deferred; set smarthost_tls = verify (or encrypt)")


def test_smarthost_tls_none_given_last_on_the_command_line_is_the_key_named(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    path = write_ini(tmp_path, f"[delivery]\nsmarthost_tls = none\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {("delivery", "smarthost_user"): "u",
                           ("delivery", "smarthost_password_file"): f"{tmp_path}/pw"})
    assert str(info.value).startswith(
        "command line: [delivery] smarthost_user: smarthost_user is set and smarthost_tls = "
        "none")


@pytest.mark.parametrize("level", ["may", "encrypt", "verify", "wrapper"])
def test_smarthost_credentials_with_tls_load(tmp_path, level):
    (tmp_path / "pw").write_text("secret\n")
    settings = load_with(tmp_path, f"[delivery]\nsmarthost_user = u\n"
                                   f"smarthost_password_file = {tmp_path}/pw\n"
                                   f"smarthost_tls = {level}\n")
    assert settings.delivery.smarthost_tls == level


# --- certificates outside their validity ---------------------------------------

def _days(number):
    import datetime
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=number)


def test_an_expired_certificate_is_refused_with_its_notafter_date(tmp_path):
    ended = _days(-3).replace(microsecond=0)
    cert, key = write_pair(tmp_path, certs.self_signed(
        "mx.test", valid_from=_days(-90), valid_until=ended))
    assert tls_error(tmp_path, cert, key) == (
        f"FILE: [tls] certificate: the certificate in {cert!r} expired on "
        f"{ended:%Y-%m-%d %H:%M:%S} UTC (notAfter)")


def test_a_certificate_not_yet_valid_is_refused_with_its_notbefore_date(tmp_path):
    starts = _days(2).replace(microsecond=0)
    cert, key = write_pair(tmp_path, certs.self_signed(
        "mx.test", valid_from=starts, valid_until=_days(90)))
    assert tls_error(tmp_path, cert, key) == (
        f"FILE: [tls] certificate: the certificate in {cert!r} is not valid until "
        f"{starts:%Y-%m-%d %H:%M:%S} UTC (notBefore)")
