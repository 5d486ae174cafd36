"""A folder on this machine as a store: today's behaviour, behind the store's interface.

An object is written to a temporary file, fsynced, renamed into place and its
folder fsynced (:func:`wanbatch.atomic.write_atomic`, as the downloader's images
are); only then is it reported stored, with its size read back from the file
system. A reader never sees half a file, and a power loss after the
rename keeps the whole file. File work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from pathlib import Path

from wanbatch.atomic import write_atomic
from wanbatch.errors import StoreConfigError, StoreError
from wanbatch.outputs.stores.base import Store, StoreConfig, Stored, digests

__all__ = ["LocalStore"]

#: The file system's answers that waiting will not fix: the user must choose another folder or fix its rights.
_REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


class LocalStore(Store):
    """A folder: ``root`` holds each key as a file, sub-folders made as needed."""

    def __init__(self, root: Path, config: StoreConfig | None = None) -> None:
        super().__init__(config or StoreConfig())
        self.root = Path(root)
        self.location = str(self.root)

    def url_for(self, key: str) -> str:
        return str(self.root / key)

    async def _check(self) -> None:
        await asyncio.to_thread(self._probe)

    async def _put(self, key: str, data: bytes, owner: str | None, md5: str, sha256: str) -> Stored:  # no owner
        return await asyncio.to_thread(self._write, key, data, md5, sha256)

    async def _stat(self, key: str) -> Stored | None:
        return await asyncio.to_thread(self._read_stat, key)

    async def _read(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        except OSError as exc:
            raise self._error(exc, f"cannot read {key}") from None

    def _probe(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root) as probe:
                probe.write(b"wanbatch")
                os.fsync(probe.fileno())
        except OSError as exc:
            raise self._error(exc, "cannot write to the output folder") from None

    def _write(self, key: str, data: bytes, md5: str, sha256: str) -> Stored:
        final = self.root / key
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            # Written whole or raised: a write that returns has every byte, fsynced, under its final name.
            write_atomic(final, data, durable=True)
        except OSError as exc:
            raise self._error(exc, f"cannot write {key}") from None
        return Stored(key=key, size_bytes=len(data), md5=md5, sha256=sha256)

    def _read_stat(self, key: str) -> Stored | None:
        try:
            data = (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, f"cannot read {key}") from None
        md5, sha256 = digests(data)
        return Stored(key=key, size_bytes=len(data), md5=md5, sha256=sha256)

    def _error(self, exc: OSError, what: str) -> StoreError:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _REFUSALS:
            return StoreConfigError(f"{self.root}: {what} ({reason}): choose another --out or fix its permissions")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"{self.root}: {what} ({reason}): free some space; the images wait meanwhile")
        return StoreError(f"{self.root}: {what} ({reason})")
