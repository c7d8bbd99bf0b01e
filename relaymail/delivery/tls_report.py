"""SMTP TLS Reporting (RFC 8460): what DANE and MTA-STS sessions gave, told
to the domains that ask.

Counting.  Every session towards an MX host held to a domain's DANE or
MTA-STS policy ends as one success or one failure with an RFC 8460 4.3
result type.  Each delivery process counts in memory, per UTC day and
policy, and writes its counts to ``QUEUE/tls-rpt/DAY.TOKEN.json`` (TOKEN:
its pid and when it began) every minute and when it stops (so a crash
loses at most a minute).

Reporting.  Once a day is over (and ten minutes more, for every process to
have written it), one process -- whichever holds ``QUEUE/tls-rpt/lock`` --
adds up that day's files, looks up each policy domain's
``_smtp._tls.DOMAIN TXT "v=TLSRPTv1; rua=..."`` and sends it its report:
by mail through our own queue for ``mailto:`` (a ``multipart/report;
report-type="tlsrpt"`` message with the gzipped JSON, marked
``TLS-Required: No`` as RFC 8689 5 asks of such reports), by HTTPS POST
for ``https:``.  Then the day's files are removed.  A domain without the
record gets nothing.  Off by default: ``[delivery] tls_report``.
"""

import datetime
import fcntl
import gzip
import io
import json
import os
import re
import time
import urllib.parse
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from relaymail import sanitize
from relaymail.config import domain as config_domain
from relaymail.envelope import Envelope
from relaymail.queue.layout import TLS_REPORT_LOCK

log = Logger(namespace="relaymail.delivery")

#: RFC 8460 4.3: the result types of a failed session.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

#: Seconds between writes of the counts; and after a day ends, how long
#: before its files are read (every process has written them by then).
FLUSH_INTERVAL = 60
REPORT_DELAY = 600
#: At most this many rua destinations per domain are sent to: the record
#: is the domain's, the mail is ours.
MAX_RUA = 5
#: Seconds one HTTPS report may take, connection to answer.
SEND_TIMEOUT = 60
#: Days a report whose record could not be looked up is kept and tried again.
RETRY_DAYS = 3

_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})\.\d+\.json\Z")
#: RFC 8460 3: the record starts with this field ("v=TLSRPTv10" does not).
_TLSRPT_RECORD = re.compile(r"v=TLSRPTv1[ \t]*(;|$)")


def policy_type(security_policy):
    """RFC 8460 4.4 ``policy-type`` of a HopSecurity's policy, or None for
    sessions that are not reported (no DANE or MTA-STS policy)."""
    if security_policy == "dane":
        return "tlsa"
    if security_policy in ("mta-sts", "mta-sts-testing"):
        return "sts"
    return None


def classify(text):
    """The RFC 8460 result type for a TLS failure's text (as the client
    words them: relaymail.delivery.tls.describe_failure and OutboundSession)."""
    lowered = text.lower()
    if "not offered" in lowered or "refused to start tls" in lowered:
        return STARTTLS_NOT_SUPPORTED
    if "does not match the host name" in lowered or "names none of" in lowered:
        return CERTIFICATE_HOST_MISMATCH
    if "expired" in lowered:
        return CERTIFICATE_EXPIRED
    if "verification failed" in lowered or "untrusted" in lowered:
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


def _day_of(now):
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date().isoformat()


class TLSReportRecorder:
    """This process's session counts, written under ``directory``.

    :param clock: seconds since the epoch.
    """

    def __init__(self, directory, clock=time.time, pid=None):
        self.directory = directory
        self._clock = clock
        pid = pid if pid is not None else os.getpid()
        # The pid and when this process began: a pid used again later the
        # same day (a container's small pids) must not overwrite the file
        # of the process that had it before.  Digits only, as the layout's
        # name pattern says.
        self.token = f"{pid}{int(clock() * 1000) % 10**9:09d}"
        # day -> (policy-type, domain, policy-string tuple) -> counts
        self._days = {}
        self._dirty = set()

    def _entry(self, security):
        kind = policy_type(security.policy)
        today = _day_of(self._clock())
        day = self._days.setdefault(today, {})
        key = (kind, security.domain, tuple(security.policy_strings))
        self._dirty.add(today)
        return day.setdefault(key, {"mx": set(), "success": 0, "failures": {}})

    def reported(self, security):
        """True when sessions under ``security`` (a HopSecurity) count."""
        return (security is not None and bool(security.domain)
                and policy_type(security.policy) is not None)

    def success(self, security, mx_host):
        if not self.reported(security):
            return
        entry = self._entry(security)
        entry["mx"].add(mx_host)
        entry["success"] += 1

    def failure(self, security, result_type, mx_host=None, receiving_ip=None):
        if not self.reported(security):
            return
        entry = self._entry(security)
        if mx_host:
            entry["mx"].add(mx_host)
        key = (result_type, mx_host or "", receiving_ip or "")
        entry["failures"][key] = entry["failures"].get(key, 0) + 1

    def flush(self):
        """Write the counts of every day that changed; forget days before
        today once written.  Blocking, but small and once a minute."""
        today = _day_of(self._clock())
        for day in sorted(self._dirty):
            if write_counts(os.path.join(self.directory, f"{day}.{self.token}.json"),
                            self._days.get(day, {})):
                self._dirty.discard(day)
        # A day is forgotten only once it is written: a failed write is
        # tried again at the next flush.
        for day in [d for d in self._days if d < today and d not in self._dirty]:
            del self._days[day]


def write_counts(path, policies):
    """Write ``policies`` (as the recorder keeps them) to ``path``,
    atomically; True when it was written."""
    data = [{"policy-type": kind, "policy-domain": domain, "policy-string": list(strings),
             "mx-host": sorted(entry["mx"]), "success": entry["success"],
             "failures": [{"result-type": result, "receiving-mx-hostname": mx,
                           "receiving-ip": ip, "count": count}
                          for (result, mx, ip), count in sorted(entry["failures"].items())]}
            for (kind, domain, strings), entry in sorted(policies.items())]
    temporary = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file)
        os.replace(temporary, path)
    except OSError as exc:
        log.warn("TLS-RPT: cannot write {path}: {error}", path=path, error=exc)
        return False
    return True


def rua_targets(strings):
    """The ``rua`` URIs of the one TLSRPTv1 TXT record among ``strings``,
    or [] (RFC 8460 3: none, or several, means no reports)."""
    found = [text for text in strings if _TLSRPT_RECORD.match(text)]
    if len(found) != 1:
        return []
    fields = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    targets = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip()
        scheme = uri.split(":", 1)[0].lower()
        if scheme in ("mailto", "https") and uri not in targets:
            targets.append(uri)
    return targets[:MAX_RUA]


def merged(paths):
    """The policies of a day's files, added up:
    {(type, domain, strings): {"mx": set, "success": n, "failures": {key: n}}}."""
    total = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                policies = json.load(file)
            for policy in policies:
                key = (policy["policy-type"], policy["policy-domain"],
                       tuple(policy["policy-string"]))
                entry = total.setdefault(key, {"mx": set(), "success": 0, "failures": {}})
                entry["mx"].update(policy["mx-host"])
                entry["success"] += int(policy["success"])
                for failure in policy["failures"]:
                    fkey = (failure["result-type"], failure["receiving-mx-hostname"],
                            failure["receiving-ip"])
                    entry["failures"][fkey] = entry["failures"].get(fkey, 0) + int(failure["count"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warn("TLS-RPT: ignoring {path}: {error}", path=path, error=exc)
    return total


def build_report(day, domain, policies, organization, contact):
    """The RFC 8460 4.4 JSON report (a dict) for ``domain`` on ``day``."""
    start = f"{day}T00:00:00Z"
    report = {
        "organization-name": organization,
        "date-range": {"start-datetime": start, "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": f"{start}_{domain}",
        "policies": [],
    }
    for (kind, _domain, strings), entry in sorted(policies.items()):
        failures = entry["failures"]
        policy = {
            "policy": {"policy-type": kind, "policy-string": list(strings),
                       "policy-domain": domain, "mx-host": sorted(entry["mx"])},
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": sum(failures.values())},
        }
        if failures:
            # Fields not known (a policy fetch fails before any host is
            # chosen) are left out, not given empty.
            policy["failure-details"] = [
                {"result-type": result,
                 **({"receiving-mx-hostname": mx} if mx else {}),
                 **({"receiving-ip": ip} if ip else {}),
                 "failed-session-count": count}
                for (result, mx, ip), count in sorted(failures.items())]
        report["policies"].append(policy)
    return report


def report_file_name(organization, domain, day, unique):
    """RFC 8460 5.1: ``sender!policy-domain!begin!end!unique.json.gz``."""
    begin = int(datetime.datetime.fromisoformat(day).replace(
        tzinfo=datetime.timezone.utc).timestamp())
    return f"{organization}!{domain}!{begin}!{begin + 86399}!{unique}.json.gz"


def report_message(report, gzipped, organization, contact, recipient, now):
    """The RFC 8460 5.3 mail carrying ``gzipped``: bytes, CRLF."""
    domain = report["policies"][0]["policy"]["policy-domain"] if report["policies"] else ""
    message = EmailMessage()
    message["From"] = contact
    message["To"] = recipient
    message["Date"] = formatdate(now, usegmt=True)
    message["Message-ID"] = make_msgid(domain=organization)
    message["Subject"] = (f"Report Domain: {domain} Submitter: {organization} "
                          f"Report-ID: <{report['report-id']}>")
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = organization
    message["TLS-Required"] = "No"
    message.set_content(f"This is an aggregate TLS report (RFC 8460) from {organization} "
                        f"for {domain}.\n")
    message.add_attachment(gzipped, maintype="application", subtype="tlsrpt+gzip",
                           filename=report_file_name(organization, domain,
                                                     report["date-range"]["start-datetime"][:10],
                                                     "1"))
    # multipart/mixed made by add_attachment becomes multipart/report; the
    # generator picks a boundary that the parts do not contain.
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


class TLSReporter(service.Service):
    """Flushes the recorder every minute and, in the process holding the
    lock, sends the reports of days that are over.

    :param queue_message: ``(envelope, message bytes) -> Deferred`` that
        commits a message to the queue (the scheduler's).
    :param resolver: a twisted.names resolver for ``_smtp._tls`` records.
    """

    def __init__(self, recorder, reactor, resolver, queue_message, organization, contact,
                 clock=time.time, agent=None):
        self.recorder = recorder
        self._reactor = reactor
        self._resolver = resolver
        self._queue_message = queue_message
        self.organization = organization
        self.contact = contact
        self._clock = clock
        self._agent = agent
        self._loop = None
        self._lock_fd = None
        self._sending = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self._reactor
        self._loop.start(FLUSH_INTERVAL, now=False).addErrback(
            lambda failure: log.failure("TLS-RPT: the reporting loop stopped", failure))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.recorder.flush()
        if self._sending is None:
            self._release_lock()
            return None
        # The lock is let go only once sending is over: released earlier,
        # another process would send the same day's files again.  Every
        # send has a deadline (SEND_TIMEOUT), so a stop waits that long at most.
        return self._sending.addBoth(lambda _: self._release_lock())

    def _release_lock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def tick(self):
        """One minute's work: write the counts; send what is due."""
        self.recorder.flush()
        if self._sending is None and self._holds_lock():
            self._sending = defer.ensureDeferred(self.send_due())

            def done(result):
                self._sending = None
                return result
            self._sending.addErrback(lambda failure: log.failure("TLS-RPT: sending failed",
                                                                 failure)).addBoth(done)
        return None

    def _holds_lock(self):
        if self._lock_fd is not None:
            return True
        path = os.path.join(self.recorder.directory, TLS_REPORT_LOCK)
        try:
            os.makedirs(self.recorder.directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def due_days(self):
        """The days whose files may be read now, oldest first."""
        cutoff = _day_of(self._clock() - REPORT_DELAY)
        try:
            names = os.listdir(self.recorder.directory)
        except FileNotFoundError:
            return {}
        days = {}
        for name in names:
            found = _DAY.match(name)
            if found and found.group(1) < cutoff:
                days.setdefault(found.group(1), []).append(
                    os.path.join(self.recorder.directory, name))
        return dict(sorted(days.items()))

    async def send_due(self):
        """Send every due day's reports, then remove its files; a domain
        whose record could not be looked up (a timeout, SERVFAIL) is kept
        for the next tick, for up to RETRY_DAYS."""
        for day, paths in self.due_days().items():
            by_domain = {}
            for key, entry in merged(paths).items():
                by_domain.setdefault(key[1], {})[key] = entry
            left = {}
            for domain, policies in sorted(by_domain.items()):
                if not await self._send(day, domain, policies):
                    left.update(policies)
            if left and day >= _day_of(self._clock() - RETRY_DAYS * 86400):
                # Written before the old files go, under a name of our own.
                if not write_counts(os.path.join(self.recorder.directory,
                                                 f"{day}.{self.recorder.token}.json"), left):
                    continue
            for path in paths:
                if os.path.basename(path).startswith(f"{day}.{self.recorder.token}."):
                    if left:
                        continue        # the file just written
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warn("TLS-RPT: cannot remove {path}: {error}", path=path, error=exc)

    async def _send(self, day, domain, policies):
        """Send ``domain`` its report; False when it should be tried again."""
        try:
            answers, _, _ = await self._resolver.lookupText(f"_smtp._tls.{domain}")
        except (DNSNameError, AuthoritativeDomainError):
            return True             # NXDOMAIN, or no TXT: no record, no report
        except Exception as exc:
            log.info("TLS-RPT: _smtp._tls.{domain} not looked up ({error}); tried again later",
                     domain=domain, error=sanitize.escape(str(exc) or type(exc).__name__))
            return False
        strings = [b"".join(rr.payload.data).decode("ascii", "replace")
                   for rr in answers if rr.type == dns.TXT]
        targets = rua_targets(strings)
        if not targets:
            return True
        report = build_report(day, domain, policies, self.organization, self.contact)
        gzipped = gzip.compress(json.dumps(report).encode("utf-8"), mtime=0)
        for target in targets:
            try:
                if target.lower().startswith("mailto:"):
                    await self._mail(report, gzipped, target)
                else:
                    await self._post(gzipped, target)
            except Exception as exc:
                log.warn("TLS-RPT: report for {domain} ({day}) to {target} not sent: {error}",
                         domain=domain, day=day, target=sanitize.escape(target),
                         error=sanitize.escape(str(exc) or type(exc).__name__))
                continue
            log.info("TLS-RPT: report for {domain} ({day}) sent to {target}", domain=domain,
                     day=day, target=sanitize.escape(target))
        return True

    async def _mail(self, report, gzipped, target):
        address = urllib.parse.unquote(target[len("mailto:"):].split("?", 1)[0])
        local, at, domain_part = address.rpartition("@")
        if (not at or not local or domain_part.startswith("[")
                or not all("!" <= c <= "~" for c in local) or any(c in local for c in '<>"\\')):
            # No address literal: the domain's record must not point our
            # relay at an internal host by number.
            raise ValueError(f"not a mailbox at a domain: {address!r}")
        address = f"{local}@{config_domain(domain_part)}"
        message = report_message(report, gzipped, self.organization, self.contact, address,
                                 self._clock())
        envelope = Envelope(sender=self.contact, recipients=[address], tls_optional=True)
        await self._queue_message(envelope, message)

    def _post(self, gzipped, target):
        """POST the report; one deadline over connecting, sending and the
        answer, whose body is read only to its first BODY_LIMIT bytes."""
        posting = defer.ensureDeferred(self._post_within(gzipped, target))
        return posting.addTimeout(SEND_TIMEOUT, self._reactor)

    async def _post_within(self, gzipped, target):
        agent = self._agent or Agent(self._reactor, connectTimeout=SEND_TIMEOUT)
        response = await agent.request(
            b"POST", target.encode("ascii"),
            Headers({b"content-type": [b"application/tlsrpt+gzip"]}),
            FileBodyProducer(io.BytesIO(gzipped)))
        response.deliverBody(DiscardBody())
        if not 200 <= response.code < 300:
            raise ValueError(f"HTTPS answered {response.code}")


class DiscardBody(protocol.Protocol):
    """An HTTP answer's body, not read: the connection is dropped at its
    first bytes (a hostile server may send without end)."""

    def dataReceived(self, data):
        self.transport.stopProducing()

    def connectionLost(self, reason):
        pass
