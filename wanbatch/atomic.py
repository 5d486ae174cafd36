"""Files written whole or not at all: a reader, or a run after a crash, never sees half of one.

    atomic_path(path, *, durable=False, temporary=None)  a temporary path to write; renamed over ``path`` at the end
    write_atomic(path, data, *, durable=False, temporary=None)  the same for text or bytes in hand

Every file the engine, its outputs and the simulator replace goes through
:func:`atomic_path`: the data goes to a temporary name beside the file (or to
``temporary``, on the same file system), only a whole file is renamed over
the old one, and on any failure the temporary file is removed. ``durable``
also fsyncs the file before the rename and its folder after it: an image the
ledger is about to call saved must survive a power loss, while a report that
the next run writes again need not pay for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = False, temporary: Path | None = None) -> Iterator[Path]:
    """Yield where to write what becomes ``path`` once the block ends without an error.

    The temporary name is unique per process and thread by default: two writers of one file (the end of a run
    and a worker of that run on one thumbnail) each rename a whole file, the later one winning.
    """
    tmp = temporary or path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        # The rename is durable once the folder is: only then may the ledger say saved.
        _fsync(path.parent)


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False, temporary: Path | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path, durable=durable, temporary=temporary) as tmp, open(tmp, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (a read-only descriptor serves both on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
