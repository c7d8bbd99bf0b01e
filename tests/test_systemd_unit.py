"""etc/relaymail.service: systemd-analyze verify finds nothing to say
about it, it carries the hardening docs/scaling.rst promises, its limits
fit the relay's defaults, and its ExecStart, ExecReload and KillSignal do
what systemd will do with them to a real relay.

systemd is not PID 1 in the test containers, so the unit is verified, not
started by systemd; the commands it names are run by the test instead."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys

from relaymail.config import load_config
from relaymail.file_limit import files_needed
from relaymail.process.master import STOP_MARGIN
from tests.relay_process import REPO, TWISTD, _env
from tests.test_delivery import wait_until
from tests.test_processes import relay_with
from tests.test_stop_and_reload import no_alarming_lines

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
UNIT = os.path.join(REPO, "etc", "relaymail.service")


def read_unit(path=UNIT):
    """The unit as {section: {key: [values, in order]}}."""
    sections, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = sections.setdefault(line.strip("[]"), {})
                continue
            key, value = line.split("=", 1)
            section.setdefault(key, []).append(value)
    return sections


def service(key):
    values = read_unit()["Service"][key]
    assert len(values) == 1, (key, values)
    return values[0]


def exec_start():
    argv = shlex.split(service("ExecStart"))
    assert argv[1:4] == ["-n", "--pidfile=", "relaymail"], argv
    assert argv[4] == "--config" and len(argv) == 6, argv
    return argv


def test_systemd_analyze_verify_has_nothing_to_say_about_the_unit(tmp_path):
    # Never a skip: `make test-tools` installs it (Debian package systemd).
    assert os.access(SYSTEMD_ANALYZE, os.X_OK), f"{SYSTEMD_ANALYZE} is missing: apt-get install systemd"
    # verify wants ExecStart's binary to exist: this checkout's twistd.
    with open(UNIT) as f:
        text = f.read()
    binary = exec_start()[0]
    assert text.count(binary) == 1
    unit = tmp_path / "relaymail.service"
    unit.write_text(text.replace(binary, TWISTD))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 even over unknown keys and bad values; it says so.
    about_the_unit = [line for line in (result.stdout + result.stderr).splitlines()
                      if "relaymail" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert about_the_unit == []


def test_the_unit_runs_unprivileged_and_hardened():
    expected = {
        "Type": "simple",
        "User": "relaymail",
        "Group": "relaymail",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/spool/relaymail",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "Restart": "on-failure",
        # SIGTERM to the master alone: it stops its workers in order.
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert {key: service(key) for key in expected} == expected


def test_systemd_waits_longer_than_the_master_waits_for_its_workers():
    grace = load_config(None).server.shutdown_grace
    assert grace == 30
    assert float(service("TimeoutStopSec")) > grace + STOP_MARGIN


def test_the_open_file_limit_holds_what_the_default_limits_need():
    assert int(service("LimitNOFILE")) >= files_needed(load_config(None))


def test_execstart_runs_the_relay_and_hup_reloads_and_term_stops_it(tmp_path):
    """ExecStart's own arguments, with this checkout's twistd and a test
    config; then what ExecReload and KillSignal send."""
    relay = relay_with(tmp_path, 9, inbound=1, delivery=1)
    argv = exec_start()
    argv[0], argv[5] = TWISTD, relay.config
    with open(relay.log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=relay.workdir, env=_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _greets(relay.port), what="the relay to greet")
        assert service("ExecReload").split()[:2] == ["/bin/kill", "-HUP"]
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded; 1 inbound and 1 delivery workers replaced" in relay.log(),
                   what="the reload")
        process.send_signal(getattr(signal, service("KillSignal")))
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    # Ended by SIGTERM: a clean exit to systemd, so Restart=on-failure
    # does not start it again.
    assert process.returncode == -signal.SIGTERM
    assert no_alarming_lines(relay.log()), relay.log()


def _greets(port):
    try:
        with socket.create_connection(("127.0.0.1", port), 2) as probe:
            return probe.recv(512).startswith(b"220 ")
    except OSError:
        return False


def test_the_shipped_config_checks_clean():
    check = os.path.join(os.path.dirname(sys.executable), "relaymail-check")
    result = subprocess.run([check, "config", "etc/relaymail.ini"], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "etc/relaymail.ini: ok\n", "")
    assert re.fullmatch(r"/\S+/relaymail\.ini", exec_start()[5])
