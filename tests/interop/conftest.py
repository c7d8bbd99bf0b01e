"""One relay for the client tests: a plain listener (STARTTLS offered), an
implicit-TLS listener (port 465 style) and a submission listener (AUTH
required), a certificate from a test CA, a password file with one user, and
a list for EXPN.  Loopback is trusted, as by default, so that a client
without AUTH may relay; AUTH still works, after TLS."""

import pytest

from relaymail.auth import passwords
from tests.certs import CertificateAuthority
from tests.interop.peers import PASSWORD, USER
from tests.relay_process import RelayProcess, free_port


@pytest.fixture(scope="package")
def ca():
    return CertificateAuthority()


@pytest.fixture(scope="package")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(ca.cert_pem)
    return str(path)


@pytest.fixture(scope="package")
def relay(tmp_path_factory, ca):
    workdir = tmp_path_factory.mktemp("interop-relay")
    pair = ca.issue("relay.test", "127.0.0.1")
    (workdir / "cert.pem").write_bytes(pair.cert_pem)
    (workdir / "key.pem").write_bytes(pair.key_pem)
    passwords.set_password(str(workdir / "passwd"), USER, PASSWORD)
    (workdir / "aliases").write_text("staff: alice@example.com, bob@example.com\n"
                                     "équipe: alice@example.com, rené@example.com\n", encoding="utf-8")
    implicit_port, submission_port = free_port(), free_port()
    process = RelayProcess(workdir, {
        "server": {"submission_listen": f"tcp:{submission_port}:interface=127.0.0.1"},
        "relay": {"domains": "example.com"},
        "tls": {"certificate": str(workdir / "cert.pem"), "private_key": str(workdir / "key.pem")},
        "auth": {"passwords": str(workdir / "passwd"), "failure_delay": "0.05"},
        "plugins": {"recipients": "aliases, domains", "expanders": "aliases"},
        "plugin:aliases": {"file": str(workdir / "aliases")},
    })
    with open(process.config) as f:
        text = f.read()
    text = text.replace(
        f"listen = tcp:{process.port}:interface=127.0.0.1",
        f"listen = tcp:{process.port}:interface=127.0.0.1\n"
        f"    ssl:{implicit_port}:interface=127.0.0.1:privateKey={workdir / 'key.pem'}"
        f":certKey={workdir / 'cert.pem'}")
    with open(process.config, "w") as f:
        f.write(text)
    process.implicit_port = implicit_port
    process.submission_port = submission_port
    process.start()
    yield process
    process.stop()
