"""relaymail.queue.batch.sync_files: one syncfs(2) for a batch, or an
fsync per file where the C library has no syncfs."""

import ctypes
import errno
import json
import os
import subprocess
import sys

import pytest

from relaymail.queue import batch


def test_syncfs_is_found_in_the_process_without_running_a_program(tmp_path, monkeypatch):
    # ctypes.util.find_library("c") runs ``ldconfig -p``: a child process
    # in every worker on its way to its first accept.
    def no_child(*args, **kwargs):
        raise AssertionError(f"a child process was started: {args!r}")
    monkeypatch.setattr(subprocess, "Popen", no_child)
    monkeypatch.setattr(os, "posix_spawn", no_child)
    syncfs = batch._load_syncfs()
    assert syncfs is not None
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert syncfs(fd) == 0
    finally:
        os.close(fd)


def test_with_syncfs_the_batch_is_one_flush_of_the_file_system(tmp_path):
    written = tmp_path / "a.msg"
    written.write_bytes(b"x")
    # The paths are not opened: a name that is gone is no error.
    batch.sync_files(str(tmp_path), [str(written), str(tmp_path / "gone.msg")])


def test_a_missing_directory_fails_with_its_name(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        batch.sync_files(str(tmp_path / "missing"), [])
    assert caught.value.filename == str(tmp_path / "missing")


def test_a_failed_syncfs_raises_its_errno_with_the_directory(tmp_path, monkeypatch):
    # The C library's errno, as the call left it: here EBADF, from a real
    # syncfs(2) of a descriptor that is not open.
    real = batch._syncfs
    monkeypatch.setattr(batch, "_syncfs", lambda fd: real(-1))
    with pytest.raises(OSError) as caught:
        batch.sync_files(str(tmp_path), [])
    assert caught.value.errno == errno.EBADF
    assert caught.value.filename == str(tmp_path)


def test_without_syncfs_each_file_is_fsynced(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "_syncfs", None)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    first, second = tmp_path / "a.msg", tmp_path / "b.msg"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    batch.sync_files(str(tmp_path), [str(first), str(second)])
    assert synced == [str(first), str(second)]
    # Each file is opened: a gone one fails, and so does a link, not followed.
    with pytest.raises(OSError) as caught:
        batch.sync_files(str(tmp_path), [str(tmp_path / "gone.msg")])
    assert caught.value.errno == errno.ENOENT
    (tmp_path / "link.msg").symlink_to(first)
    with pytest.raises(OSError) as caught:
        batch.sync_files(str(tmp_path), [str(tmp_path / "link.msg")])
    assert caught.value.errno == errno.ELOOP


# A child that installs a real seccomp filter refusing syncfs(2) with the
# errno given (as a systemd unit's SystemCallFilter= does), then commits files.
_REFUSING_CHILD = r'''
import ctypes, errno, json, os, sys
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
context = seccomp.seccomp_init(0x7FFF0000)                  # SCMP_ACT_ALLOW
number = seccomp.seccomp_syscall_resolve_name(b"syncfs")
assert seccomp.seccomp_rule_add(context, 0x00050000 | int(sys.argv[2]), number, 0) == 0
assert seccomp.seccomp_load(context) == 0
from relaymail.queue import batch
synced = []
real_fsync = os.fsync
def fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    return real_fsync(fd)
os.fsync = fsync
directory = sys.argv[1]
names = [os.path.join(directory, name) for name in ("a.msg", "b.msg")]
for name in names:
    with open(name, "wb") as f:
        f.write(b"x")
refused = batch._syncfs(os.open(directory, os.O_RDONLY))
refused = (refused, ctypes.get_errno())
batch.sync_files(directory, names)
batch.sync_files(directory, names[:1])
print(json.dumps({"refused": refused, "synced": synced, "left": batch._syncfs is None}))
'''


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EACCES], ids=["EPERM", "EACCES"])
def test_a_syncfs_refused_by_a_seccomp_filter_falls_back_to_an_fsync_each(tmp_path, refusal):
    # EPERM is what container profiles and SystemCallFilter= answer;
    # SystemCallErrorNumber= can make it EACCES.
    result = subprocess.run([sys.executable, "-c", _REFUSING_CHILD, str(tmp_path),
                             str(refusal)],
                            capture_output=True, text=True, timeout=30,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # The filter is real: syncfs(2) itself answers the refusal in the child.
    assert seen["refused"] == [-1, refusal]
    # Each batch's files are fsynced instead, and syncfs is not tried again.
    a, b = str(tmp_path / "a.msg"), str(tmp_path / "b.msg")
    assert seen["synced"] == [a, b, a]
    assert seen["left"] is True


def test_a_syncfs_that_fails_for_real_is_not_taken_for_a_refusal(tmp_path, monkeypatch):
    # EIO from syncfs is a write-back error: the batch fails, and the next
    # batch flushes with syncfs again.
    real = batch._syncfs

    def failing(fd):
        ctypes.set_errno(errno.EIO)
        return -1
    monkeypatch.setattr(batch, "_syncfs", failing)
    with pytest.raises(OSError) as caught:
        batch.sync_files(str(tmp_path), [])
    assert caught.value.errno == errno.EIO
    assert batch._syncfs is failing
    monkeypatch.setattr(batch, "_syncfs", real)
