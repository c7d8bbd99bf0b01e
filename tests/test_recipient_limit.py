"""Recipients per transaction, end to end: the real relay, real next hops.

Two limits meet here.  Ours, ``[delivery] recipients_per_transaction``
(Postfix default_destination_recipient_limit), splits a message's
recipients for one destination into deliveries of that many.  The next
hop's, a server that takes fewer than we send (a real Postfix with
``smtpd_recipient_limit``), answers "452 4.5.3 too many recipients" and
gets the rest in further transactions at once (RFC 5321 4.5.3.1.10), not
after a retry's backoff.
"""

import re
import threading

import pytest

from tests.nexthop import NextHop
from tests.postfix_server import Postfix
from tests.relay_process import free_port
from tests.test_chunking_postfix import wait_for_log
from tests.test_delivery import queue_empty, relay_with, send, wait_until

FIVE = [f"r{n}@example.com" for n in range(1, 6)]


def sent_lines(log, queue_id):
    return re.findall(queue_id + r": to=<(r\d@example\.com)>, .*status=sent ", log)


def five_in_twos(tmp_path, nexthop):
    """Send FIVE through a relay that delivers two a transaction; wait for
    three messages at ``nexthop`` and the queue to empty.

    :return: (queue id, the messages, the relay's log)."""
    relay = relay_with(tmp_path, nexthop.port, server={"workers": "0"},
                       delivery={"recipients_per_transaction": "2"}).start()
    try:
        queue_id = send(relay, "alice@example.org", FIVE)
        messages = nexthop.wait_for(3)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        return queue_id, messages, relay.log()
    finally:
        relay.stop()


def test_five_recipients_go_as_three_deliveries_of_at_most_two(tmp_path, nexthop):
    queue_id, messages, log = five_in_twos(tmp_path, nexthop)
    # The deliveries run side by side (one connection each), so in any order.
    assert sorted(m["recipients"] for m in messages) == [FIVE[0:2], FIVE[2:4], FIVE[4:5]]
    assert len(nexthop.messages) == 3
    assert sorted(sent_lines(log, queue_id)) == FIVE


def test_a_failed_delivery_of_one_group_leaves_the_others_delivered_once(tmp_path, nexthop):
    # The group with r3 gets 451 after its data once; r3 and r4 are tried
    # again, the other three never.
    lock = threading.Lock()
    refused = []

    def data_reply(transaction):
        with lock:
            if "r3@example.com" in transaction["recipients"] and not refused:
                refused.append(transaction["recipients"])
                return 451, "4.3.0 Try again later"
        return 250, "2.0.0 Ok: queued"

    nexthop.data_reply = data_reply
    queue_id, messages, log = five_in_twos(tmp_path, nexthop)
    assert refused == [FIVE[2:4]]
    assert sorted(m["recipients"] for m in messages) == [FIVE[0:2], FIVE[2:4], FIVE[4:5]]
    assert len(nexthop.messages) == 3
    for address in FIVE[2:4]:
        assert re.search(queue_id + f": to=<{re.escape(address)}>, .*dsn=4\\.3\\.0, "
                         r"status=deferred \(451 4\.3\.0 Try again later\)", log)
    assert sorted(sent_lines(log, queue_id)) == FIVE


@pytest.fixture
def strict_postfix():
    """A real Postfix that takes two recipients a transaction and relays on
    to a NextHop."""
    hop = NextHop()
    port = free_port()
    postfix = Postfix(main={"relayhost": f"[127.0.0.1]:{hop.port}",
                            "smtpd_relay_restrictions": "permit_mynetworks, reject",
                            "smtpd_recipient_limit": "2"},
                      services=[[f"127.0.0.1:{port} inet n - n - - smtpd"]])
    postfix.port = port
    postfix.start()
    yield postfix, hop
    postfix.remove()
    hop.stop()


def test_a_postfix_that_takes_two_a_transaction_gets_the_rest_at_once(tmp_path, strict_postfix):
    postfix, hop = strict_postfix
    # min_backoff 60: a recipient left to the retry would not arrive in time.
    relay = relay_with(tmp_path, postfix.port, server={"workers": "0"},
                       queue={"min_backoff": "60", "max_backoff": "60"}).start()
    try:
        queue_id = send(relay, "alice@example.org", FIVE)
        wait_until(lambda: queue_empty(relay), what="the queue to empty")
        messages = hop.wait_for(3)
        log = relay.log()
    finally:
        relay.stop()
    # Postfix queued three messages, two, two and one recipients, and sent
    # each on.
    assert sorted(m["recipients"] for m in messages) == [FIVE[0:2], FIVE[2:4], FIVE[4:5]]
    assert sorted(sent_lines(log, queue_id)) == FIVE
    assert "status=deferred" not in log
    # All three went over one connection, by BDAT (Postfix offers
    # CHUNKING): five RCPTs, then the two and the one Postfix had refused
    # with 452 4.5.3 (it does not log those; its smtpd's disconnect line
    # counts the commands).
    wait_for_log(postfix, r"disconnect from [^\n]* ehlo=1 mail=3 rcpt=8 bdat=3 quit=1 ")
