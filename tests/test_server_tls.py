"""The server's TLS (relaymail.smtp.tls) over real loopback sockets.

A Twisted server either calls ``startTLS`` at once (as STARTTLS does) or
listens on an ``SSL4ServerEndpoint`` (implicit TLS); the client is the
standard library's ``ssl`` module in a thread, so the two sides share no
code.  The client trusts only the test CA's root, which also proves that
intermediates in the certificate file are sent.
"""

import datetime
import os
import socket
import ssl
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from relaymail.config import TLSFileError
from relaymail.smtp import tls as tls_module
from relaymail.smtp.tls import ServerTLS
from tests import certs


# -- certificates -----------------------------------------------------------------

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def chain_through_intermediate(server_name):
    """(root PEM, leaf + intermediate PEM, leaf key PEM): a leaf signed by
    an intermediate CA signed by a root.  tests/certs.py signs leaves with
    its root directly, so the intermediate is made here."""
    now = datetime.datetime.now(datetime.timezone.utc)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    names = [_name("chain root"), _name("chain intermediate"), _name(server_name)]

    def issue(subject, issuer, index, signer, ca):
        builder = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(issuer)
                   .public_key(keys[index].public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    root = issue(names[0], names[0], 0, keys[0], True)
    intermediate = issue(names[1], names[0], 1, keys[0], True)
    leaf = issue(names[2], names[1], 2, keys[1], False)
    key_pem = keys[2].private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return _pem(root), _pem(leaf) + _pem(intermediate), key_pem


# -- the client, in a thread ------------------------------------------------------------

def client_context(ca_pem, version=None):
    """A stdlib client context trusting ``ca_pem``, limited to ``version``.

    Made in the reactor thread: asking for TLS 1.1 warns, and the warning
    filter is not thread-safe.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    # The served name changes across reloads; the chain is still checked.
    context.check_hostname = False
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 will not offer TLS 1.1 at its default security
            # level; level 0 lets it try, so the server is what refuses.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(port, context):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="mx.test") as wrapped:
            der = wrapped.getpeercert(binary_form=True)
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
            return wrapped.version(), subject


# -- the server ------------------------------------------------------------------------

class StartTLSServer(Protocol):
    """Starts TLS as soon as the connection is made, as after STARTTLS."""

    def connectionMade(self):
        self.transport.startTLS(self.factory.creator())

    def connectionLost(self, reason):
        self.factory.lost(self)


class ServerFactory(Factory):
    """Builds server protocols and lets a test wait until every connection
    it made has closed (trial fails a test that leaves sockets open)."""

    def __init__(self, protocol, creator=None):
        self.protocol = protocol
        self.creator = creator
        self._open = {}

    def buildProtocol(self, addr):
        built = super().buildProtocol(addr)
        self._open[built] = defer.Deferred()
        return built

    def lost(self, protocol):
        self._open.pop(protocol).callback(None)

    def all_closed(self):
        return defer.gatherResults(list(self._open.values()))


class ClosingProtocol(Protocol):
    """The application protocol under implicit TLS; reports its close."""

    def connectionLost(self, reason):
        self.factory.lost(self)


class ServerTLSTests(unittest.TestCase):
    """Handshakes, versions, chains and reloads over loopback."""

    def setUp(self):
        self.authority = certs.CertificateAuthority()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cert_path = os.path.join(self.directory, "cert.pem")
        self.key_path = os.path.join(self.directory, "key.pem")
        self.install(self.authority.issue("mx.test"))

    def install(self, pair, cert=None, key=None):
        """Write a key pair (or raw bytes) over the [tls] files."""
        with open(self.cert_path, "wb") as stream:
            stream.write(pair.cert_pem if cert is None else cert)
        with open(self.key_path, "wb") as stream:
            stream.write(pair.key_pem if key is None else key)

    async def listen_starttls(self, creator):
        """A STARTTLS-style server whose TLS comes from ``creator()``; its port."""
        factory = ServerFactory(StartTLSServer, creator)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.factory = factory
        return port.getHost().port

    async def listen_implicit(self, server_tls):
        """An implicit-TLS listener holding ``server_tls``; its port."""
        factory = ServerFactory(ClosingProtocol)
        endpoint = SSL4ServerEndpoint(reactor, 0, server_tls, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        self.factory = factory
        return port.getHost().port

    async def handshake(self, port, version=None, ca_pem=None):
        """(version, peer subject) from a stdlib client, once the server
        side has closed too."""
        context = client_context(ca_pem or self.authority.cert_pem, version)
        try:
            return await threads.deferToThread(_handshake, port, context)
        finally:
            await self.factory.all_closed()

    # -- versions ---------------------------------------------------------------------

    async def test_tls_1_2_handshake(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(server_tls.options)
        self.assertEqual(await self.handshake(port, ssl.TLSVersion.TLSv1_2),
                         ("TLSv1.2", "CN=mx.test"))

    async def test_tls_1_3_handshake(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(server_tls.options)
        self.assertEqual(await self.handshake(port, ssl.TLSVersion.TLSv1_3),
                         ("TLSv1.3", "CN=mx.test"))

    async def test_tls_1_1_is_refused(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        # pyOpenSSL has no getter; setting no new bits returns the current.
        flags = server_tls.options().getContext().set_options(0)
        self.assertTrue(flags & SSL.OP_NO_TLSv1_1)
        self.assertTrue(flags & SSL.OP_NO_TLSv1)
        self.assertFalse(flags & SSL.OP_NO_TLSv1_2)
        port = await self.listen_starttls(server_tls.options)
        with self.assertRaises(ssl.SSLError) as caught:
            await self.handshake(port, ssl.TLSVersion.TLSv1_1)
        if caught.exception.reason == "NO_PROTOCOLS_AVAILABLE":
            # This OpenSSL will not even let a client ask for TLS 1.1; the
            # option bits above are then all there is to check.
            return
        # The server answered the TLS 1.1 hello with a protocol_version
        # alert (RFC 8446 6.2).
        self.assertEqual(caught.exception.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

    def test_no_client_certificate_is_asked_for(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        self.assertEqual(server_tls.options().getContext().get_verify_mode(),
                         SSL.VERIFY_NONE)

    async def test_implicit_tls_endpoint(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_implicit(server_tls)
        self.assertEqual(await self.handshake(port), ("TLSv1.3", "CN=mx.test"))

    async def test_intermediates_after_the_leaf_are_sent(self):
        root_pem, chain_pem, key_pem = chain_through_intermediate("mx.test")
        self.install(None, cert=chain_pem, key=key_pem)
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(lambda: server_tls)
        # The client trusts only the root: without the intermediate on the
        # wire the chain could not be verified.
        self.assertEqual(await self.handshake(port, ca_pem=root_pem),
                         ("TLSv1.3", "CN=mx.test"))

    # -- reload --------------------------------------------------------------------------

    async def test_reload_reaches_a_holder_of_the_server_tls(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(lambda: server_tls)
        self.assertEqual((await self.handshake(port))[1], "CN=mx.test")
        self.install(self.authority.issue("renewed.test"))
        server_tls.reload()
        self.assertEqual((await self.handshake(port))[1], "CN=renewed.test")
        self.assertEqual(server_tls.certificate.subject.rfc4514_string(),
                         "CN=renewed.test")

    async def test_reload_reaches_an_implicit_tls_listener(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_implicit(server_tls)
        self.assertEqual((await self.handshake(port))[1], "CN=mx.test")
        self.install(self.authority.issue("renewed.test"))
        server_tls.reload()
        self.assertEqual((await self.handshake(port))[1], "CN=renewed.test")

    async def test_options_asked_per_connection_follow_a_reload(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(server_tls.options)
        self.install(self.authority.issue("renewed.test"))
        server_tls.reload()
        self.assertEqual((await self.handshake(port))[1], "CN=renewed.test")

    async def test_options_kept_from_before_a_reload_serve_the_old_certificate(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        snapshot = server_tls.options()
        port = await self.listen_starttls(lambda: snapshot)
        self.install(self.authority.issue("renewed.test"))
        server_tls.reload()
        self.assertIsNot(server_tls.options(), snapshot)
        self.assertEqual((await self.handshake(port))[1], "CN=mx.test")

    async def test_reload_of_a_broken_file_keeps_the_old_pair(self):
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(lambda: server_tls)
        before = server_tls.options()
        self.install(self.authority.issue("renewed.test"), cert=b"half written\n")
        with self.assertRaises(ValueError) as caught:
            server_tls.reload()
        self.assertEqual(str(caught.exception),
                         "no PEM certificate (-----BEGIN CERTIFICATE-----) "
                         f"in '{self.cert_path}'")
        self.assertEqual(caught.exception.key, "certificate")
        self.assertIs(server_tls.options(), before)
        self.assertEqual((await self.handshake(port))[1], "CN=mx.test")

    async def test_reload_of_a_new_certificate_with_the_old_key_keeps_the_old_pair(self):
        # A renewal that has written the new certificate but not yet the
        # new key.
        old = self.authority.issue("mx.test")
        self.install(old)
        server_tls = ServerTLS(self.cert_path, self.key_path)
        port = await self.listen_starttls(lambda: server_tls)
        self.install(self.authority.issue("renewed.test"), key=old.key_pem)
        with self.assertRaises(ValueError) as caught:
            server_tls.reload()
        self.assertEqual(str(caught.exception),
                         "the private key does not match the certificate "
                         f"in '{self.cert_path}'")
        self.assertEqual((await self.handshake(port))[1], "CN=mx.test")

    # -- refusing bad files ---------------------------------------------------------------

    def test_mismatched_key_is_refused(self):
        self.install(self.authority.issue("mx.test"),
                     key=self.authority.issue("other.test").key_pem)
        with self.assertRaises(TLSFileError) as caught:
            ServerTLS(self.cert_path, self.key_path)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertEqual(caught.exception.key, "private_key")
        self.assertEqual(str(caught.exception),
                         "the private key does not match the certificate "
                         f"in '{self.cert_path}'")

    def test_missing_key_file_is_refused(self):
        with self.assertRaises(ValueError) as caught:
            ServerTLS(self.cert_path, self.key_path + ".missing")
        self.assertEqual(str(caught.exception),
                         f"cannot read '{self.key_path}.missing': No such file or directory")
        self.assertEqual(caught.exception.key, "private_key")

    def test_openssl_refusal_is_one_line(self):
        def refuse(options):
            raise SSL.Error([("SSL routines", "", "ee key too small")])
        self.patch(tls_module.ssl.CertificateOptions, "getContext", refuse)
        with self.assertRaises(TLSFileError) as caught:
            ServerTLS(self.cert_path, self.key_path)
        self.assertEqual(str(caught.exception),
                         f"OpenSSL will not use the certificate in '{self.cert_path}': "
                         "ee key too small")
        self.assertEqual(caught.exception.key, "certificate")
