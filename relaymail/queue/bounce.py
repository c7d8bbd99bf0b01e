"""Delivery status notifications: the bounce we send back to a sender.

A DSN is an RFC 6522 ``multipart/report`` with three parts: a note in
plain words for the person who sent the message, the RFC 3464
machine-readable report (``message/delivery-status``), and the header
section of the original message (``text/rfc822-headers``).  For a
message that came in with SMTPUTF8 the last two are the RFC 6533 types
``message/global-delivery-status`` and ``message/global-headers``, which
may carry UTF-8; otherwise the whole notification is 7-bit ASCII.

The message is put together by hand rather than with the ``email``
package's generator so that every byte is known: CRLF line ends, no line
of 998 octets or more (RFC 5322 2.1.1), and the original header section
passed on exactly as it was received whenever that is legal.

A bounce is never bounced (RFC 5321 4.5.5 and 6.1): when a message from
the null sender ``<>`` cannot be delivered, the notice goes to the
postmaster instead (a "double bounce", Postfix's 2bounce), worded for
the postmaster; the scheduler makes sure that happens at most once.

Only the header section of the original is read, and only up to
:data:`HEADER_SECTION_LIMIT` bytes, unless the sender asked ``RET=FULL``
(RFC 3461 4.3) and the message is a failure's and no bigger than
:data:`RETURN_LIMIT`: then the whole message is returned.  Otherwise the
body is never returned: RFC 6522 lets the third part be the header section
alone, that is enough for the sender to recognise the message, and it
keeps the relay from reflecting large messages at a forged sender.

The same message carries success notices (``delivered``, ``relayed``,
``expanded``) for recipients that asked ``NOTIFY=SUCCESS``, with the
header section returned; ``ENVID`` and ``ORCPT`` appear as the report's
Original-Envelope-Id and Original-Recipient fields (RFC 3464 2.2.1,
2.3.1).
"""

import re
import secrets
import textwrap
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from email.utils import format_datetime

from relaymail import dsn, quoted_printable, sanitize
from relaymail.envelope import Envelope
from relaymail.folding import fold
from relaymail.queue.queue_file import open_message

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
#: The RFC 3464 2.3.3 actions: a bounce reports the first two; the others
#: are success notices, sent for NOTIFY=SUCCESS (RFC 3461 6.2).
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)
SUCCESS_ACTIONS = (DELIVERED, RELAYED, EXPANDED)

#: The most of the original returned whole for RET=FULL (RFC 3461 4.3);
#: a bigger one comes back as its header section, as Postfix's
#: bounce_size_limit (50000) has it.
RETURN_LIMIT = 50000

#: Most of the original header section returned.  RFC 6522 sets no
#: size; 64 KiB holds any honest header section many times over.
HEADER_SECTION_LIMIT = 64 * 1024

#: Who the notification says it is from (the local part is the
#: traditional name of a mail system's own mailbox).
SENDER_LOCAL_PART = "MAILER-DAEMON"
SENDER_DISPLAY_NAME = "Mail Delivery System"

#: The field that marks a double bounce in its header, for the relays it
#: passes through: a relay that cannot deliver a message from ``<>``
#: carrying it discards the message (with a log line) instead of sending a
#: double bounce of its own.  The record's ``double_bounce`` flag says the
#: same only on the relay that wrote the notice; without the field, two
#: relays that name each other as next hop would each answer the other's
#: failed double bounce with a new one, for ever.
DOUBLE_BOUNCE_FIELD = "X-Relaymail-Double-Bounce"

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_DOUBLE = "Undeliverable Mail Notification (Postmaster Copy)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"

# RFC 3463 section 2: class "." subject "." detail, the last two of one to
# three digits; 2.X.X is success, which only a success notice reports.
_STATUS = re.compile(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_SUCCESS_STATUS = re.compile(r"2\.[0-9]{1,3}\.[0-9]{1,3}\Z")

# The longest line passed on as it is: under the 998 octets (before CRLF)
# of RFC 5322 2.1.1.  Our own fields are folded to 78 where a space allows
# (relaymail.folding), and a word is cut rather than pass _MAX_LINE.
_MAX_LINE = 997
_TEXT_WIDTH = 72

# Plain words for the commonest RFC 3463 codes, by "subject.detail"
# (RFC 3463 section 3), for the part a person reads.
_DETAIL_REASONS = {
    "1.1": "the recipient's mailbox does not exist",
    "1.2": "the recipient's domain does not exist or takes no mail",
    "1.3": "the recipient's address is not valid",
    "1.6": "the recipient has moved and left no forwarding address",
    "2.1": "the recipient's mailbox is disabled",
    "2.2": "the recipient's mailbox is full",
    "2.3": "the message is larger than the recipient accepts",
    "3.4": "the message is too big for the receiving system",
    "4.1": "the recipient's mail server did not answer",
    "4.2": "the connection to the recipient's mail server broke off",
    "4.4": "no way to reach the recipient's mail server was found",
    "4.7": "the message could not be delivered in the time allowed",
    "5.3": "the message had too many recipients",
    "6.3": "the next mail server cannot take the message's 8-bit or binary "
           "content, and the message could not be converted",
    "6.7": "the next mail server cannot take non-ASCII addresses or header "
           "fields (it lacks SMTPUTF8)",
    "7.1": "the receiving system refused the message",
}
# ... and, failing those, by subject alone (RFC 3463 section 3.1 to 3.8).
_SUBJECT_REASONS = {
    "0": "an unspecified problem",
    "1": "a problem with the address",
    "2": "a problem with the recipient's mailbox",
    "3": "a problem with the receiving mail system",
    "4": "a network or routing problem",
    "5": "a problem in the mail protocol",
    "6": "a problem with the message content",
    "7": "a security or policy problem",
}


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient to report on, as delivery saw it last."""

    #: The envelope recipient as queued.
    address: str
    #: ``"failed"`` or ``"delayed"`` (RFC 3464 2.3.3).
    action: str
    #: The RFC 3463 enhanced status code, e.g. ``"5.1.1"``.
    status: str
    #: The remote reply, e.g. ``"550 5.1.1 User unknown"``; ``None`` when
    #: there was none (no connection, no MX, expired in the queue).
    diagnostic: "str | None"
    #: The host name of the server that gave ``diagnostic``, or ``None``.
    remote_mta: "str | None"
    #: Seconds since the epoch of the last attempt, or ``None``.
    last_attempt: "float | None"
    #: What ``diagnostic`` is (RFC 3464 2.3.6): ``smtp`` for a server's
    #: reply, ``x-unix`` for a command's exit (as Postfix's pipe(8) reports
    #: it), ``x-relaymail`` for a site transport's own words.
    diagnostic_type: str = "smtp"
    #: The recipient's ORCPT (``rfc822;xtext``, relaymail.dsn), or None:
    #: reported as Original-Recipient (RFC 3464 2.3.1).
    orcpt: "str | None" = None


def build_dsn(record, message_path, recipients, reporting_mta, now, *,
              retry_until=None, header_limit=HEADER_SECTION_LIMIT, postmaster=None):
    """Return ``(envelope, message)``: a DSN about ``recipients``, ready
    to be queued like any other message.

    :param record: the queue record of the original message (see
        :mod:`relaymail.queue.record`).
    :param message_path: the original message file; only its header
        section is read.
    :param recipients: a non-empty list of :class:`FailedRecipient`.
        The subject says "undelivered" if any of them failed, "delayed"
        if all of them are only delayed.
    :param reporting_mta: our host name, used in ``From:``,
        ``Message-ID:`` and ``Reporting-MTA:``.
    :param now: the time of the notification, in seconds since the epoch.
    :param retry_until: when delayed recipients will be given up on, in
        seconds since the epoch (``created_at`` plus the queue lifetime);
        reported as ``Will-Retry-Until:`` and in the note.
    :param header_limit: the most bytes of the original header section
        to return; a longer one is cut after its last whole field.
    :param postmaster: for a double bounce, the postmaster's address: the
        notice goes there instead of to the original sender, and says why.
    :return: an :class:`~relaymail.envelope.Envelope` from the null sender
        ``<>`` to the original sender (or ``postmaster``), and the message
        bytes (CRLF).
    :raise ValueError: when the original has the null sender and no
        ``postmaster`` is given (a bounce is never bounced: RFC 5321
        4.5.5), when there are
        no recipients, one with an action other than failed or delayed or
        an address that cannot go in a header, or when ``reporting_mta``
        is not a host name.  A status that is not an RFC 3463 failure code
        is reported as 5.0.0 or 4.0.0 instead of refused.
    :raise OSError: when the original message file cannot be read.
    """
    if not reporting_mta or not all("!" <= char <= "~" for char in reporting_mta):
        raise ValueError(f"bad reporting MTA name {reporting_mta!r}")
    original = record["envelope"]
    sender = original.get("sender") or ""
    if not sender and postmaster is None:
        raise ValueError("no DSN for a message from the null sender <>")
    to = postmaster if postmaster is not None else sender
    _check_recipients(recipients)
    recipients = [_with_valid_status(entry) for entry in recipients]
    addresses = [to] + [entry.address for entry in recipients]
    for address in addresses:
        _check_address(address)
    # The original's SMTPUTF8 flag decides, but an address that is not
    # ASCII can only be carried with SMTPUTF8 whatever the flag says.
    utf8 = bool(original.get("smtputf8")) or not all(
        address.isascii() for address in addresses)

    headers, cut = read_header_section(message_path, header_limit, record.get("size"))
    arrival = record["created_at"]
    failed = [entry for entry in recipients if entry.action == FAILED]
    delayed = [entry for entry in recipients if entry.action == DELAYED]
    succeeded = [entry for entry in recipients if entry.action in SUCCESS_ACTIONS]
    envid = original.get("dsn_envid")

    note = _note(reporting_mta, record["id"], arrival, failed, delayed,
                 retry_until, cut, utf8, double=postmaster is not None, succeeded=succeeded)
    report = _report(reporting_mta, arrival, recipients, retry_until, utf8, envid)
    # RFC 8689 4.3: a notice about REQUIRETLS mail travels under REQUIRETLS
    # itself, and never carries the message body (RET=FULL or not).
    requiretls = bool(original.get("requiretls"))
    whole = None if requiretls else _whole_message(message_path, record, failed)
    if whole is not None:
        returned_type = "message/global" if utf8 else "message/rfc822"
        returned_encoding, returned = _identity_encoding_of(whole), whole
        description = "The original message"
    else:
        returned_type, returned_encoding, returned = _returned_headers(headers, utf8)
        description = "Header section of the original message"

    charset = "utf-8" if utf8 else "us-ascii"
    # RFC 6533 section 6: the global type may carry UTF-8 text.
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    parts = [
        (["Content-Description: Notification",
          f"Content-Type: text/plain; charset={charset}",
          f"Content-Transfer-Encoding: {_identity_encoding(note)}"],
         note.encode("utf-8")),
        (["Content-Description: Delivery report",
          f"Content-Type: message/{report_type}",
          f"Content-Transfer-Encoding: {_identity_encoding(report)}"],
         report.encode("utf-8")),
        ([f"Content-Description: {description}",
          f"Content-Type: {returned_type}",
          f"Content-Transfer-Encoding: {returned_encoding}"],
         returned),
    ]
    boundary = _boundary([body for _, body in parts])
    # Every field goes through _fold: the host name and the sender come
    # from outside this module and may be long.
    top = [line for field in (
        f"From: {SENDER_DISPLAY_NAME} <{SENDER_LOCAL_PART}@{reporting_mta}>",
        f"To: {to}",
        f"Subject: {_subject(failed, postmaster is not None, delayed)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{record['id']}.{secrets.token_hex(6)}@{reporting_mta}>",
        # RFC 3834 section 5: tells responders not to answer it.
        "Auto-Submitted: auto-replied",
        *([f"{DOUBLE_BOUNCE_FIELD}: {reporting_mta}"] if postmaster is not None else []),
        "MIME-Version: 1.0",
        # RFC 6522: report-type names the subtype of the second part.
        f'Content-Type: multipart/report; report-type={report_type};\r\n boundary="{boundary}"',
    ) for line in _fold(field)]
    message = _assemble(top, parts, boundary)
    envelope = Envelope(
        sender="",
        recipients=[to],
        double_bounce=postmaster is not None,
        # UTF-8 text (or a returned 8-bit message) is 8-bit content, sent
        # as BODY=8BITMIME (RFC 6152).
        body="8BITMIME" if utf8 or not message.isascii() else "7BIT",
        smtputf8=utf8,
        received_at=now,
        requiretls=requiretls,
    )
    return envelope, message


def is_double_bounce(header_section):
    """True when a header section (bytes, CRLF line ends) carries
    :data:`DOUBLE_BOUNCE_FIELD`: the message is a postmaster's notice that
    some relay wrote about a failed bounce."""
    name = DOUBLE_BOUNCE_FIELD.lower().encode("ascii") + b":"
    return any(line.lower().startswith(name) for line in header_section.split(b"\r\n"))


def read_header_section(path, limit=HEADER_SECTION_LIMIT, length=None):
    """Return ``(header_section, cut)`` of the message in ``path`` (of
    ``length`` bytes, the record's size, when given: see
    relaymail.queue.queue_file.open_message).

    Reads line by line up to the first empty line, never further, and
    never more than ``limit`` bytes (plus one line end).  Line ends come
    back as CRLF.  When the section is longer than ``limit`` it is cut
    before the first field that does not fit whole, so that no field is
    returned half, and ``cut`` is true.
    """
    section = bytearray()
    field_start = 0
    with open_message(path, length) as file:
        while True:
            # Two more than is left, so that an empty line ending exactly
            # at the limit is still seen as the end of the section.
            line = file.readline(limit - len(section) + 2)
            if not line or line in (b"\r\n", b"\n"):
                return bytes(section), False
            content = line.rstrip(b"\n")
            if content.endswith(b"\r"):
                content = content[:-1]
            continued = line[:1] in (b" ", b"\t")
            if len(section) + len(content) + 2 > limit:
                if continued:
                    # The field this line belongs to does not fit.
                    del section[field_start:]
                return bytes(section), True
            if not continued:
                field_start = len(section)
            section += content + b"\r\n"


def _check_recipients(recipients):
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for entry in recipients:
        if entry.action not in ACTIONS:
            raise ValueError(f"cannot report action {entry.action!r} for {entry.address!r}")


def _with_valid_status(entry):
    """``entry``, its status replaced by X.0.0 ("other undefined status",
    RFC 3463 3.1) if it is not a failure code of RFC 3463 syntax.  The
    status may come from a remote reply: better a vague notice than none,
    so this is mended rather than refused."""
    if entry.action in SUCCESS_ACTIONS:
        return entry if _SUCCESS_STATUS.match(entry.status) else replace(entry, status="2.0.0")
    if _STATUS.match(entry.status):
        return entry
    return replace(entry, status="5.0.0" if entry.action == FAILED else "4.0.0")


def _check_address(address):
    # Addresses come from the queue, which took them from SMTP commands:
    # a line break here would be a header injection, and no address that
    # SMTP accepts (RFC 5321 4.5.3.1.3: 256 octets) comes near the limit.
    # NEL and U+2028 break lines too, and SMTP refuses them as it does C0
    # (relaymail.sanitize).
    if "\t" in address or sanitize.has_unsafe(address):
        raise ValueError(f"control character in address {address!r}")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"undecodable bytes in address {address!r}") from None
    if octets > 900:
        raise ValueError("address too long for a header line")


def _subject(failed, double, delayed=()):
    if double:
        return SUBJECT_DOUBLE
    if failed:
        return SUBJECT_FAILED
    return SUBJECT_DELAYED if delayed else SUBJECT_SUCCESS


def _whole_message(path, record, failed):
    """The original message to return whole, or None for its header
    section: only in a failure notice for RET=FULL (RFC 3461 4.3; a
    success or delay notice returns the header section, as RET=HDRS, and
    so does a message without RET, as before), within
    :data:`RETURN_LIMIT`, and never a BINARYMIME one, which no part of a
    mail message may carry as it is."""
    original = record["envelope"]
    if not failed or original.get("dsn_ret") != "FULL" or original.get("body") == "BINARYMIME":
        return None
    if record.get("size", RETURN_LIMIT + 1) > RETURN_LIMIT:
        return None
    with open_message(path, record["size"]) as file:
        data = file.read(RETURN_LIMIT + 1)
    if len(data) > RETURN_LIMIT or b"\0" in data:
        return None
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _identity_encoding_of(data):
    # RFC 2046 5.2.1: message/rfc822 takes only 7bit, 8bit or binary.
    return "7bit" if data.isascii() else "8bit"


def _note(reporting_mta, queue_id, arrival, failed, delayed, retry_until,
          cut, utf8, double=False, succeeded=()):
    """The part for people: what happened, why, and what to do."""
    lines = _wrap(
        f"This is the mail system at {reporting_mta}. This notice was "
        "written automatically; replies to it are not read by anyone.")
    lines.append("")
    if succeeded:
        lines += _wrap(
            f"Your message of {_date(arrival)} was delivered to the recipients "
            "below, or handed on to a system that does not report delivery "
            "(relayed), or to a list's members (expanded), as you asked with "
            "NOTIFY=SUCCESS.")
        lines.append("")
        for entry in succeeded:
            lines.append(f"  <{entry.address}>: {entry.action}")
        lines.append("")
    if double:
        lines += _wrap(
            f"A message of {_date(arrival)} from the null sender <> (most "
            "likely a delivery notification) could not be delivered to the "
            "recipients below. A message from <> is never returned to its "
            "sender, so it comes to you, the postmaster, once; if this copy "
            "cannot be delivered either, it is discarded.")
        lines.append("")
        lines += _recipient_lines(failed + delayed, utf8)
        lines += _wrap(
            "A recipient's mail system refusing notifications about its own "
            "mail is often a misconfiguration there, or a forged sender "
            "address on the original message.")
        lines.append("")
    elif failed:
        lines += _wrap(
            f"Your message of {_date(arrival)} could not be delivered to "
            "the recipients below. Delivery to them has been given up; "
            "they have not received it.")
        lines.append("")
        lines += _recipient_lines(failed, utf8)
        lines += ["What you can do:", ""]
        for advice in (
                "Check each address above for typing mistakes, and send "
                "the message again if you find one.",
                "If an address is right, the problem lies with the "
                "recipient's mail system: tell the recipient some "
                "other way.",
                "If you need help, send this whole notice to your own "
                "mail administrator; the report attached to it says "
                "exactly what happened."):
            lines += _wrap(advice, "  - ", "    ")
        lines.append("")
    if delayed and not double:
        until = (f"until {_date(retry_until)}" if retry_until is not None
                 else "for some time")
        lines += _wrap(
            f"Your message of {_date(arrival)} has not yet been delivered "
            "to the recipients below. This is only a warning: delivery "
            f"will be tried again {until}, and you will be told if it "
            "still has not succeeded by then. There is no need to send "
            "the message again.")
        lines.append("")
        lines += _recipient_lines(delayed, utf8)
    if cut:
        lines += _wrap(
            "The header section of your message was too long to return "
            "in full; only its beginning is attached.")
        lines.append("")
    lines += _wrap(
        f"For the administrator: queue ID {queue_id} at {reporting_mta}. "
        "The delivery report and the header section of the original "
        "message follow.")
    return "".join(line + "\r\n" for line in lines)


def _recipient_lines(entries, utf8):
    """The indented list of recipients with the reason for each."""
    lines = []
    for entry in entries:
        lines.append(f"  <{entry.address}>")
        lines += _wrap(f"Reason: {_reason(entry.status)} (status {entry.status}).",
                       "    ", "    ")
        if entry.diagnostic is not None:
            who = (_clean(entry.remote_mta, utf8) if entry.remote_mta
                   else "The receiving server" if entry.diagnostic_type == "smtp"
                   else "The delivery")
            lines += _wrap(f"{who} answered: {_clean(entry.diagnostic, utf8)}",
                           "    ", "      ")
        lines.append("")
    return lines


def _wrap(text, first="", rest=""):
    # Long words are broken too, so that no line of the note can grow
    # past the width whatever a remote server put in its reply.
    return textwrap.wrap(text, width=_TEXT_WIDTH, initial_indent=first,
                         subsequent_indent=rest, break_long_words=True,
                         break_on_hyphens=False)


def _reason(status):
    _, subject, detail = status.split(".")
    found = _DETAIL_REASONS.get(f"{subject}.{detail}")
    if found is None:
        found = _SUBJECT_REASONS.get(subject, "an unspecified problem")
    return found


def _report(reporting_mta, arrival, recipients, retry_until, utf8, envid=None):
    """The RFC 3464 section 2 fields: one per-message block, then one
    block per recipient."""
    blocks = [[
        # RFC 3464 2.2.1: the sender's ENVID, decoded, comes first.
        *(_fold(f"Original-Envelope-Id: {_clean(dsn.decode_xtext(envid), utf8)}")
          if envid else []),
        *_fold(f"Reporting-MTA: dns; {reporting_mta}"),
        f"Arrival-Date: {_date(arrival)}",
    ]]
    for entry in recipients:
        block = [*(_fold(f"Original-Recipient: {_clean(dsn.original_recipient(entry.orcpt), utf8)}")
                   if entry.orcpt else []),
                 *_fold(f"Final-Recipient: {_address_field(entry.address)}"),
                 f"Action: {entry.action}",
                 f"Status: {entry.status}"]
        if entry.remote_mta:
            block += _fold(f"Remote-MTA: dns; {_clean(entry.remote_mta, utf8)}")
        if entry.diagnostic is not None:
            block += _fold(f"Diagnostic-Code: {entry.diagnostic_type}; "
                           f"{_clean(entry.diagnostic, utf8)}")
        if entry.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {_date(entry.last_attempt)}")
        if entry.action == DELAYED and retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append(block)
    # RFC 3464 2.1: the blocks are separated by an empty line; the last
    # ends with its last field.
    return "\r\n".join("".join(line + "\r\n" for line in block)
                        for block in blocks)


def _address_field(address):
    # RFC 6533 section 3: an address that is not ASCII is of type utf-8;
    # such an address only ever appears in the global report.
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address}"


def _returned_headers(section, utf8):
    """Return ``(content_type, encoding, body)`` for the original header
    section: as it was whenever that is legal, else quoted-printable, so
    that the part decodes to the original bytes either way."""
    lines = section.split(b"\r\n")[:-1]
    legal = all(len(line) <= _MAX_LINE and b"\r" not in line and b"\0" not in line
                for line in lines)
    if legal and section.isascii():
        return ("message/global-headers" if utf8 else "text/rfc822-headers",
                "7bit", section)
    if legal and utf8 and quoted_printable.is_utf8(section):
        # RFC 6533's registration: message/global-headers should be 8bit.
        return "message/global-headers", "8bit", section
    # RFC 6522's registration of text/rfc822-headers allows
    # quoted-printable for headers that are "broken or extended".  RFC
    # 6533 allows it for message/global-headers too, but readers (Python's
    # email package among them) parse a message/* part without decoding
    # it first, so the text type is the one that reads back right.
    charset = "; charset=utf-8" if utf8 and quoted_printable.is_utf8(section) else ""
    return (f"text/rfc822-headers{charset}", "quoted-printable",
            _quoted_printable(lines))


def _identity_encoding(text):
    return "7bit" if text.isascii() else "8bit"


def _quoted_printable(lines):
    """Each line on its own, CRLF after every line (RFC 2045 6.7)."""
    return b"".join(quoted_printable.encode_line(line) + b"\r\n" for line in lines)


def _clean(text, utf8):
    """``text`` made fit for one header field or one paragraph.

    Runs of white space (multi-line replies included) become one space.
    Other control characters, and anything outside ASCII when the
    notification must be ASCII, are written as ``\\x{HEX}``, the notation
    RFC 6533 section 3 uses for the same purpose in addresses.  Lone
    surrogates (undecodable bytes) become U+FFFD.
    """
    out = []
    for char in " ".join(text.split()):
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            char, code = "\ufffd", 0xFFFD
        if sanitize.has_unsafe(char) or (code > 0x7F and not utf8):
            out.append(f"\\x{{{code:X}}}")
        else:
            out.append(char)
    return "".join(out)


def _fold(field):
    """Fold one field at spaces (RFC 5322 2.2.3) to 78 octets where it
    can; a word too long for :data:`_MAX_LINE` is cut, the one change to
    the value that folding cannot avoid."""
    return fold(field, limit=_MAX_LINE)


def _boundary(bodies):
    """A boundary that no part contains (RFC 2046 5.1.1)."""
    while True:
        # 128 random bits: a sender cannot plant it in the headers that
        # come back, but checking costs little.
        boundary = f"relaymail.{secrets.token_hex(16)}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in body for body in bodies):
            return boundary


def _assemble(top, parts, boundary):
    delimiter = f"--{boundary}".encode("ascii")
    out = bytearray()
    for line in top:
        out += line.encode("utf-8") + b"\r\n"
    out += b"\r\nThis is a MIME-formatted delivery status notification.\r\n"
    for headers, body in parts:
        out += b"\r\n" + delimiter + b"\r\n"
        for line in headers:
            out += line.encode("ascii") + b"\r\n"
        # Every body ends in a line end of its own: the CRLF that comes
        # before the next delimiter belongs to that delimiter (RFC 2046
        # 5.1.1), so the body keeps its last line end.
        out += b"\r\n" + body
    out += b"\r\n" + delimiter + b"--\r\n"
    return bytes(out)


def _date(timestamp):
    """RFC 5322 3.3 date-time, in UTC."""
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))
