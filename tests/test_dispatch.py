"""relaymail.dispatch: the reactor calls its connections plainly, and an
error that escapes an event is still logged with the connection's prefix.

Each test runs a reactor of its own over real loopback sockets."""

import time

import pytest
from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from relaymail.dispatch import dispatch_plainly


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        # What a legacy log.msg made now would be tagged with.
        self.factory.systems.append(context.get(log.ILogContext)["system"])
        self.transport.write(data)


class Client(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.factory.received.append(data)
        self.transport.loseConnection()


class RaisingOnClose(Echo):
    def connectionLost(self, reason):
        raise RuntimeError("connectionLost failed")


@pytest.fixture
def reactor():
    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    reactor._poller.close()


def ping(reactor, port):
    """Connect, send, and turn the reactor until the echo is back."""
    client = protocol.ClientFactory.forProtocol(Client)
    client.received = []
    reactor.connectTCP("127.0.0.1", port.getHost().port, client)
    deadline = time.monotonic() + 10
    while not client.received and time.monotonic() < deadline:
        reactor.iterate(0.01)
    return b"".join(client.received)


def serving(reactor, protocol_class):
    server = protocol.ServerFactory.forProtocol(protocol_class)
    server.systems = []
    return server, reactor.listenTCP(0, server, interface="127.0.0.1")


def test_connections_are_served_without_the_legacy_log_context(reactor):
    server, port = serving(reactor, Echo)
    assert ping(reactor, port) == b"ping"
    # Twisted's own loop tags the call with the connection's prefix.
    assert server.systems == ["Echo,0,127.0.0.1"]
    assert dispatch_plainly(reactor) is True
    server.systems.clear()
    assert ping(reactor, port) == b"ping"
    assert server.systems == ["-"]
    port.stopListening()


def test_an_error_escaping_an_event_is_logged_with_its_connection_and_the_loop_goes_on(
        reactor):
    dispatch_plainly(reactor)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        server, port = serving(reactor, RaisingOnClose)
        assert ping(reactor, port) == b"ping"
        deadline = time.monotonic() + 10
        while not any("failure" in event for event in events) \
                and time.monotonic() < deadline:
            reactor.iterate(0.01)
        # The client hung up; the server's connectionLost raised.
        [failure] = [event for event in events if "failure" in event]
        assert failure["failure"].check(RuntimeError)
        assert failure["log_system"] == "RaisingOnClose,0,127.0.0.1"
        # The next connection is served as before.
        assert ping(reactor, port) == b"ping"
    finally:
        globalLogPublisher.removeObserver(events.append)
    port.stopListening()


def test_a_reactor_of_another_kind_is_left_alone():
    reactor = SelectReactor()
    try:
        assert dispatch_plainly(reactor) is False
        assert "doIteration" not in vars(reactor)
    finally:
        reactor.removeAll()


def test_an_epoll_reactor_with_a_loop_of_its_own_is_left_alone():
    class Counting(EPollReactor):
        turns = 0

        def doIteration(self, timeout):
            self.turns += 1
            return EPollReactor.doIteration(self, timeout)
    reactor = Counting()
    try:
        assert dispatch_plainly(reactor) is False
        reactor.iterate(0)
        assert reactor.turns == 1
    finally:
        reactor.removeAll()
        reactor._poller.close()
