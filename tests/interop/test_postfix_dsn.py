"""DSN with a real Postfix on both sides (tests/postfix_server.py): a
Postfix downstream takes relaymail's RET, ENVID, NOTIFY and ORCPT and
hands them on to a next hop offering DSN; a Postfix upstream's sendmail
-N/-R/-V requests arrive in relaymail's queue record."""

import os
import smtplib

import pytest

from tests.nexthop import NextHop
from tests.postfix_server import Postfix
from tests.relay_process import RelayProcess, free_port
from tests.test_delivery import wait_until

DSN_HOP = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")


@pytest.fixture(scope="module")
def downstream_chain(tmp_path_factory):
    """relaymail -> Postfix -> NextHop (with DSN)."""
    hop = NextHop(extensions=DSN_HOP)
    port = free_port()
    postfix = Postfix(main={"relayhost": f"[127.0.0.1]:{hop.port}",
                            "smtpd_relay_restrictions": "permit_mynetworks, reject"},
                      services=[[f"127.0.0.1:{port} inet n - n - - smtpd"]])
    postfix.start()
    relay = RelayProcess(tmp_path_factory.mktemp("relay"), {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{port}", "smarthost_tls": "none"},
    }).start()
    yield relay, postfix, hop
    relay.stop()
    postfix.remove()
    hop.stop()


def test_postfix_downstream_takes_the_requests_and_hands_them_on(downstream_chain):
    relay, postfix, hop = downstream_chain
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        client.mail("alice@example.org", ["RET=HDRS", "ENVID=batch+2B7"])
        assert client.rcpt("bob@example.com", ["NOTIFY=SUCCESS,DELAY",
                                               "ORCPT=rfc822;Bob+40example.com"])[0] == 250
        assert client.rcpt("carol@example.com")[0] == 250
        assert client.data(b"Subject: dsn through postfix\r\n\r\nhi\r\n")[0] == 250
    hop.wait_for(before + 1)
    commands = hop.commands
    mail = [c for c in commands if c.startswith("MAIL FROM:<alice@example.org>")][-1]
    assert "RET=HDRS" in mail and "ENVID=batch+2B7" in mail, mail
    rcpts = [c for c in commands if c.startswith("RCPT TO:<")][-2:]
    # Postfix writes ORCPT first, and the xtext without needless escapes.
    assert rcpts[0] == "RCPT TO:<bob@example.com> ORCPT=rfc822;Bob@example.com NOTIFY=SUCCESS,DELAY"
    # relaymail made carol's ORCPT; Postfix passed it on (NOTIFY as none was asked).
    assert rcpts[1].startswith("RCPT TO:<carol@example.com>") and \
        "ORCPT=rfc822;carol@example.com" in rcpts[1], rcpts
    # Postfix took NOTIFY=SUCCESS on: relaymail sent no notice of its own.
    assert "success notice" not in relay.log()


def test_postfix_upstream_requests_reach_relaymails_queue_record(tmp_path):
    hop = NextHop()
    hop.data_reply = lambda message: (451, "4.3.0 not now")     # keep it queued
    os.makedirs(tmp_path / "relay")
    relay = RelayProcess(tmp_path / "relay", {
        "server": {"workers": "0"},
        "relay": {"domains": "example.com"},
        "delivery": {"smarthost": f"[127.0.0.1]:{hop.port}", "smarthost_tls": "none"},
        "queue": {"min_backoff": "60", "max_backoff": "60"},
    })
    relay.start()
    upstream = Postfix(main={"relayhost": f"[127.0.0.1]:{relay.port}"})
    upstream.start()
    try:
        done = upstream.sendmail(["-f", "app@example.org", "-N", "success,failure", "-R", "hdrs",
                                  "-V", "order-77", "dana@example.com"],
                                 b"Subject: from an application\n\nhello\n")
        assert done.returncode == 0, done.stderr
        active = os.path.join(relay.spool, "active")
        wait_until(lambda: any(name.endswith(".msg") for name in os.listdir(active)),
                   timeout=30, what="the message in relaymail's queue")
        [queue_id] = relay.queued_ids()
        envelope = relay.record(queue_id)["envelope"]
        assert (envelope["dsn_ret"], envelope["dsn_envid"]) == ("HDRS", "order-77")
        [(address, (notify, orcpt))] = envelope["dsn_recipients"].items()
        assert (address, notify) == ("dana@example.com", ["SUCCESS", "FAILURE"])
        assert orcpt.lower() == "rfc822;dana@example.com"
    finally:
        upstream.remove()
        relay.stop()
        hop.stop()
