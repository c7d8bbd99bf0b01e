"""relaymail-check: check a configuration as a start would, without
starting (Postfix's ``postfix check`` and ``postconf``).

::

    relaymail-check config [FILE]              exit 0 if it would start, else 1
    relaymail-check config [FILE] --effective  every key, its value and default
    relaymail-check --version

``config`` reads the file, every file it names (plugin tables, the TLS
certificate and key, the password file) and loads the plugins, exactly
as ``twistd relaymail`` does before it binds anything, and prints the one
line a start would print for the first problem.
"""

import argparse
import sys

import relaymail
from relaymail.config import ConfigError, effective_values, load_config, read_config_text

PROGRAM = "relaymail-check"


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"relaymail {relaymail.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config = commands.add_parser("config", help="check a configuration file as a start would")
    config.add_argument("file", nargs="?", default=None,
                        help="the INI file; without it, the built-in defaults")
    config.add_argument("--effective", action="store_true",
                        help="print every key with the value in force and its default")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code
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


if __name__ == "__main__":
    sys.exit(main())
