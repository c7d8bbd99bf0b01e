"""The durable on-disk queue."""
