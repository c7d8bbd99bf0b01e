"""The master and its worker processes: docs/architecture.rst."""
