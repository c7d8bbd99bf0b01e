"""The client's TLS policy: which STARTTLS contexts to use and how to name a failure.

Policies follow Postfix's ``smtp_tls_security_level``:

``none``
    never STARTTLS.
``may``
    STARTTLS when offered, certificate not checked; plain text otherwise.
``encrypt``
    STARTTLS required, certificate not checked.
``verify``
    STARTTLS required, the chain must verify against the trust roots and
    the certificate must name the host we meant to reach.
``dane``
    STARTTLS required, the chain held to the hop's TLSA records (RFC 7672)
    after the handshake; set by the router for one MX host, never
    configured for a whole destination.
``wrapper``
    TLS from the first byte, no STARTTLS (the port 465 "submissions" of
    RFC 8314 3.3; Postfix ``smtp_tls_wrappermode = yes``), the certificate
    checked as under ``verify``: a smarthost on 465 is one we chose, so
    there is no reason to accept any certificate it shows.
"""

import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import error, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

#: "dane" is set by the router for one hop (relaymail.delivery.tls_policy),
#: never configured for a whole ClientConfig.
POLICIES = ("none", "may", "encrypt", "verify", "wrapper", "dane")

# RFC 8996 retired TLS 1.0 and 1.1; RFC 8314 asks mail clients for 1.2 or
# later.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def tls_required(policy):
    """True when the policy forbids sending mail in plain text."""
    return policy in ("encrypt", "verify", "wrapper", "dane")


def client_options(policy, server_name, ca_file=None):
    """The TLS client options for STARTTLS (or the ``wrapper`` handshake)
    under ``policy``.

    Without verification no server name is sent: Postfix sends no SNI by
    default either (``smtp_tls_servername`` is empty).

    :param server_name: the name the certificate must carry (``Hop.name``).
    :param ca_file: PEM trust roots for ``verify``; None for the platform's.
    :raise ValueError: when ``ca_file`` holds no certificate.
    :raise OSError: when ``ca_file`` cannot be read.
    """
    if policy in ("verify", "wrapper"):
        trust = load_trust_roots(ca_file) if ca_file else ssl.platformTrust()
        return ssl.optionsForClientTLS(
            server_name, trustRoot=trust,
            extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION})
    unchecked = ssl.CertificateOptions(verify=False, raiseMinimumTo=MINIMUM_VERSION)
    if policy == "dane":
        # The chain is held to the TLSA records once the handshake is done
        # (relaymail.delivery.dane), not to any CA; RFC 7672 8.1 asks for
        # SNI with the MX host name, which a DANE server may key on.
        return _WithServerName(unchecked, server_name)
    return unchecked


@implementer(IOpenSSLClientConnectionCreator)
class _WithServerName:
    """Client TLS options that send SNI but check nothing themselves."""

    def __init__(self, options, server_name):
        self._options = options
        self._server_name = server_name.encode("idna")

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_tlsext_host_name(self._server_name)
        connection.set_connect_state()
        return connection


def pkix_problem(chain_der, server_name, ca_file=None):
    """What ``verify`` would refuse in a chain (DER, leaf first) for
    ``server_name``, in describe_failure's words, or None when it would
    take it: the chain up to ``ca_file`` (else the platform's roots), the
    dates, the name."""
    if not chain_der:
        return "server certificate verification failed: no certificate"
    certificates = [x509.load_der_x509_certificate(der) for der in chain_der]
    store = crypto.X509Store()
    if ca_file:
        for block in pem_certificates(ca_file):
            store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(block)))
    else:
        store.set_default_paths()
    failure = chain_error(store, certificates)
    if failure is not None:
        if "expired" in str(failure):
            return f"server certificate has expired: {failure}"
        return "server certificate verification failed: untrusted or invalid certificate chain"
    if not names_one_of(certificates[0], [server_name]):
        return f"server certificate does not match the host name {server_name}"
    return None


def chain_error(store, chain):
    """The ``X509StoreContextError`` that checking ``chain``
    (cryptography certificates, leaf first) against the trust anchors of
    ``store`` (a pyOpenSSL X509Store) gives, or None when it verifies."""
    try:
        crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(chain[0]),
            chain=[crypto.X509.from_cryptography(c) for c in chain[1:]]).verify_certificate()
    except crypto.X509StoreContextError as exc:
        return exc
    return None


def names_one_of(certificate, names):
    """True when ``certificate`` is valid for one of the host ``names``
    (RFC 6125, one leading wildcard label)."""
    for name in names:
        try:
            verify_certificate_hostname(certificate, name.rstrip("."))
            return True
        except VerificationError:
            continue
    return False


def peer_chain(transport):
    """The certificates a TLS peer presented, leaf first, as DER bytes."""
    handle = transport.getHandle()
    return [certificate.to_cryptography().public_bytes(Encoding.DER)
            for certificate in handle.get_peer_cert_chain() or ()]


def pem_certificates(path):
    """The PEM certificate blocks of a bundle file, as bytes."""
    with open(path, "rb") as file:
        return _PEM_CERTIFICATE.findall(file.read())


def load_trust_roots(path):
    """Every certificate in a PEM bundle, as a Twisted trust root."""
    blocks = pem_certificates(path)
    if not blocks:
        raise ValueError(f"no PEM certificate in {path}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in blocks])


def describe_failure(reason, server_name):
    """One line saying why a TLS handshake failed, from the Failure that
    ended the connection."""
    value = reason.value
    if isinstance(value, VerificationError):
        return f"server certificate does not match the host name {server_name}"
    if isinstance(value, SSL.Error):
        texts = _openssl_reasons(value)
        if any("certificate verify failed" in text for text in texts):
            return "server certificate verification failed: untrusted or invalid certificate chain"
        return "TLS error: " + ("; ".join(texts) or "handshake failed")
    if isinstance(value, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed during the TLS handshake"
    return f"TLS error: {value}"


def _openssl_reasons(exc):
    """The reason strings of an OpenSSL error stack."""
    texts = []
    for entry in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else []):
        if isinstance(entry, tuple) and entry:
            texts.append(str(entry[-1]))
    return texts
