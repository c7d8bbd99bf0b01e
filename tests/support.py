"""Shared test helpers: settings, an in-memory queue, a byte-level session driver."""

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relaymail.config import load_config
from relaymail.interfaces import Decision, IListExpander, IMessageQueue, IMessageWriter, IRecipientValidator
from relaymail.policy.recipients import Policy
from relaymail.smtp.server import SMTPFactory

FIXED_TIME = 1_700_000_000.0


def make_settings(tmp_path, **keys):
    """Settings from the embedded defaults plus ``section__key=value``
    overrides; the spool lives in ``tmp_path``."""
    overrides = {
        ("server", "hostname"): "mx.test",
        ("relay", "domains"): "example.com",
        ("queue", "path"): str(tmp_path / "spool"),
    }
    for name, value in keys.items():
        section, key = name.split("__")
        overrides[(section, key)] = value
    return load_config(None, overrides)


@implementer(IMessageWriter)
class MemoryWriter:
    def __init__(self, queue, queue_id):
        self.queue = queue
        self.queue_id = queue_id
        self.chunks = []
        self.aborted = False

    def write(self, data):
        if self.queue.fail_writes:
            raise OSError(28, "No space left on device")
        self.chunks.append(data)

    def commit(self, envelope):
        if self.queue.fail_commits:
            return defer.fail(OSError(5, "Input/output error"))
        self.queue.messages[self.queue_id] = (envelope, b"".join(self.chunks))
        return defer.succeed(self.queue_id)

    def abort(self):
        self.aborted = True


@implementer(IMessageQueue)
class MemoryQueue:
    """The queue contract in memory, for driving the dialogue alone; the real
    spool has its own tests with real files."""

    def __init__(self):
        self.messages = {}
        self.writers = []
        self.fail_writes = False
        self.fail_commits = False
        #: Bytes has_room() finds to spare beyond the reserve; None: no end.
        self.room = None
        self.room_asked = []

    def new_message(self):
        writer = MemoryWriter(self, f"Q{len(self.writers) + 1:04d}")
        self.writers.append(writer)
        return writer

    def has_room(self, size):
        self.room_asked.append(size)
        return self.room is None or size <= self.room


@implementer(IRecipientValidator)
class ScriptedValidator:
    """A plugin whose answers the test sets per local part; ``pending``
    local parts get a Deferred the test fires later."""

    def __init__(self):
        self.answers = {}
        self.pending = {}

    def check_recipient(self, recipient, context):
        key = recipient.local_text
        if key in self.answers:
            answer = self.answers[key]
            if isinstance(answer, Exception):
                raise answer
            return answer
        if key.startswith("later"):
            d = defer.Deferred()
            self.pending[key] = d
            return d
        return Decision.NO_OPINION

    def verify(self, address, context):
        return Decision.accept(f"<{address}>") if address.startswith("known") else Decision.NO_OPINION


@implementer(IListExpander)
class ScriptedExpander:
    def __init__(self, lists):
        self.lists = lists

    def expand(self, address, context):
        return self.lists.get(address)


class Session:
    """One client connection driven with bytes, no network."""

    def __init__(self, settings, validators=(), expanders=(), client_ip="127.0.0.1", queue=None,
                 factory_options=None):
        self.clock = task.Clock()
        self.queue = queue or MemoryQueue()
        self.policy = Policy(list(validators), list(expanders), settings, clock=self.clock)
        self.factory = SMTPFactory(settings, self.policy, self.queue, clock=lambda: FIXED_TIME,
                                    reactor=self.clock, **(factory_options or {}))
        address_type = IPv6Address if ":" in client_ip else IPv4Address
        peer = address_type("TCP", client_ip, 40000)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = self.factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.banner = self.take()

    def take(self):
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data):
        """Send bytes; return the bytes the server wrote in answer."""
        self.protocol.dataReceived(data)
        return self.take()

    def command(self, line):
        return self.send(line + b"\r\n")

    @property
    def closed(self):
        return self.transport.disconnecting
