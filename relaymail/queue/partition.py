"""Which delivery worker owns a message.

With ``[delivery] workers = M`` the queue is split in M partitions and
delivery worker K is the only process that reads, updates, moves or
removes the messages of partition K (relaymail.process).  A message's
partition follows from its queue id alone, so every process agrees on it
without asking: the inbound worker that committed it knows whom to tell,
the master knows where to send the queue tool's request about it, and a
restarted delivery worker knows which messages are its own.

The id's last two characters are its 8 random bits and two bits of the
minting process's slot: spread evenly whatever the clock or the process.
"""

from relaymail.queue.queue_id import ALPHABET


def partition_of(queue_id, partitions):
    """The partition (0 to ``partitions`` - 1) of ``queue_id``."""
    if partitions == 1:
        return 0
    return (ALPHABET.index(queue_id[-2]) * 32 + ALPHABET.index(queue_id[-1])) % partitions


def owner_test(partition, partitions):
    """A predicate saying whether a queue id is in ``partition``; None when
    there is one partition (every id is)."""
    if partitions == 1:
        return None
    return lambda queue_id: partition_of(queue_id, partitions) == partition
