"""Sending a message with BDAT (RFC 3030 CHUNKING) to a server that offers it.

The message goes as chunks of at most :data:`BDAT_CHUNK_SIZE` octets, the
last marked LAST, each streamed from the file as the transport takes it
(:class:`relaymail.delivery.stream.ChunkProducer`): no dot-stuffing, and
never more than a read's worth of the message in memory.  The sizes come
from the file's size, known before sending (the spool file does not
change; a converted copy is ours).

How the transaction is laid out, when the server offers PIPELINING:

* a message of at most :data:`PIPELINED_BODY` octets goes in one chunk,
  LAST, right behind MAIL and the RCPTs, without waiting for their
  replies: the whole transaction costs one round trip, as in RFC 3030
  4.2's example.  Should every recipient be refused, the server refuses
  the chunk too and has read a few kilobytes for nothing;
* a larger one waits for the replies to MAIL and the RCPTs first (the
  round trip DATA's 354 costs anyway), so that megabytes are never sent
  for recipients the server has refused.  The chunks then go one after
  another without waiting for their replies (RFC 3030 4.2 lets BDAT be
  pipelined); replies that have come in meanwhile are looked at before
  each chunk, and after a refused chunk no other is sent (RFC 3030 2:
  "MUST NOT send any additional BDAT segments").

Without PIPELINING every command and every chunk waits for its reply.

The reply to the LAST chunk is the message's outcome, as the reply after
DATA's final dot; a refused chunk before it is the outcome instead, and
the server's transaction is then left to the next RSET.
"""

import contextlib
from dataclasses import dataclass

from relaymail.delivery.outcomes import DeliveryError

# Big enough that a chunk's reply costs nothing beside its octets (a
# server without PIPELINING answers each), small enough that a server
# which buffers a chunk before storing it is not asked for much.
BDAT_CHUNK_SIZE = 1024 * 1024
# A message this small rides with the envelope in one round trip.
PIPELINED_BODY = 64 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds: each command's reply and each chunk's but the last
    (``command``), the reply to the LAST chunk (``final``, as after DATA's
    dot) and the server taking no octets (``block``)."""

    command: float
    final: float
    block: float


def chunk_sizes(size, chunk_size=BDAT_CHUNK_SIZE):
    """``[(length, last), ...]`` for a message of ``size`` octets; an
    empty message is one empty LAST chunk."""
    sizes = []
    while True:
        length = min(size, chunk_size)
        size -= length
        sizes.append((length, size == 0))
        if size == 0:
            return sizes


async def bdat_transaction(connection, reply, mail_refused, pipelining, mail, rcpts, file, size,
                           timeouts, chunk_size=BDAT_CHUNK_SIZE):
    """MAIL, the RCPTs and the message in BDAT chunks.

    :param connection: a :class:`relaymail.delivery.wire.ClientConnection`.
    :param reply: the session's reader, ``reply(what, timeout=None)``.
    :param mail_refused: gives the exception to raise for a refused MAIL.
    :return: ``(rcpt_replies, outcome, ended)``: ``outcome`` is the reply
        that decides the accepted recipients (None when none was
        accepted), ``ended`` whether the server's transaction is over (the
        LAST chunk was answered).
    """
    chunks = chunk_sizes(size, chunk_size)
    if pipelining and size <= PIPELINED_BODY:
        connection.send(mail, *rcpts)
        (length, last), = chunks
        with _after_data():
            await connection.send_chunk(file, length, last, timeouts.block)
            mail_reply, rcpt_replies = await _envelope_replies(reply, rcpts)
            outcome = await reply("receiving the reply to BDAT LAST", timeouts.final)
        if not mail_reply.positive:
            raise mail_refused(mail_reply)
        if not any(answer.positive for answer in rcpt_replies):
            return rcpt_replies, None, True
        return rcpt_replies, outcome, True
    if pipelining:
        connection.send(mail, *rcpts)
        mail_reply, rcpt_replies = await _envelope_replies(reply, rcpts)
        if not mail_reply.positive:
            raise mail_refused(mail_reply)
    else:
        connection.send(mail)
        mail_reply = await reply("receiving the reply to MAIL FROM")
        if not mail_reply.positive:
            raise mail_refused(mail_reply)
        rcpt_replies = []
        for rcpt in rcpts:
            connection.send(rcpt)
            rcpt_replies.append(await reply("receiving the reply to RCPT TO"))
    if not any(answer.positive for answer in rcpt_replies):
        return rcpt_replies, None, False
    with _after_data():
        outcome, ended = await _send_chunks(connection, reply, pipelining, file, chunks, timeouts)
    return rcpt_replies, outcome, ended


@contextlib.contextmanager
def _after_data():
    """A failure once message octets have gone may follow a delivery the
    server made (as after DATA's dot): no other hop is tried for it."""
    try:
        yield
    except DeliveryError as error:
        error.met_after_data()
        raise


async def _envelope_replies(reply, rcpts):
    mail_reply = await reply("receiving the reply to MAIL FROM")
    return mail_reply, [await reply("receiving the reply to RCPT TO") for _ in rcpts]


async def _send_chunks(connection, reply, pipelining, file, chunks, timeouts):
    """Send the chunks, stopping after a refused one; ``(outcome, ended)``."""
    answers = []
    sent = 0
    for length, last in chunks:
        await connection.send_chunk(file, length, last, timeouts.block)
        sent += 1
        if pipelining:
            # Replies that came while we sent: a refusal stops the rest.
            while (early := connection.unread_reply()) is not None:
                answers.append(early)
            if any(not answer.positive for answer in answers):
                break
        else:
            answers.append(await reply("receiving the reply to BDAT",
                                       timeouts.final if last else timeouts.command))
            if not answers[-1].positive:
                break
    while len(answers) < sent:
        final = len(answers) == len(chunks) - 1
        answers.append(await reply("receiving the reply to BDAT LAST" if final else
                                   "receiving the reply to BDAT",
                                   timeouts.final if final else timeouts.command))
    refused = next((answer for answer in answers if not answer.positive), None)
    # The LAST chunk's reply ends the transaction, as the reply after DATA's
    # dot does; after an earlier refusal its state is the server's guess
    # (RFC 3030 4.2 asks for RSET then).
    ended = sent == len(chunks) and (refused is None or refused is answers[-1])
    return refused or answers[-1], ended
