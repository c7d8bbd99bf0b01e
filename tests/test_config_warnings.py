"""relaymail.config_warnings: what a valid config deserves a line about."""

import datetime

import pytest

from relaymail.config import load_config
from relaymail.config_warnings import config_warnings
from tests import certs

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def settings_from(tmp_path, text):
    path = tmp_path / "relay.ini"
    path.write_text(text)
    return load_config(str(path))


def pair_in(tmp_path, days, name="cert"):
    """A certificate valid until ``days`` from NOW; its file paths."""
    pair = certs.self_signed("mx.test", valid_from=NOW - datetime.timedelta(days=60),
                             valid_until=NOW + datetime.timedelta(days=days))
    (tmp_path / f"{name}.pem").write_bytes(pair.cert_pem)
    (tmp_path / f"{name}.key").write_bytes(pair.key_pem)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.key"


def test_a_default_config_has_no_warnings(tmp_path):
    assert config_warnings(settings_from(tmp_path, "")) == []


def test_smarthost_credentials_under_may_are_one_warning(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    settings = settings_from(tmp_path, f"[delivery]\nsmarthost = [10.0.0.5]:587\n"
                                       f"smarthost_user = u\nsmarthost_password_file = "
                                       f"{tmp_path}/pw\n")
    assert config_warnings(settings) == [
        f"{tmp_path}/relay.ini: [delivery] smarthost_tls: may with smarthost_user set: the "
        "password is sent only over TLS, so while the smarthost offers no STARTTLS its mail "
        "is deferred, and its certificate is not checked; set verify (or encrypt)"]


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_smarthost_credentials_under_required_tls_are_no_warning(tmp_path, level):
    (tmp_path / "pw").write_text("secret\n")
    settings = settings_from(tmp_path, f"[delivery]\nsmarthost_user = u\nsmarthost_password_file"
                                       f" = {tmp_path}/pw\nsmarthost_tls = {level}\n")
    assert config_warnings(settings) == []


def test_a_certificate_expiring_within_30_days_is_one_warning(tmp_path):
    cert, key = pair_in(tmp_path, 10)
    settings = settings_from(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
    ends = NOW + datetime.timedelta(days=10)
    assert config_warnings(settings, now=NOW) == [
        f"{tmp_path}/relay.ini: [tls] certificate: the certificate in '{cert}' expires on "
        f"{ends:%Y-%m-%d %H:%M:%S} UTC, in 10 days; renew it (SIGHUP reads it again)"]


def test_a_certificate_with_31_days_left_is_no_warning(tmp_path):
    cert, key = pair_in(tmp_path, 31)
    settings = settings_from(tmp_path, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
    assert config_warnings(settings, now=NOW) == []


def test_an_ssl_listener_certificate_expiring_soon_names_its_key(tmp_path):
    cert, key = pair_in(tmp_path, 1, "listener")
    settings = settings_from(tmp_path, f"[server]\nsubmission_listen = tcp:587\n"
                                       f"listen = ssl:465:privateKey={key}:certKey={cert}\n"
                                       "[auth]\npasswords = /dev/null\n")
    ends = NOW + datetime.timedelta(days=1)
    assert config_warnings(settings, now=NOW) == [
        f"{tmp_path}/relay.ini: [server] listen: the certificate in '{cert}' expires on "
        f"{ends:%Y-%m-%d %H:%M:%S} UTC, in 1 day; renew it (SIGHUP reads it again)"]
