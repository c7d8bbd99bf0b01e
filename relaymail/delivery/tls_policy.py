"""Which TLS each MX host gets: ``[delivery] tls_policy``, ``[tls_policy]``,
DANE, MTA-STS, and what the message itself asks (REQUIRETLS, TLS-Required).

The levels a destination can be given are Postfix's
``smtp_tls_security_level`` names:

``none``, ``may``, ``encrypt``, ``verify``
    as for the smarthost (:mod:`relaymail.delivery.tls`); ``verify``
    checks each MX host's certificate against its own name.
``dane``
    Postfix's opportunistic DANE (RFC 7672): an MX host with
    DNSSEC-validated TLSA records gets TLS checked against them, with no
    fallback to plain text; when the domain's MX hosts have none, the
    domain's MTA-STS policy applies, as under ``sts`` (RFC 8461 2: DANE is
    preferred where both exist); with neither, ``may``.  The default: it
    costs a TXT lookup per domain and, with a validating resolver, a TLSA
    lookup per MX host, and defeats a downgrade where the domain asked.
``sts``
    MTA-STS only (RFC 8461): ``enforce`` delivers to matching MX hosts with
    verified certificates, else defers; ``testing`` delivers as ``may``;
    no policy means ``may``.

Each hop the router hands the client carries a :class:`HopSecurity`
saying what its TLS must be and why, for the client to hold it to and for
the delivery log line to name.
"""

import dataclasses
from dataclasses import dataclass

from relaymail.config import MX_TLS as MX_LEVELS  # noqa: F401 (re-exported)

#: What a message asks of the TLS it travels under (Destination.demand).
#: REQUIRETLS (RFC 8689 4.2.1): only to a host authenticated by DANE or
#: MTA-STS (or a chosen next hop under verify) that offers REQUIRETLS.
REQUIRETLS = "requiretls"
#: "TLS-Required: No" (RFC 8689 5): DANE and MTA-STS are not enforced.
TLS_OPTIONAL = "tls-optional"

# RFC 8689 6 (RFC 5248's registry): X.7.10, REQUIRETLS support required.
REQUIRETLS_ENHANCED = "5.7.10"


@dataclass(frozen=True)
class HopSecurity:
    """The TLS one hop must have.

    :ivar level: what the client does: ``none``, ``may``, ``encrypt``,
        ``verify`` or ``dane`` (STARTTLS required, the certificate matched
        against ``tlsa``).
    :ivar policy: what chose it, as the delivery log line says:
        ``dane``, ``mta-sts``, ``mta-sts-testing``, ``dane-unusable``
        (TLSA records, none usable: TLS without authentication, RFC 7672
        2.2), or the configured level's name.
    :ivar tlsa: the usable TLSA records when ``level`` is ``dane``.
    :ivar names: the names a DANE-TA certificate may carry (RFC 7672
        3.2.2: the MX host name, and the TLSA base domain when a CNAME
        made it different).
    :ivar authenticated: the host was authenticated beyond its own word:
        DANE, or MTA-STS naming it, or a chosen next hop under verify.
        REQUIRETLS mail goes only to such a host.
    """

    level: str
    policy: str
    tlsa: tuple = ()
    names: tuple = ()
    authenticated: bool = False
    #: The hop carries REQUIRETLS mail: it must offer REQUIRETLS.
    requiretls: bool = False
    #: For TLS-RPT (relaymail.delivery.tls_report): the recipient domain
    #: whose policy this is, and the policy as RFC 8460 4.4 words it (the
    #: TLSA records, or the MTA-STS policy's lines).
    domain: str = ""
    policy_strings: tuple = ()

    @property
    def verifies(self):
        """True when the certificate is checked (so TLS is required)."""
        return self.level in ("verify", "dane", "wrapper")


def configured(level):
    """The HopSecurity of a level set by the configuration alone."""
    return HopSecurity(level, level)


#: What a host under ``dane`` or ``sts`` gets when its domain publishes
#: neither: opportunistic TLS, as without a policy.
OPPORTUNISTIC = HopSecurity("may", "may")


def dane_security(host, tlsa_records, names=(), authenticated=True):
    """The HopSecurity of a host with DNSSEC-validated TLSA records;
    ``authenticated`` is False when the MX answer naming it was not.

    Only DANE-TA and DANE-EE records are usable for SMTP (RFC 7672 3.1.3);
    when every record is of another kind, RFC 7672 2.2 still forbids plain
    text (the domain said it has TLS) but leaves nothing to check.
    """
    usable = tuple(record for record in tlsa_records if record.usable)
    if not usable:
        return HopSecurity("encrypt", "dane-unusable")
    return HopSecurity("dane", "dane", usable, tuple(names) or (host,),
                       authenticated=authenticated,
                       policy_strings=tuple(record.presentation for record in tlsa_records))


def sts_security(policy, host):
    """The HopSecurity MTA-STS gives ``host``, or None when the policy
    rules it out (``enforce`` and the host is not among the policy's MX
    patterns, RFC 8461 4.1).

    :param policy: a :class:`relaymail.delivery.mta_sts.Policy`, or None.
    """
    if policy is None or policy.mode == "none":
        return OPPORTUNISTIC
    if policy.mode == "enforce":
        if not policy.matches(host):
            return None
        return HopSecurity("verify", "mta-sts", authenticated=True,
                           policy_strings=policy.strings())
    # testing (RFC 8461 5): deliver as without a policy, and report.  A
    # host the policy names is still authenticated by it for REQUIRETLS,
    # which then checks its certificate as under enforce.
    return HopSecurity("may", "mta-sts-testing", authenticated=policy.matches(host),
                       policy_strings=policy.strings())


def for_requiretls(security):
    """What a hop must have to carry a REQUIRETLS message, or None when
    it cannot: a host authenticated by DANE or MTA-STS, with its
    certificate checked (RFC 8689 4.2.1)."""
    if not security.authenticated:
        return None
    level = security.level if security.level in ("dane", "wrapper") else "verify"
    return dataclasses.replace(security, level=level, requiretls=True)


def with_demand(destination, envelope):
    """``destination`` (an smtp Destination) as the message in ``envelope``
    (a queue record's dict) needs it: REQUIRETLS mail and mail marked
    "TLS-Required: No" go on connections of their own, opened under the
    TLS they ask for, never shared with other mail."""
    if envelope.get("requiretls"):
        return dataclasses.replace(destination, demand=REQUIRETLS)
    if envelope.get("tls_optional") and destination.kind == "mx":
        # Only DANE and MTA-STS yield to it, and only MX delivery has them.
        return dataclasses.replace(destination, demand=TLS_OPTIONAL)
    return destination
