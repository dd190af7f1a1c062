"""One writer per directory: an exclusive `flock` the kernel drops when the holder exits."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import LockedError


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

    def acquire(self) -> DirectoryLock:
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

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
