"""nodemailer (Debian's node-nodemailer) with a connection pool: several
messages, one of them with UTF-8 addresses, over at most two connections, each with STARTTLS (the certificate
verified against the test CA) and AUTH on the submission port."""

import json
import os
import re
import subprocess

from tests.interop.peers import PASSWORD, USER, installed, tool

SCRIPT = os.path.join(os.path.dirname(__file__), "nodemailer_pool.js")
# Debian installs node modules here, outside node's own search path.
NODE_MODULES = "/usr/share/nodejs"


def test_pooled_messages_all_queued_over_two_connections(relay, ca_file):
    installed(os.path.join(NODE_MODULES, "nodemailer", "package.json"), "node-nodemailer")
    connects_before = relay.log().count("connect trusted=")
    options = {"port": relay.submission_port, "ca": ca_file, "user": USER, "password": PASSWORD,
               "count": 6, "connections": 2}
    result = subprocess.run([tool("node", "nodejs"), SCRIPT, json.dumps(options)],
                            env={**os.environ, "NODE_PATH": NODE_MODULES},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    *results, international = json.loads(result.stdout)["results"]
    assert len(results) == 6
    queue_ids = []
    for i, sent in enumerate(results):
        assert sent["accepted"] == [f"one{i}@example.net", f"two{i}@example.com"]
        queue_ids.append(re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)",
                                      sent["response"]).group(1))
    assert len(set(queue_ids)) == 6
    log = relay.log()
    # The pool reused its connections: two sessions for seven messages.
    assert log.count("connect trusted=") - connects_before == 2
    for i, queue_id in enumerate(queue_ids):
        stored = relay.message(queue_id)
        assert b"(relaymail) with ESMTPSA id " + queue_id.encode() in stored
        assert f"\r\nSubject: pooled {i}\r\n".encode() in stored
        # nodemailer sends the UTF-8 text as quoted-printable.
        assert stored.endswith(f"\r\n\r\nmessage {i} from the pool\r\nGr=C3=BC=C3=9Fe\r\n".encode())
    assert international["accepted"] == ["jürgen@example.com"]
    queue_id = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)", international["response"]).group(1)
    # nodemailer sends the domain in IDNA form, the local parts as UTF-8.
    assert re.search(queue_id + r": queued from=<rené@xn--exmple-cua\.org> to=<jürgen@example\.com> ", log)
    stored = relay.message(queue_id)
    assert b"(relaymail) with UTF8SMTPSA id " + queue_id.encode() in stored
