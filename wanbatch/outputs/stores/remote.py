"""Buckets as stores, through fsspec: ``S3Store`` (s3fs: AWS, Alibaba OSS's S3-compatible endpoint, MinIO,
SeaweedFS) and ``FsspecStore`` (any async fsspec file system: ossfs for ``oss://``).

What proves an object stored:

- ``S3Store`` sends ``Content-MD5`` with a single-part ``PutObject``: the store
  computes the MD5 of what it received and refuses the request when they
  differ, so a cut or altered body is never stored. Its answer's ETag (for a
  single-part upload, the MD5 of the object) must equal our MD5 too, or the
  upload is not counted. Both are in the one answer to the PUT, so verifying
  costs no second request. Our sha256 goes with the object as metadata
  (``x-amz-meta-sha256``), so ``stat`` can match it to the ledger's record.
- ``FsspecStore`` uploads with ``_pipe_file`` and then asks for the object
  (a HEAD): its size must be ours, and an ETag that is an MD5 must be ours.

Every request goes through the file system's async API, bounded by the
store's slots. The S3 client's own checksums (CRC32 trailers, on by default
since botocore 1.36) are asked for only where an operation requires them:
several S3-compatible stores, Alibaba OSS among them, refuse the trailers,
and Content-MD5 is what every one of them verifies.

Errors are mapped here, in one place: refused credentials and a missing
bucket are ``StoreConfigError``; a store that does not answer, answers 5xx, or
answers something that does not prove the object is a retryable
``StoreError``. A message never holds a credential: known secrets are blanked
from whatever the store's answer said.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from wanbatch.errors import StoreConfigError, StoreError
from wanbatch.outputs.stores.base import Store, StoreConfig, Stored, digests

__all__ = ["FsspecStore", "S3Store"]

#: Where each library looks for credentials in the environment: blanked from any message that echoes them.
SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OSS_ACCESS_KEY_ID",
    "OSS_ACCESS_KEY_SECRET",
    "OSS_SESSION_TOKEN",
)
#: Where a run leaves its proof of write access: one small object, overwritten by each start.
CHECK_KEY = ".wanbatch/write-check"


#: botocore's errors for credentials it cannot find or read: the user must act, as for refused ones.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


class _Unproved(StoreError):
    """The store answered an upload with a size or ETag that does not prove it holds what was sent."""


class FsspecStore(Store):
    """``root`` (``bucket/prefix``) on an async fsspec file system ``fs``, whose protocol is ``protocol``."""

    def __init__(self, fs: Any, root: str, *, protocol: str, endpoint: str, config: StoreConfig) -> None:
        super().__init__(config)
        self.fs, self.root, self.protocol, self.endpoint = fs, root.strip("/"), protocol, endpoint
        self.bucket = self.root.split("/", 1)[0]
        self.location = f"{protocol}://{self.root}"

    def url_for(self, key: str) -> str:
        return f"{self.location}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    async def _check(self) -> None:
        try:
            exists = await self.fs._exists(self.bucket)
        except Exception as exc:
            raise self._error(exc, f"looking for bucket {self.bucket}") from None
        if not exists:
            raise self._no_bucket()
        await self._prove_writes()

    async def _put(self, key: str, data: bytes, owner: str | None, md5: str, sha256: str) -> Stored:  # no owner
        try:
            await self.fs._pipe_file(self._path(key), data)
            info = await self.fs._info(self._path(key))
        except Exception as exc:
            raise self._error(exc, f"storing {key}") from None
        stored = self._from_info(key, info)
        if stored.size_bytes != len(data) or stored.md5 not in (None, md5):
            raise self._mismatch(key, f"{stored.size_bytes} bytes, MD5 {stored.md5}", f"{len(data)} bytes, MD5 {md5}")
        return Stored(key=key, size_bytes=len(data), md5=md5, sha256=sha256)

    async def _stat(self, key: str) -> Stored | None:
        try:
            info = await self.fs._info(self._path(key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, f"asking for {key}") from None
        return self._from_info(key, info)

    async def _read(self, key: str) -> bytes:
        try:
            return await self.fs._cat_file(self._path(key))
        except FileNotFoundError:
            raise FileNotFoundError(key) from None
        except Exception as exc:
            raise self._error(exc, f"reading {key}") from None

    def _from_info(self, key: str, info: dict[str, Any]) -> Stored:
        etag = info.get("ETag") or info.get("etag") or ""
        return Stored(key=key, size_bytes=int(info.get("size") or 0), md5=_md5_of_etag(etag), sha256=None)

    # ── errors, in one place ──────────────────────────────────────────────────────────────────────

    def _error(self, exc: BaseException, action: str) -> StoreError:
        """The store's exception ``exc`` while ``action``, as ours, with no credential in its text."""
        reason = _scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self._secrets())
        if isinstance(exc, PermissionError) or type(exc).__name__ in _NO_CREDENTIALS:
            return StoreConfigError(
                f"{self.location} (endpoint {self.endpoint}) refused us {action} ({reason}): check the credentials "
                f"({self._credential_hint()}) and that they may read and write bucket {self.bucket}"
            )
        if isinstance(exc, FileNotFoundError):
            return self._no_bucket()
        if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError) or _is_botocore(exc):
            return StoreError(f"{self.location} (endpoint {self.endpoint}) failed {action}: {reason}")
        raise exc  # anything else is a bug of ours, not the store's answer: it goes on as it is

    def _no_bucket(self) -> StoreConfigError:
        return StoreConfigError(
            f"bucket {self.bucket} does not exist at endpoint {self.endpoint}: create it, or give --out a bucket "
            f"that exists (and check the endpoint and region)"
        )

    def _mismatch(self, key: str, theirs: str, ours: str) -> StoreError:
        return _Unproved(f"{self.url_for(key)}: the store answered {theirs} for {ours} sent; not counted as saved")

    async def _prove_writes(self) -> None:
        """Write the check object: a store that answers it without proof will answer every image so."""
        try:
            await self._put(CHECK_KEY, b"wanbatch", None, *digests(b"wanbatch"))
        except _Unproved as exc:
            raise StoreConfigError(
                f"{exc}. A store whose ETag is not the MD5 of what it took (a bucket encrypted with SSE-KMS or SSE-C, "
                f"say) cannot prove it holds an image: give --out a bucket without such encryption"
            ) from None

    def _credential_hint(self) -> str:
        return "OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, or fsspec's oss config"

    def _secrets(self) -> Iterable[str]:
        yield from (os.environ.get(name, "") for name in SECRET_VARIABLES)
        yield from (str(getattr(self.fs, name, None) or "") for name in ("key", "secret", "token"))


class S3Store(FsspecStore):
    """``s3://bucket/prefix`` through s3fs: verified by Content-MD5 and the single-part upload's ETag."""

    def __init__(self, fs: Any, root: str, *, endpoint: str, config: StoreConfig) -> None:
        super().__init__(fs, root, protocol="s3", endpoint=endpoint, config=config)
        self._prefix = self.root[len(self.bucket) + 1 :]

    def _object_key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    async def _check(self) -> None:
        await self._call("head_bucket", f"looking for bucket {self.bucket}")
        await self._prove_writes()

    async def _put(self, key: str, data: bytes, owner: str | None, md5: str, sha256: str) -> Stored:
        answer = await self._call(
            "put_object",
            f"storing {key}",
            Key=self._object_key(key),
            Body=data,
            ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
            ContentType=mimetypes.guess_type(key)[0] or "application/octet-stream",
            Metadata={"sha256": sha256} | ({"owner": owner} if owner else {}),
        )
        etag = _md5_of_etag(answer.get("ETag", ""))
        if etag != md5:
            raise self._mismatch(key, f"ETag {answer.get('ETag')!r}", f"MD5 {md5}")
        return Stored(key=key, size_bytes=len(data), md5=md5, sha256=sha256, owner=owner)

    async def _stat(self, key: str) -> Stored | None:
        try:
            head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=self._object_key(key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error(exc, f"asking for {key}") from None
        return Stored(
            key=key,
            size_bytes=int(head["ContentLength"]),
            md5=_md5_of_etag(head.get("ETag", "")),
            sha256=(head.get("Metadata") or {}).get("sha256"),
            owner=(head.get("Metadata") or {}).get("owner"),
        )

    async def _call(self, method: str, action: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return await self.fs._call_s3(method, Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise self._error(exc, action) from None

    async def aclose(self) -> None:
        client = getattr(self.fs, "_s3", None)
        if client is not None:
            self.fs._s3 = None
            await client.close()

    def _credential_hint(self) -> str:
        return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or fsspec's s3 config"


def _md5_of_etag(etag: str) -> str | None:
    """The MD5 an ETag states, or None: a multipart upload's ETag (``<md5>-<parts>``) is not the object's MD5."""
    value = etag.strip().strip('"').lower()
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else None


def _is_botocore(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's (a connection refused, a timeout): imported only where s3fs is."""
    return type(exc).__module__.startswith(("botocore", "aiobotocore"))


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def endpoint_for_display(url: str | None) -> str:
    """``url`` without any user or password in it; "the default (AWS)" when there is none."""
    if not url:
        return "the default (AWS)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
