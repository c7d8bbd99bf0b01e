"""SIGHUP for the master: read the config file again, check it as a start
would, and say what must wait for a restart.

The master applies a good config by replacing its workers (Postfix's
``postfix reload`` likewise lets its daemons finish their work and starts
new ones): new inbound workers start with the new text and take new
connections while the old ones finish their sessions, and each delivery
worker finishes the deliveries under way, then its successor owns the
partition.  Every file the config names (plugin tables, aliases, the
password file, TLS certificates and keys) is read afresh by the new
workers, so a reload reaches all of them.

Some keys shape what the master itself holds -- the spool, the number of
workers and partitions, the bound listeners -- and change only with a
restart; a reload keeps their running values and logs one line for each.
"""

from relaymail.config import load_config, read_config_text
from relaymail.process.launch import Launch

#: Keys a reload cannot apply: the master holds what they describe.
RESTART_ONLY = (
    ("queue", "path"),
    ("server", "workers"),
    ("delivery", "workers"),
    ("server", "listen"),
    ("server", "submission_listen"),
    ("server", "proxy_listen"),
    ("server", "listen_backlog"),
)


def reread(launch, running):
    """The Launch and settings for the config file as it is now, with the
    running values of :data:`RESTART_ONLY` kept.

    :return: ``(launch, settings, notes)``, a line for each key kept.
    :raise ConfigError: the file does not validate (the same line a start
        would print).
    """
    text = read_config_text(launch.config) if launch.config is not None else None
    settings = load_config(launch.config, launch.overrides, text)
    overrides = dict(launch.overrides)
    notes = []
    for section, key in RESTART_ONLY:
        old = getattr(getattr(running, section), key)
        if getattr(getattr(settings, section), key) != old:
            notes.append(f"[{section}] {key} changed: it needs a restart; "
                         f"{_as_text(old)!r} stays in force until then")
            overrides[(section, key)] = _as_text(old)
    if notes:
        settings = load_config(launch.config, overrides, text)
    return Launch(launch.config, overrides, text, launch.directory), settings, notes


def _as_text(value):
    """A running value written back as the config file would give it."""
    if isinstance(value, (list, tuple)):
        return "\n".join(str(item) for item in value)
    return str(value)
