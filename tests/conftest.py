"""Fixtures shared by the test modules."""

import pytest

from relaymail.queue.spool import Spool


@pytest.fixture
def spool(tmp_path):
    """A started spool in a fresh directory, stopped after the test."""
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    yield spool
    spool.stop()
