"""Text from outside, made safe for a log line, a header we write, or a terminal.

Clients, next hops, DNS and plugins hand the relay text that ends up in
three places where some characters do harm:

- a log line: a reader that splits lines with :meth:`str.splitlines` (most
  log shippers, ``grep`` on a decoded file) also breaks at CR, VT, FF,
  FS/GS/RS, NEL (U+0085), LINE SEPARATOR (U+2028) and PARAGRAPH SEPARATOR
  (U+2029); a next hop's reply holding one can forge a whole line such as
  ``status=sent``;
- a header field we write (``Received:``, a DSN's ``Diagnostic-Code:``):
  CR and LF start a new field, and RFC 5322 2.2 admits no control there;
- a terminal: ESC (U+001B) and its 8-bit form CSI (U+009B) start escape
  sequences that clear the screen, move the cursor or, with OSC 52,
  write the clipboard.

So the characters that must not pass are the C0 controls but TAB, DEL,
the C1 controls (U+0080-U+009F: ECMA-48 gives each a meaning, NEL and
CSI among them), U+2028/U+2029, and lone surrogates (U+D800-U+DFFF):
bytes that were not UTF-8, kept by the ``surrogateescape`` error
handler, which an output stream with the same handler writes back as the
raw byte (0x9B, CSI, among them).  That set includes every character
:meth:`str.splitlines` breaks at.  TAB stays: it separates words in a
header or a reply, and folded header lines begin with it.  Where the
relay reads commands (``relaymail.smtp.dialogue``, ``relaymail.address``)
these characters are refused; where it must keep the text (a reply, an
error), :func:`escape` writes each as ``\\x{HEX}``, the notation RFC 6533
section 3 uses for the same job and that DSNs use already
(``relaymail.queue.bounce``).  A backslash is left as it is: the escape is
for people and log readers, not a reversible encoding.
"""

import re

#: The characters that must not pass, as the inside of a regular
#: expression character class: C0 but TAB, DEL, C1, U+2028, U+2029 and
#: the surrogates.
UNSAFE_CLASS = "\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"

_UNSAFE = re.compile(f"[{UNSAFE_CLASS}]")

#: ``has_unsafe(text)`` is a match object (true) when ``text`` holds a
#: character that must not pass.
has_unsafe = _UNSAFE.search


def _escaped(match):
    return f"\\x{{{ord(match.group()):X}}}"


def escape(text):
    """``text`` with every character that must not pass written as
    ``\\x{HEX}`` (ESC becomes ``\\x{1B}``, U+2028 ``\\x{2028}``)."""
    if _UNSAFE.search(text) is None:
        return text         # nearly always; a search costs less than a sub
    return _UNSAFE.sub(_escaped, text)


def escape_lines(text):
    """As :func:`escape`, but LF is kept: for text that is several lines
    on purpose (a traceback in a log event)."""
    if _UNSAFE.search(text) is None:
        return text
    return "\n".join(_UNSAFE.sub(_escaped, line) for line in text.split("\n"))


def escape_for_terminal(text, keep=""):
    """``text`` with every character that is not printable
    (:meth:`str.isprintable`: controls, but also format characters such
    as the bidirectional overrides, which reorder what a person sees)
    written as ``\\x{HEX}``, but a space and the characters in ``keep``."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char == " " or char in keep
                   else f"\\x{{{ord(char):X}}}" for char in text)
