"""A start that fails outside the config file (a port taken, a port it
may not bind) is one line naming the key, with no traceback, and leaves
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
