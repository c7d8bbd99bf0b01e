"""Session ids: the tag that ties every log line of one SMTP session
together (connect, AUTH, each RCPT, the "queued as" line, disconnect).

Postfix's smtpd has none and admins follow a client by its process id and
address; several sessions of one app server at once, from one address,
cannot be told apart that way.  Eight characters of base32 (40 random
bits) are short enough to read and grep; two sessions share one with odds
of about 1 in 10^12, and the queue id on the queued line is unique anyway.
They differ in look from queue ids (16 characters, relaymail.queue.queue_id).
"""

import base64
import os


def new_session_id():
    return base64.b32encode(os.urandom(5)).decode("ascii")
