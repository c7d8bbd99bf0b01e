"""The inbound SMTP wire: addresses, replies, the dialogue, DATA and the Twisted protocol."""
