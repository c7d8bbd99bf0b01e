"""relaymail: an SMTP mail relay on Twisted."""

__version__ = "0.1.0"
