"""What a worker is started with: the master's config as the master read
it, and the directory it was read in."""

import dataclasses
import json

#: The byte on an inbound worker's standard input that lets it accept:
#: the master sends it once no leftover of the worker's slot is in the spool.
GO = b"g"
#: The byte an inbound worker writes on its ``ready`` pipe once it accepts:
#: the master starts the delivery workers when every inbound one has.
READY = b"r"


@dataclasses.dataclass(frozen=True)
class Launch:
    """The config file's name (for messages; None: the defaults), the
    command-line overrides ``{(section, key): value}``, the file's text as
    the master read it, and the master's working directory then (relative
    paths in the config are taken from it; twistd's ``--rundir`` moves the
    master elsewhere later)."""

    config: str
    overrides: dict
    config_text: str
    directory: str

    #: The environment variable the text travels in: a worker's arguments
    #: are visible to every user in ps, its environment only to its owner.
    TEXT_VARIABLE = "RELAYMAIL_CONFIG_TEXT"

    def arguments(self):
        """The worker's command-line arguments for this launch."""
        overrides = {f"{section}.{key}": value for (section, key), value in self.overrides.items()}
        arguments = ["--overrides", json.dumps(overrides)]
        if self.config is not None:
            arguments += ["--config", self.config]
        return arguments

    def environment(self, env):
        """``env`` with the config text added."""
        env = dict(env)
        if self.config_text is not None:
            env[self.TEXT_VARIABLE] = self.config_text
        return env


def overrides_from(text):
    """The overrides as :meth:`Launch.arguments` wrote them."""
    return {tuple(name.split(".", 1)): value for name, value in json.loads(text).items()}
