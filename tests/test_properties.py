"""Property tests over the whole protocol (bounded, in the normal run):
random input never crashes it, replies never leave out of order, and a
message ends only at CRLF.CRLF; and the envelope's dict form, which the queue
record is made of."""

import re

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer
from zope.interface import implementer

from relaymail.envelope import Envelope
from relaymail.interfaces import Decision, IRecipientValidator
from relaymail.policy.loader import build_plugins
from tests.support import Session, make_settings

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

WORDS = [b"HELO x", b"EHLO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>",
         b"RCPT TO:<c@example.net>", b"DATA", b"RSET", b"NOOP", b"VRFY b", b"EXPN b", b"HELP",
         b"QUIT", b"STARTTLS", b"AUTH PLAIN", b".", b"", b"MAIL FROM:<>", b"GET /"]

chunks = st.lists(
    st.one_of(st.binary(max_size=40),
              st.sampled_from(WORDS).map(lambda w: w + b"\r\n"),
              st.sampled_from([b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"\x00"])),
    max_size=30)


def well_formed(output):
    return REPLY_LINE.sub(b"", output) == b""


@PROPERTY
@given(chunks)
def test_random_input_never_crashes_and_the_session_stays_usable(tmp_path, parts):
    settings_ = make_settings(tmp_path, limits__errors="1000")
    session = Session(settings_, build_plugins(settings_)[0])
    output = b"".join(session.send(part) for part in parts)
    assert well_formed(output)
    if session.closed:
        return
    # Whatever state the input left, ending any message and any line gets
    # the session back to commands.
    tail = session.send(b"\r\n.\r\n*\r\nRSET\r\nNOOP\r\n")
    assert well_formed(tail)
    if not session.closed:
        assert tail.endswith(b"250 2.0.0 Ok\r\n") or tail.endswith(b"250 Ok\r\n")


@implementer(IRecipientValidator)
class Numbered:
    """Answers RCPT for ``nowN`` at once and ``laterN`` through a Deferred;
    the reply text carries N, so the order of replies can be checked."""

    def __init__(self):
        self.pending = []

    def check_recipient(self, recipient, context):
        name = recipient.local_text
        decision = Decision.accept(f"ok {name[3:] if name.startswith('now') else name[5:]}")
        if name.startswith("later"):
            d = defer.Deferred()
            self.pending.append((d, decision))
            return d
        return decision

    def verify(self, address, context):
        d = defer.Deferred()
        self.pending.append((d, Decision.accept(f"ok {address[5:]}")))
        return d


commands = st.lists(st.tuples(st.sampled_from(["now", "later", "vrfy", "noop"]), st.booleans()),
                    min_size=1, max_size=25)


@PROPERTY
@given(commands, st.randoms())
def test_replies_leave_in_command_order(tmp_path, plan, random):
    validator = Numbered()
    session = Session(make_settings(tmp_path, limits__recipients="1000"), [validator])
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    lines, expected = [], []
    for n, (kind, _) in enumerate(plan):
        if kind == "noop":
            lines.append(b"NOOP")
            expected.append(b"250 2.0.0 Ok")
        elif kind == "vrfy":
            lines.append(b"VRFY later%d" % n)
            expected.append(b"250 2.1.5 ok %d" % n)
        else:
            lines.append(b"RCPT TO:<%s%d@example.com>" % (kind.encode(), n))
            expected.append(b"250 2.1.5 ok %d" % n)
    # Everything pipelined, cut into random pieces.
    stream = b"".join(line + b"\r\n" for line in lines)
    cuts = sorted(random.sample(range(len(stream)), min(5, len(stream))))
    output = b""
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        output += session.send(stream[start:end])
    # Plugins answer one at a time, whenever the test gets to them.
    while validator.pending:
        d, decision = validator.pending.pop(0)
        d.callback(decision)
        output += session.take()
    assert output.split(b"\r\n")[:-1] == expected


@PROPERTY
@given(st.binary(max_size=300), st.lists(st.integers(1, 60), max_size=6))
def test_a_message_ends_only_at_crlf_dot_crlf(tmp_path, body, cuts):
    stream = body + b"\r\n.\r\n"
    # Only bodies whose first end marker is the one we add.
    if (b"\r\n" + stream).find(b"\r\n.\r\n") != len(body):
        return
    session = Session(make_settings(tmp_path), build_plugins(make_settings(tmp_path))[0])
    session.command(b"EHLO client.test")
    session.command(b"MAIL FROM:<a@example.org>")
    session.command(b"RCPT TO:<b@example.com>")
    assert session.command(b"DATA").startswith(b"354 ")
    data = stream + b"NOOP\r\n"
    output, position = b"", 0
    for size in cuts:
        output += session.send(data[position:position + size])
        position += size
    output += session.send(data[position:])
    replies = output.split(b"\r\n")[:-1]
    assert len(replies) == 2 and replies[1] == b"250 2.0.0 Ok"
    if replies[0].startswith(b"250 2.0.0 Ok: queued as "):
        [(envelope, message)] = session.queue.messages.values()
        stored = message.split(b"\r\n", 4)[4]       # after our Received header
        expected = (b"\r\n" + body + b"\r\n").replace(b"\r\n.", b"\r\n")[2:]
        assert stored == expected
    else:
        assert replies[0][:3] in (b"554", b"500", b"552")
        assert session.queue.messages == {}


texts = st.text(max_size=12)
envelopes = st.builds(
    Envelope,
    sender=texts, recipients=st.lists(texts, max_size=4),
    body=st.sampled_from(["7BIT", "8BITMIME", "BINARYMIME"]),
    authenticated_user=st.none() | texts, received_at=st.floats(0, 2e9),
    dsn_ret=st.none() | st.sampled_from(["FULL", "HDRS"]),
    dsn_recipients=st.none() | st.dictionaries(texts, st.lists(st.none() | texts, max_size=2)),
    dsn_expanded=st.none() | st.lists(st.lists(texts, max_size=2), max_size=2),
    requiretls=st.booleans())


@PROPERTY
@given(envelopes)
def test_an_envelopes_dict_is_what_asdict_gives_and_a_copy(envelope):
    from dataclasses import asdict
    before = asdict(envelope)
    made = envelope.to_dict()
    assert made == before
    # A copy all the way down: changing it changes nothing in the envelope.

    def change(value):
        if isinstance(value, list):
            for member in value:
                change(member)
            value.append("changed")
        elif isinstance(value, dict):
            for member in value.values():
                change(member)
    for value in made.values():
        change(value)
    assert asdict(envelope) == before
