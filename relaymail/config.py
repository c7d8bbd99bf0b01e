"""The INI file to validated settings.

One table, :data:`SCHEMA`, names every section and key with the parser that
checks it, its default and the attribute it becomes.  Adding a key is one
line there (and its documentation in ``etc/relaymail.ini``, which a test
enforces).  Two small tables sit beside it: :data:`TABLES`, the sections
whose keys the admin chooses ([routes]), and :data:`SECRETS`, values read
from files that other keys name.  :func:`load_config` reads the file,
applies command-line overrides and returns a :class:`Settings`; every
problem becomes one :class:`ConfigError` line naming the file, the section
and the key, never a traceback.  :func:`load_server_certificate` is the one
check of the [tls] certificate and key; the STARTTLS code loads them with it
too.

Values are strings in the file; the parsers below turn them into ints,
floats, lists, networks and so on.  The accepted forms are:

* sizes: a whole number of bytes or one with a K, M or G suffix (binary
  multiples: ``10M`` is 10485760);
* durations: seconds, or a number with an ``s``, ``m``, ``h``, ``d`` or
  ``w`` suffix, as Postfix time parameters are written (``5d``, ``1.5h``);
* booleans: yes/no, true/false, on/off, 1/0;
* lists: items separated by commas, white space or new lines; an empty value
  is an empty list.
"""

import configparser
import dataclasses
import datetime
import difflib
import ipaddress
import os
import re
import socket
from typing import Any, Callable

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class ConfigError(Exception):
    """A problem with the configuration, told in one line that names the
    file, the section and the key."""

    def __init__(self, source, section, key, problem):
        self.source = source
        self.section = section
        self.key = key
        self.problem = problem
        where = f"[{section}]" if section else ""
        if key:
            where = f"{where} {key}".strip()
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


DEFAULTS_SOURCE = "<defaults>"
COMMAND_LINE_SOURCE = "command line"

# A section named "plugin:NAME" holds options for the plugin NAME, passed to
# it as raw strings for the plugin to check itself.
PLUGIN_SECTION_PREFIX = "plugin:"

_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


# ---------------------------------------------------------------------------
# Value parsers.  Each takes the raw string and returns the typed value, or
# raises ValueError whose text is the one-line problem shown to the user.
# ---------------------------------------------------------------------------

def _one_line(text):
    """Squeeze a library's error text onto one line for a ConfigError."""
    return " ".join(str(text).split())


def _at_least(minimum, value, raw):
    """Raise when ``value`` (parsed from ``raw``) is below ``minimum``."""
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum}, got {raw!r}")


def integer(minimum=None, maximum=None):
    """A whole number, optionally with a lower and an upper bound."""
    def parse(raw):
        text = raw.strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"expected a whole number, got {raw!r}")
        value = int(text)
        _at_least(minimum, value, raw)
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}, got {raw!r}")
        return value
    return parse


def usable_cpus():
    """The CPUs this process may run on (its affinity mask where the
    system has one), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def per_cpu(parse):
    """``auto`` for the number of usable CPUs, or what ``parse`` takes."""
    def parse_per_cpu(raw):
        if raw.strip().lower() == "auto":
            return usable_cpus()
        try:
            return parse(raw)
        except ValueError as exc:
            raise ValueError(f"{exc} (or auto)") from None
    return parse_per_cpu


# Binary multiples, as the brief for relaymail sizes asks; Postfix itself
# takes plain byte counts only.
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def size(minimum=1):
    """A number of bytes, plain or with a K/M/G suffix."""
    def parse(raw):
        match = re.fullmatch(r"(\d+)\s*([kmg]?)", raw.strip(), re.IGNORECASE)
        if not match:
            raise ValueError(
                f"expected a size in bytes (e.g. 10485760 or 10M), got {raw!r}")
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        _at_least(minimum, value, raw)
        return value
    return parse


# The suffixes Postfix accepts for time parameters (postconf(5), "Time
# units"): seconds, minutes, hours, days, weeks.
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(whole=False, minimum=0, positive=False, maximum=None):
    """A time span in seconds, plain or with an s/m/h/d/w suffix.

    :param whole: return an int and refuse spans that are not whole seconds
        (queue timers); otherwise return a float (socket timeouts).
    :param positive: refuse zero, for timeouts where zero would mean
        "expire at once" rather than anything useful.
    """
    def parse(raw):
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)",
                             raw.strip(), re.IGNORECASE)
        if not match:
            raise ValueError(
                "expected a duration in seconds or with a unit "
                f"(e.g. 300, 300s, 5m, 1.5h, 5d), got {raw!r}")
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        if whole:
            if value != int(value):
                raise ValueError(
                    f"expected a whole number of seconds, got {raw!r}")
            value = int(value)
        if positive and value <= 0:
            raise ValueError(f"must be more than 0, got {raw!r}")
        _at_least(minimum, value, raw)
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum} seconds, got {raw!r}")
        return value
    return parse


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}


def boolean(raw):
    """yes/no, true/false, on/off or 1/0, in any case."""
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(
            f"expected yes or no (or true/false, on/off, 1/0), got {raw!r}") from None


def _split(raw, separators=r"[\s,]+"):
    """The non-empty items of a list value."""
    return [item for item in re.split(separators, raw.strip()) if item]


def listing(item):
    """A list whose items are separated by commas, white space or new
    lines, each checked by ``item``."""
    def parse(raw):
        return [item(part) for part in _split(raw)]
    return parse


# RFC 1123 section 2.1 host name syntax: letters, digits and hyphens in
# labels of at most 63 octets, no hyphen at either end; RFC 1035 2.3.4 caps
# the whole name at 255 octets, which is 253 characters in text form.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _is_host_name(text):
    """True when ``text`` is a syntactically valid (ASCII) host name."""
    return (0 < len(text) <= 253
            and all(_LABEL.match(label) for label in text.split(".")))


def host_name(raw):
    """The name this relay gives itself in its greeting and EHLO."""
    text = raw.strip()
    if not _is_host_name(text):
        raise ValueError(
            "expected a host name such as mail.example.com (letters, digits, "
            f"hyphens and dots), got {raw!r}")
    return text


def domain(raw):
    """A domain name, lower-cased in IDNA A-label form so it compares
    equal to what arrives on the wire (RFC 5890)."""
    try:
        encoded = idna.encode(raw, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(
            f"expected a domain name, got {raw!r} ({_one_line(exc)})") from None
    # "example.com." is the same domain in its absolute form; addresses
    # never carry the dot, so neither do we.
    return encoded.lower().removesuffix(".")


def network(raw):
    """An IPv4 or IPv6 network in CIDR form; a bare address is a /32 or
    /128."""
    try:
        return ipaddress.ip_network(raw)
    except ValueError:
        pass
    # Postfix warns about host bits set (mynetworks); we refuse, since a
    # typo there would trust the wrong clients, but say what was meant.
    try:
        meant = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError(
            "expected a network in CIDR form (e.g. 192.0.2.0/24 or "
            f"2001:db8::/32), got {raw!r}") from None
    raise ValueError(f"{raw!r} has host bits set; did you mean '{meant}'?")


def metrics_endpoint(raw):
    """At most one Twisted server endpoint string; empty means none (None)."""
    endpoints = server_endpoints(raw)
    if len(endpoints) > 1:
        raise ValueError(f"one endpoint only, not {len(endpoints)}")
    return endpoints[0] if endpoints else None


def server_endpoints(raw):
    """Twisted server endpoint strings, one per line (or comma-separated).

    Each is built with ``serverFromString``, which parses and checks it
    without listening, so a bad string fails at start-up with its name.
    """
    # Imported here, not at the top: importing the reactor installs the
    # default one, and twistd must be free to choose another before that.
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from relaymail.smtp import endpoint_check

    endpoints = [part.strip() for part in _split(raw, r"[\n,]+")]
    endpoints = [part for part in endpoints if part]
    for description in endpoints:
        # relaymail's reading first: Twisted's own complaints are Python's
        # (an unexpected keyword argument), and it takes port 70000.
        reason = endpoint_check.problem(description)
        if reason is None:
            try:
                serverFromString(reactor, description)
            except Exception as exc:
                reason = _one_line(exc) or type(exc).__name__
        if reason is not None:
            raise ValueError(
                f"not a valid Twisted server endpoint {description!r}: {reason}") from None
    return endpoints


@dataclasses.dataclass(frozen=True)
class Portion:
    """A count written as a number or as a percentage of another count
    (``50`` or ``10%``); :meth:`of` gives the number for a given total."""

    value: int
    percent: bool

    def of(self, total):
        """The count this portion stands for out of ``total`` (rounded down)."""
        return total * self.value // 100 if self.percent else self.value

    def __str__(self):
        return f"{self.value}%" if self.percent else str(self.value)


def portion(maximum_percent):
    """A whole number, or a percentage up to ``maximum_percent`` with a ``%``."""
    def parse(raw):
        match = re.fullmatch(r"(\d+)\s*(%?)", raw.strip())
        if not match:
            raise ValueError(f"expected a whole number or a percentage (e.g. 50 or 10%), got {raw!r}")
        value, percent = int(match.group(1)), bool(match.group(2))
        if percent and value > maximum_percent:
            raise ValueError(f"must be at most {maximum_percent}%, got {raw!r}")
        return Portion(value, percent)
    return parse


def prefix_length(bits):
    """A network prefix length for addresses of ``bits`` bits (``/64`` or ``64``)."""
    def parse(raw):
        text = raw.strip().removeprefix("/")
        if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= bits:
            raise ValueError(f"expected a prefix length from 1 to {bits}, got {raw!r}")
        return int(text)
    return parse


def absolute_path(raw):
    """A file system path, made absolute against the current directory at
    load time so a later chdir (twistd --rundir) cannot change its meaning."""
    text = raw.strip()
    if not text:
        raise ValueError("expected a path, got ''")
    return os.path.abspath(text)


def directory(raw):
    """An existing directory, made absolute like :func:`absolute_path`."""
    absolute = absolute_path(raw)
    if not os.path.isdir(absolute):
        reason = "is not a directory" if os.path.exists(absolute) else "does not exist"
        raise ValueError(f"directory {raw!r} {reason}")
    return absolute


def readable_file(raw):
    """An optional path to a file that must be readable now; empty means
    unset (None)."""
    if not raw.strip():
        return None
    absolute = absolute_path(raw)
    try:
        with open(absolute, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {raw.strip()!r}: {exc.strerror}") from None
    return absolute


# The PEM armour line that opens a certificate (RFC 7468 section 2 and 5.1).
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def pem_certificates(raw):
    """An optional readable file holding at least one PEM certificate
    (trust roots); empty means unset (None).

    Checked now so that a key file or a DER file given by mistake fails at
    start-up rather than at the first delivery that needs it.
    """
    absolute = readable_file(raw)
    if absolute is None:
        return None
    with open(absolute, "rb") as stream:
        found = _PEM_CERTIFICATE in stream.read()
    if not found:
        raise ValueError(f"no PEM certificate ({_PEM_CERTIFICATE.decode()}) "
                         f"in {raw.strip()!r}")
    return absolute


# ---------------------------------------------------------------------------
# The server's certificate and key, checked here at load time and loaded
# again by relaymail.smtp.tls (at start-up and on reload), so both say the
# same thing about the same files.
# ---------------------------------------------------------------------------

# A PEM block of any kind (RFC 7468 section 2); the label says what it is.
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)

# Certificate files are a few KiB even with a long chain; past this the
# path surely names the wrong file (or /dev/zero).
_PEM_FILE_LIMIT = 1024 * 1024


class TLSFileError(ValueError):
    """A [tls] file that cannot serve; ``key`` is the config key to blame
    ('certificate' or 'private_key') and the text is one line."""

    def __init__(self, key, problem):
        super().__init__(problem)
        self.key = key
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class ServerCertificate:
    """A checked certificate chain and the private key of its first
    certificate, as ``cryptography`` objects (what pyOpenSSL takes)."""

    chain: tuple        # the server's own certificate, then intermediates
    private_key: Any

    @property
    def leaf(self):
        """The server's own certificate."""
        return self.chain[0]


def _pem_blocks(key, path):
    """(label, block) for every PEM block in the file at ``path``."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(_PEM_FILE_LIMIT + 1)
    except OSError as exc:
        raise TLSFileError(key, f"cannot read {path!r}: {exc.strerror}") from None
    if len(data) > _PEM_FILE_LIMIT:
        raise TLSFileError(key, f"{path!r} is larger than 1 MiB; not a PEM file")
    return [(match.group(1).decode("ascii"), match.group(0))
            for match in _PEM_BLOCK.finditer(data)]


def _load_chain(path):
    """Every certificate in the file, in file order."""
    blocks = [block for label, block in _pem_blocks("certificate", path)
              if label == "CERTIFICATE"]
    if not blocks:
        raise TLSFileError("certificate", "no PEM certificate "
                           f"({_PEM_CERTIFICATE.decode()}) in {path!r}")
    chain = []
    for number, block in enumerate(blocks, 1):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise TLSFileError("certificate", f"certificate {number} in {path!r} "
                               f"cannot be read: {_one_line(exc)}") from None
    return tuple(chain)


def _load_private_key(path):
    """The one private key in the file."""
    # "PRIVATE KEY" (PKCS #8), "RSA PRIVATE KEY", "EC PRIVATE KEY" and
    # "ENCRYPTED PRIVATE KEY"; other blocks (EC PARAMETERS, a certificate
    # kept in the same file) are skipped.
    blocks = [block for label, block in _pem_blocks("private_key", path)
              if label.endswith("PRIVATE KEY")]
    if not blocks:
        raise TLSFileError("private_key", "no PEM private key "
                           f"(-----BEGIN PRIVATE KEY-----) in {path!r}")
    if len(blocks) > 1:
        raise TLSFileError("private_key", f"{len(blocks)} private keys in {path!r}; "
                           "expected one")
    try:
        return serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:
        # cryptography's way of saying a password is needed.  The relay
        # starts unattended, so there is nobody to type one.
        raise TLSFileError("private_key", f"the private key in {path!r} is encrypted; "
                           "give relaymail an unencrypted key readable only "
                           "by its user") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSFileError("private_key", f"the private key in {path!r} cannot be "
                           f"read: {_one_line(exc)}") from None


def _public_key_bytes(public_key):
    """A public key as comparable bytes (its DER SubjectPublicKeyInfo)."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_server_certificate(certificate_path, private_key_path):
    """Read and check the server's certificate chain and private key.

    The certificate file holds the server's certificate first, then any
    intermediates (the order TLS sends them in, RFC 8446 4.4.2); the key
    file holds one unencrypted private key, which must belong to the first
    certificate.  Both may be the same file.

    :return: a :class:`ServerCertificate`.
    :raise TLSFileError: naming the key at fault, with a one-line problem.
    """
    chain = _load_chain(certificate_path)
    private_key = _load_private_key(private_key_path)
    wanted = _public_key_bytes(private_key.public_key())
    if _public_key_bytes(chain[0].public_key()) != wanted:
        for number, certificate in enumerate(chain[1:], 2):
            if _public_key_bytes(certificate.public_key()) == wanted:
                raise TLSFileError(
                    "certificate", f"the private key belongs to certificate {number} "
                    f"in {certificate_path!r}; put the server's own certificate "
                    "first, then its intermediates")
        raise TLSFileError("private_key", "the private key does not match the "
                           f"certificate in {certificate_path!r}")
    _check_validity(chain[0], certificate_path)
    return ServerCertificate(chain=chain, private_key=private_key)


def certificate_validity(certificate):
    """A certificate's (notBefore, notAfter) as aware UTC datetimes."""
    try:
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    except AttributeError:      # cryptography 41 (setup.cfg allows it)
        utc = datetime.timezone.utc
        return (certificate.not_valid_before.replace(tzinfo=utc),
                certificate.not_valid_after.replace(tzinfo=utc))


def certificate_date(moment):
    """A certificate's notBefore or notAfter as messages show it."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


#: False in a worker process (relaymail.process.worker): the master checks
#: the dates at start and on SIGHUP; a worker restarted after a crash,
#: once the certificate on disk has expired, must still start, or one
#: lapsed renewal would stop delivery of the whole queue.
CHECK_CERTIFICATE_DATES = True


def _check_validity(certificate, path):
    """Refuse a server certificate outside its validity period: every
    client that checks would fail the handshake (RFC 5280 4.1.2.5), and
    one that does not would be taught to accept anything."""
    if not CHECK_CERTIFICATE_DATES:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = certificate_validity(certificate)
    if not_after < now:
        raise TLSFileError("certificate", f"the certificate in {path!r} expired on "
                           f"{certificate_date(not_after)} (notAfter)")
    if not_before > now:
        raise TLSFileError("certificate", f"the certificate in {path!r} is not valid until "
                           f"{certificate_date(not_before)} (notBefore)")


def optional_text(raw):
    """A free-form string such as a user name; empty means unset (None)."""
    return raw.strip() or None


def optional(parse):
    """``parse``, except that an empty value means unset (None)."""
    def parse_optional(raw):
        return parse(raw) if raw.strip() else None
    return parse_optional


def choice(*options):
    """One of a fixed set of words, compared without regard to case."""
    def parse(raw):
        word = raw.strip().lower()
        if word not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {raw!r}")
        return word
    return parse


def plugin_name(raw):
    """The name a plugin declares, as it appears in [plugin:NAME]."""
    if not _PLUGIN_NAME.match(raw):
        raise ValueError(
            "expected a plugin name (letters, digits, '_', '-', '.'), "
            f"got {raw!r}")
    return raw


@dataclasses.dataclass(frozen=True)
class Smarthost:
    """Where all outbound mail goes instead of the recipients' MX hosts.

    ``mx_lookup`` is False for the bracketed form ``[host]:port``: as in
    Postfix relayhost, brackets mean "connect to this host's address
    records" rather than "look up its MX records".
    """

    host: str
    port: int
    mx_lookup: bool

    def __str__(self):
        shown = f"[{self.host}]" if not self.mx_lookup else self.host
        return f"{shown}:{self.port}"


# RFC 5321 section 4.5.4.1: mail is sent to port 25 unless told otherwise.
_SMTP_PORT = 25
_SMARTHOST = re.compile(r"\[(?P<literal>[^\]]*)\](?::(?P<lport>[^:]*))?"
                        r"|(?P<host>[^\[\]:]+)(?::(?P<port>[^:]*))?")


def _port(text):
    """A TCP port number, 1 to 65535."""
    if not re.fullmatch(r"\d{1,5}", text) or not 0 < int(text) < 65536:
        raise ValueError(f"port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def _smarthost_host(text, raw):
    """The host part of a smarthost: a host name (IDNA-encoded when it is
    not ASCII) or an IP address."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        name = domain(text)
    except ValueError:
        name = ""
    if not _is_host_name(name):
        whole = "" if text == raw.strip() else f" in {raw!r}"
        raise ValueError(f"expected a host name or IP address, got {text!r}{whole}")
    return name


def port_number(raw):
    """A TCP port number, 1 to 65535."""
    return _port(raw.strip())


def smarthost(raw):
    """``[host]:port``, ``[host]``, ``host:port`` or ``host``; empty means
    no smarthost (None)."""
    text = raw.strip()
    if not text:
        return None
    match = _SMARTHOST.fullmatch(text)
    if not match:
        raise ValueError(
            "expected [host]:port, host:port or host "
            f"(e.g. [mail.example.net]:587; an IPv6 address in brackets), got {raw!r}")
    bracketed = match.group("literal") is not None
    host_text = match.group("literal") if bracketed else match.group("host")
    port_text = match.group("lport") if bracketed else match.group("port")
    host = _smarthost_host(host_text, raw)
    if not bracketed and is_ip_address(host):
        # An address has no MX records to look up, so "host" form would
        # promise a lookup that cannot happen; Postfix relayhost likewise
        # writes addresses in brackets.
        raise ValueError(
            "put an IP address in brackets, e.g. "
            f"'[{host}]:{port_text or _SMTP_PORT}', got {raw!r}")
    port = _SMTP_PORT if port_text is None else _port(port_text)
    return Smarthost(host=host, port=port, mx_lookup=not bracketed)


def route_domain(raw):
    """A [routes] (and [route_tls]) key: a domain, which matches itself, or
    ``.domain``, which matches every subdomain of it and not the domain
    itself, as a Postfix transport(5) ``.domain`` entry does while
    transport_maps is not in ``parent_domain_matches_subdomains`` (Postfix's
    default, where a bare domain matches that domain only, as here)."""
    text = raw.strip()
    if text.startswith("*"):
        parent = domain(text.lstrip("*.")) if text.lstrip("*.") else "example.com"
        raise ValueError(
            f"wildcards are not supported; write '.{parent}', which matches every "
            f"subdomain of {parent} (not {parent} itself), as in a Postfix transport map")
    if text.startswith("."):
        if not text[1:]:
            raise ValueError("expected a domain or .domain (its subdomains), got '.'")
        return "." + domain(text[1:])
    return domain(text)


def next_hop(raw):
    """A next hop written like a smarthost, where a value is required: an
    empty [routes] entry would say nothing about where the mail goes."""
    hop = smarthost(raw)
    if hop is None:
        raise ValueError("expected a next hop: [host]:port, host:port or host "
                         "(e.g. [10.0.0.5]:25), got ''")
    return hop


def rate_key(raw):
    """A [delivery_rates] key: ``smarthost``, or a domain or .domain."""
    if raw.strip().lower() == "smarthost":
        return "smarthost"
    return route_domain(raw)


def message_rate(raw):
    """``N/PERIOD``, messages per time span: ``250/1h``, ``10/1m``.

    :return: ``(count, seconds)``.
    """
    count, slash, period = raw.partition("/")
    if not slash:
        raise ValueError(f"expected messages/period such as 250/1h, got {raw!r}")
    return integer(minimum=1)(count), duration(positive=True)(period)


#: The client TLS policies: Postfix smtp_tls_security_level names, and
#: wrapper for TLS from the first byte (Postfix smtp_tls_wrappermode).
CLIENT_TLS = ("none", "may", "encrypt", "verify", "wrapper")

#: The TLS levels for direct MX delivery ([delivery] tls_policy and
#: [tls_policy]): Postfix's names plus dane (RFC 7672, then MTA-STS) and
#: sts (RFC 8461); relaymail.delivery.tls_policy says what each does.
MX_TLS = ("none", "may", "encrypt", "verify", "dane", "sts")


def notice_recipient(raw):
    """Who gets a notice relaymail writes itself: an address, or a bare
    local part (``postmaster``) that the scheduler completes with our own
    domain; empty means nobody."""
    text = raw.strip()
    if not text:
        return None
    if any(char.isspace() or char in "<>\"\\" or ord(char) < 32 for char in text):
        raise ValueError(f"expected an address or a local part such as postmaster, got {raw!r}")
    local, at, domain_text = text.rpartition("@")
    if not at:
        local = text
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError(f"expected an address or a local part such as postmaster, got {raw!r}")
    return f"{local}@{domain(domain_text)}" if at else local


def is_ip_address(text):
    """True when ``text`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# The schema.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key: how to parse it, its default and the
    attribute it becomes (the key's own name when None).

    The default is a raw string parsed exactly like a value from the file,
    so defaults pass the same checks; or a function returning one, called
    only when the key is unset, for defaults that depend on the host.
    """

    parse: Callable[[str], Any]
    default: str | Callable[[], str]
    attribute: str | None = None


# section -> key -> Key.  Defaults cite where their numbers come from.
SCHEMA = {
    "server": {
        "listen": Key(server_endpoints, "tcp:2525:interface=127.0.0.1"),
        # Looked up through the module at load time, not bound at import.
        "hostname": Key(host_name, lambda: socket.getfqdn()),
        # Loopback only: narrower than Postfix's mynetworks_style = subnet,
        # so a fresh install relays for nobody else by accident.
        "trusted_networks": Key(listing(network), "127.0.0.0/8 ::1/128"),
        # Message submission (RFC 6409, port 587): MAIL needs AUTH first.
        "submission_listen": Key(server_endpoints, ""),
        # Listeners behind a load balancer speaking the HAProxy PROXY
        # protocol (v1 or v2), and the only peers whose header is believed:
        # anyone else could claim any client address.
        "proxy_listen": Key(server_endpoints, ""),
        "proxy_trusted": Key(listing(network), ""),
        # VRFY and EXPN (RFC 5321 7.3 lets a site restrict both): "off" is
        # 502 5.5.1 for all (Postfix disable_vrfy_command), "trusted" 502
        # 5.7.0 for clients neither in trusted_networks nor authenticated.
        # Under vrfy = anyone such a client may ask but hears only 252
        # (RFC 5321 3.5.3), no oracle of who exists; expn = anyone lists
        # members to anyone, so EXPN is trusted only by default.
        "vrfy": Key(choice("anyone", "trusted", "off"), "anyone"),
        "expn": Key(choice("anyone", "trusted", "off"), "trusted"),
        # listen(2) backlog for listeners whose endpoint string names none.
        # Twisted's 50 left 654 of a 1,000-connect burst ungreeted after
        # 30 s; nginx and Apache use 511.  Linux caps it at
        # net.core.somaxconn (4096 since 5.4).
        "listen_backlog": Key(integer(minimum=1), "1024"),
        # Inbound worker processes sharing the listeners (relaymail.process);
        # 0 runs the whole relay in the one twistd process.
        "workers": Key(per_cpu(integer(minimum=0, maximum=64)), "auto"),
        # After SIGTERM (and for the old workers after SIGHUP), how long
        # sessions in DATA and deliveries in flight may take to finish
        # before they are cut; Postfix's master waits for its children
        # without a bound, systemd's default stop timeout is 90 s.
        "shutdown_grace": Key(duration(minimum=0), "30"),
    },
    "relay": {
        "domains": Key(listing(domain), ""),
    },
    "queue": {
        "path": Key(absolute_path, "var/spool"),
        # Postfix minimal_backoff_time, maximal_backoff_time and
        # maximal_queue_lifetime; delay_warning_time is off by default.
        "min_backoff": Key(duration(whole=True, minimum=1), "300"),
        "max_backoff": Key(duration(whole=True, minimum=1), "4000"),
        "lifetime": Key(duration(whole=True), "5d"),
        "delay_warning": Key(duration(whole=True), "0"),
        # Free space the spool's file system keeps: MAIL gets 452 4.3.1
        # below it (or below it plus a declared SIZE).  Unset means 1.5 x
        # [limits] message_size, the floor Postfix's smtpd holds
        # (smtpd_check_queue: queue_minfree, and 1.5 x message_size_limit);
        # a value set replaces it (Postfix keeps the larger of the two);
        # 0 turns the check off.
        "min_free": Key(optional(size(minimum=0)), ""),
        # Postfix 2bounce_notice_recipient: where a bounce that cannot be
        # delivered goes once, instead of being lost (or looping).
        "double_bounce_recipient": Key(notice_recipient, "postmaster"),
        # Postfix qmgr_message_active_limit (20000): messages being
        # delivered at once, with their records in memory, per delivery
        # worker; the rest of the queue waits as ids, read when their
        # turn comes, so a queue of any size costs little memory.
        "active_limit": Key(integer(minimum=1), "20000"),
        # After PostgreSQL's commit_delay (off there by default): the
        # commit thread waits up to this long for other sessions' messages
        # before one sync for all, while sessions are between MAIL and
        # their final dot.  4 ms measured best here (relaymail.queue.batch);
        # at most 100 ms, PostgreSQL's own bound, so that a "1" or a "4"
        # meant as milliseconds is refused rather than costing seconds.
        "commit_delay": Key(duration(maximum=0.1), "0.004"),
    },
    "delivery": {
        "smarthost": Key(smarthost, ""),
        # SMTP AUTH (RFC 4954) at the smarthost; both or neither.  The
        # password lives in its own file so this one can be world-readable.
        "smarthost_user": Key(optional_text, ""),
        "smarthost_password_file": Key(readable_file, ""),
        # Postfix smtp_tls_security_level names.  Postfix defaults to none;
        # may (opportunistic STARTTLS, RFC 3207) costs nothing when the
        # peer lacks it and defeats passive eavesdropping when it has it.
        "smarthost_tls": Key(choice(*CLIENT_TLS), "may"),
        "tls_ca_file": Key(pem_certificates, ""),
        # None means [server] hostname; resolved by whoever builds the client.
        "helo_name": Key(optional(host_name), ""),
        # Postfix smtp_connect_timeout is 30s.  RFC 5321 4.5.3.2 asks a
        # client to wait 5 minutes for the greeting and the MAIL and RCPT
        # replies (4.5.3.2.1-3) and 10 minutes after the final dot
        # (4.5.3.2.6).
        "connect_timeout": Key(duration(positive=True), "30"),
        "command_timeout": Key(duration(positive=True), "300"),
        "data_timeout": Key(duration(positive=True), "600"),
        # Postfix default_destination_concurrency_limit, and a global cap
        # in the spirit of its default_process_limit (100).
        "destination_concurrency": Key(integer(minimum=1), "20"),
        "max_connections": Key(integer(minimum=1), "100"),
        # Postfix default_destination_recipient_limit (50): recipients of
        # one message in one delivery to one destination (an SMTP or LMTP
        # transaction, a transport's deliver() call); more go in further
        # deliveries.  Every server must take 100 (RFC 5321 4.5.3.1.8), and
        # a server that takes fewer says 452 4.5.3 and gets the rest in
        # further transactions at once.
        "recipients_per_transaction": Key(integer(minimum=1), "50"),
        # Transports other than smtp (lmtp, pipe, a site's;
        # relaymail.delivery.transports): deliveries at once per transport,
        # as default_destination_concurrency_limit, and the longest one
        # deliver() may take before its recipients are deferred: Postfix's
        # command_time_limit (1000s), its bound on a pipe(8) command.
        "transport_concurrency": Key(integer(minimum=1), "20"),
        "transport_timeout": Key(duration(positive=True), "1000"),
        # Delivery worker processes, each owning one partition of the queue,
        # when [server] workers is not 0 (relaymail.queue.partition).
        "workers": Key(integer(minimum=1, maximum=64), "1"),
        # RFC 5321 4.5.4.1: MX hosts are reached on port 25; tests move it.
        "mx_port": Key(port_number, "25"),
        # TLS towards MX hosts (relaymail.delivery.tls_policy).  Postfix
        # defaults to none and recommends dane with a validating resolver;
        # dane here falls back to MTA-STS and then to may, and believes the
        # AD bit only from a resolver on this host (or resolv.conf's
        # trust-ad), so a remote resolver cannot be forged into DANE.
        "tls_policy": Key(choice(*MX_TLS), "dane"),
        # RFC 8461 3.3: the policy is fetched by HTTPS, port 443; tests move it.
        "mta_sts_port": Key(port_number, "443"),
        # RFC 8460 TLS reports to the domains that ask (off by default, as
        # every MTA that has them); the organization named in them, and the
        # address they come from and name for contact (a bare local part
        # gets [server] hostname).
        "tls_report": Key(boolean, "no"),
        "tls_report_organization": Key(optional(host_name), ""),
        "tls_report_contact": Key(notice_recipient, "postmaster"),
        # Postfix soft_bounce (default no): keep as deferred what would
        # bounce, while a new set-up is being tried out.
        "soft_bounce": Key(boolean, "no"),
        # Postfix mime_nesting_limit: how deep the 8-bit to 7-bit conversion
        # for a next hop without 8BITMIME follows multipart and message/rfc822.
        # At most 250: the conversion walks the nesting recursively (three
        # frames a level), and Python's stack stops near 330 levels.
        "mime_nesting_limit": Key(integer(minimum=1, maximum=250), "100"),
    },
    "tls": {
        "certificate": Key(readable_file, ""),
        "private_key": Key(readable_file, ""),
    },
    "auth": {
        # user:password-hash lines; empty means AUTH is not offered.
        "passwords": Key(readable_file, ""),
        # RFC 4954 section 14: PLAIN and LOGIN send the password in the
        # clear, so they are offered only under TLS unless this says yes.
        "allow_plaintext": Key(boolean, "no"),
        # Wait this long before a 535 so guessing passwords is slow; the
        # session itself is not blocked.
        "failure_delay": Key(duration(), "1"),
        # scrypt runs (32 MiB and ~0.2 s of a core each) in progress at
        # once, past which AUTH gets 454 4.7.0 at once.  hashlib.scrypt
        # lets go of the GIL, so one per CPU keeps every core busy under a
        # flood; more would only add 32 MiB each and make every login
        # slower (measured on 2 cores: one run 0.17 s, two at once 0.29 s).
        "max_concurrent_hashes": Key(per_cpu(integer(minimum=1)), "auto"),
        # AUTH commands per client address per minute (0: no limit);
        # Postfix smtpd_client_auth_rate_limit, off there by default.  A
        # client logs in once per session; 30 leaves room for a small
        # office behind one address while one address may try at most a
        # twentieth of what two cores can hash in a minute (~700).
        "attempts_per_minute": Key(integer(minimum=0), "30"),
    },
    "limits": {
        # 10 MiB; Postfix message_size_limit is 10240000.
        "message_size": Key(size(), "10M"),
        # Postfix smtpd_recipient_limit.  RFC 5321 4.5.3.1.8 wants at
        # least 100 accepted, but a smaller value is the admin's call.
        "recipients": Key(integer(minimum=1), "1000"),
        # RFC 5321 4.5.3.1.6: a text line is up to 1000 octets with CRLF
        # and a server must accept that; the lower floor is for tests.
        "line_length": Key(integer(minimum=80), "1000"),
        # RFC 5321 4.5.3.2.7 (server timeout, 5 minutes) and 4.5.3.2.5
        # (data block, 3 minutes).
        "command_timeout": Key(duration(positive=True), "300"),
        "data_timeout": Key(duration(positive=True), "180"),
        # Postfix smtpd_hard_error_limit.
        "errors": Key(integer(minimum=1), "20"),
        # Postfix smtpd_junk_command_limit: NOOP, RSET, VRFY, EXPN, HELP and
        # repeated HELO/EHLO beyond this many count as errors; reset by each
        # queued message.
        "junk_commands": Key(integer(minimum=0), "100"),
        # Postfix smtpd_min_data_rate (3.7 and later, default 500): a DATA
        # block must arrive at least this fast, so a client trickling a
        # byte at a time cannot hold a connection for hours.  0 is off.
        "min_data_rate": Key(integer(minimum=0), "500"),
        # Connections at once from everyone.  Not 0: an unbounded count
        # would let a flood exhaust file descriptors.
        "connections": Key(integer(minimum=1), "1000"),
        # Postfix smtpd_client_connection_count_limit (default 50) and
        # smtpd_client_connection_rate_limit (per anvil_rate_time_unit,
        # 60 s); 0 turns either off, as in Postfix.
        "connections_per_ip": Key(integer(minimum=0), "50"),
        "connection_rate_per_ip": Key(integer(minimum=0), "120"),
        # Addresses counted as one client for the per-IP limits: an IPv6
        # site gets a /64 (RFC 6177), so counting single addresses lets one
        # client look like millions.  Postfix 3.8 smtpd_client_ipv4_prefix_length
        # is 32 and smtpd_client_ipv6_prefix_length 84; a /64 also catches
        # the clients that pick a fresh interface id per connection.
        "ipv4_prefix": Key(prefix_length(32), "32"),
        "ipv6_prefix": Key(prefix_length(128), "64"),
        # Connections only trusted_networks may use, so no crowd of
        # outsiders can lock out the relay's own clients.  Postfix gets the
        # same from a separate smtpd for mynetworks; 10% is our choice.
        "trusted_reserve": Key(portion(99), "10%"),
        # Stress: from this many open connections on, outsiders' sessions
        # get the shorter limits below, as Postfix uses
        # smtpd_timeout = ${stress?{10}:{300}}, smtpd_hard_error_limit =
        # ${stress?{1}:{20}} and smtpd_junk_command_limit = ${stress?{1}:{100}}
        # once all smtpd processes are busy.
        "stress_threshold": Key(portion(100), "80%"),
        "stress_timeout": Key(duration(positive=True), "10"),
        "stress_errors": Key(integer(minimum=1), "1"),
        "stress_junk_commands": Key(integer(minimum=0), "1"),
        # Postfix header_size_limit: 102400 bytes of message header.
        "header_size": Key(size(), "102400"),
        # Postfix hopcount_limit (default 50): most Received: fields a
        # message may have with ours, or it is refused as a loop (RFC 5321
        # 6.3).  Postfix counts its own too, but its cleanup refuses at the
        # limit itself (++hop_count >= hopcount_limit); this is the "maximal
        # number allowed" of its documentation, one more.
        "hops": Key(integer(minimum=1), "50"),
        # NUL in message content is refused (554 5.6.0) unless this is yes.
        "allow_nul": Key(boolean, "no"),
        # A text line over line_length: refused (554 5.6.0), or cut into
        # lines of line_length with CRLF SPACE, as Postfix breaks the lines
        # it sends (smtp_line_length_limit).
        "long_lines": Key(choice("reject", "split"), "reject"),
    },
    "metrics": {
        # Prometheus exposition at /metrics and a status page at / (over
        # HTTP, served by the master: relaymail.metrics); empty is off.
        # One endpoint string; the sample binds loopback, as Postfix's
        # own status tools are local only: queue data names senders.
        "listen": Key(metrics_endpoint, ""),
        # Where each process writes its metrics files; empty: a new
        # private directory per run under $RUNTIME_DIRECTORY (systemd's
        # RuntimeDirectory=) or the system's temporary directory.
        "directory": Key(optional(absolute_path), ""),
        # How often the status page reloads itself.
        "status_refresh": Key(duration(positive=True), "10"),
    },
    "plugins": {
        # Which plugins run at each hook, in order; the first decisive
        # answer wins (Postfix's smtpd_client_, _helo_, _sender_ and
        # _recipient_restrictions, one list a stage).
        "connect": Key(listing(plugin_name), ""),
        "helo": Key(listing(plugin_name), ""),
        "senders": Key(listing(plugin_name), ""),
        "recipients": Key(listing(plugin_name), "domains"),
        "expanders": Key(listing(plugin_name), ""),
        "filters": Key(listing(plugin_name), ""),
        "routers": Key(listing(plugin_name), ""),
        "transports": Key(listing(plugin_name), ""),
        "path": Key(listing(directory), ""),
        "timeout": Key(duration(positive=True), "10"),
        # Threads for plugins that declare blocking = True, per process.
        # A hung plugin holds one until [plugins] timeout and beyond; past
        # this many, further calls wait their turn (and time out), so the
        # reactor and other sessions are never held.
        "threads": Key(integer(minimum=1), "10"),
    },
    "log": {
        # "text": twistd's line format; "json": one JSON object a line with
        # the same fields (session, client, queue_id, ...) for log shippers.
        # Applies where relaymail writes the log itself (twistd -n without
        # --logfile or --syslog: standard output, the systemd journal).
        "format": Key(choice("text", "json"), "text"),
    },
}


@dataclasses.dataclass(frozen=True)
class Table:
    """A section whose keys the admin chooses (the domains of [routes]):
    each key is checked by ``parse_key``, each value by ``parse_value``,
    and the section becomes a dict of the results."""

    parse_key: Callable[[str], Any]
    parse_value: Callable[[str], Any]


# section -> Table.  Kept apart from SCHEMA, whose sections have a fixed
# set of keys each with a default; a Table's default is the empty dict.
TABLES = {
    # Per-domain next hops, like a Postfix transport(5) map holding only
    # "domain smtp:[host]:port" lines: a domain, or .domain for its
    # subdomains (relaymail.delivery.routing picks the entry).
    "routes": Table(route_domain, next_hop),
    # TLS towards a route's next hop, by the same keys (Postfix keeps
    # this apart too, in smtp_tls_policy_maps); a route not named: may.
    "route_tls": Table(route_domain, choice(*CLIENT_TLS)),
    # TLS towards a recipient domain's MX hosts, overriding [delivery]
    # tls_policy for it (Postfix smtp_tls_policy_maps): the same keys.
    "tls_policy": Table(route_domain, choice(*MX_TLS)),
    # Outbound shaping: at most N messages per period to a destination
    # (relaymail.delivery.shaping): "smarthost", or a recipient domain or
    # .domain as in [routes].  The excess waits in the queue, never refused:
    # an ISP's smarthost that takes 250 messages an hour.
    "delivery_rates": Table(rate_key, message_rate),
}


# section -> attribute -> the key naming the file it is read from.  These
# are secrets: read once at load time (so a bad file fails at start-up),
# never shown in an error or in the settings' repr.
SECRETS = {
    "delivery": {"smarthost_password": "smarthost_password_file"},
}

# Longest secret line read; a password longer than this is surely the
# wrong file.
_SECRET_LIMIT = 4096


def _attribute(name, key):
    """The attribute ``key`` (the Key named ``name``) becomes."""
    return key.attribute or name


def _section_class(section, keys):
    """A frozen dataclass holding one section's parsed values."""
    fields = [(_attribute(name, key), Any) for name, key in keys.items()]
    fields += [(name, Any, dataclasses.field(repr=False))
               for name in SECRETS.get(section, {})]
    cls = dataclasses.make_dataclass(
        f"{section.capitalize()}Settings", fields, frozen=True)
    cls.__doc__ = f"The parsed values of [{section}]."
    cls.__module__ = __name__
    return cls


SECTION_CLASSES = {section: _section_class(section, keys)
                   for section, keys in SCHEMA.items()}

Settings = dataclasses.make_dataclass(
    "Settings",
    [("source", str)]
    + [(section, cls) for section, cls in SECTION_CLASSES.items()]
    + [(section, dict) for section in TABLES]
    + [("plugin_options", dict)],
    frozen=True)
Settings.__module__ = __name__
Settings.__doc__ = """All of relaymail's settings: ``source`` (the file read,
or '<defaults>'), one attribute per section of :data:`SCHEMA`, one dict per
section of :data:`TABLES` (``routes``: domain -> :class:`Smarthost`), and
``plugin_options``, a dict of each [plugin:NAME] section's raw strings."""


# ---------------------------------------------------------------------------
# Reading the file.
# ---------------------------------------------------------------------------

def _suggest(word, choices):
    """The closest of ``choices`` to ``word``, or None."""
    close = difflib.get_close_matches(word, choices, n=1)
    return close[0] if close else None


def _unknown_section(source, section):
    """The ConfigError for a section relaymail does not know."""
    known = sorted([*SCHEMA, *TABLES])
    if ":" in section:
        # [plugins:aliases] or [Plugin:aliases]: a plugin's options, mistyped.
        guess = PLUGIN_SECTION_PREFIX + section.split(":", 1)[1]
    else:
        guess = _suggest(section, known)
    if guess:
        return ConfigError(source, section, None,
                           f"unknown section; did you mean [{guess}]?")
    listed = ", ".join(f"[{name}]" for name in known)
    return ConfigError(source, section, None,
                       f"unknown section; expected one of {listed} or [plugin:NAME]")


def _unknown_key(source, section, key):
    """The ConfigError for a key its section does not have."""
    known = list(SCHEMA[section])
    guess = _suggest(key, known)
    if guess:
        return ConfigError(source, section, key,
                           f"unknown key; did you mean '{guess}'?")
    return ConfigError(source, section, key,
                       f"unknown key; [{section}] has {', '.join(known)}")


def _plugin_name_of(source, section):
    """The NAME of a [plugin:NAME] section, checked."""
    name = section[len(PLUGIN_SECTION_PREFIX):]
    try:
        return plugin_name(name)
    except ValueError as exc:
        raise ConfigError(source, section, None, str(exc)) from None


def _syntax_error(source, text, exc):
    """Turn configparser's multi-line complaint into one ConfigError."""
    lines = text.splitlines()

    def line_at(number):
        return lines[number - 1].strip() if 0 < number <= len(lines) else ""

    if isinstance(exc, configparser.DuplicateOptionError):
        return ConfigError(source, exc.section, exc.option,
                           f"line {exc.lineno}: set twice in this section")
    if isinstance(exc, configparser.DuplicateSectionError):
        return ConfigError(source, exc.section, None,
                           f"line {exc.lineno}: section appears twice")
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return ConfigError(source, None, None,
                           f"line {exc.lineno}: expected a [section] header "
                           f"before {line_at(exc.lineno)!r}")
    if isinstance(exc, configparser.ParsingError) and exc.errors:
        number = exc.errors[0][0]
        return ConfigError(source, None, None,
                           f"line {number}: expected '[section]' or "
                           f"'key = value', got {line_at(number)!r}")
    return ConfigError(source, None, None, _one_line(exc))


def _read_text(source):
    """The file's text, or a ConfigError saying why it cannot be had."""
    try:
        with open(source, encoding="utf-8") as stream:
            return stream.read()
    except OSError as exc:
        raise ConfigError(source, None, None,
                          f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, None,
                          f"cannot read the file: not UTF-8 (byte {exc.start} "
                          f"is {exc.object[exc.start]:#04x})") from None


def _parse_ini(source, text):
    """The file as a ConfigParser, or a ConfigError naming the bad line."""
    parser = configparser.ConfigParser(
        # Values are taken literally: '%' has no meaning in them.
        interpolation=None,
        # No section can be named "\n", so [DEFAULT] is an ordinary (and
        # therefore unknown) section instead of silently feeding every
        # other section its keys.
        default_section="\n",
    )
    parser.optionxform = str  # keep keys as written; the schema is lower-case
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        raise _syntax_error(source, text, exc) from None
    return parser


class _Values:
    """The raw strings gathered so far, with where each came from."""

    def __init__(self):
        self.raw = {}       # (section, key) -> (string, source)
        self.plugins = {}   # plugin name -> {key: string}

    def set(self, source, section, key, value):
        """Record one value after checking its section and key exist."""
        if section.startswith(PLUGIN_SECTION_PREFIX):
            name = _plugin_name_of(source, section)
            self.plugins.setdefault(name, {})[key] = value
        elif section in TABLES:
            self.raw[section, key] = (value, source)
        elif section not in SCHEMA:
            raise _unknown_section(source, section)
        elif key not in SCHEMA[section]:
            raise _unknown_key(source, section, key)
        else:
            self.raw[section, key] = (value, source)

    def add_file(self, source, text=None):
        """Gather every value in the INI file ``source`` (or in ``text``,
        what it held when it was read)."""
        parser = _parse_ini(source, _read_text(source) if text is None else text)
        for section in parser.sections():
            if section.startswith(PLUGIN_SECTION_PREFIX):
                # An empty [plugin:NAME] still says the section exists.
                self.plugins.setdefault(_plugin_name_of(source, section), {})
            elif section not in SCHEMA and section not in TABLES:
                raise _unknown_section(source, section)
            for key, value in parser.items(section):
                self.set(source, section, key, value)

    def source_of(self, section, key, fallback):
        """Where the value of ``key`` came from; ``fallback`` for defaults."""
        return self.raw.get((section, key), (None, fallback))[1]


def _parse_value(values, section, name, key, fallback):
    """The typed value of one key, from its raw string or its default."""
    raw, source = values.raw.get((section, name), (None, fallback))
    if raw is None:
        raw = key.default() if callable(key.default) else key.default
    try:
        return key.parse(raw)
    except ValueError as exc:
        raise ConfigError(source, section, name, str(exc)) from None


def _read_secret(values, section, file_key, path, fallback):
    """The first line of the file at ``path``, without its line end.

    Errors name the file key and the path, never any of the file's text.
    """
    def fail(problem):
        return ConfigError(values.source_of(section, file_key, fallback),
                           section, file_key, problem)

    try:
        with open(path, "rb") as stream:
            line = stream.readline(_SECRET_LIMIT + 1)
    except OSError as exc:
        raise fail(f"cannot read {path!r}: {exc.strerror}") from None
    line = line.removesuffix(b"\n").removesuffix(b"\r")
    if len(line) > _SECRET_LIMIT:
        raise fail(f"the first line of {path!r} is longer than "
                   f"{_SECRET_LIMIT} bytes")
    if not line:
        raise fail(f"the first line of {path!r} is empty")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"the first line of {path!r} is not UTF-8") from None


def _build_section(values, section, fallback):
    """One section's dataclass, every key parsed and every secret read."""
    fields = {_attribute(name, key): _parse_value(values, section, name, key, fallback)
              for name, key in SCHEMA[section].items()}
    for name, file_key in SECRETS.get(section, {}).items():
        path = fields[_attribute(file_key, SCHEMA[section][file_key])]
        fields[name] = (None if path is None
                        else _read_secret(values, section, file_key, path, fallback))
    return SECTION_CLASSES[section](**fields)


def _build_table(values, section):
    """One admin-keyed section as a dict, every key and value checked."""
    table = TABLES[section]
    built = {}
    written = {}   # parsed key -> the key as written, to name duplicates
    for (where, key), (raw, source) in values.raw.items():
        if where != section:
            continue
        try:
            parsed_key = table.parse_key(key)
            parsed_value = table.parse_value(raw)
        except ValueError as exc:
            raise ConfigError(source, section, key, str(exc)) from None
        if parsed_key in written and written[parsed_key] != key:
            # configparser keeps case, so Example.com and example.com
            # arrive as two keys that mean one domain.
            raise ConfigError(source, section, key,
                              f"same domain as {written[parsed_key]!r}")
        written[parsed_key] = key
        built[parsed_key] = parsed_value
    return built


_SOURCE_RANK = {DEFAULTS_SOURCE: 0, COMMAND_LINE_SOURCE: 2}


def _later(values, section, first, second, fallback):
    """Which of two keys to blame for a conflict between them: the one set
    most recently (command line over file over default); ``second`` on a
    tie.  Returns (source, key)."""
    def rank(key):
        return _SOURCE_RANK.get(values.source_of(section, key, DEFAULTS_SOURCE), 1)
    key = first if rank(first) > rank(second) else second
    return values.source_of(section, key, fallback), key


def _check_together(values, settings, fallback):
    """Rules that tie two keys together."""
    queue = settings.queue
    if queue.max_backoff < queue.min_backoff:
        source, key = _later(values, "queue", "min_backoff", "max_backoff", fallback)
        raise ConfigError(source, "queue", key,
                          f"max_backoff ({queue.max_backoff}) must be at least "
                          f"min_backoff ({queue.min_backoff})")
    _check_pair(values, settings, fallback, "tls", "certificate", "private_key")
    _check_server_certificate(values, settings, fallback)
    _check_pair(values, settings, fallback, "delivery",
                "smarthost_user", "smarthost_password_file")
    delivery = settings.delivery
    if delivery.smarthost_user is not None and delivery.smarthost_tls == "none":
        source, key = _later(values, "delivery", "smarthost_user", "smarthost_tls", fallback)
        raise ConfigError(source, "delivery", key,
                          "smarthost_user is set and smarthost_tls = none, but the password "
                          "is sent only over TLS: every message to the smarthost would be "
                          "deferred; set smarthost_tls = verify (or encrypt)")
    for name in settings.route_tls:
        if name not in settings.routes:
            raise ConfigError(values.source_of("route_tls", name, fallback), "route_tls", name,
                              "has no [routes] entry: TLS for a route that does not exist")
    _check_connection_shares(values, settings, fallback)
    server = settings.server
    # Listeners that could never serve anyone are a mistake, not a choice.
    if server.proxy_listen and not server.proxy_trusted:
        raise ConfigError(values.source_of("server", "proxy_listen", fallback), "server",
                          "proxy_listen", "set but proxy_trusted is empty: no proxy would be believed")
    if server.submission_listen and settings.auth.passwords is None:
        raise ConfigError(values.source_of("server", "submission_listen", fallback), "server",
                          "submission_listen",
                          "set but [auth] passwords is not: nobody could log in to send")


def _check_connection_shares(values, settings, fallback):
    """The trusted reserve must leave outsiders a connection, and the
    stress threshold must be a number of connections that can be open."""
    limits = settings.limits
    reserve = limits.trusted_reserve.of(limits.connections)
    if reserve >= limits.connections:
        source, key = _later(values, "limits", "connections", "trusted_reserve", fallback)
        raise ConfigError(source, "limits", key,
                          f"trusted_reserve ({reserve}) must be less than connections "
                          f"({limits.connections}): clients outside trusted_networks "
                          "could never connect")
    # A percentage always names a possible count (the gate takes at least
    # one connection); a number must be one.
    threshold = limits.stress_threshold
    if not threshold.percent and not 1 <= threshold.value <= limits.connections:
        source, key = _later(values, "limits", "connections", "stress_threshold", fallback)
        raise ConfigError(source, "limits", key,
                          f"stress_threshold ({threshold.value}) must be from 1 to connections "
                          f"({limits.connections})")


def _check_pair(values, settings, fallback, section, first, second):
    """Refuse one of two keys that only make sense together set without
    the other, naming the one that was set."""
    parsed = getattr(settings, section)
    first_set = getattr(parsed, first) is not None
    second_set = getattr(parsed, second) is not None
    if first_set != second_set:
        present, absent = (first, second) if first_set else (second, first)
        raise ConfigError(values.source_of(section, present, fallback), section, present,
                          f"set but {absent} is not; set both or neither")


def _check_server_certificate(values, settings, fallback):
    """Refuse a [tls] certificate and key that could not serve a handshake,
    now rather than at the first STARTTLS."""
    tls = settings.tls
    if tls.certificate is None:
        return
    try:
        load_server_certificate(tls.certificate, tls.private_key)
    except TLSFileError as exc:
        raise ConfigError(values.source_of("tls", exc.key, fallback),
                          "tls", exc.key, exc.problem) from None


#: [queue] min_free when unset, in units of [limits] message_size (Postfix
#: smtpd_space_multf): room for one whole message with half again to spare.
MIN_FREE_FACTOR = 1.5


def _derive_defaults(sections):
    """Fill in the defaults that depend on another key, in place."""
    queue = sections["queue"]
    if queue.min_free is None:
        sections["queue"] = dataclasses.replace(
            queue, min_free=int(MIN_FREE_FACTOR * sections["limits"].message_size))


def read_config_text(path):
    """The config file's text, for :func:`load_config`'s ``text``; a
    ConfigError as load_config would raise when it cannot be read."""
    return _read_text(path)


def effective_values(path=None, text=None):
    """Every key of :data:`SCHEMA` as ``(section, key, value, default,
    source)``: the raw string in force, the default's, and where the value
    came from (the file, or :data:`DEFAULTS_SOURCE`), for ``relaymail-check
    config --effective`` (Postfix's ``postconf`` and ``postconf -d``).
    Check the file with :func:`load_config` first: this only reads it."""
    values = _Values()
    if path is not None:
        values.add_file(path, text)
    rows = []
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            default = key.default() if callable(key.default) else key.default
            raw, source = values.raw.get((section, name), (default, DEFAULTS_SOURCE))
            rows.append((section, name, raw, default, source))
    return rows


def load_config(path=None, overrides=None, text=None):
    """Read and check relaymail's settings.

    :param path: the INI file, or None for the built-in defaults alone.
    :param text: the file's text, read before (by the master, for its
        workers: they then check the same settings even if the file has
        changed since); None reads ``path``.
    :param overrides: ``{(section, key): string}`` from the command line,
        applied after the file and checked the same way.
    :return: a :class:`Settings`.
    :raise ConfigError: for the first problem found.
    """
    source = DEFAULTS_SOURCE if path is None else path
    values = _Values()
    if path is not None:
        values.add_file(path, text)
    for (section, key), value in (overrides or {}).items():
        values.set(COMMAND_LINE_SOURCE, section, key, value)
    sections = {section: _build_section(values, section, source)
                for section in SCHEMA}
    sections.update((section, _build_table(values, section)) for section in TABLES)
    _derive_defaults(sections)
    settings = Settings(source=source, plugin_options=values.plugins, **sections)
    _check_together(values, settings, source)
    return settings
