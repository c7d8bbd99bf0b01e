"""relaymail-passwd: set or remove a user's password in the AUTH password file.

::

    relaymail-passwd --file FILE USER            set USER's password
    relaymail-passwd --file FILE --delete USER   remove USER

The new password is read from standard input: from a terminal, typed twice
at a prompt that does not echo it; otherwise one line, without its line
ending, so that a script can pipe it in (never put it on the command line,
where ``ps`` shows it to every user).  An empty password is refused.

The file is rewritten atomically (see :mod:`relaymail.auth.passwords`); a
running daemon sees the change when it reloads.

Exit status: 0 when done, printing nothing; 1 when it could not be done
(the user to delete is absent, the file is unreadable or malformed, the
passwords typed differ), with one line on standard error; 2 for a usage
error.
"""

import argparse
import getpass
import sys

import relaymail
from relaymail.auth.passwords import (
    PasswordFileError, delete_user, set_password, user_name_problem)

PROGRAM = "relaymail-passwd"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class ToolError(Exception):
    """An expected problem, told in one line; the exit status is 1."""


def main(argv=None, stdin=None, err=None):
    """Run the tool.

    :param argv: the arguments, without the program name (``sys.argv``
        when None).
    :param stdin: where the password comes from (``sys.stdin`` when None);
        a text stream, read through its ``buffer`` when it has one so that
        the password is taken as UTF-8 whatever the locale.
    :param err: where problems go (``sys.stderr`` when None).
    :return: the exit status.
    """
    stdin = stdin or sys.stdin
    err = err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:
        # argparse has printed the usage and why; 2 on error, 0 for --help.
        return exit.code
    problem = user_name_problem(args.user)
    if problem:
        err.write(f"{PROGRAM}: {problem}\n")
        return EXIT_USAGE
    try:
        if args.delete:
            if not delete_user(args.file, args.user):
                raise ToolError(f"{args.file}: no user {args.user!r}")
        else:
            set_password(args.file, args.user, _read_password(stdin))
    except (ToolError, PasswordFileError) as error:
        err.write(f"{PROGRAM}: {error}\n")
        return EXIT_FAILED
    except OSError as error:
        # Writing the new file failed: a missing directory, no permission.
        err.write(f"{PROGRAM}: {args.file}: {error.strerror}\n")
        return EXIT_FAILED
    return EXIT_OK


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Set a user's AUTH password (read from standard input), "
                    "or remove the user.")
    parser.add_argument("--version", action="version",
                        version=f"relaymail {relaymail.__version__}")
    parser.add_argument("--file", required=True, metavar="FILE",
                        help="the password file")
    parser.add_argument("--delete", action="store_true",
                        help="remove USER instead of setting a password")
    parser.add_argument("user", metavar="USER", help="the user name (case-sensitive)")
    return parser


def _read_password(stdin):
    """The new password: prompted for twice on a terminal, else the first
    line of ``stdin``.  ToolError if empty, mismatched or absent."""
    if stdin.isatty():
        password = _prompt_twice()
    else:
        password = _first_line(stdin)
    if not password:
        raise ToolError("empty password refused")
    return password


def _prompt_twice():
    try:
        first = getpass.getpass("New password: ")
        if not first:
            raise ToolError("empty password refused")
        second = getpass.getpass("Retype new password: ")
    except EOFError:
        raise ToolError("no password given") from None
    if first != second:
        raise ToolError("passwords do not match")
    return first


def _first_line(stdin):
    source = getattr(stdin, "buffer", stdin)
    line = source.readline()
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            # Clients send UTF-8 (RFC 4616 2), so a password in another
            # encoding could never be matched.
            raise ToolError("password on standard input is not UTF-8") from None
    if not line:
        raise ToolError("no password on standard input")
    # One line "without its newline": CRLF too, as a Windows editor or
    # here-string may leave it.
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


if __name__ == "__main__":
    sys.exit(main())
