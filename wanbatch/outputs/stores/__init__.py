"""Where a run's outputs go: a folder, or a bucket through fsspec, behind one interface (``Store``).

    open_store("runs/x")                     LocalStore: a folder, as today
    open_store("file:///data/runs/x")        LocalStore
    open_store("s3://bucket/prefix")         S3Store: AWS, Alibaba OSS (S3-compatible endpoint), MinIO, SeaweedFS
    open_store("oss://bucket/prefix")        FsspecStore over ossfs (the ``oss`` extra)

An object counts as stored only once the store has proved it holds all of it
(see ``local`` and ``remote`` for how each proves it). Credentials and
endpoints come from each library's own configuration (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, fsspec's
config files and ``FSSPEC_S3_*`` variables; ``OSS_ENDPOINT``,
``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET`` for ossfs), never from a
manifest, and are never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wanbatch.errors import ConfigError
from wanbatch.outputs.stores.base import Store, StoreConfig, Stored, check_key
from wanbatch.outputs.stores.local import LocalStore
from wanbatch.outputs.stores.remote import FsspecStore, S3Store, endpoint_for_display

__all__ = ["FsspecStore", "LocalStore", "S3Store", "Store", "StoreConfig", "Stored", "check_key", "open_store"]


def open_store(target: str | Path, *, config: StoreConfig | None = None) -> Store:
    """The store for ``--out``: a URL (``s3://``, ``oss://``, ``file://``) or a plain path. Nothing is sent yet:
    call ``check()`` before the run sends anything."""
    config = config or StoreConfig()
    if isinstance(target, Path):
        return LocalStore(target, config)
    parts = urlsplit(target)
    scheme = parts.scheme.lower()
    if scheme == "" or len(scheme) == 1:  # a plain path (one letter: a Windows drive)
        return LocalStore(Path(target), config)
    if scheme == "file":
        return LocalStore(Path(parts.path), config)
    if scheme not in ("s3", "s3a", "oss"):
        raise ConfigError(f"--out {target}: unsupported scheme {scheme}://; use a folder, file://, s3:// or oss://")
    if "@" in parts.netloc:  # the text is not echoed: what comes before the bucket may be a key and its secret
        raise ConfigError(
            f"--out {scheme}://…@{parts.netloc.rsplit('@', 1)[1]}: no credentials in --out (they would be printed "
            f"and kept in the state folder's name); give them in the environment, see docs/storage.md"
        )
    if not parts.netloc:
        raise ConfigError(f"--out {target}: name the bucket, as in {scheme}://bucket/prefix")
    if ":" in parts.netloc or parts.query or parts.fragment or "?" in target or "#" in target:
        raise ConfigError(f"--out {target}: a bucket has no port, and a prefix no '?' or '#' (a URL drops them)")
    root = f"{parts.netloc}{parts.path}".strip("/")
    try:
        check_key(root)
    except ValueError:
        raise ConfigError(f"--out {target}: a prefix of non-empty parts, not . or .. (a store may drop them)") from None
    if scheme == "oss":
        return _oss_store(root, config)
    return _s3_store(root, config)


def _s3_store(root: str, config: StoreConfig) -> S3Store:
    try:
        import fsspec.config
        import s3fs
    except ImportError:
        raise ConfigError("s3:// needs s3fs: pip install 'wanbatch[s3]'") from None

    user = fsspec.config.conf.get("s3", {})
    endpoint = (
        user.get("endpoint_url")
        or user.get("client_kwargs", {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    fs = s3fs.S3FileSystem(
        asynchronous=True,
        skip_instance_cache=True,  # an instance belongs to one event loop; fsspec's cache would share it
        config_kwargs=_s3_client_config(config, endpoint, user.get("config_kwargs", {})),
    )
    # Our own slots bound the requests; s3fs's retry loop is left to the one layer that knows the deadline.
    fs.retries = 1
    return S3Store(fs, root, endpoint=endpoint_for_display(endpoint), config=config)


def _s3_client_config(config: StoreConfig, endpoint: str | None, user: dict[str, Any]) -> dict[str, Any]:
    """botocore's client settings: ours, then the user's fsspec config on top (theirs wins where both speak)."""
    ours: dict[str, Any] = {
        "connect_timeout": config.connect_timeout_s,
        "read_timeout": config.read_timeout_s,
        "retries": {"max_attempts": config.attempts, "mode": "standard"},
        "max_pool_connections": config.max_concurrency,
        # Content-MD5 is our proof; the default CRC32 trailers are refused by several S3-compatible stores.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    style = config.addressing_style
    if style == "auto":
        host = urlsplit(endpoint or "").hostname or ""
        style = "virtual" if host.endswith(".aliyuncs.com") else None
    if style is not None:
        ours["s3"] = {"addressing_style": style}
    merged = {**ours, **user}
    if "s3" in ours and "s3" in user:
        merged["s3"] = {**ours["s3"], **user["s3"]}
    return merged


def _oss_store(root: str, config: StoreConfig) -> FsspecStore:
    try:
        import fsspec.config
        from ossfs import AioOSSFileSystem
    except ImportError:
        raise ConfigError(
            "oss:// needs ossfs: pip install 'wanbatch[oss]' (or use OSS's S3-compatible endpoint with s3://, "
            "see docs/storage.md)"
        ) from None
    user = fsspec.config.conf.get("oss", {})
    kwargs = {
        name: os.environ[variable]
        for name, variable in (("key", "OSS_ACCESS_KEY_ID"), ("secret", "OSS_ACCESS_KEY_SECRET"))
        if name not in user and variable in os.environ
    }
    endpoint = user.get("endpoint") or os.environ.get("OSS_ENDPOINT")
    if not endpoint:
        raise ConfigError("oss:// needs an endpoint: set OSS_ENDPOINT, as in https://oss-cn-beijing.aliyuncs.com")
    fs = AioOSSFileSystem(asynchronous=True, skip_instance_cache=True, **kwargs)
    return FsspecStore(fs, root, protocol="oss", endpoint=endpoint_for_display(endpoint), config=config)
