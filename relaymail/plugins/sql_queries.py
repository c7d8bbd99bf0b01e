"""The queries of ``[plugin:sql]``: neutral placeholders to a driver's own.

A query in the configuration names what it is given with ``{address}``,
``{local_part}`` and ``{domain}`` (``{{`` and ``}}`` are literal braces).
Each placeholder becomes a bound parameter in the driver's paramstyle
(PEP 249): ``?`` for sqlite3 (qmark), ``%(name)s`` for psycopg (pyformat).
The values never become part of the SQL text, so an address such as
``a'--@example.com`` is only ever compared, never run.

What is checked here, at start: the braces balance, every placeholder is
one of the three, none carries a conversion or a format spec (``{domain!r}``
would suggest the value is formatted into the text, which it never is).
"""

import string

#: The placeholders a query may use, and what the plugin fills them with.
PLACEHOLDERS = ("address", "local_part", "domain")

#: The paramstyles the supported drivers use (PEP 249).
QMARK = "qmark"
PYFORMAT = "pyformat"


class Query:
    """One configured query, ready for its driver.

    :ivar sql: the text to execute, with the driver's placeholders.
    :ivar names: the placeholder names in the order they occur.
    """

    def __init__(self, text, paramstyle):
        """:raise ValueError: describing the first problem with ``text``."""
        self.text = text
        self.paramstyle = paramstyle
        self.sql, self.names = _translate(text, paramstyle)

    def parameters(self, values):
        """The parameters for ``cursor.execute``: a tuple in order for
        qmark, a dict for pyformat.

        :param values: a dict holding every name of :data:`PLACEHOLDERS`.
        """
        if self.paramstyle == QMARK:
            return tuple(values[name] for name in self.names)
        return {name: values[name] for name in self.names}

    def __repr__(self):
        return f"Query({self.text!r}, {self.paramstyle!r})"


def _translate(text, paramstyle):
    if not text.strip():
        raise ValueError("empty query")
    parts = []
    names = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:
        # "Single '}' encountered in format string" and the like.
        raise ValueError(f"{exc}; write a literal brace as {{{{ or }}}}") from None
    for literal, name, spec, conversion in pieces:
        if paramstyle == PYFORMAT:
            # psycopg reads every % of the text as the start of a
            # placeholder; a LIKE '%x' must reach the server as written.
            literal = literal.replace("%", "%%")
        parts.append(literal)
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            shown = "{" + name + "}" if name else "{}"
            raise ValueError(
                f"unknown placeholder {shown}; a query may use "
                + ", ".join("{" + known + "}" for known in PLACEHOLDERS))
        if spec or conversion:
            raise ValueError(
                f"placeholder {{{name}}} takes no conversion or format spec: "
                "its value is a bound parameter, never formatted into the text")
        names.append(name)
        parts.append("?" if paramstyle == QMARK else f"%({name})s")
    return "".join(parts), tuple(names)


def address_values(mailbox):
    """What the placeholders stand for, for a ``relaymail.address.Mailbox``.

    ``local_part`` is the local part as the client wrote it, quoting
    removed (RFC 5321 2.4 leaves its case to the receiving host, so it is
    not folded: ``lower({local_part})`` in the query does that);
    ``domain`` is lower case with IDNs as A-labels, the form domains are
    compared in; ``address`` is the two joined by ``@``, or the bare
    local part for ``<postmaster>`` and VRFY/EXPN of a bare name (with
    ``domain`` empty).
    """
    local = mailbox.local_text
    domain = mailbox.domain_key
    return {"address": f"{local}@{domain}" if domain else local,
            "local_part": local, "domain": domain}
