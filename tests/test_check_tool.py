"""relaymail-check config, and --version on every command."""

import os
import subprocess
import sys

import pytest

import relaymail
from relaymail.tools.check import main
from tests.relay_process import REPO, twistd


def run(*argv):
    import io
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_a_good_file_is_ok_and_exits_0(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text("[limits]\nmessage_size = 20M\n")
    assert run("config", str(config)) == (0, f"{config}: ok\n", "")


def test_a_bad_file_is_the_line_a_start_would_print_and_exits_1(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text("[delivry]\nsmarthost = [mail.example]:587\n")
    assert run("config", str(config)) == (
        1, "", f"relaymail-check: {config}: [delivry]: unknown section; "
               "did you mean [delivery]?\n")
    # The same words as the start itself.
    started = twistd("--config", str(config))
    assert f"{config}: [delivry]: unknown section; did you mean [delivery]?" in (
        started.stdout + started.stderr)


def test_a_file_the_config_names_is_read_too(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text(f"[auth]\npasswords = {tmp_path}/missing\n")
    status, out, err = run("config", str(config))
    assert (status, out) == (1, "")
    assert err.startswith(f"relaymail-check: {config}: [auth] passwords: ")


def test_effective_prints_every_key_with_its_value_and_the_default_where_changed(tmp_path):
    config = tmp_path / "relaymail.ini"
    config.write_text("[limits]\nmessage_size = 20M\n")
    status, out, err = run("config", str(config), "--effective")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert "[limits] message_size = 20M    # default: 10M" in lines
    assert "[server] listen_backlog = 1024" in lines
    assert "[server] shutdown_grace = 30" in lines
    from relaymail.config import SCHEMA
    assert len(lines) == sum(len(keys) for keys in SCHEMA.values())


@pytest.mark.parametrize("module", ["check", "queue_tool", "passwd"])
def test_every_tool_prints_relaymails_version(module):
    result = subprocess.run([sys.executable, "-m", f"relaymail.tools.{module}", "--version"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                            timeout=30)
    assert (result.returncode, result.stdout) == (0, f"relaymail {relaymail.__version__}\n")


def test_twistd_relaymail_version_is_relaymails():
    import twisted
    result = twistd("--version")
    assert result.returncode == 0
    assert result.stdout == f"relaymail {relaymail.__version__} (Twisted {twisted.__version__})\n"


def test_a_warning_a_start_would_log_is_printed_and_the_file_is_still_ok(tmp_path):
    (tmp_path / "password").write_text("secret\n")
    config = tmp_path / "relaymail.ini"
    config.write_text(f"[delivery]\nsmarthost = [10.0.0.5]:587\nsmarthost_user = relay\n"
                      f"smarthost_password_file = {tmp_path}/password\n")
    assert run("config", str(config)) == (
        0, f"{config}: ok\n",
        f"relaymail-check: warning: {config}: [delivery] smarthost_tls: may with smarthost_user "
        "set: the password is sent only over TLS, so while the smarthost offers no STARTTLS "
        "its mail is deferred, and its certificate is not checked; set verify (or encrypt)\n")


def test_config_keeps_argparse_usage_status_and_dry_runs_exit_64(tmp_path):
    # ``config`` answered 2 for a bad command line before the dry runs
    # came; they answer 64 (EX_USAGE), as 2 is theirs for a 4xx.
    assert run("config", "a", "b")[0] == 2
    assert run("rcpt")[0] == 64
    assert run("mail", "a@example.com", "--client")[0] == 64
