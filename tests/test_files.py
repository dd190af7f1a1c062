"""File plumbing: atomic writes, the directory lock, and the safetensors reader."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_lite.io.lock as lock_module
from qlora_lite.errors import LockedError
from qlora_lite.io.atomic import atomic_dir, atomic_file, save_safetensors_atomic
from qlora_lite.io.lock import DirectoryLock, lock_path
from qlora_lite.io.safetensors import SafetensorsFile


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    final = tmp_path / "merged"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("failed mid-write")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as tmp:
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_safetensors_reader_with_conversion(tmp_path, dtype, monkeypatch):
    import qlora_lite.io.safetensors as files

    monkeypatch.setattr(files, "READ_CHUNK_BYTES", 64)  # force many chunks
    tensor = (torch.randn(37, 11) * 100).to(dtype)
    save_safetensors_atomic({"w": tensor, "empty": torch.zeros(0)}, tmp_path / "x.safetensors")
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(st.read("w"), tensor)
    if dtype.is_floating_point:
        assert torch.equal(st.read("w", torch.bfloat16), tensor.to(torch.bfloat16))
    assert st.read("empty").numel() == 0


def test_lock_refuses_a_second_holder_and_frees_on_crash(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from qlora_lite.io.lock import DirectoryLock; "
            "lock = DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"in use by pid {holder.pid}"):
            DirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    with DirectoryLock(tmp_path) as lock:
        assert lock.path.read_text().startswith("pid ")


def test_the_lock_sits_beside_the_directory_and_goes_with_its_holder(tmp_path):
    target = tmp_path / "out"
    with DirectoryLock(target, purpose="a test") as held:
        assert held.path == tmp_path / ".out.qlora-lite.lock" == lock_path(target)
        assert held.path.read_text() == f"pid {os.getpid()} (a test)"
        assert not target.exists()  # taking the lock creates nothing but the lock file
        with pytest.raises(LockedError, match=r"out is in use by pid \d+ \(a test\)"):
            DirectoryLock(tmp_path / "x" / ".." / "out", beside=False).acquire()  # another spelling, same lock
    assert list(tmp_path.iterdir()) == []
    link = tmp_path / "link"
    target.mkdir()
    link.symlink_to(target, target_is_directory=True)
    assert lock_path(link) == lock_path(target)


def test_lock_goes_inside_where_the_parent_cannot_take_a_file(tmp_path, monkeypatch):
    target = tmp_path / "mount"
    target.mkdir()

    def read_only_parent(path, *args, **kwargs):
        if Path(path).parent == tmp_path:  # as if tmp_path were root's and we were not
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(lock_module, "open", read_only_parent, raising=False)
    with DirectoryLock(target, purpose="in place") as held:
        assert held.path == target / ".qlora-lite.lock"
        with pytest.raises(LockedError, match=r"mount is in use by pid \d+ \(in place\)"):
            DirectoryLock(target).acquire()
    assert list(target.iterdir()) == []
    with pytest.raises(PermissionError):  # nothing to fall back to: the directory does not exist
        DirectoryLock(tmp_path / "absent").acquire()
