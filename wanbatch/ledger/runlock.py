"""One run per folder: the lock a run holds on its run folder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from wanbatch.errors import RunLocked

__all__ = ["LOCK_FILE", "RunLock"]

LOCK_FILE = "run.lock"


class RunLock:
    """One run per folder: an exclusive ``flock`` on ``run_dir/run.lock``, holding the holder's pid.

    The OS drops the lock when its process dies, however it dies, so a killed run never blocks the next.
    A run that ends removes the file; one that was killed leaves it, and the next run takes it over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLocked(
                    f"run folder {self.path.parent} is in use by another run (pid {holder});"
                    " wait for it to end, stop it, or choose another --out folder"
                ) from None
            if self._still_named(fd):
                break
            # The holder removed the file between our open and our lock: the lock is on a name nobody sees.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        # Removed while still locked, so that a run that opened the old file finds it gone and opens a new one.
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _still_named(self, fd: int) -> bool:
        """Whether ``fd`` is the file that ``self.path`` names now."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
