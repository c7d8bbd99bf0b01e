"""What the built-in plugins share in reading their ``[plugin:NAME]`` options."""

from relaymail.plugins.table_file import TableFile


def reject_unknown(context, allowed):
    """Raise the ConfigError for the first option not in ``allowed``."""
    for key in context.options:
        if key not in allowed:
            raise context.config_error(
                key, f"unknown option; [plugin:{context.name}] takes {', '.join(allowed)}")


def read_table(context, path, parse):
    """The :class:`~relaymail.plugins.table_file.TableFile` of the file
    ``[plugin:NAME] file`` names; every problem is a ConfigError on that key."""
    try:
        return TableFile(path, parse, f"[plugin:{context.name}] file")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise context.config_error("file", f"cannot read {path}: {reason}") from None
    except ValueError as exc:
        raise context.config_error("file", f"{path}: {exc}") from None
