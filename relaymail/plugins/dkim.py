"""The ``dkim`` plugin: a message filter that signs outgoing mail with
DKIM (RFC 6376), using dkimpy.

It signs for the domain of the message's ``From:`` field, not the envelope
sender's: DMARC (RFC 7489 3.1.1) counts a DKIM signature only when its
``d=`` domain is the author's, the ``From:`` domain, and a signature for a
bounce address domain that is not it passes DKIM yet fails DMARC.  A
message whose ``From:`` is missing, repeated, holds several addresses, or
names a domain with no key gets no signature and no opinion: the next
filter decides, and the message goes on unsigned.

``[plugin:dkim]`` takes:

``domain``, ``selector``, ``private_key``
    One signing domain, the selector its public key is published under
    (``SELECTOR._domainkey.DOMAIN``, RFC 6376 3.6.2.1) and the private key
    file.  The key file is a PEM RSA key (PKCS#1 or PKCS#8, at least 1024
    bits, RFC 8301 3.2) or an Ed25519 key, PEM (PKCS#8) or the base64 of
    its 32-byte seed as ``dknewkey`` writes it.  The algorithm follows
    the key: ``rsa-sha256``, or ``ed25519-sha256`` (RFC 8463).
``key.DOMAIN``
    More domains, each ``SELECTOR:PATH``:
    ``key.example.net = mail2026:/etc/relaymail/dkim/example.net.key``.
    Two keys, comma separated, one RSA and one Ed25519, sign each message
    twice, as RFC 8463 3 advises while receivers learn Ed25519: those that
    do not know it ignore that signature and check the RSA one (RFC 6376
    6.1).  ``key.DOMAIN`` for the ``domain`` above adds its second key.
    A key's path therefore cannot hold a comma.
``headers``
    The fields to sign, comma or space separated; ``From`` must be one
    (RFC 6376 5.4).  Default: the fields of RFC 6376 5.4.1's list that
    the message has (From, Subject, Date, To, Cc, Message-ID, MIME and
    List fields ...), with From signed once more so that a second From
    added in transit breaks the signature (RFC 6376 8.15).
``subdomains``
    ``no`` (default): a ``From:`` domain is signed only when it has a key
    of its own.  ``yes``: mail from a subdomain (``alice@eu.example.org``)
    is signed with the key of the nearest domain above it that has one,
    ``d=example.org``, which DMARC's relaxed alignment (``adkim=r``, its
    default, RFC 7489 3.1.1) accepts for the author's domain, as OpenDKIM's
    ``SubDomains`` does.  A domain publishing ``adkim=s`` needs keys of
    its own subdomains.
``sign``
    ``trusted`` (default): sign mail from clients in ``[server]
    trusted_networks`` or logged in with AUTH only, so that a stranger
    cannot have the relay sign a forged ``From:``.  ``all``: sign every
    message whose ``From:`` domain has a key.
``canonicalization``
    ``HEADER/BODY``, each ``simple`` or ``relaxed`` (RFC 6376 3.4).
    Default ``relaxed/relaxed``: it survives what relays on the way do
    to white space and folding, where ``simple`` breaks.
``convert_8bit``
    ``yes`` (default): a message with 8-bit octets in its body is converted
    to 7 bits (its 8-bit parts to quoted-printable or base64, as delivery
    would for a next hop without 8BITMIME) and that form is signed and
    queued, as RFC 6376 5.3 asks of signers: converted later, on the way,
    the signature would break.  It costs size (up to 1.4 times: base64
    for text that is mostly 8-bit; never past ``[limits] message_size``:
    such a message is signed as it is).  ``no`` signs the
    8-bit form, as OpenDKIM does: right while every next hop offers
    8BITMIME, as nearly all do; to one that does not, the signature breaks.
    BINARYMIME mail, 8-bit header fields and 8-bit content inside
    multipart/signed are always signed as they are (delivery never converts
    them either).

Every key is read and tried (one test signature) at start; a bad one stops
start-up with the option that names it.  Signing reads the whole message
into memory (dkimpy takes bytes; ``[limits] message_size`` bounds it), so
the plugin declares ``blocking = True`` and runs in the plugin threads.
The signature is added at the top of the message, above the relay's own
``Received:`` field, as RFC 6376 5.6 has signers prepend it.
"""

import base64
import email.utils
import re

# As dkimpy: this module's ``dkim`` is the plugin (relaymail.policy.loader).
import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from relaymail.address import AddressError
from relaymail.config import absolute_path
from relaymail.interfaces import Decision, IMessageFilter, IPluginFactory
from relaymail.plugins.static import domain_key

log = Logger()

_OPTIONS = ("domain", "selector", "private_key", "key.DOMAIN", "headers", "subdomains",
            "sign", "canonicalization", "convert_8bit")

#: RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024

# RFC 6376 3.1: a selector is sub-domain *("." sub-domain).
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
_CANONICALIZATIONS = ("simple", "relaxed")
# RFC 5322 2.2 field-name.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")

# What a key is tried on at start.
_PROBE = b"From: probe@%s\r\nSubject: probe\r\n\r\nprobe\r\n"


class SigningKey:
    """One domain's key: ``selector``, ``algorithm`` (dkimpy's name, bytes)
    and ``private`` (the key as dkimpy takes it)."""

    __slots__ = ("selector", "algorithm", "private")

    def __init__(self, selector, algorithm, private):
        self.selector = selector
        self.algorithm = algorithm
        self.private = private


@implementer(IMessageFilter)
class DKIMSigner:
    """Signs each message its rules allow (see the module's text)."""

    name = "dkim"
    description = "signs outgoing mail with DKIM (RFC 6376) for the From: domain"
    #: dkimpy reads and hashes the whole message.
    blocking = True

    def __init__(self, keys, headers=None, sign_all=False,
                 canonicalization=(b"relaxed", b"relaxed"), subdomains=False,
                 convert_8bit=True, limits=None):
        """:param keys: a dict from domain key (lower case, A-labels) to a
            list of :class:`SigningKey`, one signature each.
        :param headers: the field names to sign (bytes), or None for
            dkimpy's RFC 6376 5.4.1 default.
        :param subdomains: sign a subdomain's mail with the nearest parent
            domain's keys when it has none of its own.
        :param convert_8bit: sign (and queue) an 8-bit body in 7 bits.
        :param limits: ``[limits]``: a conversion whose result the relay
            would refuse from a filter (bigger than ``message_size`` ...)
            is not made."""
        self._keys = {domain: list(each) for domain, each in keys.items()}
        self._headers = headers
        self._sign_all = sign_all
        self._canonicalization = canonicalization
        self._subdomains = subdomains
        self._convert_8bit = convert_8bit
        self._limits = limits

    @property
    def keys(self):
        """The signing keys, a dict from domain key to a list of
        :class:`SigningKey` (a copy: ``relaymail-check dkim`` prints their
        public records)."""
        return {domain: list(each) for domain, each in self._keys.items()}

    def signing_domain(self, author):
        """The domain that signs for ``author`` (a From: domain key), or
        None: the domain itself, or with ``subdomains`` the nearest one
        above it with keys."""
        if author in self._keys:
            return author
        if self._subdomains:
            labels = author.split(".")
            # Never up to a top-level domain: no key is ever for one.
            for start in range(1, len(labels) - 1):
                parent = ".".join(labels[start:])
                if parent in self._keys:
                    return parent
        return None

    def check_message(self, message, context):
        """The DKIM-Signature fields to add (one a key of the signing
        domain), or no opinion and no change."""
        if not self._sign_all and not (context.trusted or context.authenticated_user):
            return Decision.NO_OPINION
        author = author_domain(message.headers)
        domain = self.signing_domain(author) if author else None
        if domain is None:
            return Decision.NO_OPINION
        with message.open() as f:
            data = f.read()
        seven_bit, kept_because = None, None
        if self._convert_8bit and _has_8bit_body(data, getattr(message, "envelope", None)):
            seven_bit, kept_because = self._seven_bit(data, message)
            if seven_bit is not None:
                data = seven_bit
        fields = []
        # Each signature over the message as received, not over the other
        # signature: a receiver checks each on its own (RFC 6376 4.2).
        for key in self._keys[domain]:
            try:
                field = dkimpy.sign(data, key.selector.encode("ascii"), domain.encode("ascii"),
                                  key.private, signature_algorithm=key.algorithm,
                                  canonicalize=self._canonicalization,
                                  include_headers=self._headers, linesep=b"\r\n")
            except dkimpy.DKIMException as exc:
                # A message dkimpy cannot parse: deferring it would only
                # have it refused again at every try.  It goes without this
                # signature, and a receiver judges it as it would any
                # unsigned mail.
                log.warn("{queue_id}: not signed for {domain} ({selector}): {error}",
                         queue_id=message.queue_id, domain=domain, selector=key.selector,
                         error=str(exc))
                continue
            name, _, value = field.decode("ascii").partition(":")
            # Kept exactly as dkimpy folded it: with simple header
            # canonicalization the signature covers those bytes.
            fields.append((name, value[1:].rstrip("\r\n")))
        if not fields:
            return Decision.NO_OPINION
        where = f"{getattr(context, 'label', '-')}: {message.queue_id}"
        decision = Decision.NO_OPINION
        if seven_bit is not None:
            log.info("{where}: dkim: 8-bit body converted to 7 bits and signed so (RFC 6376 "
                     "5.3)", where=where, queue_id=message.queue_id)
            decision = decision.with_message(seven_bit)
        elif kept_because is not None:
            log.info("{where}: dkim: 8-bit body signed as it is: {reason}", where=where,
                     queue_id=message.queue_id, reason=kept_because)
        return decision.with_headers(add=fields)

    def _seven_bit(self, data, message):
        """``(the 7-bit form of the message, None)`` to be signed and queued
        in its place, or ``(None, why not)`` to sign it as it is.

        RFC 6376 5.3: a relay that converts 8-bit mail for a next hop
        without 8BITMIME (relaymail.delivery.downgrade does, as Postfix
        does) breaks a signature made over the 8-bit form, so signers
        SHOULD convert first.  The converted message means the same to its
        reader (quoted-printable or base64 parts) and goes to every next hop
        unchanged.  A message that cannot be converted (8-bit content in
        multipart/signed, 8-bit header fields) is signed as it is: delivery
        refuses to convert it too, so the signature still covers what is
        sent.  Nor is one whose 7-bit form the relay would refuse from a
        filter: past ``[limits] message_size`` (a next hop with the same
        limit would refuse it) or ``header_size``."""
        from relaymail.delivery.downgrade import CannotSend, downgrade
        try:
            converted = downgrade(data)
        except CannotSend as exc:
            return None, exc.reason
        from relaymail.policy.filters import replacement_problem
        problem = replacement_problem(converted, self._limits, current=message)
        if problem is not None:
            return None, f"its 7-bit form would have {problem}"
        return converted, None


def _has_8bit_body(data, envelope):
    """Whether the message (bytes) has 8-bit octets after its header
    section, and is not BINARYMIME (binary octets, RFC 3030, which a
    7-bit form cannot carry line by line; delivery sends it by BDAT or
    bounces it, never converts it)."""
    if data.isascii() or getattr(envelope, "body", None) == "BINARYMIME":
        return False
    end = data.find(b"\r\n\r\n")
    return end >= 0 and not data[end + 4:].isascii()


def author_domain(headers):
    """The domain of the one address of the one ``From:`` field, as a
    domain key (lower case, A-labels), or None."""
    values = [value for name, value in headers if name.lower() == "from"]
    if len(values) != 1:
        return None
    addresses = [address for _, address in email.utils.getaddresses(values) if address]
    if len(addresses) != 1:
        return None
    local, at, domain = addresses[0].rpartition("@")
    if not at or not local:
        return None
    try:
        return domain_key(domain)
    except AddressError:
        return None


def load_key(path, selector):
    """Read the private key at ``path`` for dkimpy.

    :raise ValueError: saying what is wrong with the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(
                base64.b64decode(data.strip(), validate=True))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM RSA or Ed25519 key, nor a base64 Ed25519 "
                         f"seed: {' '.join(str(exc).split())}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{path}: an RSA key of {key.key_size} bits; DKIM needs at least "
                             f"{MIN_RSA_BITS} (RFC 8301 3.2)")
        # dkimpy reads PKCS#1 (RFC 8017 RSAPrivateKey) PEM.
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return SigningKey(selector, b"rsa-sha256", private)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey(selector, b"ed25519-sha256", base64.b64encode(seed))
    raise ValueError(f"{path}: neither an RSA nor an Ed25519 key; DKIM signs with those "
                     f"(RFC 6376 3.3, RFC 8463)")


@implementer(IPlugin, IPluginFactory)
class DKIMSignerFactory:
    """Builds :class:`DKIMSigner` from ``[plugin:dkim]``."""

    name = "dkim"
    description = DKIMSigner.description
    hooks = ("filters",)

    def build(self, context):
        options = context.options
        for key in options:
            if key not in _OPTIONS and not key.startswith("key."):
                raise context.config_error(
                    key, f"unknown option; [plugin:dkim] takes {', '.join(_OPTIONS)}")
        keys = {}
        single = [options.get(key, "").strip() for key in ("domain", "selector", "private_key")]
        if any(single):
            for key, value in zip(("domain", "selector", "private_key"), single):
                if not value:
                    raise context.config_error(
                        key, "missing: domain, selector and private_key go together")
            domain, selector, path = single
            self._add(context, keys, "domain", domain, selector, "selector", path, "private_key")
        for option, value in options.items():
            if option.startswith("key."):
                for each in value.split(","):
                    selector, colon, path = each.strip().partition(":")
                    if not colon or not path.strip():
                        raise context.config_error(
                            option, f"expected SELECTOR:PATH, or two of them, got {value!r}")
                    self._add(context, keys, option, option[len("key."):], selector.strip(),
                              option, path, option)
        if not keys:
            raise context.config_error(
                "domain", "no key: set domain, selector and private_key, or key.DOMAIN")
        headers = _headers(context, options.get("headers", ""))
        sign = options.get("sign", "trusted").strip()
        if sign not in ("trusted", "all"):
            raise context.config_error("sign", f"expected trusted or all, got {sign!r}")
        canonicalization = _canonicalization(context, options.get("canonicalization",
                                                                  "relaxed/relaxed"))
        subdomains = options.get("subdomains", "no").strip().lower()
        if subdomains not in ("yes", "no"):
            raise context.config_error("subdomains", f"expected yes or no, got {subdomains!r}")
        convert = options.get("convert_8bit", "yes").strip().lower()
        if convert not in ("yes", "no"):
            raise context.config_error("convert_8bit", f"expected yes or no, got {convert!r}")
        signer = DKIMSigner(keys, headers, sign == "all", canonicalization,
                            subdomains=subdomains == "yes", convert_8bit=convert == "yes",
                            limits=getattr(context.settings, "limits", None))
        for domain, each in keys.items():
            for key in each:
                try:
                    dkimpy.sign(_PROBE % domain.encode("ascii"), key.selector.encode("ascii"),
                              domain.encode("ascii"), key.private,
                              signature_algorithm=key.algorithm,
                              canonicalize=canonicalization, include_headers=headers)
                except dkimpy.DKIMException as exc:
                    raise context.config_error(
                        _option_for(options, domain),
                        f"the {key.selector} key for {domain} does not sign: {exc}")
        return signer

    @staticmethod
    def _add(context, keys, domain_option, domain, selector, selector_option, path, key_option):
        try:
            name = domain_key(domain.strip().lower())
        except AddressError as exc:
            raise context.config_error(domain_option, f"not a domain: {domain!r}: {exc}") from None
        if not _SELECTOR.match(selector):
            raise context.config_error(selector_option, f"not a selector: {selector!r}")
        try:
            key = load_key(absolute_path(path), selector)
        except ValueError as exc:
            raise context.config_error(key_option, str(exc)) from None
        held = keys.setdefault(name, [])
        for other in held:
            if other.algorithm == key.algorithm:
                raise context.config_error(
                    domain_option, f"a second {key.algorithm.decode('ascii')} key for {name}: "
                                   f"a domain signs once with RSA and once with Ed25519 at most")
            if other.selector == key.selector:
                raise context.config_error(
                    domain_option, f"two keys for {name} under one selector, {selector}: "
                                   f"a selector names one public key (RFC 6376 3.1)")
        held.append(key)


def _option_for(options, domain):
    for option in options:
        if option.startswith("key.") and domain_key(option[len("key."):]) == domain:
            return option
    return "private_key"


def _headers(context, raw):
    names = [name.lower() for name in raw.replace(",", " ").split()]
    if not names:
        return None
    for name in names:
        if not _FIELD_NAME.match(name):
            raise context.config_error("headers", f"not a header field name: {name!r}")
    if "from" not in names:
        raise context.config_error("headers", "must include From (RFC 6376 5.4)")
    for name in names:
        if name.encode("ascii") in dkimpy.DKIM.SHOULD_NOT:
            raise context.config_error(
                "headers", f"{name} should not be signed: it changes in transit (RFC 6376 5.4)")
    return [name.encode("ascii") for name in names]


def _canonicalization(context, raw):
    header, slash, body = raw.strip().partition("/")
    if not slash or header not in _CANONICALIZATIONS or body not in _CANONICALIZATIONS:
        raise context.config_error(
            "canonicalization", f"expected HEADER/BODY, each simple or relaxed, got {raw!r}")
    return header.encode("ascii"), body.encode("ascii")


dkim = DKIMSignerFactory()
