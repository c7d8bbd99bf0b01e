"""relaymail-check's ``dkim`` command: the DNS records to publish for the
keys the ``dkim`` plugin signs with.

::

    relaymail-check --config FILE dkim [--json]

The configuration and plugins are loaded as a start loads them
(``build_hooks``), so the keys are the ones the running relay would sign
with, read and tried as a start reads and tries them.  One line per key,
by signing domain, in zone-file form::

    mail2026._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MIIBIjAN..." "...AQAB"

``k=rsa`` with ``p=`` the base64 of the DER SubjectPublicKeyInfo (RFC
6376 3.6.1), or ``k=ed25519`` with ``p=`` the base64 of the 32-byte public
key (RFC 8463 4.2).  A value longer than 255 octets is split into several
quoted strings of at most 255 each, as one TXT record holds them (RFC 1035
3.3.14; RFC 6376 3.6.2.2: a verifier joins them with nothing between).
``--json`` prints a list of objects with ``domain``, ``selector``,
``name``, ``algorithm``, ``value`` (the whole value, unsplit) and
``record`` (the line above).

The keys are those of the dkim plugin ``[plugins] filters`` enables or,
when it is not enabled yet, of the ``[plugin:dkim]`` section: publish
the records first, then turn signing on.

Exit status: 0 when a record was printed; 78 (EX_CONFIG) for a bad
configuration, a bad key, and for one with neither the dkim plugin in
``[plugins] filters`` nor a ``[plugin:dkim]`` section.
"""

import base64
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relaymail.config import ConfigError
from relaymail.plugins.dkim import DKIMSigner
from relaymail.policy.loader import _build, find_plugins

#: The dkim plugin's name in [plugins] and [plugin:NAME].
DKIM = "dkim"

#: RFC 1035 3.3: a <character-string> is at most 255 octets.
MAX_STRING = 255


def add_arguments(commands):
    command = commands.add_parser(
        "dkim", help="the DNS TXT record to publish for each key the dkim plugin signs with")
    command.add_argument("--json", action="store_true", help="print a JSON list")


def signers(settings, hooks):
    """The dkim plugin ``[plugins] filters`` enables, or else the one a
    ``[plugin:dkim]`` section configures: the records go into DNS before
    signing is turned on, or receivers would fail the first signatures.

    :raise ConfigError: when there is neither, or the section's keys are bad.
    """
    found = [plugin for plugin in hooks.get("filters", ()) if isinstance(plugin, DKIMSigner)]
    if not found and DKIM in settings.plugin_options:
        found = [_build(find_plugins(settings)[DKIM], DKIM, settings)]
    if not found:
        raise ConfigError(settings.source, "plugins", "filters",
                          "no dkim plugin and no [plugin:dkim]: there is no key to publish")
    return found


def public_value(key):
    """The ``v=DKIM1; k=...; p=...`` text for a :class:`SigningKey`."""
    if key.algorithm == b"ed25519-sha256":
        # The plugin keeps the base64 of the seed, as dkimpy takes it.
        private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private))
        public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
        kind = "ed25519"
    else:
        private = serialization.load_pem_private_key(key.private, password=None)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def quoted_strings(value):
    """``value`` as zone-file character-strings of at most 255 octets.

    The value is base64 and ASCII tags: nothing in it needs escaping.
    """
    return " ".join(f'"{value[i:i + MAX_STRING]}"' for i in range(0, len(value), MAX_STRING))


def records(settings, hooks):
    """One dict per key (see the module's text), by domain."""
    result = []
    for signer in signers(settings, hooks):
        pairs = [(domain, key) for domain, keys in signer.keys.items() for key in keys]
        for domain, key in sorted(pairs, key=lambda pair: (pair[0], pair[1].selector)):
            name = f"{key.selector}._domainkey.{domain}."
            value = public_value(key)
            result.append({
                "domain": domain,
                "selector": key.selector,
                "name": name,
                "algorithm": key.algorithm.decode("ascii"),
                "value": value,
                "record": f"{name} IN TXT {quoted_strings(value)}",
            })
    return result


def run(settings, hooks, args, out):
    """Print the records; :return: the exit status."""
    found = records(settings, hooks)
    if args.json:
        out.write(json.dumps(found, indent=2) + "\n")
    else:
        for record in found:
            out.write(record["record"] + "\n")
    return 0
