"""Reading Twisted server endpoint strings (``tcp:25:interface=192.0.2.1``).

relaymail reads a few listener strings itself before Twisted does: to add
a default ``backlog=`` (:func:`with_backlog`) and to build
implicit-TLS listeners with its own TLS options
(:func:`relaymail.smtp.tls.implicit_tls_endpoint`).  Both must split a
string exactly as Twisted's ``serverFromString`` does, or the two would
disagree about what the administrator wrote; this is that one reading.
"""


def fields(description):
    """``[(key or None, value)]`` for each ``:``-separated field of an
    endpoint string, backslash escapes undone (``\\:`` is a colon inside a
    value), as Twisted's parser reads it.  The first field is the endpoint
    type, e.g. ``(None, "tcp")``; a later ``name=value`` field has its key.
    """
    result, key, current, chars = [], None, [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            result.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None and result:
            key, current = "".join(current), []
        else:
            current.append(char)
    result.append((key, "".join(current)))
    return result


def options(fields_of_string):
    """``{key: value}`` of :func:`fields`' result, the port (the first
    positional field after the type) as ``"port"`` unless named so."""
    named = {key: value for key, value in fields_of_string[1:] if key is not None}
    positional = [value for key, value in fields_of_string[1:] if key is None]
    if "port" not in named and positional:
        named["port"] = positional[0]
    return named


# Endpoint types whose Twisted parsers take a listen backlog.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})


def with_backlog(description, backlog):
    """``description`` with ``backlog=`` added, for the endpoint types that
    take one (tcp, tcp6, ssl, unix), unless it names one already."""
    parts = fields(description)
    if parts[0][1].strip().lower() not in _BACKLOG_TYPES:
        return description
    if any(key is not None and key.strip() == "backlog" for key, _ in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"
