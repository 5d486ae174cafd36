"""SQLite statements per task: what the ledger costs a finished task, counted statement by statement.

One engine runs in this process against the in-process simulator (fast clock, the catalog's quotas, tasks
that take no time, every task succeeds) through
``items`` items of ``n`` images each, with and without the gallery. Every statement the ledger's connection
runs is counted (``sqlite3.Connection.set_trace_callback``), from the ledger's opening to its closing, and
sorted by kind: reads (SELECT), writes (INSERT, UPDATE, DELETE), transactions (BEGIN, COMMIT, ROLLBACK) and
pragmas. Planning's upserts (one per item, made once per manifest) are counted apart, so that the figure per
task is what submitting, tracking, downloading and the outputs cost.

    python -m benchmarks.statements            # 200 items
    python -m benchmarks.statements --items 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from wanbatch.engine import Engine, EngineConfig
from wanbatch.ledger import Ledger
from wanbatch.manifest import Manifest
from wanbatch.sim import SimConfig, running_sim

__all__ = ["KINDS", "counted_sqlite", "kind_of", "main", "measure", "write_manifest"]

ITEMS = 200
SPEED = 100.0
KINDS = ("read", "write", "transaction", "pragma", "plan")


def kind_of(statement: str) -> str:
    """A statement's kind of :data:`KINDS` (or ``other``: DDL, settings) by its first word."""
    head = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
    if statement.lstrip().upper().startswith("INSERT INTO ITEMS"):
        return "plan"  # planning's upsert: once per item and manifest, not per task
    if head in ("SELECT", "WITH"):
        return "read"
    if head in ("INSERT", "UPDATE", "DELETE", "REPLACE"):
        return "write"
    if head in ("BEGIN", "COMMIT", "ROLLBACK"):
        return "transaction"
    return "pragma" if head == "PRAGMA" else "other"


@contextmanager
def counted_sqlite(counts: Counter) -> Iterator[None]:
    """Count every statement of every ledger opened within the block, by kind."""
    opened = Ledger.open.__func__

    def open_counted(cls, *args, **kwargs):
        ledger = opened(cls, *args, **kwargs)
        ledger._conn.set_trace_callback(lambda statement: counts.update((kind_of(statement),)))
        return ledger

    Ledger.open = classmethod(open_counted)
    try:
        yield
    finally:
        Ledger.open = classmethod(opened)


def write_manifest(folder: Path, *, items: int, n: int) -> Manifest:
    """A manifest of ``items`` distinct prompts of ``n`` images each, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(
        {
            "name": "statements",
            "defaults": {"model": "wan2.2-t2i-flash", "size": "512*512", "n": n, "prompt_extend": False, "seed": 7},
            "prompts": [f"a statement test card number {index}" for index in range(items)],
        },
        sort_keys=False,
    )
    (folder / "job.yaml").write_text(text, encoding="utf-8")
    return Manifest.from_yaml(folder / "job.yaml")


async def _run(workdir: Path, *, items: int, n: int, gallery: bool) -> dict[str, Any]:
    manifest = write_manifest(workdir, items=items, n=n)
    sim_config = SimConfig(speed=SPEED, durations=0)
    counts: Counter = Counter()
    async with running_sim(sim_config) as sim:
        engine = Engine(
            run_dir=workdir / "run",
            keys={"beijing": "sk-sim-beijing"},
            config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=SPEED, gallery=gallery),
            clock=sim.clock,
        )
        with counted_sqlite(counts):
            report = await engine.run(manifest)
    saved = report["images_saved_this_run"]
    if saved != items * n:
        raise RuntimeError(f"the run saved {saved} of {items * n} images: the figures would not be per task")
    per_task = {kind: round(counts[kind] / items, 2) for kind in KINDS if kind != "plan"}
    return {
        "items": items,
        "n": n,
        "gallery": gallery,
        "statements_per_task": round(sum(counts[k] for k in KINDS if k != "plan") / items, 2),
        "commits_per_task": round(counts["transaction"] / 2 / items, 2),
        "by_kind_per_task": per_task,
        "plan_statements": counts["plan"],
        "other": counts["other"],
    }


def measure(workdir: Path, *, items: int = ITEMS, log=print) -> dict[str, Any]:
    """Statements per task for n=1 and n=4, with the gallery (the default) and without."""
    results = {}
    for n, gallery in ((1, True), (1, False), (4, True)):
        name = f"n{n}{'' if gallery else '_no_gallery'}"
        folder = workdir / name
        shutil.rmtree(folder, ignore_errors=True)
        results[name] = asyncio.run(_run(folder, items=items, n=n, gallery=gallery))
        log(f"statements {name}: {json.dumps(results[name])}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.statements", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wanbatch-statements-") as workdir:
        measure(Path(workdir), items=args.items)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
