"""Root never follows a link in the spool: the hand-over at start-up
(twistd as root with --uid), the spool lock, and relaymail-queue run as
root.  Real files, real ownership, the real twistd; the "victim" is a
root-owned file the test makes next to the spool, never a system file."""

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from relaymail.queue import record as records
from relaymail.queue.layout import UnsafeSpool, check_root_owned, hand_over, trusted_path
from relaymail.queue.lock import SpoolLock
from relaymail.tools.queue_tool import main
from tests.relay_process import REPO, RelayProcess, twistd
from tests.test_queue_tool import put

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")

NOBODY = pwd.getpwnam("nobody")
UID, GID = NOBODY.pw_uid, NOBODY.pw_gid

ID = "0000000000000007"
SECRET = b"root's secret\n"

#: Long enough for twistd to start on a busy machine; only reached when a
#: relay that should have refused starts instead.
START_TIMEOUT = 20


@pytest.fixture
def workdir():
    """A directory nobody can reach (pytest's tmp_path is root's 0700)."""
    path = tempfile.mkdtemp(prefix="relaymail-priv-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim(workdir):
    path = os.path.join(workdir, "victim")
    with open(path, "wb") as file:
        file.write(SECRET)
    os.chmod(path, 0o600)
    return path


def assert_untouched(path, content=SECRET, mode=0o600):
    info = os.lstat(path)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, mode)
    if content is not None:
        with open(path, "rb") as file:
            assert file.read() == content


def relay_spool(workdir, owner=(UID, GID)):
    """A spool as the relay leaves it after running as ``owner``."""
    spool = os.path.join(workdir, "spool")
    os.mkdir(spool, 0o700)
    for name in ("tmp", "active", "hold", "corrupt"):
        os.mkdir(os.path.join(spool, name), 0o700)
    with open(os.path.join(spool, "lock"), "w") as file:
        file.write("4242\n")
    for directory, subdirectories, files in os.walk(spool):
        for name in [""] + subdirectories + files:
            os.lchown(os.path.join(directory, name), *owner)
    return spool


def owners(spool):
    """{relative name: uid} of everything in the spool, itself as '.'."""
    found = {".": os.lstat(spool).st_uid}
    for directory, subdirectories, files in os.walk(spool):
        for name in subdirectories + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, spool)] = os.lstat(path).st_uid
    return found


def start_as_nobody(workdir, spool):
    """Run twistd as root with --uid/--gid nobody on ``spool``; return the
    finished process, or None when it started and kept running."""
    config = os.path.join(workdir, "relaymail.ini")
    with open(config, "w") as file:
        file.write(f"[server]\nlisten = tcp:0:interface=127.0.0.1\nhostname = relay.test\n"
                   f"[queue]\npath = {spool}\n"
                   f"[delivery]\nsmarthost = [127.0.0.1]:9\n")
    try:
        return twistd("--config", config, cwd=workdir, timeout=START_TIMEOUT,
                      options=("--uid", str(UID), "--gid", str(GID)))
    except subprocess.TimeoutExpired:
        return None


# -- start-up as root, the real twistd ---------------------------------------

def test_start_as_root_refuses_a_message_file_linked_to_a_root_file(workdir, victim):
    spool = relay_spool(workdir)
    os.symlink(victim, os.path.join(spool, "tmp", "x.msg"))
    result = start_as_nobody(workdir, spool)
    assert_untouched(victim)
    assert result is not None, "the relay started"
    assert result.returncode != 0
    assert result.stderr == f"relaymail: unsafe spool {spool}: tmp/x.msg is a symbolic link\n"
    # Refused before anything was handed over.
    assert os.lstat(os.path.join(spool, "tmp", "x.msg")).st_uid == 0


def test_start_as_root_refuses_a_lock_linked_to_a_root_file(workdir, victim):
    spool = relay_spool(workdir)
    os.unlink(os.path.join(spool, "lock"))
    os.symlink(victim, os.path.join(spool, "lock"))
    result = start_as_nobody(workdir, spool)
    assert_untouched(victim)
    assert result is not None, "the relay started"
    assert result.returncode != 0
    assert result.stderr == f"relaymail: unsafe spool {spool}: lock is a symbolic link\n"


def test_start_as_root_refuses_a_hard_link_to_a_root_file(workdir, victim):
    # What a relay user can do where fs.protected_hardlinks is 0.
    spool = relay_spool(workdir)
    os.link(victim, os.path.join(spool, "active", ID + ".msg"))
    result = start_as_nobody(workdir, spool)
    assert_untouched(victim)
    assert result is not None, "the relay started"
    assert result.stderr == (f"relaymail: unsafe spool {spool}: active/{ID}.msg has "
                             "2 hard links, 1 of them in the spool\n")


def refused_start_staying_root(workdir, spool):
    """Start the relay as root, no --uid, on ``spool``; what it said when
    it refused (it must refuse: starting is a failure)."""
    config = os.path.join(workdir, "relaymail.ini")
    with open(config, "w") as file:
        file.write(f"[server]\nlisten = tcp:0:interface=127.0.0.1\n[queue]\npath = {spool}\n")
    try:
        return twistd("--config", config, cwd=workdir, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the relay started") from None


def test_staying_root_refuses_a_spool_of_another_user(workdir, victim):
    spool = relay_spool(workdir)
    os.symlink(victim, os.path.join(spool, "active", ID + ".msg"))
    result = refused_start_staying_root(workdir, spool)
    assert result.stderr == (f"relaymail: unsafe spool {spool}: it belongs to uid {UID}; "
                             f"run as that user (twistd --uid {UID}) or give the spool to root\n")
    assert_untouched(victim)


def test_staying_root_refuses_a_root_spool_below_a_directory_of_another_user(workdir):
    # sudo make run in a developer's checkout: var/ is the developer's, the
    # spool root's.  The developer could rename var/ away while root runs
    # and leave var/spool/active/ID.msg -> a root file in its place.
    var = os.path.join(workdir, "var")
    os.mkdir(var, 0o755)
    os.chown(var, UID, GID)
    spool = relay_spool(var, owner=(0, 0))
    result = refused_start_staying_root(workdir, spool)
    assert result.stderr == (f"relaymail: unsafe spool {spool}: {var} is owned by uid {UID}, "
                             "not root; whoever owns it could replace the spool\n")


@pytest.mark.parametrize("where, mode, problem", [
    ("", 0o777, "the spool directory is writable by others than root (mode 0777)"),
    ("active", 0o770, "active is writable by others than root (mode 0770)"),
])
def test_staying_root_refuses_a_spool_others_may_write_in(workdir, where, mode, problem):
    # Whoever may write there could swap active/ or plant a record whose
    # message file is a link for root to read and send.
    spool = relay_spool(workdir, owner=(0, 0))
    os.chmod(os.path.join(spool, where), mode)
    with pytest.raises(UnsafeSpool) as raised:
        check_root_owned(spool)
    assert str(raised.value) == f"unsafe spool {spool}: {problem}"


def test_a_root_spool_may_sit_in_a_sticky_directory_only_while_it_stays_roots(workdir):
    # Nobody can rename root's entry out of a sticky directory; a spool
    # handed to the relay user could be renamed by that user.
    sticky = os.path.join(workdir, "shared")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    spool = relay_spool(sticky, owner=(0, 0))
    assert trusted_path(spool, spool_stays_root=True) == spool
    with pytest.raises(UnsafeSpool, match="is writable by others than root"):
        trusted_path(spool)


# -- the hand-over itself ------------------------------------------------------

def test_hand_over_leaves_the_lost_and_found_of_a_spool_file_system_alone(workdir):
    # A spool on a file system of its own (against a full disk) has mkfs's
    # lost+found, root's: neither refused nor given to the relay user.
    spool = relay_spool(workdir, owner=(0, 0))
    os.mkdir(os.path.join(spool, "lost+found"), 0o700)
    hand_over(spool, UID, GID)
    assert os.lstat(os.path.join(spool, "lost+found")).st_uid == 0
    assert os.lstat(os.path.join(spool, "active")).st_uid == UID
    # One that is not root's is a stranger like any other name.
    os.chown(os.path.join(spool, "lost+found"), UID, GID)
    with pytest.raises(UnsafeSpool, match="lost\\+found does not belong in a spool"):
        hand_over(spool, UID, GID)


def _plant_directory_link(spool, victim):
    elsewhere = os.path.join(os.path.dirname(victim), "elsewhere")
    os.mkdir(elsewhere, 0o700)
    shutil.rmtree(os.path.join(spool, "hold"))
    os.symlink(elsewhere, os.path.join(spool, "hold"))
    return elsewhere


PLANTED = {
    "a link with a queue file's name": (
        lambda spool, victim: os.symlink(victim, os.path.join(spool, "active", ID + ".json")),
        f"active/{ID}.json is a symbolic link"),
    "a directory replaced by a link": (
        _plant_directory_link, "hold is a symbolic link"),
    "a FIFO": (
        lambda spool, victim: os.mkfifo(os.path.join(spool, "hold", ID + ".msg")),
        f"hold/{ID}.msg is a FIFO, not a regular file"),
    "a name the layout does not know": (
        lambda spool, victim: open(os.path.join(spool, "corrupt", "notes.txt"), "w").close(),
        "corrupt/notes.txt does not belong in a spool"),
    "a directory where a file belongs": (
        lambda spool, victim: os.mkdir(os.path.join(spool, "tmp", ID + ".msg")),
        f"tmp/{ID}.msg is a directory, not a regular file"),
    "a file of a third user": (
        lambda spool, victim: _file_of(os.path.join(spool, "active", ID + ".json"), 12345),
        f"active/{ID}.json is owned by uid 12345"),
    "a stranger in the MTA-STS cache": (
        lambda spool, victim: _in_sts_cache(spool, "../notes.json"),
        "mta-sts/...notes.json does not belong in a spool"),
    "a lock that is a directory": (
        lambda spool, victim: _directory_instead(os.path.join(spool, "lock")),
        "lock is a directory, not a regular file"),
}


def _in_sts_cache(spool, name):
    os.makedirs(os.path.join(spool, "mta-sts"), exist_ok=True)
    open(os.path.join(spool, "mta-sts", name.replace("/", ".")), "w").close()


def _file_of(path, uid):
    open(path, "w").close()
    os.chown(path, uid, uid)


def _directory_instead(path):
    os.unlink(path)
    os.mkdir(path)


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_hand_over_refuses_what_the_layout_does_not_say_and_changes_nothing(
        workdir, victim, planted):
    # A spool first made by root: everything root's, nothing handed over yet.
    spool = relay_spool(workdir, owner=(0, 0))
    plant, problem = PLANTED[planted]
    elsewhere = plant(spool, victim)
    before = owners(spool)
    with pytest.raises(UnsafeSpool) as raised:
        hand_over(spool, UID, GID)
    assert str(raised.value) == f"unsafe spool {spool}: {problem}"
    assert owners(spool) == before
    assert_untouched(victim)
    if elsewhere:
        assert_untouched(elsewhere, content=None, mode=0o700)


def test_hand_over_gives_every_expected_entry_to_the_relay_user(workdir):
    spool = relay_spool(workdir, owner=(0, 0))
    # Queued as root and retried (a record beside its queue file), an
    # interrupted hold (one file, a name in active/ and one in hold/), a
    # move's staging name, a record being replaced, a second corrupt copy:
    # all names the spool itself makes.
    active, hold = os.path.join(spool, "active"), os.path.join(spool, "hold")
    put(spool, ID, 1.0, change=lambda record: record.update(size=1))
    os.link(os.path.join(active, ID + ".msg"), os.path.join(hold, ID + ".msg"))
    os.link(os.path.join(active, ID + ".json"),
            os.path.join(spool, "tmp", ID + ".json-0a1b2c3d.link"))
    for name in (f"tmp/{ID}-89abcdef.json", f"corrupt/{ID}.json", f"corrupt/{ID}-hold.msg"):
        open(os.path.join(spool, name), "w").close()
    # The MTA-STS cache: a policy, and one being written.
    for name in ("example.com.json", "xn--bcher-kva.example.json.4242.tmp"):
        _in_sts_cache(spool, name)
    # TLS-RPT counts: a process's day, one being written, the sender's lock.
    os.mkdir(os.path.join(spool, "tls-rpt"))
    for name in ("2026-12-01.4242.json", "2026-12-01.4242.json.tmp", "lock"):
        open(os.path.join(spool, "tls-rpt", name), "w").close()
    # A version that reused delivered messages' files left them in spare/.
    os.mkdir(os.path.join(spool, "spare"))
    open(os.path.join(spool, "spare", "4242.17"), "w").close()
    with socket.socket(socket.AF_UNIX) as control:
        control.bind(os.path.join(spool, "control"))
        hand_over(spool, UID, GID)
    found = owners(spool)
    # The socket is left: the relay, as nobody, replaces it at start.
    assert found.pop("control") == 0
    assert found == {name: UID for name in found}
    assert len(found) == 22
    assert {os.lstat(os.path.join(spool, name)).st_gid for name in found} == {GID}


def test_a_real_start_as_root_hands_over_messages_queued_as_root(workdir):
    spool = relay_spool(workdir)
    # Root's 0600 files, as the tool as root leaves them; not due for an
    # hour, so delivery leaves them alone while the test looks.
    now = time.time()
    put(spool, ID, now, change=lambda record: record.update(next_attempt_at=now + 3600))
    # One process: this machine's interpreter lives under /root, where the
    # relay user cannot run it (test_tls_auth.py shows the refusal).
    relay = RelayProcess(workdir, {"server": {"workers": "0"}, "queue": {"path": spool}})
    relay.extra_args = ["--uid", str(UID), "--gid", str(GID)]
    relay.start()
    try:
        assert os.listdir(os.path.join(spool, "active")) == [ID + ".msg"]
        assert os.lstat(os.path.join(spool, "active", ID + ".msg")).st_uid == UID
        # Recovered as nobody: the message is still queued, not set aside.
        assert os.listdir(os.path.join(spool, "corrupt")) == []
        assert os.lstat(os.path.join(spool, "control")).st_uid == UID
    finally:
        relay.stop()


# -- the path to the spool ---------------------------------------------------------

def test_a_spool_in_a_directory_others_can_write_is_refused(workdir):
    shared = os.path.join(workdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)        # sticky does not help: the spool is nobody's
    spool = os.path.join(shared, "spool")
    with pytest.raises(UnsafeSpool) as raised:
        trusted_path(spool)
    assert str(raised.value) == (
        f"unsafe spool {spool}: {shared} is writable by others than root (mode 1777); "
        "they could replace the spool")


def test_a_spool_below_a_directory_of_the_relay_user_is_refused(workdir):
    home = os.path.join(workdir, "home")
    os.makedirs(os.path.join(home, "spool"))
    os.chown(home, UID, GID)
    spool = os.path.join(home, "spool")
    with pytest.raises(UnsafeSpool) as raised:
        trusted_path(spool)
    assert str(raised.value) == (
        f"unsafe spool {spool}: {home} is owned by uid {UID}, not root; "
        "whoever owns it could replace the spool")


def test_a_spool_path_through_the_administrators_links_is_followed(workdir):
    real = relay_spool(workdir)
    os.symlink("spool", os.path.join(workdir, "link"))
    assert trusted_path(os.path.join(workdir, "link", "..", "link")) == real
    # Below a sticky /tmp the root-owned entries on the way are safe.
    assert trusted_path(os.path.join(workdir, "missing", "spool")) == os.path.join(
        workdir, "missing", "spool")


def test_a_link_to_the_spool_in_a_directory_others_can_write_is_refused(workdir):
    spool = relay_spool(workdir)
    shared = os.path.join(workdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    os.symlink(spool, os.path.join(shared, "spool"))
    with pytest.raises(UnsafeSpool, match=f"{shared} is writable by others than root"):
        trusted_path(os.path.join(shared, "spool"))


# -- the lock --------------------------------------------------------------------

def test_the_lock_is_never_truncated_through_a_hard_link(workdir, victim):
    spool = relay_spool(workdir)
    os.unlink(os.path.join(spool, "lock"))
    os.link(victim, os.path.join(spool, "lock"))
    lock = SpoolLock(spool)
    with pytest.raises(UnsafeSpool) as raised:
        lock.acquire()
    assert str(raised.value) == (
        f"unsafe spool {spool}: lock has 2 hard links, 1 of them in the spool")
    assert not lock.held
    assert_untouched(victim)


def test_the_holder_is_not_read_through_a_link(workdir, victim):
    spool = relay_spool(workdir)
    with open(victim, "w") as file:
        file.write("1234\n")
    os.unlink(os.path.join(spool, "lock"))
    os.symlink(victim, os.path.join(spool, "lock"))
    assert SpoolLock(spool).holder_pid() is None


# -- relaymail-queue as root -------------------------------------------------------

def test_the_tool_as_root_refuses_a_lock_linked_to_a_root_file(workdir, victim, capsys):
    spool = relay_spool(workdir, owner=(0, 0))
    put(spool, ID, 1.0)
    os.unlink(os.path.join(spool, "lock"))
    os.symlink(victim, os.path.join(spool, "lock"))
    assert main(["--spool", spool, "hold", ID]) == 1
    assert capsys.readouterr().err == (
        f"relaymail-queue: unsafe spool {spool}: lock is a symbolic link\n")
    assert_untouched(victim)
    assert os.path.exists(os.path.join(spool, "active", ID + ".msg"))


def run_tool(*argv):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "relaymail.tools.queue_tool", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def held_by_nobody(workdir):
    spool = relay_spool(workdir)
    put(spool, ID, 1.0, where="hold")
    os.chown(os.path.join(spool, "hold", ID + ".msg"), UID, GID)
    return spool


def test_the_tool_as_root_works_as_the_spool_owner(workdir):
    spool = held_by_nobody(workdir)
    result = run_tool("--spool", spool, "release", ID)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{ID} released\n", "")
    # Written with nobody's ids, not root's: root would leave a file the
    # relay cannot read.
    record = os.path.join(spool, "active", ID + ".json")
    assert (os.lstat(record).st_uid, os.lstat(record).st_gid) == (UID, GID)
    with open(record, "rb") as file:
        assert records.decode(file.read(), ID)["next_attempt_at"] > 1.0


def test_the_tool_as_root_follows_a_planted_link_only_as_the_spool_owner(workdir):
    spool = held_by_nobody(workdir)
    # tmp/ swapped for a link to a directory of root's: the record written
    # there on the way to active/ would be root's file in root's place.
    elsewhere = os.path.join(workdir, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    os.rmdir(os.path.join(spool, "tmp"))
    os.symlink(elsewhere, os.path.join(spool, "tmp"))
    result = run_tool("--spool", spool, "release", ID)
    assert result.returncode == 1
    assert result.stderr.startswith("relaymail-queue: release failed: [Errno 13] Permission denied")
    assert os.listdir(elsewhere) == []
    assert os.path.exists(os.path.join(spool, "hold", ID + ".msg"))


def test_the_tool_as_root_on_a_relay_spool_refuses_a_lock_link(workdir, victim):
    spool = relay_spool(workdir)
    put(spool, ID, 1.0)
    os.unlink(os.path.join(spool, "lock"))
    os.symlink(victim, os.path.join(spool, "lock"))
    result = run_tool("--spool", spool, "delete", "ALL")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"relaymail-queue: unsafe spool {spool}: lock is a symbolic link\n"
    assert_untouched(victim)


def test_the_tool_as_root_records_an_offline_change_only_through_no_link(workdir, victim):
    spool = held_by_nobody(workdir)
    os.symlink(victim, os.path.join(spool, "offline-actions"))
    result = run_tool("--spool", spool, "release", ID)
    # The change is made; its record is refused, not written through the
    # link into root's file.
    assert (result.returncode, result.stdout) == (0, f"{ID} released\n")
    assert result.stderr == (f"relaymail-queue: release {ID}: not recorded in "
                             f"{spool}/offline-actions: Too many levels of symbolic links\n")
    assert_untouched(victim)


def test_the_tool_as_root_writes_its_offline_record_as_the_spool_owner(workdir):
    spool = held_by_nobody(workdir)
    assert run_tool("--spool", spool, "release", ID).returncode == 0
    journal = os.path.join(spool, "offline-actions")
    info = os.lstat(journal)
    # The relay, running as the owner, reads it and removes it at start.
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (UID, GID, 0o600)
