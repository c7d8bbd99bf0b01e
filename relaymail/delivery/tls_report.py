"""SMTP TLS Reporting (RFC 8460): what DANE and MTA-STS sessions gave, told
to the domains that ask.

Counting.  Every session towards an MX host held to a domain's DANE or
MTA-STS policy ends as one success or one failure with an RFC 8460 4.3
result type.  Each delivery process counts in memory, per UTC day and
policy, and writes its counts to ``QUEUE/tls-rpt/DAY.PID.json`` every
minute and when it stops (so a crash loses at most a minute).

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
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.names import dns
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from relaymail import sanitize
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

_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})\.\d+\.json\Z")


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
        self._pid = pid if pid is not None else os.getpid()
        # day -> (policy-type, domain, policy-string tuple) -> counts
        self._days = {}
        self._dirty = set()

    def _entry(self, security):
        kind = policy_type(security.policy)
        day = self._days.setdefault(_day_of(self._clock()), {})
        key = (kind, security.domain, tuple(security.policy_strings))
        self._dirty.add(_day_of(self._clock()))
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
            self._write(day, self._days.get(day, {}))
        self._dirty.clear()
        for day in [d for d in self._days if d < today]:
            del self._days[day]

    def _write(self, day, policies):
        path = os.path.join(self.directory, f"{day}.{self._pid}.json")
        data = [{"policy-type": kind, "policy-domain": domain, "policy-string": list(strings),
                 "mx-host": sorted(entry["mx"]), "success": entry["success"],
                 "failures": [{"result-type": result, "receiving-mx-hostname": mx,
                               "receiving-ip": ip, "count": count}
                              for (result, mx, ip), count in sorted(entry["failures"].items())]}
                for (kind, domain, strings), entry in sorted(policies.items())]
        temporary = f"{path}.tmp"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(data, file)
            os.replace(temporary, path)
        except OSError as exc:
            log.warn("TLS-RPT: cannot write {path}: {error}", path=path, error=exc)


def rua_targets(strings):
    """The ``rua`` URIs of the one TLSRPTv1 TXT record among ``strings``,
    or [] (RFC 8460 3: none, or several, means no reports)."""
    found = [text for text in strings if text.startswith("v=TLSRPTv1")]
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
            policy["failure-details"] = [
                {"result-type": result, "receiving-mx-hostname": mx, "receiving-ip": ip,
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
                                                     report["report-id"].split("_")[0]
                                                     .replace(":", "")))
    message.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; '
                                           f'boundary="{message.get_boundary()}"')
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return self._sending

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
        """Send every due day's reports, then remove its files."""
        for day, paths in self.due_days().items():
            by_domain = {}
            for key, entry in merged(paths).items():
                by_domain.setdefault(key[1], {})[key] = entry
            for domain, policies in sorted(by_domain.items()):
                await self._send(day, domain, policies)
            for path in paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def _send(self, day, domain, policies):
        try:
            answers, _, _ = await self._resolver.lookupText(f"_smtp._tls.{domain}")
        except Exception:
            return                  # no record, no report
        strings = [b"".join(rr.payload.data).decode("ascii", "replace")
                   for rr in answers if rr.type == dns.TXT]
        targets = rua_targets(strings)
        if not targets:
            return
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

    async def _mail(self, report, gzipped, target):
        address = urllib.parse.unquote(target[len("mailto:"):].split("?", 1)[0])
        if "@" not in address or any(c in address for c in "<>\r\n \t,"):
            raise ValueError(f"not an address: {address!r}")
        message = report_message(report, gzipped, self.organization, self.contact, address,
                                 self._clock())
        envelope = Envelope(sender=self.contact, recipients=[address], tls_optional=True)
        await self._queue_message(envelope, message)

    async def _post(self, gzipped, target):
        agent = self._agent or Agent(self._reactor)
        response = await agent.request(
            b"POST", target.encode("ascii"),
            Headers({b"content-type": [b"application/tlsrpt+gzip"]}),
            FileBodyProducer(io.BytesIO(gzipped)))
        await readBody(response)
        if not 200 <= response.code < 300:
            raise ValueError(f"HTTPS answered {response.code}")
