"""Who may send to whom: runs the configured recipient and list plugins in order."""
