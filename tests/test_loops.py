"""Two relays that name each other as smarthost: the trial's mail loop.

The outside trial passed one message back and forth 1,273 times, and its
bounce looped too.  With the hop limit (``[limits] hops``, RFC 5321 6.3)
each message stops after that many relays: the message, then its bounce,
then the double bounce to the postmaster, which is discarded when it too
is refused, so the traffic is bounded and both queues end empty.
"""

import re
import smtplib
import time

from tests.relay_process import RelayProcess, free_port

HOPS = 10


def looping_pair(tmp_path):
    """Relays a and b, each the other's smarthost."""
    ports = {"a": free_port(), "b": free_port()}
    relays = {}
    for name, other in (("a", "b"), ("b", "a")):
        workdir = tmp_path / name
        workdir.mkdir()
        relay = RelayProcess(workdir, {
            "server": {"listen": f"tcp:{ports[name]}:interface=127.0.0.1",
                       "hostname": f"{name}.test"},
            "delivery": {"smarthost": f"[127.0.0.1]:{ports[other]}", "smarthost_tls": "none",
                         "connect_timeout": "2", "command_timeout": "5", "data_timeout": "5"},
            "queue": {"min_backoff": "1", "max_backoff": "2"},
            "limits": {"hops": str(HOPS)},
        })
        relay.port = ports[name]
        relays[name] = relay
    return relays["a"], relays["b"]


def queue_empty(relay):
    return not relay.queued_ids()


def test_two_relays_pointed_at_each_other_stop_at_the_hop_limit(tmp_path):
    a, b = looping_pair(tmp_path)
    a.start()
    b.start()
    try:
        with smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.test") as client:
            client.ehlo()
            client.mail("alice@example.org")
            client.rcpt("bob@example.net")
            code, _ = client.data(b"Subject: loop\r\n\r\nround and round\r\n")
        assert code == 250
        deadline = time.monotonic() + 60
        while not ("double bounce discarded" in a.log() + b.log()
                   and queue_empty(a) and queue_empty(b)):
            assert time.monotonic() < deadline, "the loop did not end:\n" + a.log() + b.log()
            time.sleep(0.1)
    finally:
        a.stop()
        b.stop()
    log = a.log() + b.log()
    # Three messages went round (the mail, its bounce, the double bounce),
    # each accepted HOPS times over SMTP and refused the next time.  The
    # mail's first acceptance was from the client, so it was sent HOPS - 1
    # times; the notices start in a queue, so each was sent HOPS times.
    sent = re.findall(r"status=sent", log)
    assert len(sent) == (HOPS - 1) + 2 * HOPS, log
    refusals = re.findall(r"status=bounced \(554 5\.4\.6 Too many hops\)", log)
    assert len(refusals) == 3, log
    # Discarded by whichever relay it failed on: the one that wrote it
    # knows it from its record, the other from its header field.
    [discarded] = re.findall(r"double bounce discarded: .*", log)
    assert discarded in (
        "double bounce discarded: undeliverable to the postmaster <postmaster@a.test> too",
        "double bounce discarded: undeliverable to the postmaster <postmaster@b.test> too",
        "double bounce discarded: another relay's notice to the postmaster, "
        "undeliverable to <postmaster@a.test>",
        "double bounce discarded: another relay's notice to the postmaster, "
        "undeliverable to <postmaster@b.test>"), discarded
