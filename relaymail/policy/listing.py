"""What plugins a configuration can see and which it enables:
``twistd relaymail --list-plugins`` and the start-up log line.

Each plugin is built with the configuration's ``[plugin:NAME]`` options,
as a start builds it, because only the built object says for sure which
hooks it serves and whether it blocks (ratelimit blocks only with ``redis``
set).  A plugin that cannot be built so (dkim without its key, say) is
listed all the same, with the build's error and the hooks its factory
declares (``IPluginFactory.hooks``).

The listing, a block per plugin in name order::

    aliases
      from: /usr/lib/python3/dist-packages/relaymail/plugins/aliases.py
      hooks: recipients, expanders
      enabled: recipients
      description: lists and aliases from a file in aliases(5) form
      blocking: no
"""

from relaymail.config import ConfigError
from relaymail.policy.loader import HOOKS, _build, _describe, find_plugins


def enabled_line(settings):
    """The start-up log line: ``plugins: recipients = aliases, domains;
    expanders = aliases``, hooks in the order a message meets them, those
    with no plugin left out (``plugins: none`` when no hook has any)."""
    parts = [f"{key} = {', '.join(names)}" for key, names in _enabled(settings) if names]
    return "plugins: " + ("; ".join(parts) or "none")


def _enabled(settings):
    return [(key, list(getattr(settings.plugins, key))) for key, _ in HOOKS]


def listing(settings):
    """The ``--list-plugins`` text, lines ending in newlines.

    :raise ConfigError: when the plugins cannot be found at all (a site
        plugin that does not load, two plugins of one name).
    """
    factories = find_plugins(settings)
    enabled = _enabled(settings)
    out = []
    for name in sorted(factories):
        try:
            factory = factories[name]
        except ConfigError as error:
            # A built-in whose module does not import (a library missing):
            # the rest are still listed.
            out.append(f"{name}\n  from: {factories.where(name)}\n")
            out.append(f"  not loaded: {_one_line(error.problem)}\n")
            continue
        hooks, blocking, problem, built = _inspect(factory, name, settings)
        at = [key for key, names in enabled if name in names]
        description = _one_line(getattr(factory, "description", None)
                                or getattr(built, "description", None) or "(none given)")
        out.append(f"{name}\n")
        out.append(f"  from: {_describe(factory)}\n")
        out.append(f"  hooks: {', '.join(hooks) or 'none'}\n")
        out.append(f"  enabled: {', '.join(at) or 'no'}\n")
        out.append(f"  description: {description}\n")
        out.append(f"  blocking: {blocking}\n")
        if problem is not None:
            out.append(f"  not built: {problem}\n")
    return "".join(out)


def _inspect(factory, name, settings):
    """``(hooks, blocking, problem, built object or None)``."""
    try:
        built = _build(factory, name, settings)
    except ConfigError as error:
        declared = [key for key, _ in HOOKS if key in tuple(getattr(factory, "hooks", ()))]
        return declared, "unknown", _one_line(str(error)), None
    hooks = [key for key, interface in HOOKS if interface.providedBy(built)]
    blocking = "yes" if getattr(built, "blocking", False) is True else "no"
    return hooks, blocking, None, built


def _one_line(text):
    return " ".join(str(text).split())
