"""Names relaymail's twistd plugin; everything else lives in relaymail.tap."""

from twisted.application.service import ServiceMaker

relaymail = ServiceMaker(
    "relaymail",
    "relaymail.tap",
    "An SMTP mail relay: ESMTP server, plugin policy, durable queue.",
    "relaymail",
)
