"""Checking a listener's endpoint string, so a typo is told in words.

Twisted's ``serverFromString`` hands the fields of an endpoint string to
its parser as Python arguments, so its complaints are Python's:
``tcp:2590:interfce=127.0.0.1`` is "_parseTCP() got an unexpected keyword
argument", ``tcp:2590:interface=::1`` (colons not escaped, so ``:1`` is
two more fields) is "got multiple values for argument 'interface'", and
``tcp:70000`` is accepted until the bind fails.  :func:`problem` reads the
string first (as :mod:`relaymail.smtp.endpoint_string` does, the way
Twisted does) for the endpoint types a relay listens on, and says what is
wrong and how to write it; config validation runs it, so a start,
``relaymail-check config`` and a SIGHUP reload all refuse the string.
Other types (``systemd:``, Twisted plugins) are left to Twisted.
"""

import difflib
import ipaddress

from relaymail.smtp import endpoint_string


class _Type:
    """What one endpoint type takes: its positional field (the port, or a
    socket's path) and its ``key=value`` options."""

    def __init__(self, positional, options, port=True):
        self.positional = positional
        self.options = options
        self.port = port


#: The types checked here, with the parameters of Twisted's parsers
#: (twisted.internet.endpoints: _parseTCP, _TCP6ServerParser, _parseUNIX);
#: ssl: is relaymail's own reading (relaymail.smtp.tls.implicit_tls_endpoint),
#: a part of Twisted's _parseSSL.  tests/test_config.py holds the first
#: three to Twisted's signatures.
TYPES = {
    "tcp": _Type("port", ("interface", "backlog")),
    "tcp6": _Type("port", ("interface", "backlog")),
    "ssl": _Type("port", ("privateKey", "certKey", "interface", "backlog")),
    "unix": _Type("address", ("mode", "backlog", "lockfile"), port=False),
}

#: Options of Twisted's ssl: string that relaymail's implicit-TLS
#: listeners refuse, and why.
SSL_REFUSED = {
    "sslmethod": "relaymail chooses the TLS versions itself (1.2 and later)",
    "extraCertChain": "put the intermediate certificates in the certKey file, after the "
                      "server's own",
    "dhParameters": "implicit-TLS listeners use ECDHE only",
}


def known_types():
    """Every endpoint type a server string may start with: those above
    and those of Twisted's string parser plugins (systemd, tcp6, ...)."""
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins
    return sorted(set(TYPES) | {plugin.prefix for plugin in
                                getPlugins(IStreamServerEndpointStringParser)})


def problem(description):
    """What is wrong with the server endpoint string ``description``, in
    one line, or None when this reading finds nothing (Twisted's parser
    still has the last word)."""
    fields = endpoint_string.fields(description)
    kind = fields[0][1]
    if kind not in TYPES:
        known = known_types()
        if kind in known:
            return None
        guess = difflib.get_close_matches(kind.lower(), known, n=1)
        hint = f"did you mean '{guess[0]}'? " if guess else ""
        return f"unknown endpoint type '{kind}'; {hint}known: {', '.join(known)}"
    spec = TYPES[kind]
    options = {key: value for key, value in fields[1:] if key is not None}
    for key in options:
        if kind == "ssl" and key in SSL_REFUSED:
            return f"ssl: option {key} is not supported: {SSL_REFUSED[key]}"
        if key != spec.positional and key not in spec.options:
            return _unknown_option(kind, key, spec)
    extra = _unescaped_colon(kind, fields, spec, options)
    if extra:
        return extra
    positional = [value for key, value in fields[1:] if key is None]
    given = positional[0] if positional else options.get(spec.positional)
    if given is None:
        return f"{kind} needs a {spec.positional}, e.g. {_example(kind)}"
    if spec.port:
        bad_port = _number(given, "port", 0, 65535)
        if bad_port:
            return bad_port
    if "backlog" in options:
        return _number(options["backlog"], "backlog", 1, None)
    return None


def _unknown_option(kind, key, spec):
    guess = difflib.get_close_matches(key, spec.options, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return (f"unknown parameter '{key}' for {kind}{hint}; {kind} takes "
            f"{', '.join(spec.options)}")


def _unescaped_colon(kind, fields, spec, options):
    """A field past the one positional field: the value of the
    ``key=value`` field before it held colons that were not escaped."""
    expected = 0 if spec.positional in options else 1
    for index, (key, value) in enumerate(fields[1:], 1):
        if key is not None:
            continue
        if expected:
            expected -= 1
            continue
        key, first = fields[index - 1]
        if key is None:
            return f"'{value}' is one field too many; a ':' inside a value is written '\\:'"
        end = index
        while end < len(fields) and fields[end][0] is None:
            end += 1
        meant = ":".join([first, *(text for _, text in fields[index:end])])
        escaped = meant.replace(":", "\\:")
        if key == "interface" and _is_ipv6(meant):
            also = ""
            if kind == "tcp":
                port = options.get(spec.positional) or fields[1][1]
                also = f", or use tcp6:{port}:interface={escaped}"
            return (f"the colons of the IPv6 address in interface={meant} must be escaped: "
                    f"write interface={escaped}{also}")
        return (f"the value of {key} holds ':', which separates fields; escape it: "
                f"{key}={escaped}")
    return None


def _is_ipv6(text):
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def _number(text, what, low, high):
    """A problem with the number ``text`` for ``what``, or None."""
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii():
        return f"{what} must be a number, got '{text}'"
    if int(stripped) < low or (high is not None and int(stripped) > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        return f"{what} must be {bounds}, got {text}"
    return None


def _example(kind):
    return {"unix": "unix:/run/relaymail.sock"}.get(kind, f"{kind}:25")
