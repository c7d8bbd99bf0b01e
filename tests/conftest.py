"""Fixtures shared by the test modules."""

import pytest

from relaymail.queue.spool import Spool
from tests.nexthop import NextHop


@pytest.fixture
def spool(tmp_path):
    """A started spool in a fresh directory, stopped after the test."""
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    yield spool
    spool.stop()


@pytest.fixture
def nexthop():
    """A NextHop that accepts everything, stopped after the test; modules
    that need other answers define their own."""
    server = NextHop()
    yield server
    server.stop()
