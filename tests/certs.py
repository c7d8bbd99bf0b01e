"""Throwaway certificates for TLS tests, made at test time.

A small CA, server certificates it signs, and a self-signed certificate,
all with P-256 keys (fast to make).  Everything is PEM bytes.
"""

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa as rsa_keys
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject, issuer, public_key, valid_from=None, valid_until=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - datetime.timedelta(hours=1))
            # A year: past the 30 days in which relaymail warns of expiry
            # (relaymail.config_warnings), so test relays log no warning.
            .not_valid_after(valid_until or now + datetime.timedelta(days=365)))


def _alt_names(names):
    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class CertificateAuthority:
    """A CA that signs server certificates for the names asked."""

    def __init__(self, common_name="relaymail test CA"):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = _name(common_name)
        cert = (_builder(self._subject, self._subject, self._key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names, rsa=False):
        """A server certificate for ``names`` (DNS names or IP addresses);
        an RSA key with ``rsa`` (static-RSA suites need one), else P-256."""
        key = (rsa_keys.generate_private_key(public_exponent=65537, key_size=2048) if rsa
               else ec.generate_private_key(ec.SECP256R1()))
        cert = (_builder(_name(names[0]), self._subject, key.public_key())
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_alt_names(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def self_signed(*names, valid_from=None, valid_until=None):
    """A certificate for ``names`` that signs itself (no CA vouches for it),
    valid from an hour ago for a year unless ``valid_from`` and
    ``valid_until`` (aware datetimes) say otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(names[0]), _name(names[0]), key.public_key(), valid_from, valid_until)
            .add_extension(_alt_names(names), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
