"""A start that fails outside the config file (a port taken, a port it
may not bind, a spool it cannot make or write) is one line naming the key, with no traceback, and leaves
nothing behind: no spool made for nothing, no lock, no pid file."""

import os
import socket
import subprocess

import pytest

from tests.relay_process import TWISTD, _env, free_port


@pytest.mark.parametrize("section", ["server", "metrics"])
@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_port_in_use_is_one_line_naming_the_key_and_leaves_nothing(tmp_path, workers, section):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relaymail.ini"
        spool = tmp_path / "spool"
        # The metrics listener (relaymail.metrics.web) fails as the SMTP ones do.
        smtp_port = port if section == "server" else free_port()
        metrics = f"[metrics]\nlisten = tcp:{port}:interface=127.0.0.1\n" if section == "metrics" else ""
        config.write_text(f"[server]\nlisten = tcp:{smtp_port}:interface=127.0.0.1\n"
                          f"workers = {workers}\n[queue]\npath = {spool}\n{metrics}")
        result = subprocess.run([TWISTD, "-n", "--pidfile=twistd.pid", "relaymail",
                                 "--config", str(config)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "#error]" in line]
    assert len(errors) == 1, output
    assert errors[0].endswith(
        f"relaymail: {config}: [{section}] listen: cannot listen on "
        f"tcp:{port}:interface=127.0.0.1: Address already in use; another server has that "
        "port (ss -ltnp shows which)"), errors[0]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini"]


def test_a_failed_start_keeps_a_spool_that_holds_mail(tmp_path):
    spool = tmp_path / "spool"
    (spool / "active").mkdir(parents=True)
    (spool / "active" / "KEEPME").write_text("x")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relaymail.ini"
        config.write_text(f"[server]\nlisten = tcp:{port}:interface=127.0.0.1\nworkers = 0\n"
                          f"[queue]\npath = {spool}\n")
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "relaymail", "--config",
                                 str(config)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert (spool / "active" / "KEEPME").read_text() == "x"
    # The lock file stays (it is never removed while a spool exists), its
    # pid forgotten.
    assert (spool / "lock").read_text() == ""


def _free_port_whose_digits_begin_another():
    """A free port Q with Q*10+1 free too (25 and 251, say)."""
    for port in range(2000, 6500, 7):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port * 10 + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no such pair of free ports")


def test_the_key_named_is_the_one_whose_port_failed_not_one_with_a_longer_port(tmp_path):
    port = _free_port_whose_digits_begin_another()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        config = tmp_path / "relaymail.ini"
        config.write_text(f"[server]\nlisten = tcp:{port * 10 + 1}:interface=127.0.0.1\n"
                          f"proxy_listen = tcp:{port}:interface=127.0.0.1\nproxy_trusted = 127.0.0.1\n"
                          "workers = 0\n"
                          f"[queue]\npath = {tmp_path / 'spool'}\n")
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "relaymail", "--config",
                                 str(config)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=30)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "#error]" in line]
    assert len(errors) == 1, result.stdout + result.stderr
    assert f"[server] proxy_listen: cannot listen on tcp:{port}:" in errors[0], errors[0]


# --- a spool the relay cannot make or write ---------------------------------

def start_with(tmp_path, text, *twistd_options):
    """Start the relay on a config of ``text`` and expect it to fail:
    its exit code and every line it printed."""
    config = tmp_path / "relaymail.ini"
    config.write_text(text)
    result = subprocess.run([TWISTD, "-n", "--pidfile=twistd.pid", *twistd_options, "relaymail",
                             "--config", str(config)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=30)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def spool_config(spool, workers):
    return (f"[server]\nlisten = tcp:0:interface=127.0.0.1\nworkers = {workers}\n"
            f"[queue]\npath = {spool}\n")


@pytest.fixture
def read_only_mount(tmp_path):
    """A directory on a tmpfs mounted read-only, holding an empty
    directory ``spool``: root ignores mode bits, not a read-only mount."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs mount(8) with CAP_SYS_ADMIN (run as root)")
    try:
        (mount_point / "spool").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_spool_path_that_is_a_file_is_one_line_and_leaves_nothing(tmp_path, workers):
    spool = tmp_path / "spool"
    spool.write_text("not a directory\n")
    code, lines = start_with(tmp_path, spool_config(spool, workers))
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [queue] path: {spool} is not a "
                     "directory (it is a regular file)"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini", "spool"]
    assert spool.read_text() == "not a directory\n"


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_read_only_spool_is_one_line_and_leaves_nothing(tmp_path, read_only_mount, workers):
    spool = read_only_mount / "spool"
    code, lines = start_with(tmp_path, spool_config(spool, workers))
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [queue] path: cannot write in "
                     f"{spool}: Read-only file system"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini", "ro"]
    assert os.listdir(spool) == []


def test_a_read_only_spool_is_refused_before_the_uid_switch(tmp_path, read_only_mount):
    spool = read_only_mount / "spool"
    code, lines = start_with(tmp_path, spool_config(spool, 0), "--uid", "nobody")
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [queue] path: cannot write in "
                     f"{spool}: Read-only file system"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini", "ro"]


def test_a_spool_that_cannot_be_made_in_a_read_only_directory_is_one_line(tmp_path,
                                                                           read_only_mount):
    spool = read_only_mount / "var" / "spool"
    code, lines = start_with(tmp_path, spool_config(spool, 2))
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [queue] path: cannot create "
                     f"{spool}: cannot write in {read_only_mount}: Read-only file system"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini", "ro"]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_spool_below_a_file_is_one_line_and_leaves_nothing(tmp_path, workers):
    (tmp_path / "var").write_text("")
    spool = tmp_path / "var" / "relaymail" / "spool"
    code, lines = start_with(tmp_path, spool_config(spool, workers))
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [queue] path: cannot create "
                     f"{spool}: {tmp_path}/var is not a directory (it is a regular file)"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini", "var"]


# --- listener endpoint typos ---------------------------------------------------

@pytest.mark.parametrize("workers", ["2", "0"])
def test_an_endpoint_typo_is_one_line_naming_the_key_and_leaves_nothing(tmp_path, workers):
    spool = tmp_path / "spool"
    code, lines = start_with(tmp_path, f"[server]\nlisten = tcp:2590:interfce=127.0.0.1\n"
                                       f"workers = {workers}\n[queue]\npath = {spool}\n")
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [server] listen: not a valid "
                     "Twisted server endpoint 'tcp:2590:interfce=127.0.0.1': unknown parameter "
                     "'interfce' for tcp (did you mean 'interface'?); tcp takes interface, "
                     "backlog"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini"]


def test_an_unescaped_ipv6_interface_is_refused_by_relaymail_check_too(tmp_path):
    from relaymail.tools.check import main
    import io
    config = tmp_path / "relaymail.ini"
    config.write_text("[server]\nlisten = tcp:2590:interface=::1\n")
    err = io.StringIO()
    assert main(["config", str(config)], out=io.StringIO(), err=err) == 1
    assert err.getvalue() == (
        f"relaymail-check: {config}: [server] listen: not a valid Twisted server endpoint "
        "'tcp:2590:interface=::1': the colons of the IPv6 address in interface=::1 must be "
        "escaped: write interface=\\:\\:1, or use tcp6:2590:interface=\\:\\:1\n")


# --- certificates outside their validity, and warnings at start ------------------

def _certificate(tmp_path, name, valid_from_days, valid_until_days):
    """A self-signed pair valid between the two offsets from now, written
    to NAME.pem and NAME.key; (cert path, key path, notBefore, notAfter)."""
    import datetime
    from tests import certs
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    starts = now + datetime.timedelta(days=valid_from_days)
    ends = now + datetime.timedelta(days=valid_until_days)
    pair = certs.self_signed("relay.test", valid_from=starts, valid_until=ends)
    (tmp_path / f"{name}.pem").write_bytes(pair.cert_pem)
    (tmp_path / f"{name}.key").write_bytes(pair.key_pem)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.key", starts, ends


def _when(moment):
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


@pytest.mark.parametrize("workers", ["2", "0"])
def test_an_expired_tls_certificate_is_one_line_and_leaves_nothing(tmp_path, workers):
    files = tmp_path / "files"
    files.mkdir()
    cert, key, _, ends = _certificate(files, "cert", -90, -1)
    code, lines = start_with(tmp_path, spool_config(tmp_path / "spool", workers)
                             + f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [tls] certificate: the certificate "
                     f"in '{cert}' expired on {_when(ends)} (notAfter)"]
    assert sorted(os.listdir(tmp_path)) == ["files", "relaymail.ini"]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_an_ssl_listener_certificate_not_yet_valid_is_one_line_and_leaves_nothing(tmp_path,
                                                                                  workers):
    files = tmp_path / "files"
    files.mkdir()
    cert, key, starts, _ = _certificate(files, "listener", 1, 90)
    listener = f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    code, lines = start_with(tmp_path, spool_config(tmp_path / "spool", workers).replace(
        "listen = tcp:0:interface=127.0.0.1", f"listen = {listener}"))
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [server] listen: {listener}: the "
                     f"certificate in '{cert}' is not valid until {_when(starts)} (notBefore)"]
    assert sorted(os.listdir(tmp_path)) == ["files", "relaymail.ini"]


def _warnings(relay):
    return [line.split("#warn] ", 1)[1] for line in relay.log().splitlines()
            if "#warn] " in line]


def test_a_certificate_expiring_soon_is_one_warning_at_start_and_still_serves(tmp_path):
    from tests.relay_process import RelayProcess
    cert, key, _, ends = _certificate(tmp_path, "cert", -60, 12)
    relay = RelayProcess(tmp_path, {"server": {"workers": "2"}, "tls": {
        "certificate": str(cert), "private_key": str(key)}}).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), 10) as client:
            replies = client.makefile("rb")
            assert replies.readline().startswith(b"220 relay.test")
            client.sendall(b"EHLO client.test\r\n")
            ehlo = []
            while not ehlo or ehlo[-1][3:4] == b"-":
                ehlo.append(replies.readline())
            assert b"250-STARTTLS\r\n" in ehlo
    finally:
        relay.stop()
    # Days are whole days left: 11 and some hours, a moment after writing.
    assert _warnings(relay) == [
        f"{relay.config}: [tls] certificate: the certificate in '{cert}' expires on "
        f"{_when(ends)}, in 11 days; renew it (SIGHUP reads it again)"]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_smarthost_credentials_under_may_are_one_warning_at_start(tmp_path, workers):
    from tests.relay_process import RelayProcess
    (tmp_path / "password").write_text("secret\n")
    relay = RelayProcess(tmp_path, {"server": {"workers": workers}, "delivery": {
        "smarthost_user": "relay", "smarthost_password_file": str(tmp_path / "password")}}).start()
    relay.stop()
    assert _warnings(relay) == [
        f"{relay.config}: [delivery] smarthost_tls: may with smarthost_user set: the password "
        "is sent only over TLS, so while the smarthost offers no STARTTLS its mail is "
        "deferred, and its certificate is not checked; set verify (or encrypt)"]


def test_smarthost_credentials_with_smarthost_tls_none_are_one_line_and_leave_nothing(tmp_path):
    (tmp_path / "password").write_text("secret\n")
    code, lines = start_with(tmp_path, spool_config(tmp_path / "spool", 2)
                             + "[delivery]\nsmarthost = [127.0.0.1]:2525\nsmarthost_user = relay\n"
                             f"smarthost_password_file = {tmp_path}/password\n"
                             "smarthost_tls = none\n")
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [delivery] smarthost_tls: "
                     "smarthost_user is set and smarthost_tls = none, but the password is sent "
                     "only over TLS: every message to the smarthost would be deferred; set "
                     "smarthost_tls = verify (or encrypt)"]
    assert sorted(os.listdir(tmp_path)) == ["password", "relaymail.ini"]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_misspelt_plugin_section_is_one_line_and_leaves_nothing(tmp_path, workers):
    code, lines = start_with(tmp_path, spool_config(tmp_path / "spool", workers)
                             + "[plugins]\nrecipients = aliases\n[plugin:alaises]\nfile = x\n")
    assert code == 1
    assert lines == [f"relaymail: {tmp_path}/relaymail.ini: [plugin:alaises]: no plugin named "
                     "'alaises' is loaded ([plugins] path); did you mean [plugin:aliases]?"]
    assert sorted(os.listdir(tmp_path)) == ["relaymail.ini"]
