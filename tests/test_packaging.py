"""What ``pip install .`` installs: every package of the source tree.

The tests import relaymail from the checkout, so a package missing from
setup.cfg passes them all and fails only where relaymail is installed
(twistd from .venv, the benchmarks, a user's machine)."""

import configparser
import os

from tests.relay_process import REPO


def test_every_package_directory_is_a_package_and_is_installed():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    listed = set(config["options"]["packages"].split())
    found = set()
    for directory, _subdirectories, files in os.walk(os.path.join(REPO, "relaymail")):
        if "__pycache__" in directory or not any(name.endswith(".py") for name in files):
            continue
        assert "__init__.py" in files, f"{directory} has modules but no __init__.py"
        found.add(os.path.relpath(directory, REPO).replace(os.sep, "."))
    assert found - listed == set(), "packages missing from setup.cfg [options] packages"
