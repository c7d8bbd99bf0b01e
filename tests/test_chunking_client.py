"""BDAT outbound (RFC 3030): the ESMTP client against tests/nexthop.py's
NextHop offering CHUNKING (and BINARYMIME or not), on a real socket."""

import os
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from relaymail.delivery import chunking
from relaymail.delivery.client import ClientConfig, DeliveryError, Hop, RecipientResult, connect
from relaymail.delivery.lmtp import LMTPTransport
from tests.dovecot import Dovecot
from tests.nexthop import NextHop
from tests.support import make_settings
from tests.test_lmtp import FileMessage

MIB = 2 ** 20
CHUNKING = ("CHUNKING", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE 100000000")
# What a DATA transfer would have to stuff or could end early on.
AWKWARD = b".dot first\r\n.\r\n..two\r\nSubject: x\r\n\r\n\r\n.\r\nbody\r\nno final CRLF"


def config(**overrides):
    values = dict(helo_name="client.test", tls="none", connect_timeout=5, command_timeout=5,
                  data_timeout=5, data_block_timeout=5, quit_timeout=2)
    values.update(overrides)
    return ClientConfig(**values)


def big_message(size):
    line = b"0123456789abcdef" * 6 + b"\r\n"
    body = line * (size // len(line) + 1)
    return (b"Subject: big\r\n\r\n" + body)[:size - 2] + b"\r\n"


class ChunkingTestCase(unittest.TestCase):

    timeout = 60

    async def session_with(self, extensions=CHUNKING, **overrides):
        hop = NextHop(extensions=extensions)
        self.addCleanup(hop.stop)
        session = await connect(reactor, Hop("nexthop.test", "127.0.0.1", hop.port),
                                config(**overrides))
        self.addCleanup(session.quit)
        return hop, session

    def message_file(self, content):
        handle, path = tempfile.mkstemp(suffix=".msg")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self.addCleanup(os.unlink, path)
        return path

    async def deliver_fails(self, session, *args, **kwargs):
        try:
            await session.deliver(*args, **kwargs)
        except DeliveryError as error:
            return error
        self.fail("deliver() succeeded")


class SendingByBdat(ChunkingTestCase):

    async def test_a_small_message_is_one_last_chunk_sent_as_it_is(self):
        hop, session = await self.session_with()
        path = self.message_file(AWKWARD)
        results = await session.deliver("a@example.org", ["b@example.com", "c@example.com"], path)
        self.assertEqual(results, [RecipientResult(r, 250, "2.0.0", "Ok: queued")
                                   for r in ("b@example.com", "c@example.com")])
        message, = hop.messages
        # Length-framed: no dot-stuffing, no end marker, no CRLF added.
        self.assertEqual(message["data"], AWKWARD)
        self.assertEqual(message["chunks"], [len(AWKWARD)])
        self.assertEqual(hop.commands[1:], [
            "MAIL FROM:<a@example.org> SIZE=%d" % len(AWKWARD),
            "RCPT TO:<b@example.com>", "RCPT TO:<c@example.com>", "BDAT %d LAST" % len(AWKWARD)])

    async def test_a_large_message_goes_in_chunks_of_1_mib(self):
        hop, session = await self.session_with()
        content = big_message(2 * MIB + MIB // 2)
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(content))
        message, = hop.messages
        self.assertEqual(message["chunks"], [MIB, MIB, MIB // 2])
        self.assertEqual(message["data"], content)
        self.assertEqual(hop.commands[-3:], ["BDAT %d" % MIB, "BDAT %d" % MIB,
                                             "BDAT %d LAST" % (MIB // 2)])

    async def test_without_pipelining_each_chunk_waits_for_its_reply(self):
        hop, session = await self.session_with(tuple(k for k in CHUNKING if k != "PIPELINING"))
        content = big_message(MIB + 10)
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(content))
        self.assertEqual(hop.messages[0]["chunks"], [MIB, 10])
        self.assertEqual(hop.messages[0]["data"], content)

    async def test_an_empty_message_is_bdat_0_last(self):
        hop, session = await self.session_with()
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(b""))
        self.assertEqual(hop.commands[-1], "BDAT 0 LAST")
        self.assertEqual(hop.messages[0]["data"], b"")

    async def test_a_refused_last_chunk_decides_the_recipients_and_the_session_goes_on(self):
        hop, session = await self.session_with()
        hop.data_reply = lambda message: (554, "5.7.1 Message refused")
        path = self.message_file(AWKWARD)
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results, [RecipientResult("b@example.com", 554, "5.7.1", "Message refused")])
        hop.data_reply = lambda message: (250, "2.0.0 Ok: queued")
        await session.deliver("a@example.org", ["b@example.com"], path)
        # LAST ended the first transaction: no RSET needed.
        self.assertNotIn("RSET", hop.commands)
        self.assertEqual(len(hop.messages), 1)

    async def test_a_refused_chunk_stops_the_message_and_the_next_one_resets(self):
        hop, session = await self.session_with(tuple(k for k in CHUNKING if k != "PIPELINING"))
        hop.chunk_reply = lambda message: (
            (552, "5.3.4 Chunk exceeds message size limit") if len(message["chunks"]) == 2
            else (250, "2.0.0 Ok"))
        path = self.message_file(big_message(5 * MIB))
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results, [RecipientResult("b@example.com", 552, "5.3.4",
                                                   "Chunk exceeds message size limit")])
        self.assertEqual([c for c in hop.commands if c.startswith("BDAT")], ["BDAT %d" % MIB] * 2)
        small = self.message_file(b"Subject: s\r\n\r\nsmall\r\n")
        await session.deliver("a@example.org", ["b@example.com"], small)
        self.assertEqual(hop.commands[-5:-3], ["BDAT %d" % MIB, "RSET"])
        self.assertEqual(hop.messages[0]["data"], b"Subject: s\r\n\r\nsmall\r\n")

    async def test_pipelined_chunks_stop_once_a_refusal_has_come(self):
        hop, session = await self.session_with()
        hop.chunk_reply = lambda message: (552, "5.3.4 Chunk exceeds message size limit")
        path = self.message_file(big_message(40 * MIB))
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results[0].code, 552)
        sent = [c for c in hop.commands if c.startswith("BDAT")]
        # The refusal came after the first chunk; what was already on its
        # way is all that went (loopback buffers hold a few MiB).
        self.assertLess(len(sent), 40)
        self.assertNotIn("BDAT %d LAST" % MIB, sent)

    async def test_a_large_message_waits_for_the_recipients_before_its_chunks(self):
        hop, session = await self.session_with()
        hop.rcpt_reply = lambda address: (550, "5.1.1 No such user")
        path = self.message_file(big_message(3 * MIB))
        results = await session.deliver("a@example.org", ["b@example.com"], path)
        self.assertEqual(results, [RecipientResult("b@example.com", 550, "5.1.1", "No such user")])
        self.assertFalse([c for c in hop.commands if c.startswith("BDAT")])

    async def test_a_hop_without_chunking_gets_data(self):
        hop, session = await self.session_with(tuple(k for k in CHUNKING if k != "CHUNKING"))
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(AWKWARD))
        self.assertEqual(hop.commands[-1], "DATA")
        self.assertIsNone(hop.messages[0]["chunks"])
        self.assertEqual(hop.messages[0]["data"], AWKWARD + b"\r\n")

    async def test_8bit_mail_to_a_hop_without_8bitmime_is_converted_and_chunked(self):
        hop, session = await self.session_with(("CHUNKING", "PIPELINING"))
        content = "Subject: x\r\n\r\nGrüße\r\n".encode()
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(content),
                              body="8BITMIME")
        message, = hop.messages
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", message["data"])
        self.assertIn(b"Gr=C3=BC=C3=9Fe", message["data"])
        self.assertEqual(message["chunks"], [len(message["data"])])
        self.assertEqual(message["mail"], "MAIL FROM:<a@example.org>")


BINARY = (b"Subject: b\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Transfer-Encoding: binary\r\n\r\n" + bytes(range(256)) + b"\n.\n\r\n.\r\n")


class BinaryMime(ChunkingTestCase):

    async def test_binarymime_goes_by_bdat_with_its_body_parameter(self):
        hop, session = await self.session_with(CHUNKING + ("BINARYMIME",))
        await session.deliver("a@example.org", ["b@example.com"], self.message_file(BINARY),
                              body="BINARYMIME")
        message, = hop.messages
        self.assertEqual(message["mail"], "MAIL FROM:<a@example.org> SIZE=%d BODY=BINARYMIME" % len(BINARY))
        self.assertEqual(message["data"], BINARY)

    async def test_binarymime_to_a_hop_without_binarymime_bounces_unsent(self):
        for extensions, missing in ((CHUNKING, "BINARYMIME"),
                                    (("PIPELINING", "8BITMIME", "BINARYMIME"), "CHUNKING"),
                                    (("PIPELINING", "8BITMIME"), "CHUNKING and BINARYMIME")):
            hop, session = await self.session_with(extensions)
            error = await self.deliver_fails(session, "a@example.org", ["b@example.com"],
                                             self.message_file(BINARY), body="BINARYMIME")
            self.assertFalse(error.temporary)
            self.assertEqual(error.enhanced, "5.6.3")
            self.assertEqual(error.text, f"binary message (BODY=BINARYMIME), but {session.remote} "
                                         f"does not offer {missing}: conversion required but not "
                                         "supported")
            self.assertFalse([c for c in hop.commands if c.startswith("MAIL")])


def test_chunk_sizes():
    assert chunking.chunk_sizes(0) == [(0, True)]
    assert chunking.chunk_sizes(5, 5) == [(5, True)]
    assert chunking.chunk_sizes(11, 5) == [(5, False), (5, False), (1, True)]


class LMTPKeepsData(unittest.TestCase):
    """The lmtp transport sends DATA; a binary message cannot go that way."""

    timeout = 30

    async def test_binarymime_to_dovecot_lmtp_bounces_with_5_6_3_and_nothing_is_stored(self):
        dovecot = Dovecot()
        self.addCleanup(dovecot.remove)
        dovecot.start()
        handle, path = tempfile.mkstemp(suffix=".msg")
        with os.fdopen(handle, "wb") as file:
            file.write(BINARY)
        self.addCleanup(os.unlink, path)
        message = FileMessage(path, "sender@example.org", ["alice@example.com"], body="BINARYMIME")
        root = Path(self.mktemp())
        root.mkdir(parents=True)
        transport = LMTPTransport(reactor, make_settings(root))
        outcomes = await transport.deliver(message, ["alice@example.com"], dovecot.socket_path)
        outcome = outcomes["alice@example.com"]
        self.assertEqual((outcome.kind, outcome.status), ("bounced", "5.6.3"))
        self.assertIn("does not offer BINARYMIME: conversion required but not supported",
                      outcome.reason)
        self.assertEqual(dovecot.mailbox("alice"), [])
