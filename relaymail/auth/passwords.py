"""The password file: one user per line, each with a salted scrypt hash.

Format
======

UTF-8 text, one entry per line::

    # comments start with '#'; blank lines are ignored
    alice:$scrypt$ln=15,r=8,p=1$<salt>$<hash>

The user name is everything before the first ``:``.  It is case-sensitive,
at least one character, and made of printable characters other than white
space and ``:``; it must not start with ``#`` (that line is a comment).

The hash string is self-describing, in the spirit of the PHC string format
used by other password stores, so that :data:`PARAMETERS` can be raised
later without invalidating hashes already written:

``$scrypt$``
    the algorithm (only scrypt, RFC 7914, is known);
``ln=L,r=R,p=P``
    the scrypt parameters: ``N = 2**L`` (CPU/memory cost), block size ``R``
    and parallelisation ``P``, decimal, in this order;
``$<salt>$<hash>``
    the salt and the derived key, standard base64 (RFC 4648 4) without
    ``=`` padding.

A new hash uses a 16-byte random salt and a 32-byte key.  Verification
uses whatever parameters, salt and key length the string names, within
sanity bounds that keep a mistyped line from asking for gigabytes.

Errors in the file are reported as :class:`PasswordFileError`, one line,
naming the file and line number but never quoting the line: a malformed
line may be a password pasted in the wrong place.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import os
import secrets
import tempfile

#: Salt and derived-key lengths for new hashes, in bytes.  RFC 7914 leaves
#: both to the application; 16 random bytes make salt collisions
#: negligible and 32 bytes match the SHA-256 output scrypt is built on.
SALT_BYTES = 16
KEY_BYTES = 32


class ScryptParameters(collections.namedtuple("ScryptParameters", "ln r p")):
    """scrypt's cost parameters: ``N = 2**ln``, block size ``r`` and
    parallelisation ``p`` (RFC 7914 2)."""

    __slots__ = ()

    @property
    def n(self):
        return 1 << self.ln

    @property
    def memory(self):
        """Bytes OpenSSL needs for one derivation: ``128*r*(N+p+2)``, its
        V array plus the p blocks of B; ``hashlib.scrypt``'s ``maxmem``
        must be at least this."""
        return 128 * self.r * (self.n + self.p + 2)


#: The parameters for new hashes.  Tests may replace this with something
#: cheap; production code must not.
#:
#: N = 2**15, r = 8, p = 1: 32 MiB and ~50-130 ms per verification on
#: current hardware.  The scrypt paper (Percival 2009) suggested N = 2**14,
#: r = 8, p = 1 for interactive logins under 100 ms on 2009 hardware; this
#: is one doubling on.  OWASP's Password Storage Cheat Sheet asks for
#: N = 2**17 (128 MiB) as a minimum, but that is half a second here and
#: every AUTH attempt, including an attacker's online guesses, buys one
#: verification: ``[auth] max_concurrent_hashes`` of them at once
#: (relaymail.smtp.authentication), each holding this much memory, and a
#: real user's login waits for one.  Raise ``ln``
#: when the hardware allows; old hashes keep verifying and
#: :func:`needs_rehash` finds them.
PARAMETERS = ScryptParameters(ln=15, r=8, p=1)

# Sanity bounds on what a hash line may ask for.  hashlib takes maxmem as
# a C int, so no derivation may need 2 GiB or more.
_MAX_MEMORY = 2**31 - 1
_MAX_LN = 24
_MAX_R = 64
_MAX_P = 64
_MIN_SALT_BYTES = 8
_MIN_KEY_BYTES = 16
_MAX_FIELD_BYTES = 1024

_PREFIX = "$scrypt$"


class HashFormatError(ValueError):
    """A hash string that is not ``$scrypt$ln=..,r=..,p=..$salt$hash``.

    The message says what is wrong and never quotes the string.
    """


class PasswordFileError(Exception):
    """A password file that cannot be read or parsed.

    ``str()`` is one line, ``PATH:LINE: PROBLEM`` (or ``PATH: PROBLEM``
    when no line is at fault), and never holds a hash or a password.
    """

    def __init__(self, path, line_number, problem):
        super().__init__(path, line_number, problem)
        self.path = os.fspath(path)
        self.line_number = line_number
        self.problem = problem

    def __str__(self):
        where = self.path if self.line_number is None else f"{self.path}:{self.line_number}"
        return f"{where}: {self.problem}"


# ---------------------------------------------------------------------------
# Hashes

def hash_password(password):
    """A new hash string for ``password`` (a str, hashed as UTF-8), with a
    fresh random salt and the current :data:`PARAMETERS`."""
    params = PARAMETERS
    salt = secrets.token_bytes(SALT_BYTES)
    key = _derive(_password_bytes(password), salt, params, KEY_BYTES)
    return format_hash(params, salt, key)


def verify_password(password, encoded):
    """Whether ``password`` (str, or bytes taken as they are) matches the
    hash string ``encoded``.

    Takes as long as one scrypt derivation with the string's parameters,
    whatever the answer.  Raises :class:`HashFormatError` if ``encoded``
    is malformed.
    """
    params, salt, key = parse_hash(encoded)
    candidate = _derive(_password_bytes(password), salt, params, len(key))
    # compare_digest so that the time taken does not say how many leading
    # bytes of the key were right.
    return hmac.compare_digest(candidate, key)


def needs_rehash(encoded):
    """Whether ``encoded`` was made with other parameters than the
    current :data:`PARAMETERS`, so that a tool may offer to renew it."""
    params, _salt, _key = parse_hash(encoded)
    return params != PARAMETERS


def parse_hash(encoded):
    """``(ScryptParameters, salt, key)`` from a hash string, checked
    against the sanity bounds; :class:`HashFormatError` otherwise."""
    if not encoded.startswith(_PREFIX):
        raise HashFormatError("hash is not a $scrypt$ hash")
    fields = encoded[len(_PREFIX):].split("$")
    if len(fields) != 3:
        raise HashFormatError("hash does not have the form $scrypt$PARAMS$SALT$HASH")
    params = _parse_parameters(fields[0])
    salt = _b64decode(fields[1], "salt")
    key = _b64decode(fields[2], "hash")
    if len(salt) < _MIN_SALT_BYTES:
        raise HashFormatError(f"salt is shorter than {_MIN_SALT_BYTES} bytes")
    if len(key) < _MIN_KEY_BYTES:
        raise HashFormatError(f"hash is shorter than {_MIN_KEY_BYTES} bytes")
    return params, salt, key


def _parse_parameters(text):
    names = []
    values = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.isascii() or not value.isdigit() or len(value) > 3:
            raise HashFormatError("scrypt parameters are not ln=L,r=R,p=P")
        names.append(name)
        values.append(int(value))
    # One fixed order keeps the encoding canonical: equal parameters are
    # equal strings.
    if names != ["ln", "r", "p"]:
        raise HashFormatError("scrypt parameters are not ln=L,r=R,p=P")
    params = ScryptParameters(*values)
    if not (1 <= params.ln <= _MAX_LN and 1 <= params.r <= _MAX_R
            and 1 <= params.p <= _MAX_P):
        raise HashFormatError("scrypt parameters are out of range")
    if params.memory > _MAX_MEMORY:
        raise HashFormatError("scrypt parameters need too much memory")
    return params


def format_hash(params, salt, key):
    """The hash string for ``params``, ``salt`` and derived ``key``."""
    return (f"{_PREFIX}ln={params.ln},r={params.r},p={params.p}"
            f"${_b64encode(salt)}${_b64encode(key)}")


def _derive(password, salt, params, length):
    return hashlib.scrypt(password, salt=salt, n=params.n, r=params.r, p=params.p,
                          maxmem=params.memory, dklen=length)


def _password_bytes(password):
    if isinstance(password, bytes):
        return password
    return password.encode("utf-8")


def _b64encode(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text, what):
    if not text or len(text) > _MAX_FIELD_BYTES or not text.isascii():
        raise HashFormatError(f"{what} is not base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise HashFormatError(f"{what} is not base64") from None


# ---------------------------------------------------------------------------
# User names

def user_name_problem(name):
    """Why ``name`` cannot be a user name, or None if it can."""
    if not name:
        return "empty user name"
    if name.startswith("#"):
        return "user name starts with '#'"
    for char in name:
        if char == ":":
            return "user name contains ':'"
        if char.isspace():
            return "user name contains white space"
        if not char.isprintable():
            return "user name contains a control character"
    return None


# ---------------------------------------------------------------------------
# The file

def load_password_file(path):
    """``{user: hash string}`` from the password file at ``path``.

    Raises :class:`PasswordFileError` if it cannot be read, or for the
    first malformed line.
    """
    entries = {}
    for _number, _line, user, encoded in _parse(path, _read_lines(path)):
        if user is not None:
            entries[user] = encoded
    return entries


def set_password(path, user, password):
    """Give ``user`` a new hash of ``password`` in the file at ``path``,
    replacing the user's line where it is or appending one.

    Every other line, comments included, is kept as it was.  The file is
    rewritten atomically (see :func:`_replace_file`) and created, mode
    0600, if missing.  Raises ValueError for an invalid user name and
    :class:`PasswordFileError` if the existing file cannot be read or is
    malformed: rewriting a file we do not understand could lose entries.
    """
    problem = user_name_problem(user)
    if problem:
        raise ValueError(problem)
    new_line = f"{user}:{hash_password(password)}"
    try:
        lines = _read_lines(path, missing_ok=True)
    except FileNotFoundError:
        lines = []
    out = []
    replaced = False
    for _number, line, name, _encoded in _parse(path, lines):
        if name == user:
            out.append(new_line)
            replaced = True
        else:
            out.append(line)
    if not replaced:
        out.append(new_line)
    _replace_file(path, out)


def delete_user(path, user):
    """Remove ``user``'s line from the file at ``path``.

    Returns False, leaving the file untouched, if the user has no line.
    Raises :class:`PasswordFileError` as :func:`set_password` does, and
    for a missing file.
    """
    lines = _read_lines(path)
    out = []
    found = False
    for _number, line, name, _encoded in _parse(path, lines):
        if name == user:
            found = True
        else:
            out.append(line)
    if found:
        _replace_file(path, out)
    return found


def _read_lines(path, missing_ok=False):
    """The file's lines, decoded; FileNotFoundError passes through when
    ``missing_ok`` (the caller creates the file), every other OSError
    becomes a PasswordFileError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        if missing_ok:
            raise
        raise PasswordFileError(path, None, f"cannot read: {e.strerror}") from None
    except OSError as e:
        raise PasswordFileError(path, None, f"cannot read: {e.strerror}") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return []
    # Split on LF only: str.splitlines() would also split on characters
    # such as U+2028, and line numbers would no longer match an editor's.
    return data.split(b"\n")


def _parse(path, raw_lines):
    """Yield ``(line_number, text, user, encoded)`` per line, ``user`` and
    ``encoded`` None for comments and blank lines; PasswordFileError for
    the first bad line."""
    seen = set()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PasswordFileError(path, number, "not valid UTF-8") from None
        text = text.rstrip("\r")
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            yield number, text, None, None
            continue
        user, sep, encoded = stripped.partition(":")
        if not sep:
            raise PasswordFileError(path, number, "no ':' between user name and hash")
        problem = user_name_problem(user)
        if problem:
            raise PasswordFileError(path, number, problem)
        try:
            parse_hash(encoded)
        except HashFormatError as e:
            raise PasswordFileError(path, number, str(e)) from None
        if user in seen:
            # The name is no secret, and it says which line to remove.
            raise PasswordFileError(path, number, f"user {user!r} appears twice")
        seen.add(user)
        yield number, text, user, encoded


def _replace_file(path, lines):
    """Write ``lines`` to ``path`` so that a reader sees the old file or
    the new one, never a mixture, and the new one survives a crash.

    The temporary file is made in the same directory, so that the rename
    stays on one file system, by mkstemp, which creates it mode 0600.
    Replacing an existing file keeps its group-read permission, if any,
    and, when run as root, its owner and group, so that the daemon's user
    can still read it; permission for others is never kept.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if old is not None:
                os.fchmod(f.fileno(), (old.st_mode & 0o660) | 0o600)
                if os.geteuid() == 0:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    # The rename is only durable once the directory itself is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
