"""DSN (RFC 3461, RFC 3464) over real sockets: the parameters taken, kept
in the queue record, passed on to a next hop that offers DSN, and the
notices a sender asked for (and only those) coming back to it through the
queue; plus the parsing rules, unit by unit."""

import email
import email.policy
import os
import smtplib

import pytest

from relaymail import dsn
from tests.nexthop import NextHop
from tests.relay_process import RelayProcess
from tests.test_delivery import queue_empty, wait_until

BODY = b"From: Alice <alice@sender.test>\r\nSubject: dsn\r\nMessage-ID: <m1@sender.test>\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def hops():
    """``with_dsn`` offers DSN, ``plain`` does not, ``senders`` takes the
    notices for sender.test; ``unknown@`` is refused with 550 5.1.1."""
    with_dsn = NextHop(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"))
    plain = NextHop()
    senders = NextHop()
    for hop in (with_dsn, plain):
        hop.rcpt_reply = lambda address: (
            (550, "5.1.1 no such user") if address.startswith("unknown") else (250, "2.1.5 Ok"))
    yield with_dsn, plain, senders
    for hop in (with_dsn, plain, senders):
        hop.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, hops):
    with_dsn, plain, senders = hops
    process = RelayProcess(tmp_path_factory.mktemp("dsn"), {
        "server": {"workers": "0", "hostname": "relay.test"},
        "relay": {"domains": "dsn.test, plain.test"},
        "routes": {"dsn.test": f"[127.0.0.1]:{with_dsn.port}",
                   "plain.test": f"[127.0.0.1]:{plain.port}",
                   "sender.test": f"[127.0.0.1]:{senders.port}"},
        "delivery": {"connect_timeout": "2", "command_timeout": "5"},
        "queue": {"min_backoff": "1", "max_backoff": "2"},
    })
    yield process.start()
    process.stop()


def send(relay, recipients, mail_options=(), rcpt_options=None, body=BODY):
    """Send one message; ``rcpt_options`` maps a recipient to its RCPT
    parameters.  The queue id."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.has_extn("dsn")
        assert client.mail("alice@sender.test", list(mail_options))[0] == 250
        for recipient in recipients:
            code, text = client.rcpt(recipient, (rcpt_options or {}).get(recipient, []))
            assert code == 250, text
        code, text = client.data(body)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def notices(senders, queue_id_text=None):
    """The notices that reached the sender: parsed messages."""
    return [email.message_from_bytes(m["data"], policy=email.policy.default)
            for m in senders.messages if m["sender"] == ""]


def report_blocks(notice):
    """The delivery-status part's blocks: a list of dicts (field -> value)."""
    part = next(p for p in notice.walk() if p.get_content_type() in (
        "message/delivery-status", "message/global-delivery-status"))
    text = part.get_payload(decode=False)
    if isinstance(text, list):
        text = "\r\n".join(str(block) for block in text)
    blocks = []
    for chunk in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        blocks.append(fields)
    return blocks


def test_parameters_pass_on_to_a_next_hop_that_offers_dsn_and_no_notice_comes(relay, hops):
    with_dsn, plain, senders = hops
    before = len(senders.messages)
    start = len(with_dsn.commands)
    queue_id = send(relay, ["bob@dsn.test", "carol@dsn.test"],
                    mail_options=["RET=HDRS", "ENVID=QQ+2B1"],
                    rcpt_options={"bob@dsn.test": ["NOTIFY=SUCCESS,FAILURE",
                                                   "ORCPT=rfc822;Bob+40dsn.test"]})
    wait_until(lambda: queue_empty(relay), what="the delivery")
    commands = with_dsn.commands[start:]
    assert "MAIL FROM:<alice@sender.test> RET=HDRS ENVID=QQ+2B1" in commands
    # The given ORCPT as sent; one made of the address for the other.
    assert "RCPT TO:<bob@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40dsn.test" in commands
    assert "RCPT TO:<carol@dsn.test> ORCPT=rfc822;carol@dsn.test" in commands
    # The next hop took NOTIFY=SUCCESS on: relaymail sends no notice.
    assert f"{queue_id}: sender success notice" not in relay.log()
    assert len(senders.messages) == before


def test_a_message_without_dsn_requests_sends_no_dsn_parameters(relay, hops):
    with_dsn, _, _ = hops
    start = len(with_dsn.commands)
    send(relay, ["dave@dsn.test"])
    wait_until(lambda: queue_empty(relay), what="the delivery")
    assert [c for c in with_dsn.commands[start:] if c.startswith(("MAIL", "RCPT"))] == [
        "MAIL FROM:<alice@sender.test>", "RCPT TO:<dave@dsn.test>"]


def test_success_to_a_next_hop_without_dsn_is_one_relayed_notice_per_recipient(relay, hops):
    with_dsn, plain, senders = hops
    before = len(senders.messages)
    queue_id = send(relay, ["bob@plain.test", "carol@plain.test", "erin@dsn.test",
                            "frank@plain.test"],
                    mail_options=["ENVID=app-42"],
                    rcpt_options={"bob@plain.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@plain.test"],
                                  "carol@plain.test": ["NOTIFY=FAILURE"],
                                  "erin@dsn.test": ["NOTIFY=SUCCESS"]})
    wait_until(lambda: queue_empty(relay) and len(senders.messages) > before,
               what="the delivery and the notice")
    wait_until(lambda: queue_empty(relay), what="the notice's own delivery")
    got = senders.messages[before:]
    # Exactly one notice, for bob only: carol did not ask for success,
    # frank asked nothing, erin's next hop took the request on.
    assert len(got) == 1 and got[0]["recipients"] == ["alice@sender.test"]
    [notice] = notices(senders)[-1:]
    assert notice["Subject"] == "Successful Mail Delivery Report"
    assert notice["To"] == "alice@sender.test"
    blocks = report_blocks(notice)
    assert blocks[0]["Original-Envelope-Id"] == "app-42"
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert [b.get("Final-Recipient") for b in blocks[1:]] == ["rfc822; bob@plain.test"]
    assert (blocks[1]["Action"], blocks[1]["Status"], blocks[1]["Original-Recipient"]) == (
        "relayed", "2.0.0", "rfc822; bob@plain.test")
    # The header section comes back, not the body.
    returned = next(p for p in notice.walk() if p.get_content_type() == "text/rfc822-headers")
    assert b"Message-ID: <m1@sender.test>" in returned.get_payload(decode=True)
    assert b"hello" not in returned.get_payload(decode=True)
    assert f"{queue_id}: sender success notice" in relay.log()


def test_failure_notices_honour_notify_never_and_carry_orcpt_envid_and_ret_full(relay, hops):
    _, plain, senders = hops
    before = len(senders.messages)
    queue_id = send(relay, ["unknown1@plain.test", "unknown2@plain.test", "unknown3@plain.test"],
                    mail_options=["RET=FULL", "ENVID=order+3D7"],
                    rcpt_options={"unknown1@plain.test": ["NOTIFY=NEVER"],
                                  "unknown2@plain.test": ["NOTIFY=DELAY"],
                                  "unknown3@plain.test": ["NOTIFY=FAILURE",
                                                          "ORCPT=rfc822;three+40plain.test"]})
    wait_until(lambda: len(senders.messages) > before, what="the bounce")
    wait_until(lambda: queue_empty(relay), what="the queue to empty")
    got = senders.messages[before:]
    assert len(got) == 1
    notice = email.message_from_bytes(got[0]["data"], policy=email.policy.default)
    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = report_blocks(notice)
    assert blocks[0]["Original-Envelope-Id"] == "order=7"
    # Only the recipient that asked for failures is reported.
    assert [(b["Final-Recipient"], b["Action"], b["Status"], b["Original-Recipient"])
            for b in blocks[1:]] == [("rfc822; unknown3@plain.test", "failed", "5.1.1",
                                      "rfc822; three@plain.test")]
    # RET=FULL: the whole message comes back, our Received field first.
    returned = next(p for p in notice.walk() if p.get_content_type() == "message/rfc822")
    original = returned.get_payload()[0].as_bytes()
    assert b"hello" in original and b"Message-ID: <m1@sender.test>" in original
    log = relay.log()
    assert f"{queue_id}: <unknown1@plain.test>: no bounce: NOTIFY=NEVER" in log
    assert f"{queue_id}: <unknown2@plain.test>: no bounce: NOTIFY=DELAY" in log


def test_the_requests_are_kept_in_the_queue_record(tmp_path):
    hop = NextHop(extensions=("DSN",))
    hop.data_reply = lambda message: (451, "4.3.0 try later")
    relay = RelayProcess(tmp_path, {
        "server": {"workers": "0"}, "relay": {"domains": "dsn.test"},
        "routes": {"dsn.test": f"[127.0.0.1]:{hop.port}"},
        "queue": {"min_backoff": "60", "max_backoff": "60"},
    }).start()
    try:
        queue_id = send(relay, ["bob@dsn.test", "carol@dsn.test"],
                        mail_options=["RET=HDRS", "ENVID=abc"],
                        rcpt_options={"bob@dsn.test": ["NOTIFY=SUCCESS,DELAY",
                                                       "ORCPT=rfc822;bob@dsn.test"]})
        # The first attempt's outcome goes beside the queue file.
        path = os.path.join(relay.spool, "active", queue_id + ".json")
        wait_until(lambda: os.path.exists(path) and relay.record(queue_id)["attempts"] >= 1,
                   what="the first attempt")
        envelope = relay.record(queue_id)["envelope"]
        assert (envelope["dsn_ret"], envelope["dsn_envid"], envelope["dsn_recipients"]) == (
            "HDRS", "abc", {"bob@dsn.test": [["SUCCESS", "DELAY"], "rfc822;bob@dsn.test"]})
    finally:
        relay.stop()
        hop.stop()


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<a@sender.test> RET=SOME", "501 5.5.4 Syntax error in parameters: RET takes FULL or HDRS"),
    ("MAIL FROM:<a@sender.test> RET", "501 5.5.4 Syntax error in parameters: RET takes FULL or HDRS"),
    ("MAIL FROM:<a@sender.test> ENVID=a+G1", "501 5.5.4 Syntax error in parameters: ENVID takes xtext"),
    ("MAIL FROM:<a@sender.test> ENVID=" + "x" * 101,
     "501 5.5.4 Syntax error in parameters: ENVID is longer than 100 characters"),
    ("MAIL FROM:<a@sender.test> RET=FULL RET=HDRS",
     "501 5.5.4 Syntax error in parameters: duplicate parameter RET"),
])
def test_malformed_mail_parameters_get_501_and_the_session_goes_on(relay, command, reply):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        code, text = client.docmd(command)
        assert f"{code} {text.decode()}" == reply
        assert client.mail("a@sender.test", ["RET=full"])[0] == 250


@pytest.mark.parametrize("parameter, problem", [
    ("NOTIFY=NEVER,SUCCESS", "NOTIFY=NEVER goes alone"),
    ("NOTIFY=SUCCESS,SUCCESS", "NOTIFY names a value twice"),
    ("NOTIFY=ALWAYS", "NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY separated by commas"),
    ("NOTIFY=,", "NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY separated by commas"),
    ("NOTIFY", "NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY separated by commas"),
    ("ORCPT=bob@dsn.test", "ORCPT takes addr-type;xtext, e.g. rfc822;alice@example.com"),
    ("ORCPT=rfc822;b+zz", "ORCPT takes addr-type;xtext, e.g. rfc822;alice@example.com"),
    ("ORCPT=;bob", "ORCPT takes addr-type;xtext, e.g. rfc822;alice@example.com"),
])
def test_malformed_rcpt_parameters_get_501_and_the_transaction_goes_on(relay, parameter, problem):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.mail("a@sender.test")[0] == 250
        code, text = client.docmd(f"RCPT TO:<bob@dsn.test> {parameter}")
        assert (code, text.decode()) == (501, f"5.5.4 Syntax error in parameters: {problem}")
        assert client.rcpt("bob@dsn.test", ["NOTIFY=failure,delay"])[0] == 250


def test_dsn_parameters_in_a_helo_session_are_unsupported(relay):
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test") as client:
        client.helo()
        assert client.docmd("MAIL FROM:<a@sender.test> RET=FULL") == (
            555, b"Unsupported parameter RET")
        assert client.docmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert client.docmd("RCPT TO:<bob@dsn.test> NOTIFY=NEVER") == (
            555, b"Unsupported parameter NOTIFY")


# -- the rules, unit by unit --------------------------------------------------

def test_xtext_round_trips():
    assert dsn.decode_xtext("a+2Bb+3Dc") == "a+b=c"
    assert dsn.encode_xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert dsn.decode_xtext(dsn.encode_xtext("x=y+z")) == "x=y+z"


def test_what_each_notify_asks_for():
    assert dsn.wants(None, dsn.FAILURE) and dsn.wants(None, dsn.DELAY)
    assert not dsn.wants(None, dsn.SUCCESS)
    assert not dsn.wants(["NEVER"], dsn.FAILURE)
    assert dsn.wants(["SUCCESS"], dsn.SUCCESS) and not dsn.wants(["SUCCESS"], dsn.DELAY)


def test_expansion_passes_requests_on_as_rfc_3461_6_2_7_says():
    requests = {"alias@x.test": [["SUCCESS", "FAILURE"], None],
                "list@x.test": [["SUCCESS", "FAILURE"], "rfc822;List+40x.test"],
                "only@x.test": [["SUCCESS"], None]}
    queued, kept, expanded = dsn.inherit(
        ["alias@x.test", "list@x.test", "only@x.test", "plain@x.test"],
        [["real@y.test"], ["a@y.test", "b@y.test"], ["c@y.test", "a@Y.TEST"], ["plain@x.test"]],
        requests)
    # Members met twice are queued once (domains without case).
    assert queued == ["real@y.test", "a@y.test", "b@y.test", "c@y.test", "plain@x.test"]
    assert kept == {
        # An alias of one: its NOTIFY, and the alias as ORCPT.
        "real@y.test": [["SUCCESS", "FAILURE"], "rfc822;alias@x.test"],
        # A list's members: NOTIFY without SUCCESS, the list's ORCPT.
        "a@y.test": [["FAILURE"], "rfc822;List+40x.test"],
        "b@y.test": [["FAILURE"], "rfc822;List+40x.test"],
        "c@y.test": [["NEVER"], "rfc822;only@x.test"],
    }
    assert expanded == [["list@x.test", "rfc822;List+40x.test"], ["only@x.test", None]]


def test_transports_other_than_smtp_owe_a_delivered_notice():
    from relaymail.delivery.destinations import Job
    from relaymail.delivery.transports import TransportHop, outcomes_of
    from relaymail.interfaces import RecipientOutcome
    job = Job(queue_id="Q", destination=TransportHop("pipe", "x"), sender="", message_path="",
              recipients=["a@x.test"])
    [outcome] = outcomes_of(job, {"a@x.test": RecipientOutcome.delivered()})
    assert outcome.notice == "delivered"
