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
``wrapper``
    TLS from the first byte, no STARTTLS (the port 465 "submissions" of
    RFC 8314 3.3; Postfix ``smtp_tls_wrappermode = yes``), the certificate
    checked as under ``verify``: a smarthost on 465 is one we chose, so
    there is no reason to accept any certificate it shows.
"""

import re

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error, ssl

POLICIES = ("none", "may", "encrypt", "verify", "wrapper")

# RFC 8996 retired TLS 1.0 and 1.1; RFC 8314 asks mail clients for 1.2 or
# later.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def tls_required(policy):
    """True when the policy forbids sending mail in plain text."""
    return policy in ("encrypt", "verify", "wrapper")


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
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=MINIMUM_VERSION)


def load_trust_roots(path):
    """Every certificate in a PEM bundle, as a Twisted trust root."""
    with open(path, "rb") as file:
        blocks = _PEM_CERTIFICATE.findall(file.read())
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
