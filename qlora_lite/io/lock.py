"""One writer per directory, across commands: an exclusive `flock` the kernel drops when the holder exits.

Every command that writes a directory (`train` into its run dir, `export` into its output) takes the same lock:
the file `.NAME.qlora-lite.lock` beside the directory `NAME`. It sits beside rather than inside because an export
replaces its output directory whole (a rename), which would carry a lock file inside it away; and it can be
taken before the directory exists. So an `export --overwrite` of a run dir that `train` is writing is refused,
and so is a `train` into the output an export is writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import LockedError

LOCK_SUFFIX = ".qlora-lite.lock"
# Lock file name that runs of earlier versions kept inside their run dir; still marks a run dir.
INSIDE_LOCK_NAME = LOCK_SUFFIX
# Errors meaning "this folder cannot hold a new file", as opposed to a full disk or a bad path.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def lock_path(directory: str | Path) -> Path:
    """The lock file guarding `directory`: `.NAME.qlora-lite.lock` beside it (symlinks resolved, so every
    spelling of one directory shares one lock)."""
    real = Path(directory).resolve()
    if not real.name:  # the file system root has no "beside"
        return real / INSIDE_LOCK_NAME
    return real.with_name(f".{real.name}{LOCK_SUFFIX}")


class DirectoryLock:
    """An exclusive lock on a directory, held by an open lock file with `fcntl.flock`.

    The kernel drops the lock when the holding process exits, however it exits, so a crashed run never leaves
    it stuck; the file holds "pid N (purpose)" for the error message and is deleted on release (a process that
    opened it just before that deletion notices and locks the new file instead).

    Where the folder holding the directory cannot take a file (read-only or not ours, e.g. a mount point), the
    lock file goes inside the existing directory instead. That stays one protocol: such a directory cannot be
    renamed or replaced either, so every writer of it writes in place and falls back to the same file.
    `beside` is accepted for callers of earlier versions and ignored: every lock is taken the same way.
    """

    def __init__(self, directory: str | Path, purpose: str = "run", beside: bool | None = None):
        self.directory = Path(directory)
        self.purpose = purpose
        self.path = lock_path(self.directory)
        self._file = None

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+")
        except OSError as exc:
            inside = self.directory.resolve() / INSIDE_LOCK_NAME
            if exc.errno not in _NOT_WRITABLE or self.path == inside or not self.directory.is_dir():
                raise
            self.path = inside
            return open(self.path, "a+")

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise `LockedError` naming the process that holds it."""
        import fcntl

        while True:
            handle = self._open()
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
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
        # The holder's name is only for the message: a full disk must not turn a held lock into a failure.
        with contextlib.suppress(OSError):
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} ({self.purpose})")
            handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Drop the lock and delete its file (an unlocked file left by a killed holder means nobody holds it)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # still locked here, so nobody else can be using this file
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DirectoryLock", "lock_path", "LOCK_SUFFIX", "INSIDE_LOCK_NAME"]
