"""File plumbing shared by the loader, the trainer and the exporter.

- safetensors read one tensor at a time with plain reads (no mmap, so untouched pages never count
  against resident memory), converting dtype chunk by chunk so a float32 checkpoint never needs a whole
  float32 copy of a tensor;
- weight-file discovery that refuses pickle checkpoints;
- atomic writes: every file goes to a temporary name in the same folder and is renamed when complete;
- the directory lock, and the fault points the crash tests use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ModelLoadError

# Fault injection for the crash tests: "<point>:<N>" SIGKILLs the process at that point (KILL_ENV) or fails
# there as a full disk would, with OSError(ENOSPC) (ENOSPC_ENV). Points: in-checkpoint:STEP,
# after-checkpoint:STEP, in-final-adapter:STEP (train.py), in-export:TENSORS_WRITTEN (export.py).
KILL_ENV = "QLORA_LITE_TEST_KILL"
ENOSPC_ENV = "QLORA_LITE_TEST_ENOSPC"


def fault_point(point: str, count: int) -> None:
    """Crash here (SIGKILL) or fail with ENOSPC when the test environment asks for `point:count`; else nothing."""
    here = f"{point}:{count}"
    if os.environ.get(KILL_ENV) == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(ENOSPC_ENV) == here:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {here})")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
READ_CHUNK_BYTES = 32 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """The header of one .safetensors file, and reads of single tensors from it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > 100 * 2**20 or header_len > self.path.stat().st_size - 8:
                    raise ValueError(f"header length {header_len} does not fit the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{self.path} is not a readable safetensors file ({exc}); re-save or re-download it."
            ) from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        for name, info in header.items():
            if info.get("dtype") not in SAFETENSORS_DTYPES or "data_offsets" not in info or "shape" not in info:
                raise ModelLoadError(f"{self.path} has a malformed entry for tensor {name!r}; re-save the checkpoint.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into CPU memory, converted to `dtype` chunk by chunk if it differs."""
        info = self.entries[name]
        src_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        dst_dtype = dtype or src_dtype
        out = torch.empty(shape, dtype=dst_dtype)
        numel = out.numel()
        elem = torch.empty((), dtype=src_dtype).element_size()
        if (end - start) != numel * elem:
            raise ModelLoadError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {list(shape)}; the file is corrupted.")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            if dst_dtype == src_dtype:
                _read_exact(f, out.view(-1).view(torch.uint8) if numel else out, end - start, self.path)
                return out
            flat = out.view(-1)
            per_chunk = max(1, READ_CHUNK_BYTES // elem)
            buffer = torch.empty(min(numel, per_chunk) * elem, dtype=torch.uint8)
            for first in range(0, numel, per_chunk):
                count = min(per_chunk, numel - first)
                chunk = buffer[: count * elem]
                _read_exact(f, chunk, count * elem, self.path)
                flat[first : first + count].copy_(chunk.view(src_dtype))
        return out


def _read_exact(f, dest: torch.Tensor, nbytes: int, path: Path) -> None:
    if nbytes == 0:
        return
    view = memoryview(dest.numpy()).cast("B")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:nbytes])
        if not n:
            raise ModelLoadError(f"{path} ends early; the file is truncated, re-save or re-download it.")
        got += n


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model dir, in index order; refuses pickle-only checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}); re-save the model.") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists {missing[0]}, which is not in {model_dir}; download the missing shard.")
        return [model_dir / n for n in names]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_dir} holds only pickle weights ({pickles[0]}), which qlora-lite does not load because unpickling "
            "can run arbitrary code; convert them once with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` in a trusted environment."
        )
    raise ModelLoadError(f"{model_dir} has no *.safetensors weight files; point to a Hugging Face model directory.")


def largest_tensor_numel(model_dir: str | Path) -> int:
    """Element count of the largest tensor among a model dir's safetensors shards (headers only)."""
    largest = 0
    for path in weight_files(Path(model_dir)):
        st = SafetensorsFile(path)
        for key in st.keys():
            largest = max(largest, math.prod(st.shape(key)))
    return largest


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write a JSON file atomically, indented and with a trailing newline."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save

    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_file(path) as f:
        f.write(payload)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `final`, renamed into place only when complete.

    With `overwrite`, an existing `final` is replaced only after the new one is complete: where the kernel can
    swap two directories in one step (Linux renameat2), a crash at any moment leaves `final` either old or new;
    elsewhere the old one is moved aside first, so a crash between the two renames leaves no `final`.
    A crash mid-build leaves only the temporary `.NAME.XXXXXXXX.tmp` (see `remove_stale_temps`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            _fsync_dir(tmp)
            if _exchange(tmp, final):
                old = tmp  # now holds the previous contents
            else:
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False  # file system or kernel without the flag: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Delete what killed `atomic_dir` / `atomic_file` writes of `final` left beside it; return what was removed.

    Matches only this name's temporaries (`.NAME.` + mkstemp's 8 random characters + `.tmp`, and `.NAME.old-PID`),
    never those of another name in the same folder. Call it only while holding the lock that guards `final`.
    """
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old-\d+)$")
    removed = []
    if final.parent.is_dir():
        for path in sorted(final.parent.iterdir()):
            if pattern.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
    return removed


class DirectoryLock:
    """An exclusive lock on a directory, held by an open file with `fcntl.flock`.

    The kernel drops the lock when the holding process exits, however it exits, so a crashed run never
    leaves it stuck; the file keeps the holder's pid for the error message.

    By default the lock file is `DIR/.qlora-lite.lock` and stays. With `beside=True` it is `.DIR.qlora-lite.lock`
    next to the directory, for outputs that are renamed into place whole (a merged export), and is deleted on
    release; a process that opened it just before that deletion notices and locks the new file instead.
    """

    def __init__(self, directory: str | Path, purpose: str = "run", beside: bool = False):
        self.directory = Path(directory)
        self.beside = beside
        if beside:
            self.path = self.directory.with_name(f".{self.directory.name}.qlora-lite.lock")
        else:
            self.path = self.directory / ".qlora-lite.lock"
        self.purpose = purpose
        self._file = None

    def acquire(self) -> "DirectoryLock":
        """Take the lock or raise `LockedError` naming the process that holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                from ..errors import LockedError

                raise LockedError(
                    f"{self.directory} is in use by {holder}; wait for it to finish or choose another output directory."
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()  # the previous holder deleted this file as it let go: lock the one now at the path
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({self.purpose})")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Drop the lock (the file stays unless `beside`; an unlocked file means nobody holds it)."""
        if self._file is not None:
            if self.beside:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # still locked here, so nobody else can be using this file
            self._file.close()
            self._file = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
