"""The engine as ``wanbatch run --base-url URL --speed X`` runs it, for the ceiling benchmark.

    python -m benchmarks.engine_proc MANIFEST --out DIR|URL [--state DIR] --base-url URL --speed X
                                     [--lift-quotas] [--guard-s S] [--no-gallery] [-q]

The engine paces itself to the quotas of ``wanbatch.catalog`` and queries
below the account's 20 per second; against a simulator whose quotas are
lifted it would still keep to them. ``--lift-quotas`` tells this process's
engine what the simulator was told (every offer unlimited, queries
unlimited); nothing else changes. ``--guard-s`` replaces the pacer's
per-request wall-clock guard, to find what limits the engine once that guard
is gone (a diagnostic, not the engine as shipped); ``--no-gallery`` leaves
out the gallery written at the end, as ``wanbatch run --no-gallery`` does. ``--out`` takes a bucket URL
(``s3://bucket/prefix``) with ``--state DIR`` for the ledger, as ``wanbatch run`` does: the store is proved
before anything is sent and its client reads the standard ``AWS_*`` variables. The API key comes from
``DASHSCOPE_API_KEY`` as for ``wanbatch run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from wanbatch import catalog
from wanbatch.engine import Engine, EngineConfig
from wanbatch.manifest import Manifest
from wanbatch.outputs.location import locate
from wanbatch.service import pacing
from wanbatch.service.client import keys_from_env

__all__ = ["CPU_MARK", "lift_quotas", "main"]

CPU_MARK = "engine cpu: "
UNLIMITED_RPS = 1e6
UNLIMITED_CONCURRENCY = 10**6


def lift_quotas() -> None:
    """Every catalog offer unlimited, in this process only (the simulator's config says the same)."""
    offers = catalog._OFFERS  # the catalog has no setter: quotas are facts of the service, not settings
    for key, offer in offers.items():
        offers[key] = dataclasses.replace(offer, submit_rps=UNLIMITED_RPS, concurrency=UNLIMITED_CONCURRENCY)


def _set_guard(guard_s: float) -> None:
    defaults = list(pacing.Pacer.__init__.__kwdefaults__.items())
    pacing.Pacer.__init__.__kwdefaults__ = {**dict(defaults), "guard_s": guard_s}


async def _run(args: argparse.Namespace) -> int:
    manifest = Manifest.from_yaml(args.manifest)
    regions = sorted({item.region for item in manifest.items()})
    config = EngineConfig(
        base_url=args.base_url,
        speed=args.speed,
        **({"query_qps": UNLIMITED_RPS} if args.lift_quotas else {}),
        **({} if args.gallery else {"gallery": False}),
    )
    where = locate(args.out, state=args.state)
    async with contextlib.AsyncExitStack() as stack:
        if where.store is not None:
            stack.push_async_callback(where.store.aclose)
            await where.store.check()
        engine = Engine(
            run_dir=where.state_dir, store=where.store, keys=keys_from_env(regions, os.environ), config=config
        )
        report = await engine.run(manifest)
    items = report["items_in_manifest"]
    print(f"images saved: {report['images']['saved']}  wall: {report['wall_s']:.2f}s", flush=True)
    # The event loop's thread against the whole process: the rest ran in worker threads (files, PNG checks).
    cpu = {"main_thread_cpu_s": time.thread_time(), "process_cpu_s": time.process_time()}
    print(CPU_MARK + json.dumps(cpu), flush=True)
    return 0 if items.get("saved", 0) == sum(items.values()) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_proc", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", required=True, help="a folder, or a bucket URL with --state")
    parser.add_argument("--state", type=Path, default=None, help="the ledger's folder when --out is a bucket")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--lift-quotas", action="store_true")
    parser.add_argument("--guard-s", type=float, default=None)
    parser.add_argument("--no-gallery", dest="gallery", action="store_false", help="as wanbatch run --no-gallery")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, as wanbatch run -q")
    args = parser.parse_args(argv)
    # The same logging as the CLI's: one INFO line per event unless quiet.
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    if args.lift_quotas:
        lift_quotas()
    if args.guard_s is not None:
        _set_guard(args.guard_s)
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
