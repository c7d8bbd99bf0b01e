"""Finding the real peers the interoperability tests run, and reading what
they say back."""

import os
import re
import shutil

#: The one user in the client tests' password file (conftest.py).
USER, PASSWORD = "alice", "correct horse"

INSTALL_HINT = "make test-tools installs it (apt-get install -y {package})"


def tool(name, package=None):
    """The path of command ``name`` (looked for on PATH and in /usr/sbin);
    a missing one fails the test, naming the Debian package to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/sendmail")
    assert path, f"{name} is not installed: " + INSTALL_HINT.format(package=package or name)
    return path


def installed(path, package):
    """``path`` itself, failing the test if the file is not there."""
    assert os.path.exists(path), f"{path} is missing: " + INSTALL_HINT.format(package=package)
    return path


def queued_ids(output):
    """The queue ids of the relay's ``250 2.0.0 Ok: queued as ID`` replies
    found in a client's transcript."""
    return re.findall(r"250 2\.0\.0 Ok: queued as ([0-9A-Z]+)", output)


def logged_queue_id(relay, sender, recipients):
    """The queue id of the last message the relay logged as queued from
    ``sender`` to ``recipients`` (in order)."""
    wanted = f"queued from=<{sender}> to=" + ",".join(f"<{r}>" for r in recipients) + " "
    found = re.findall(r" ([0-9A-Z]+): " + re.escape(wanted), relay.log())
    assert found, f"no {wanted!r} in the relay's log:\n{relay.log()}"
    return found[-1]
