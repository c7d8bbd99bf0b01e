"""A site transport: POST each message to a web hook (an example to copy).

Enable it as a site would, from this directory::

    [plugins]
    path = /etc/relaymail/plugins
    transports = webhook
    routers = webhook          ; optional: route the domains below to it

    [plugin:webhook]
    url = https://hooks.example.net/mail
    timeout = 30
    domains = tickets.example.com, .support.example.com

Each delivery is one request: ``POST url`` with the message exactly as
queued as the body (``Content-Type: message/rfc822``, CRLF line ends, its
length known in advance), and the envelope in header fields, so that the
server needs no MIME or JSON parser to store the message as it is:

``X-Relaymail-Queue-Id``   the queue id
``X-Relaymail-Sender``     the envelope sender (empty for ``<>``)
``X-Relaymail-Recipient``  one field per recipient of this delivery

Addresses are UTF-8, percent-encoded (RFC 3986) where they hold anything
but the printable ASCII an address is usually made of, since a header
field value is not the place for raw 8-bit text.

The server's answer is every recipient's outcome: 2xx delivered; 429 (RFC
6585: too many requests) and 5xx deferred, to be tried again later; any
other 4xx bounced (5.0.0, the status in the reason); a connection that
fails or a server that does not answer within ``timeout`` seconds
deferred (4.4.1).  Redirects are not followed (they are a setting to fix):
deferred.

As a router (``[plugins] routers = webhook``) it sends the recipients of
``domains`` (a domain, or ``.domain`` for its subdomains; U-labels or
A-labels alike) to itself and has no opinion on others.
"""

from urllib.parse import quote, urlsplit

from twisted.internet import defer, protocol, task
from twisted.plugin import IPlugin
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from relaymail.address import AddressError
from relaymail.interfaces import (
    IPluginFactory, IRouter, ITransport, RecipientOutcome, Route)
from relaymail.plugins.static import domain_key

#: Characters left as they are in an address header value.
_SAFE = "@!#$&'*+-/=?^_`{|}~.%"
#: How much of the server's answer is read for the reason.
_REASON_BYTES = 512


@implementer(ITransport, IRouter)
class WebHook:
    name = "webhook"
    description = "POSTs each message to [plugin:webhook] url"

    def __init__(self, url, timeout, domains, reactor=None):
        self.url = url
        self.timeout = timeout
        self.domains = domains
        self._reactor = reactor

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    # -- IRouter ------------------------------------------------------------

    def route(self, recipient, context):
        domain = recipient.domain_key
        if domain in self.domains or any(
                key.startswith(".") and domain.endswith(key) for key in self.domains):
            return Route(self.name)
        return None

    # -- ITransport ---------------------------------------------------------

    def deliver(self, message, recipients, next_hop):
        recipients = list(recipients)
        d = defer.ensureDeferred(self._post(message, recipients))
        # Whatever the cancelled request failed with, a timeout is a timeout.
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=lambda _, timeout: (
            RecipientOutcome.deferred(f"webhook {self.url}: no answer within {timeout:g}s",
                                      "4.4.1")))

        def failed(failure):
            return RecipientOutcome.deferred(f"webhook {self.url}: {_why(failure.value)}",
                                             "4.4.1")
        d.addErrback(failed)
        return d.addCallback(lambda outcome: {r: outcome for r in recipients})

    async def _post(self, message, recipients):
        headers = Headers({
            b"Content-Type": [b"message/rfc822"],
            b"User-Agent": [b"relaymail-webhook"],
            b"X-Relaymail-Queue-Id": [message.queue_id.encode("ascii")],
            b"X-Relaymail-Sender": [_quoted(message.sender)],
            b"X-Relaymail-Recipient": [_quoted(r) for r in recipients],
        })
        # open() reads the spool: a thread, as it may block on the disk.
        from twisted.internet import threads
        body = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                               message.open)
        try:
            producer = _Body(body, message.size)
            agent = Agent(self.reactor, connectTimeout=self.timeout)
            response = await agent.request(b"POST", self.url.encode("ascii"), headers, producer)
            said = await _first_line(response)
        finally:
            body.close()
        code = response.code
        reason = f"webhook {self.url} said {code} {response.phrase.decode('latin-1')}"
        if said:
            reason += f": {said}"
        if 200 <= code < 300:
            return RecipientOutcome.delivered(reason)
        if code == 429 or code >= 500 or code < 400:
            return RecipientOutcome.deferred(reason, "4.0.0")
        return RecipientOutcome.bounced(reason, "5.0.0")


@implementer(IBodyProducer)
class _Body:
    """The message file as a request body of known length (a Content-Length,
    not chunks), read a piece at a time as the connection takes it."""

    def __init__(self, file, length):
        self._file = file
        self.length = length
        self._task = None

    def startProducing(self, consumer):
        self._task = task.cooperate(self._chunks(consumer))
        return self._task.whenDone().addCallback(lambda _: None)

    def _chunks(self, consumer):
        while True:
            chunk = self._file.read(64 * 1024)
            if not chunk:
                return
            consumer.write(chunk)
            yield None

    # The request may pause, resume or stop a body already sent in full.
    def pauseProducing(self):
        self._on_task("pause")

    def resumeProducing(self):
        self._on_task("resume")

    def stopProducing(self):
        self._on_task("stop")

    def _on_task(self, action):
        try:
            getattr(self._task, action)()
        except (task.TaskDone, task.TaskStopped, task.TaskFailed, task.TaskFinished):
            pass


class _FirstBytes(protocol.Protocol):
    def __init__(self, done):
        self._done = done
        self._data = b""

    def dataReceived(self, data):
        self._data += data
        if len(self._data) >= _REASON_BYTES:
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if not self._done.called:
            self._done.callback(self._data[:_REASON_BYTES])


async def _first_line(response):
    done = defer.Deferred()
    response.deliverBody(_FirstBytes(done))
    data = await done
    for line in data.decode("utf-8", "replace").splitlines():
        line = "".join(char if char.isprintable() else "?" for char in line).strip()
        if line:
            return line[:200]
    return ""


def _quoted(address):
    return quote(str(address) if address is not None else "", safe=_SAFE).encode("ascii")


def _why(exc):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@implementer(IPlugin, IPluginFactory)
class WebHookFactory:
    name = "webhook"

    def build(self, context):
        options = dict(context.options)
        for key in options:
            if key not in ("url", "timeout", "domains"):
                raise context.config_error(key, "unknown option; [plugin:webhook] takes "
                                                "url, timeout, domains")
        url = options.get("url", "").strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise context.config_error("url", f"expected an http:// or https:// URL, got {url!r}")
        try:
            timeout = float(options.get("timeout", "30"))
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise context.config_error(
                "timeout", f"expected seconds (e.g. 30), got {options['timeout']!r}") from None
        domains = set()
        for written in options.get("domains", "").replace(",", " ").split():
            dot = "." if written.startswith(".") else ""
            try:
                # The form a recipient's domain_key has (lower case,
                # A-labels): "bücher.example" must match what it becomes.
                domains.add(dot + domain_key(written[len(dot):].lower()))
            except AddressError as exc:
                raise context.config_error("domains", f"not a domain: {written!r}: {exc}") from None
        return WebHook(url, timeout, frozenset(domains))


webhook = WebHookFactory()
