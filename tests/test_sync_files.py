"""relaymail.queue.batch.sync_files: one syncfs(2) for a batch, or an
fsync per file where the C library has no syncfs."""

import errno
import os
import subprocess

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
