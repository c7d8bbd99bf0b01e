"""relaymail-check: check a configuration as a start would, without
starting (Postfix's ``postfix check`` and ``postconf``).

::

    relaymail-check config [FILE]              exit 0 if it would start, else 1
    relaymail-check config [FILE] --effective  every key, its value and default
    relaymail-check --version
    relaymail-check --config FILE rcpt|mail|connect|helo|expn|route ...
    relaymail-check --config FILE dkim         the DNS records of the DKIM keys

The dry-run commands (``rcpt`` and the others) say what the relay would
answer a client and why, plugin by plugin: see
:mod:`relaymail.tools.dry_run`.  ``dkim`` prints the TXT record to
publish for each key the dkim plugin signs with: see
:mod:`relaymail.tools.dkim_records`.

``config`` reads the file, every file it names (plugin tables, the TLS
certificate and key, the password file) and loads the plugins, exactly
as ``twistd relaymail`` does before it binds anything, and prints the one
line a start would print for the first problem.
"""

import argparse
import sys

import relaymail
from relaymail.config import ConfigError, effective_values, load_config, read_config_text
from relaymail.tools import dkim_records, dry_run

PROGRAM = "relaymail-check"


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"relaymail {relaymail.__version__}")
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="the INI file the dry-run commands use (default: built-in)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config = commands.add_parser("config", help="check a configuration file as a start would")
    config.add_argument("file", nargs="?", default=None,
                        help="the INI file; without it, the built-in defaults")
    config.add_argument("--effective", action="store_true",
                        help="print every key with the value in force and its default")
    dry_run.add_arguments(commands)
    dkim_records.add_arguments(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        if exit.code and argv_names_dry_run(argv):
            return dry_run.EX_USAGE
        return exit.code
    if args.command == "dkim":
        return _dkim(args, out, err)
    if args.command != "config":
        return _dry_run(args, out, err)
    try:
        text = read_config_text(args.file) if args.file else None
        settings = load_config(args.file, None, text)
        from relaymail.tap import check_files
        check_files(settings)
    except ConfigError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return 1
    from relaymail.config_warnings import config_warnings
    for line in config_warnings(settings):
        err.write(f"{PROGRAM}: warning: {line}\n")
    if args.effective:
        for section, key, value, default, source in effective_values(args.file, text):
            shown = " ".join(value.split("\n")).strip()
            note = "" if source == "<defaults>" else f"    # default: {' '.join(default.split())}"
            out.write(f"[{section}] {key} = {shown}{note}\n")
    else:
        out.write(f"{args.file or 'the built-in defaults'}: ok\n")
    return 0


def argv_names_dry_run(argv):
    """Whether a command line that did not parse was meant for a dry run or dkim
    (whose usage errors exit 64, EX_USAGE; ``config`` keeps argparse's 2)."""
    words = sys.argv[1:] if argv is None else argv
    return any(word in dry_run.COMMAND_HOOKS or word == "dkim" for word in words)


def _dkim(args, out, err):
    try:
        text = read_config_text(args.config_file) if args.config_file else None
        settings = load_config(args.config_file, None, text)
        from relaymail.policy.loader import build_hooks
        # Built as a start builds them: each key read and tried once.
        return dkim_records.run(settings, build_hooks(settings), args, out)
    except ConfigError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return dry_run.EX_CONFIG


def _dry_run(args, out, err):
    try:
        dry_run.check_client(args.client)
        text = read_config_text(args.config_file) if args.config_file else None
        settings = load_config(args.config_file, None, text)
        # The plugins are built as a start builds them.
        from relaymail.policy.loader import build_hooks
        hooks = build_hooks(settings)
    except dry_run.UsageError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return dry_run.EX_USAGE
    except ConfigError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return dry_run.EX_CONFIG
    try:
        return dry_run.run(settings, hooks, args, out)
    except dry_run.UsageError as error:
        err.write(f"{PROGRAM}: {error}\n")
        return dry_run.EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
