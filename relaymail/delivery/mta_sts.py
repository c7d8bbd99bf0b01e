"""MTA-STS (RFC 8461): a domain's published promise of verified TLS.

A domain that publishes ``_mta-sts.DOMAIN TXT "v=STSv1; id=..."`` serves
its policy at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.example.net
    max_age: 604800

Under ``enforce`` mail goes only to MX hosts the ``mx`` patterns name,
over TLS with a certificate that verifies for the host's name; under
``testing`` it goes as it would without a policy.

The policy is cached for its ``max_age``, in memory and on disk (one JSON
file per domain under ``QUEUE/mta-sts/``, shared by the delivery workers):
a policy once seen is what stops an attacker who later blocks the HTTPS
fetch or the TXT record from turning it off (RFC 8461 3.3 and 10.2).  The
TXT record's ``id`` says when to fetch again.
"""

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.names import dns
from twisted.web.client import Agent, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relaymail import sanitize
from relaymail.delivery import tls, tls_policy, tls_report
from relaymail.queue.layout import MTA_STS_NAME

log = Logger(namespace="relaymail.delivery")

#: RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600
#: RFC 8461 3.3: "senders SHOULD impose a timeout" and limit the size; 64
#: KiB is the limit RFC 8461 3.2 suggests policy hosts stay under.
BODY_LIMIT = 64 * 1024
#: Seconds for the whole fetch (RFC 8461 3.3 suggests about a minute);
#: a slow policy host delays only this destination's first delivery.
FETCH_TIMEOUT = 60
#: Seconds before a failed fetch is tried again: meanwhile deliveries use
#: the cached policy (or none) without waiting on a host that is down.
RETRY_AFTER = 300

_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
#: RFC 8461 3.1: the record starts with this field ("v=STSv10" does not).
_STS_RECORD = re.compile(r"v=STSv1[ \t]*(;|$)")
_MODES = ("enforce", "testing", "none")


class PolicyError(ValueError):
    """A policy that could not be had: an HTTPS answer that is not one."""


class InvalidPolicy(PolicyError):
    """A policy file that does not follow RFC 8461 3.2."""


@dataclass(frozen=True)
class Policy:
    mode: str
    mx: tuple
    max_age: int
    policy_id: str
    fetched: float

    def matches(self, host):
        """RFC 8461 4.1: ``host`` is named by an ``mx`` pattern, exactly
        or, for ``*.example.com``, by one label before ``example.com``."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            pattern = pattern.rstrip(".").lower()
            if pattern.startswith("*."):
                first, _, rest = host.partition(".")
                if first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def strings(self):
        """The policy as RFC 8460 4.4's ``policy-string``: its lines."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
                f"max_age: {self.max_age}")

    def stale(self, now):
        """Time to fetch it again though its id is unchanged: after half
        its max_age, at most a day (RFC 8461 10.2: a policy refreshed
        before it lapses leaves an attacker no day to strip it)."""
        return now >= self.fetched + min(self.max_age / 2, 86400)

    def fresh(self, now):
        return now < self.fetched + self.max_age

    def __str__(self):
        return f"mode {self.mode}, id {self.policy_id}, mx {', '.join(self.mx)}"


def txt_policy_id(strings):
    """The ``id`` of the one STSv1 TXT record among ``strings`` (each a
    record's text, its strings joined), or None (RFC 8461 3.1: none, or
    more than one, means no policy)."""
    found = [text for text in strings if _STS_RECORD.match(text)]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _TXT_ID.match(policy_id) else None


def parse_policy(text, policy_id, fetched):
    """The :class:`Policy` in a policy file's ``text``.

    :raise InvalidPolicy: naming what is wrong.
    """
    fields, mx = {}, []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise InvalidPolicy(f"line {number} is not 'key: value'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise InvalidPolicy(f"version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in _MODES:
        raise InvalidPolicy(f"mode is {mode!r}, not one of {', '.join(_MODES)}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise InvalidPolicy(f"max_age is {age!r}, not a number of seconds")
    if mode != "none" and not mx:
        raise InvalidPolicy(f"mode {mode} names no mx")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), policy_id, fetched)


class PolicyStore:
    """MTA-STS policies by domain: looked up, fetched and cached.

    :param resolver: a twisted.names resolver (the router's).
    :param reactor: the reactor.
    :param cache_dir: where policies are kept across restarts; None for
        memory only.
    :param port: the HTTPS port of policy hosts (443; tests move it).
    :param ca_file: PEM trust roots for the policy host's certificate,
        None for the platform's (``[delivery] tls_ca_file``).
    :param clock: seconds since the epoch, for tests.
    """

    def __init__(self, resolver, reactor, cache_dir=None, port=443, ca_file=None,
                 clock=time.time, timeout=FETCH_TIMEOUT, tls_report=None):
        self._resolver = resolver
        self._reactor = reactor
        self._cache_dir = cache_dir
        self._port = port
        self._ca_file = ca_file
        self._clock = clock
        self._timeout = timeout
        self._memory = {}
        self._pending = {}
        #: domain -> when a failed fetch may be tried again.
        self._refresh_after = {}
        #: A relaymail.delivery.tls_report.TLSReportRecorder, or None.
        self._tls_report = tls_report

    def policy(self, domain):
        """A Deferred firing with the domain's :class:`Policy`, or None
        when it has none (or only an expired one); never fails: a failed
        lookup or fetch falls back to the cached policy."""
        domain = domain.rstrip(".").lower()
        if domain in self._pending:
            # One lookup per domain at a time, however many deliveries ask.
            waiting = defer.Deferred()
            self._pending[domain].append(waiting)
            return waiting
        self._pending[domain] = []
        result = defer.ensureDeferred(self._policy(domain))

        def done(outcome):
            if isinstance(outcome, Failure):
                # _policy catches what it expects; anything else is a bug,
                # and its waiters must not wait for ever.
                log.failure("MTA-STS: looking up the policy of {domain} failed", outcome,
                            domain=domain)
                outcome = None
            for waiting in self._pending.pop(domain):
                waiting.callback(outcome)
            return outcome
        return result.addBoth(done)

    async def _policy(self, domain):
        now = self._clock()
        cached = self._cached(domain, now)
        try:
            answers, _, _ = await self._resolver.lookupText(f"_mta-sts.{domain}")
            strings = [b"".join(rr.payload.data).decode("ascii", "replace")
                       for rr in answers if rr.type == dns.TXT]
            policy_id = txt_policy_id(strings)
        except Exception as exc:
            # RFC 8461 3.3: a TXT lookup that fails keeps the cached policy.
            log.info("MTA-STS: TXT lookup for _mta-sts.{domain} failed ({error}); {using}",
                     domain=domain, error=_describe(exc),
                     using="using the cached policy" if cached else "no policy")
            return cached
        if policy_id is None:
            # RFC 8461 3.3 and 10.2: a policy still in date applies
            # without its TXT record, or stripping the record would undo it.
            return cached
        if cached is not None and cached.policy_id == policy_id and (
                not cached.stale(now) or now < self._refresh_after.get(domain, 0)):
            return cached
        if cached is None and now < self._refresh_after.get(domain, 0):
            return None             # failed a moment ago: not every delivery waits on it
        try:
            policy = await self._fetch(domain, policy_id, now)
        except Exception as exc:
            log.warn("MTA-STS: policy of {domain} (id {policy_id}) not fetched: {error}; "
                     "{using}", domain=domain, policy_id=policy_id,
                     error=_describe(exc),
                     using="using the cached policy" if cached else "no policy")
            self._report_failure(domain, exc)
            self._refresh_after[domain] = now + RETRY_AFTER
            return cached
        self._refresh_after.pop(domain, None)
        self._remember(domain, policy)
        log.info("MTA-STS: policy of {domain}: {policy}", domain=domain,
                 policy=sanitize.escape(str(policy)))
        return policy

    def _report_failure(self, domain, error):
        """Count a failed fetch for TLS-RPT (RFC 8460 4.3.2.2)."""
        if self._tls_report is None:
            return
        if isinstance(error, InvalidPolicy):
            result = tls_report.STS_POLICY_INVALID
        elif _is_certificate_error(error):
            result = tls_report.STS_WEBPKI_INVALID
        else:
            result = tls_report.STS_POLICY_FETCH_ERROR
        self._tls_report.failure(tls_policy.HopSecurity("may", "mta-sts", domain=domain), result)

    # -- the cache ----------------------------------------------------------

    def _path(self, domain):
        """The cache file of ``domain``, or None for a name the spool
        layout would not accept there (never one from a valid domain)."""
        name = domain + ".json"
        if not MTA_STS_NAME.match(name) or ".." in name:
            return None
        return os.path.join(self._cache_dir, name)

    def _cached(self, domain, now):
        policy = self._memory.get(domain)
        if policy is None and self._cache_dir is not None and self._path(domain):
            policy = self._read(domain)
        if policy is None or not policy.fresh(now):
            return None
        self._memory[domain] = policy
        return policy

    def _read(self, domain):
        try:
            with open(self._path(domain), encoding="utf-8") as file:
                data = json.load(file)
            return Policy(data["mode"], tuple(data["mx"]), int(data["max_age"]),
                          data["policy_id"], float(data["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warn("MTA-STS: ignoring the cached policy {path}: {error}",
                     path=self._path(domain), error=exc)
            return None

    def _remember(self, domain, policy):
        self._memory[domain] = policy
        path = self._path(domain) if self._cache_dir is not None else None
        if path is None:
            return
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self._cache_dir, mode=0o700, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(asdict(policy), file)
            os.replace(temporary, path)
        except OSError as exc:
            log.warn("MTA-STS: cannot keep the policy of {domain} in {path}: {error}",
                     domain=domain, path=path, error=exc)

    # -- the fetch ------------------------------------------------------------

    def _fetch(self, domain, policy_id, now):
        """The policy by HTTPS, the whole fetch (lookup, connection,
        headers and body) bounded by ``timeout``: a policy host that
        trickles its answer must not hold the destination's deliveries."""
        fetching = defer.ensureDeferred(self._fetch_within(domain, policy_id, now))
        return fetching.addTimeout(self._timeout, self._reactor)

    async def _fetch_within(self, domain, policy_id, now):
        host = f"mta-sts.{domain}"
        address = await self._address(host)
        trust = tls.load_trust_roots(self._ca_file) if self._ca_file else platformTrust()
        endpoint_kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = wrapClientTLS(
            optionsForClientTLS(host, trustRoot=trust,
                                extraCertificateOptions={"raiseMinimumTo": tls.MINIMUM_VERSION}),
            endpoint_kind(self._reactor, address, self._port, timeout=self._timeout))
        agent = Agent.usingEndpointFactory(self._reactor, _OneEndpoint(endpoint))
        url = f"https://{host}:{self._port}/.well-known/mta-sts.txt".encode("ascii")
        response = await agent.request(b"GET", url)
        # RFC 8461 3.3: no redirects, 200 only, text/plain.
        if response.code != 200:
            response.deliverBody(tls_report.DiscardBody())
            raise PolicyError(f"HTTPS answered {response.code} {response.phrase!r}")
        media = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if media.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(tls_report.DiscardBody())
            raise PolicyError(f"Content-Type is {media!r}, not text/plain")
        reader = _LimitedBody(BODY_LIMIT)
        response.deliverBody(reader)
        text = await reader.finished
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPolicy("the policy is not UTF-8") from None
        return parse_policy(decoded, policy_id, now)


    async def _address(self, host):
        """An address of the policy host: IPv4 first, then IPv6."""
        for lookup, record_type in ((self._resolver.lookupAddress, dns.A),
                                    (self._resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers, _, _ = await lookup(host)
            except Exception:
                continue
            for rr in answers:
                if rr.type == record_type:
                    family = socket.AF_INET if record_type == dns.A else socket.AF_INET6
                    return socket.inet_ntop(family, rr.payload.address)
        raise PolicyError(f"{host} has no A or AAAA records")


def _is_certificate_error(error):
    """The HTTPS fetch failed on the policy host's certificate (the
    Agent wraps the handshake's failure in ResponseNeverReceived)."""
    reasons = getattr(error, "reasons", None) or []
    for reason in reasons:
        if reason.check(SSL.Error, VerificationError):
            return True
    return isinstance(error, (SSL.Error, VerificationError))


def _describe(error):
    """An exception's text for a log line (twisted.names' errors carry
    bytes that their str() cannot join)."""
    try:
        return sanitize.escape(str(error) or type(error).__name__)
    except Exception:
        return sanitize.escape(repr(error))


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """The endpoint already resolved through the router's resolver, so a
    policy host is found by the same DNS as the MX hosts."""

    def __init__(self, endpoint):
        self._endpoint = endpoint

    def endpointForURI(self, uri):
        return self._endpoint


class _LimitedBody(protocol.Protocol):
    """The body, up to ``limit`` bytes; cancelling ``finished`` (the
    fetch's deadline) drops the connection."""

    def __init__(self, limit):
        self.finished = self._finished = defer.Deferred(canceller=self._cancelled)
        self._limit = limit
        self._data = []
        self._size = 0

    def _cancelled(self, _):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data):
        self._size += len(data)
        if self._size > self._limit:
            if not self._finished.called:
                self._finished.errback(PolicyError(f"the policy is over {self._limit} bytes"))
            self.transport.stopProducing()
            return
        self._data.append(data)

    def connectionLost(self, reason):
        if self._finished.called:
            return
        if reason.check(ResponseDone):
            self._finished.callback(b"".join(self._data))
        else:
            self._finished.errback(PolicyError(f"the policy was cut off: "
                                               f"{reason.getErrorMessage()}"))
