"""The end of a run: ``metadata.jsonl``, the gallery and ``report.json``, and, when the outputs are in object
storage, each of them stored beside the images.

They are written to the run's state folder first (the same files a local run
leaves), then put in the store, verified as images are; ``report.json`` last,
so that it can say whether the others were stored. A store that refuses them
costs no image: the images are saved already, and the next run (or
``wanbatch run`` again on the finished folder) writes them again.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

import aiofiles

from wanbatch.errors import ConfigError, StoreError
from wanbatch.ledger.interface import RunLedger
from wanbatch.outputs.export import Format, export
from wanbatch.outputs.gallery import DATA_FILE, GALLERY_FILE, write_gallery
from wanbatch.outputs.location import locate
from wanbatch.outputs.metadata import METADATA_FILE, REPORT_FILE, write_metadata, write_report
from wanbatch.outputs.stores import Store

__all__ = ["export_from_store", "export_run", "store_files", "write_outputs"]

log = logging.getLogger("wanbatch")


async def write_outputs(
    run_dir: Path,
    ledger: RunLedger,
    *,
    run: int,
    extra: dict[str, Any],
    gallery: bool,
    store: Store | None = None,
) -> dict[str, Any]:
    """Write what a run leaves for people and tools into ``run_dir`` (and ``store``); the report."""
    extra = {**extra, "images_in_metadata": await write_metadata(run_dir, ledger)}
    if gallery:
        await write_gallery(run_dir, ledger, images_here=store is None, title=None if store is None else _title(store))
    if store is None:
        return await write_report(run_dir, ledger, run=run, extra=extra)
    names = [METADATA_FILE, *([DATA_FILE, GALLERY_FILE] if gallery else [])]
    not_stored = await store_files(store, run_dir, names)
    extra["outputs"] = {"location": store.location, "state": str(run_dir), "gallery": gallery, "not_stored": not_stored}
    report = await write_report(run_dir, ledger, run=run, extra=extra)
    # The report cannot list itself; what the run returns (and prints) does.
    report["outputs"]["not_stored"] += await store_files(store, run_dir, [REPORT_FILE])
    return report


async def store_files(store: Store, folder: Path, names: list[str]) -> list[str]:
    """Put each of ``names`` (files in ``folder``) in ``store`` under the same name; those it refused."""
    refused = []
    for name in names:
        async with aiofiles.open(folder / name, "rb") as f:
            data = await f.read()
        try:
            await store.put_verified(name, data)
        except StoreError as exc:
            log.error("✗ %s not stored (it is in %s): %s", name, folder, exc)
            refused.append(name)
    return refused


def _title(store: Store) -> str:
    """The gallery's title for a run in a store: the last part of its location, as a folder's name would be."""
    return store.location.rstrip("/").rsplit("/", 1)[-1]


def export_run(run: str, *, state: Path | None, fmt: Format, out: Path | None, shard_size: int) -> list[str]:
    """``wanbatch export RUN``: the run's shards, from a folder or from a bucket (:func:`export_from_store`);
    where each went."""
    where = locate(run, state=state)
    if where.store is None:
        return [str(path) for path in export(where.state_dir, fmt=fmt, out=out, shard_size=shard_size)]
    store, state_dir = where.store, where.state_dir

    async def from_store() -> list[str]:
        async with store:
            state_dir.mkdir(parents=True, exist_ok=True)
            return await export_from_store(store, state_dir, fmt=fmt, out=out, shard_size=shard_size)

    return asyncio.run(from_store())


async def export_from_store(
    store: Store, state_dir: Path, *, fmt: Format, out: Path | None, shard_size: int
) -> list[str]:
    """``wanbatch export`` of a run whose outputs are in ``store``: its ``metadata.jsonl`` and images read from
    the store, the shards written to ``out`` or, by default, stored under ``exports/FMT/`` beside them; where
    each shard went."""
    loop = asyncio.get_running_loop()

    def read(name: str) -> bytes:  # in export's worker thread: each read is done on the event loop
        return asyncio.run_coroutine_threadsafe(store.read(name), loop).result()

    with tempfile.TemporaryDirectory(dir=state_dir, prefix="export-") as scratch:
        folder = Path(scratch)
        try:
            (folder / METADATA_FILE).write_bytes(await store.read(METADATA_FILE))
        except FileNotFoundError:
            raise ConfigError(f"{store.location} has no {METADATA_FILE}: has a run finished into it?") from None
        shards = await asyncio.to_thread(
            export,
            folder,
            fmt=fmt,
            out=out or folder / "shards",
            shard_size=shard_size,
            read=read,
            where=store.location,
        )
        if out is not None:
            return [str(path) for path in shards]
        keys = [f"exports/{fmt}/{path.name}" for path in shards]
        for path, key in zip(shards, keys, strict=True):
            await store.put_verified(key, await asyncio.to_thread(path.read_bytes))
        return [store.url_for(key) for key in keys]
