"""The ``pipe`` plugin: the built-in transport that runs commands
(:mod:`relaymail.delivery.pipe`), enabled with ``[plugins] transports = pipe``.

Commands run only where the site lists them, as Postfix's pipe runs only
what master.cf names.  ``[plugin:pipe]`` takes:

``command.NAME``
    A command template, e.g. ``command.archive = /usr/local/bin/archive
    -f {sender} -- {recipient}``; a Route ``("pipe", "archive")`` runs it
    (``command.default`` for a Route with no next hop).  At least one.
``timeout``
    Seconds a command may run before it is killed and its recipients
    deferred.  Default: ``[delivery] transport_timeout`` (1000, Postfix's
    command_time_limit).
``directory``
    The working directory of the commands.  Default ``/``.
``path``
    The commands' ``PATH``.  Default ``/usr/bin:/bin``.
``export_environment``
    Names of the relay's environment variables passed on (Postfix
    export_environment).  Default ``TZ LANG``.
``env.NAME``
    A variable set for the commands: ``env.HOME = /var/lib/archive``.
``null_sender``
    What ``{sender}`` is for the null sender ``<>``.  Default
    ``MAILER-DAEMON``, as Postfix's pipe ``null_sender``.
``newline``
    ``lf`` (default: Unix commands read LF lines, and Postfix's pipe writes
    them) or ``crlf`` (the message exactly as queued).
"""

import os

from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.config import duration
from relaymail.delivery.pipe import PipeTransport, Template
from relaymail.interfaces import IPluginFactory

_OPTIONS = ("command.NAME", "timeout", "directory", "path", "export_environment", "env.NAME",
            "null_sender", "newline")
_PREFIXED = ("command.", "env.")


@implementer(IPlugin, IPluginFactory)
class PipeFactory:
    """Builds :class:`~relaymail.delivery.pipe.PipeTransport` from ``[plugin:pipe]``."""

    name = "pipe"

    def build(self, context):
        """Read the commands and settings; every problem is a ConfigError."""
        options = context.options
        for key in options:
            if key not in _OPTIONS and not key.startswith(_PREFIXED):
                raise context.config_error(
                    key, f"unknown option; [plugin:pipe] takes {', '.join(_OPTIONS)}")
        commands = {}
        environment = {"PATH": options.get("path", "/usr/bin:/bin").strip()}
        for name in options.get("export_environment", "TZ LANG").split():
            if name in os.environ:
                environment[name] = os.environ[name]
        for key, value in options.items():
            prefix, _, name = key.partition(".")
            if prefix + "." not in _PREFIXED:
                continue
            if not name or (prefix == "command" and ":" in name):
                raise context.config_error(key, f"expected {prefix}.NAME (a name without ':')")
            if prefix == "env":
                environment[name] = value
                continue
            try:
                commands[name] = Template(value)
            except ValueError as exc:
                raise context.config_error(key, str(exc)) from None
            if not os.access(commands[name].words[0], os.X_OK):
                raise context.config_error(
                    key, f"{commands[name].words[0]} is not an executable file")
        if not commands:
            raise context.config_error("command.NAME", "no command: define at least one, e.g. "
                                       "command.deliver = /usr/bin/procmail -f {sender}")
        try:
            timeout = (duration(positive=True)(options["timeout"]) if "timeout" in options
                       else context.settings.delivery.transport_timeout)
        except ValueError as exc:
            raise context.config_error("timeout", str(exc)) from None
        directory = options.get("directory", "/").strip()
        if not os.path.isabs(directory) or not os.path.isdir(directory):
            raise context.config_error("directory", f"{directory!r} is not an absolute path "
                                                    "to a directory")
        newline = options.get("newline", "lf").strip().lower()
        if newline not in ("lf", "crlf"):
            raise context.config_error("newline", f"expected lf or crlf, got {newline!r}")
        return PipeTransport(commands, environment, directory=directory, timeout=timeout,
                             null_sender=options.get("null_sender", "MAILER-DAEMON").strip(),
                             crlf=newline == "crlf")


pipe = PipeFactory()
