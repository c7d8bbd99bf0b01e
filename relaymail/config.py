"""The INI file to validated settings."""


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
