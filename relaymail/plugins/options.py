"""What the built-in plugins share in reading their ``[plugin:NAME]`` options."""


def reject_unknown(context, allowed):
    """Raise the ConfigError for the first option not in ``allowed``."""
    for key in context.options:
        if key not in allowed:
            raise context.config_error(
                key, f"unknown option; [plugin:{context.name}] takes {', '.join(allowed)}")
