"""Built-in plugins, written against the same contracts as a site plugin (relaymail.interfaces)."""
