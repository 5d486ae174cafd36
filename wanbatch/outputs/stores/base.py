"""What every output store offers: the interface, what a stored object is, and the store's settings.

A store holds objects under keys: relative, ``/``-separated paths such as
``images/0001-a.png`` or ``metadata.jsonl``, the same whether the store is a
folder or a bucket. Keys are deterministic (the naming pattern decides them),
so a crash between an upload and the ledger's commit is healed by ``stat``:
the object is there, whole, under the key the ledger would have written.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

__all__ = ["Hashes", "Store", "StoreConfig", "Stored", "check_key", "digests"]

AddressingStyle = Literal["auto", "path", "virtual"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """How a store talks to its backend. Credentials are never here: each library reads its own configuration."""

    #: Uploads and HEADs in flight at once; the rest wait their turn.
    max_concurrency: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    #: Tries of one request inside the S3 client (transient errors only). The caller retries for longer, within
    #: the image's deadline, so this stays small: a store that is down fails fast and the bytes wait in memory.
    attempts: int = 2
    #: S3 addressing: "virtual" (bucket in the host name: Alibaba OSS requires it), "path", or "auto" (virtual for
    #: an ``*.aliyuncs.com`` endpoint, otherwise the S3 client's own default).
    addressing_style: AddressingStyle = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stored:
    """An object the store holds, as the store described it."""

    key: str
    size_bytes: int
    #: The MD5 the store vouches for (a single-part upload's ETag, or the file hashed), hex; None when the store
    #: gave an ETag that is not an MD5 (a multipart upload's, say).
    md5: str | None
    #: The sha256 we recorded with the object (S3 metadata ``x-amz-meta-sha256``, or the file hashed), hex; None
    #: when the store has none for it.
    sha256: str | None
    #: Whose object it is, as given to ``put_verified`` (an image's item and index), where the store keeps it with
    #: the object (S3 metadata); None otherwise.
    owner: str | None = None

    def matches(self, data: bytes) -> bool:
        """Whether this object is ``data``: same size, and every checksum the store gave agrees."""
        return self.holds(len(data), digests(data))

    def holds(self, size_bytes: int, hashes: Hashes) -> bool:
        """Whether this object is the bytes of ``size_bytes`` with ``hashes``: :meth:`matches` with the hashing
        done already (off the event loop, once per image)."""
        known = [(self.md5, hashes[0]), (self.sha256, hashes[1])]
        return (
            self.size_bytes == size_bytes
            and any(ours is not None for ours, _ in known)
            and all(ours in (None, theirs) for ours, theirs in known)
        )


#: (md5, sha256) of some bytes, hex.
Hashes = tuple[str, str]


def digests(data: bytes) -> Hashes:
    """(md5, sha256) of ``data``, hex: MD5 is what S3 stores check, sha256 what the ledger records."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path inside the store; a key that could leave it is a bug upstream."""
    parts = key.split("/")
    if not key or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{key!r} is not a store key: give a relative path of non-empty names, without . or ..")
    return key


class Store(abc.ABC):
    """Where a run's outputs go. Every method is a coroutine; at most ``max_concurrency`` requests run at once.

    Errors are ``StoreError`` (retryable: down, refusing for now, an answer that does not prove the object) or
    ``StoreConfigError`` (no bucket, refused credentials: the user must act). No message holds a credential.
    """

    #: Where the store is, for people: ``s3://bucket/prefix`` or a folder. Never holds a credential.
    location: str

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def check(self) -> None:
        """Prove at start that the store exists and takes writes, before anything is sent to the service."""
        async with self._slots:
            await self._check()

    async def put_verified(
        self, key: str, data: bytes, *, owner: str | None = None, hashes: Hashes | None = None
    ) -> Stored:
        """Store ``data`` under ``key`` and return only once the store has proved it holds all of it. ``owner``
        goes with the object where the store keeps metadata, so that ``stat`` can say whose it is; ``hashes``
        are ``digests(data)`` when the caller has them already (hashing is done once, off the event loop)."""
        check_key(key)
        md5, sha256 = hashes or await asyncio.to_thread(digests, data)
        async with self._slots:
            return await self._put(key, data, owner, md5, sha256)

    async def stat(self, key: str) -> Stored | None:
        """What the store holds under ``key``, or None: to heal a crash between upload and commit without a
        second upload (compare with ``Stored.matches`` or the ledger's sha256)."""
        check_key(key)
        async with self._slots:
            return await self._stat(key)

    async def read(self, key: str) -> bytes:
        """The bytes under ``key``; FileNotFoundError when there is none."""
        check_key(key)
        async with self._slots:
            return await self._read(key)

    async def write_text(self, key: str, text: str) -> Stored:
        """Write ``text`` (UTF-8) whole or not at all: a reader sees the old object or the new, never half."""
        return await self.put_verified(key, text.encode("utf-8"))

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """Where the object under ``key`` is, for display."""

    async def aclose(self) -> None:
        """Let go of connections; the store is not used after this."""
        return None  # a folder holds no connection

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def _check(self) -> None: ...

    @abc.abstractmethod
    async def _put(self, key: str, data: bytes, owner: str | None, md5: str, sha256: str) -> Stored: ...

    @abc.abstractmethod
    async def _stat(self, key: str) -> Stored | None: ...

    @abc.abstractmethod
    async def _read(self, key: str) -> bytes: ...
