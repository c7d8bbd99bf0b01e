"""The configuration reference in README.rst, generated so that it cannot
drift from what the relay accepts.

The keys, their sections and their defaults come from
:data:`relaymail.config.SCHEMA` and :data:`relaymail.config.TABLES`, the
tables that validate a configuration file; what each key means comes from
its comment in ``etc/relaymail.ini``, the sample every key must be
documented in.  A key of the schema without a comment there is an error,
so a new key cannot reach the README undocumented.

::

    python -m relaymail.tools.reference           print the reference (reStructuredText)
    python -m relaymail.tools.reference --update  rewrite it in README.rst (make reference)

``tests/test_reference.py`` fails when README.rst is not what this prints.
"""

import argparse
import os
import re
import sys

from relaymail.config import SCHEMA, TABLES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "etc", "relaymail.ini")
README = os.path.join(REPO, "README.rst")
BEGIN = ".. BEGIN CONFIGURATION REFERENCE"
END = ".. END CONFIGURATION REFERENCE"

_SECTION = re.compile(r"\[([^\]]+)\]\s*$")
_KEY = re.compile(r"([a-z_][a-z0-9_]*)\s*=")


class Undocumented(Exception):
    """A key of the schema that the sample file does not explain."""


def sample_comments(path=SAMPLE):
    """``{(section, key): [comment lines]}`` and ``{section: [lines]}`` for
    a section's own comment (one with no key under it: the tables)."""
    keys, sections = {}, {}
    section, comment = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#"):
                comment.append(line[1:].removeprefix(" "))
                continue
            found = _SECTION.match(line)
            if found:
                section, comment = found.group(1), []
                continue
            found = _KEY.match(line)
            if found and section is not None and comment:
                # Keys on the lines after one comment share it (the same
                # list object: the reference lists them together).
                keys[(section, found.group(1))] = comment
            elif not line.strip():
                if comment and section is not None:
                    sections.setdefault(section, comment)
                comment = []
            elif not line.startswith((" ", "\t")):
                comment = []
    return keys, sections


def _split_default(comment):
    """(text, the "Default: ..." line's value or None)."""
    text, default = [], None
    for line in comment:
        if line.startswith(("Default:", "Defaults:")):
            default = line.split(":", 1)[1].strip()
        elif default is not None:
            default += " " + line.strip()      # a Default line that wraps
        else:
            text.append(line)
    return text, default


def _paragraphs(lines):
    """The comment as reStructuredText: its example lines (indented in the
    sample) as literal blocks, the rest as flowing text."""
    out, literal = [], False
    for line in lines:
        if line.startswith("  ") and line.strip():
            if not literal:
                out.append("::" if not out or not out[-1] else "\n::")
                out.append("")
                literal = True
            out.append("    " + line.strip())
        else:
            if literal:
                out.append("")
                literal = False
            out.append(_escape(line))
    return "\n".join(out).strip("\n")


def _escape(text):
    # Asterisks, backticks and bars in the sample's prose are meant
    # literally, and so is an underscore ending a word (a link in RST).
    text = re.sub(r"([*`|\\])", r"\\\1", text)
    return re.sub(r"_(?=\W|$)", r"\\_", text)


def _indent(text, by="    "):
    return "\n".join(by + line if line else "" for line in text.split("\n"))


def reference(path=SAMPLE):
    """The reference, as reStructuredText lines between the README markers."""
    keys, sections = sample_comments(path)
    missing = [f"[{s}] {k}" for s in SCHEMA for k in SCHEMA[s] if (s, k) not in keys]
    missing += [f"[{s}]" for s in TABLES if s not in sections]
    if missing:
        raise Undocumented(f"{path}: no comment for {', '.join(missing)}")
    out = []
    for section in sorted([*SCHEMA, *TABLES]):
        title = f"``[{section}]``"
        out += [title, "~" * len(title), ""]
        if section in TABLES:
            text, default = _split_default(sections[section])
            out += [_paragraphs(text), ""]
            if default:
                out += [f"Default: {_escape(default)}", ""]
            continue
        for names in _groups(section, keys):
            text, sample_default = _split_default(keys[(section, names[0])])
            defaults = [_default(SCHEMA[section][name], sample_default) for name in names]
            if len(names) == 1:
                shown = f"Default: {defaults[0]}{_why(sample_default)}"
            else:
                shown = "Defaults: " + ", ".join(
                    f"``{name}`` {default}" for name, default in zip(names, defaults))
            out += [", ".join(f"``{name}``" for name in names), _indent(_paragraphs(text)), "",
                    _indent(shown), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _groups(section, keys):
    """The section's keys in schema order, those sharing one comment together."""
    groups = []
    for name in SCHEMA[section]:
        if groups and keys[(section, name)] is keys[(section, groups[-1][0])]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _why(sample_default):
    """The sample's note on a default, " (deliver straight to ...)"."""
    found = re.search(r" (\(.*\))$", sample_default or "")
    return " " + _escape(found.group(1)) if found else ""


def _default(key, sample_default):
    if callable(key.default):
        # Worked out at start (the host name, the number of CPUs): the
        # sample says how.
        return _escape(re.sub(r" \(.*\)$", "", sample_default or "set at start-up"))
    if key.default.strip():
        return f"``{' '.join(key.default.split())}``"
    return "empty"


def readme_with(text, generated):
    begin, end = text.index(BEGIN), text.index(END)
    head = text[:text.index("\n", begin) + 1]
    return head + "\n" + generated + "\n" + text[end:]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m relaymail.tools.reference",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite it in README.rst")
    args = parser.parse_args(argv)
    try:
        generated = reference()
    except Undocumented as error:
        sys.stderr.write(f"{error}\n")
        return 1
    if not args.update:
        sys.stdout.write(generated)
        return 0
    with open(README, encoding="utf-8") as f:
        text = f.read()
    with open(README, "w", encoding="utf-8") as f:
        f.write(readme_with(text, generated))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
