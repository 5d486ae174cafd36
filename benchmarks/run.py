"""``python -m benchmarks.run``: every figure of issue 6, written to benchmarks/results/latest.{md,json}.

    python -m benchmarks.run                 # the issue's sizes (about 50 minutes on two cores)
    python -m benchmarks.run --quick         # tiny sizes, seconds: checks that every row comes out
    python -m benchmarks.run --only scale    # one section again, merged into the existing results
    python -m benchmarks.run --render        # latest.md again from latest.json (after a change of report.py)

Sections, in order: ``utilisation`` (figures 1-4 for wan2.2-t2i-flash and
wan2.6-t2i, each through wanbatch, the dashscope SDK and a plain loop),
``slow_clock`` (figures 1-3 for wan2.6-t2i on a slower simulated clock, to
show how much the fast clock weighs on each contender), ``cold_start``
(429s when wan2.5-t2i-preview starts from idle),
``ceiling`` (5), ``scale`` (6), ``capacity`` (7), ``statements`` (8, the ledger's SQLite
statements per task), ``gallery`` (its own section, also
``python -m benchmarks.gallery``), ``pools`` (quota utilisation over 1, 2 and
4 accounts, its own section), ``fleet`` (1, 2 and 3 worker processes on one batch
through a PostgreSQL ledger) and ``ledgers`` (the database's statements and
milliseconds per task, PostgreSQL against SQLite). Scratch files go to
``--workdir`` (default runs/bench, emptied first). The benchmark asserts
nothing about time: it measures and reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import capacity, ceiling, fleet, gallery, ledgers, pools, report, scale, statements, utilisation
from .contenders import CONTENDERS, Job
from .procs import SimServer

__all__ = ["FULL", "QUICK", "SECTIONS", "Sizes", "main", "run"]

REPO = Path(__file__).resolve().parent.parent
SECTION_TITLES = {
    "utilisation": "figures 1-4, quota utilisation and tracking",
    "slow_clock": "figures 1-3 again on a slower clock",
    "cold_start": "figure 4, 429s at a cold start",
    "ceiling": "figure 5, engine ceiling",
    "scale": "figure 6, scale",
    "capacity": "figure 7, simulator capacity",
    "statements": "figure 8, ledger statements per task",
    "gallery": "the gallery at scale",
    "pools": "quota utilisation of account pools",
    "fleet": "quota utilisation of worker processes on one batch",
    "ledgers": "the database's cost per task, PostgreSQL against SQLite",
}
SECTIONS = tuple(SECTION_TITLES)
CONTENDER_SECTIONS = ("utilisation", "slow_clock", "cold_start")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    speed: float  #: simulated seconds per wall second for figures 1-4
    items: int  #: tasks per model in figures 1-4
    slow_speed: float  #: the slower clock of the check on figures 1-3
    slow_items: int
    cold_speed: float  #: the clock of the cold start: slow enough that a second holds several requests
    cold_items: int
    ceiling_items: int
    scale_items: int
    capacity_s: float  #: wall seconds of load per request kind
    statements_items: int  #: items of each run whose SQLite statements are counted
    gallery_images: tuple[int, ...]  #: images of each synthetic run whose gallery is measured
    pool_items: int  #: items per account of the pools' runs (1, 2 and 4 accounts)
    fleet_items: int  #: items per account of the fleet's runs (2 accounts)
    fleet_workers: tuple[int, ...]  #: the worker counts the fleet is measured with
    fleet_repeats: int  #: runs of each worker count (the least makespan is reported)
    ledger_items: int  #: items of the batch run on each ledger


#: The issue's sizes. Speed 100: a loopback round trip of 1-2 ms stands for 0.1-0.2 s, a plausible round
#: trip to the real service, and 2,000 flash tasks (40,000 s of quota time) take under 7 minutes each.
FULL = Sizes(
    speed=100.0,
    items=2000,
    slow_speed=25.0,
    slow_items=200,
    cold_speed=20.0,
    cold_items=40,
    ceiling_items=2000,
    scale_items=1_000_000,
    capacity_s=3.0,
    statements_items=statements.ITEMS,
    gallery_images=gallery.SIZES,
    pool_items=500,
    fleet_items=300,
    fleet_workers=fleet.WORKERS,
    fleet_repeats=3,
    ledger_items=200,
)
QUICK = Sizes(
    speed=400.0,
    items=4,
    slow_speed=400.0,
    slow_items=2,
    cold_speed=400.0,
    cold_items=6,
    ceiling_items=10,
    scale_items=2000,
    capacity_s=0.3,
    statements_items=10,
    gallery_images=(50,),
    pool_items=4,
    fleet_items=2,
    fleet_workers=(2,),  # worker processes start in about a second each: one run of two shows the rows come out
    fleet_repeats=1,
    ledger_items=10,
)

#: model -> the size every contender asks for (the model's default size)
MODELS = {"wan2.2-t2i-flash": "1024*1024", "wan2.6-t2i": "1280*1280"}
SLOW_MODEL = ("wan2.6-t2i", "1280*1280")
COLD_MODEL = ("wan2.5-t2i-preview", "1280*1280")


def _contenders_section(
    section: str, jobs: list[Job], *, speed: float, workdir: Path, log, contenders: tuple[str, ...]
) -> dict[str, Any]:
    """Every job through each of ``contenders`` against one simulator at ``speed``; results by model."""
    log(f"{SECTION_TITLES[section]}: {', '.join(f'{j.count} x {j.model}' for j in jobs)} at speed {speed:g}")
    config = {"accounts": utilisation.job_accounts(jobs, contenders)}
    with SimServer(workdir / section / "sim", speed=speed, config=config) as sim:
        return {
            job.model: utilisation.measure(
                job, sim=sim, workdir=workdir / section / job.model, contenders=contenders, log=log
            )
            for job in jobs
        }


def run(
    sections: tuple[str, ...],
    sizes: Sizes,
    *,
    workdir: Path,
    log=print,
    profile: bool = True,
    contenders: tuple[str, ...] = tuple(CONTENDERS),
) -> dict[str, Any]:
    """Run ``sections`` at ``sizes``; their results by section name (``profile``: the profiled ceiling run;
    ``contenders``: who runs figures 1-4)."""
    results: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    contender_jobs = {
        "utilisation": (
            [Job(model=m, count=sizes.items, size=size, tag="util") for m, size in MODELS.items()],
            sizes.speed,
        ),
        "slow_clock": (
            [Job(model=SLOW_MODEL[0], count=sizes.slow_items, size=SLOW_MODEL[1], tag="slow")],
            sizes.slow_speed,
        ),
        "cold_start": (
            [Job(model=COLD_MODEL[0], count=sizes.cold_items, size=COLD_MODEL[1], tag="cold")],
            sizes.cold_speed,
        ),
    }
    for section, (jobs, speed) in contender_jobs.items():
        if section in sections:
            results[section] = _contenders_section(
                section, jobs, speed=speed, workdir=workdir, log=log, contenders=contenders
            )
            settings[section] = f"{jobs[0].count} tasks per model, speed {speed:g}"
    if "ceiling" in sections:
        log(f"{SECTION_TITLES['ceiling']}: {sizes.ceiling_items} items")
        results["ceiling"] = ceiling.measure(workdir / "ceiling", items=sizes.ceiling_items, log=log, profile=profile)
        settings["ceiling"] = f"{sizes.ceiling_items} items, speed {ceiling.SPEED:g}"
    if "scale" in sections:
        log(f"{SECTION_TITLES['scale']}: {sizes.scale_items} items")
        results["scale"] = scale.measure(workdir / "scale", items=sizes.scale_items, log=log)
        settings["scale"] = f"{sizes.scale_items:,} items"
    if "capacity" in sections:
        log(SECTION_TITLES["capacity"])
        results["capacity"] = capacity.measure(workdir / "capacity", duration_s=sizes.capacity_s, log=log)
        settings["capacity"] = f"{sizes.capacity_s:g} s per kind, {capacity.CONNECTIONS} connections"
    if "statements" in sections:
        log(f"{SECTION_TITLES['statements']}: {sizes.statements_items} items")
        results["statements"] = statements.measure(workdir / "statements", items=sizes.statements_items, log=log)
        settings["statements"] = f"{sizes.statements_items} items, speed {statements.SPEED:g}"
    if "gallery" in sections:
        log(f"{SECTION_TITLES['gallery']}: {', '.join(f'{n:,}' for n in sizes.gallery_images)} images")
        results["gallery"] = gallery.run(sizes.gallery_images, workdir=workdir / "gallery", log=log)
    if "pools" in sections:
        log(f"{SECTION_TITLES['pools']}: {sizes.pool_items} items per account, speed {sizes.speed:g}")
        results["pools"] = pools.measure(workdir / "pools", per_account=sizes.pool_items, speed=sizes.speed, log=log)
        settings["pools"] = f"{sizes.pool_items} items per account, speed {sizes.speed:g}"
    if "fleet" in sections:
        log(f"{SECTION_TITLES['fleet']}: {sizes.fleet_items} items per account, speed {sizes.speed:g}")
        results["fleet"] = fleet.measure(
            workdir / "fleet",
            per_account=sizes.fleet_items,
            speed=sizes.speed,
            workers=sizes.fleet_workers,
            repeats=sizes.fleet_repeats,
            log=log,
        )
        settings["fleet"] = (
            f"{sizes.fleet_items} items per account, 2 accounts, {fleet.DURATION_S:g} s tasks, speed {sizes.speed:g},"
            f" the least makespan of {sizes.fleet_repeats} run(s) per worker count"
        )
    if "ledgers" in sections:
        log(f"{SECTION_TITLES['ledgers']}: {sizes.ledger_items} items")
        results["ledgers"] = ledgers.measure(workdir / "ledgers", items=sizes.ledger_items, log=log)
        settings["ledgers"] = f"{sizes.ledger_items} items, speed {ledgers.SPEED:g}"
    results["settings"] = settings
    return results


def _merge(previous: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The results of ``previous`` (latest.json) with the sections just run replaced."""
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError):
        return fresh
    merged = dict(old)
    for section, value in fresh.items():
        if section in CONTENDER_SECTIONS and isinstance(old.get(section), dict):
            # Runs of some contenders only: the others' runs of the same section are kept.
            merged[section] = {
                model: {**old[section].get(model, {}), **runs} if isinstance(runs, dict) else runs
                for model, runs in value.items()
            }
        elif section != "settings":
            merged[section] = value
    merged["settings"] = {**old.get("settings", {}), **fresh.get("settings", {})}
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--speed", type=float, help="simulator speed for figures 1-4")
    parser.add_argument("--items", type=int, help="tasks per model for figures 1-4")
    parser.add_argument("--scale-items", type=int, help="items of the manifest of figure 6")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated contenders of {tuple(CONTENDERS)}"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--render", action="store_true", help="rewrite latest.md from latest.json; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        doc = json.loads((args.out / "latest.json").read_text(encoding="utf-8"))
        keep = {k: doc[k] for k in ("results", "settings", "machine", "date")}
        print(f"wrote {report.write(args.out, **keep)}")
        return 0
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    base = QUICK if args.quick else FULL
    sizes = dataclasses.replace(
        base,
        speed=args.speed or base.speed,
        items=args.items or base.items,
        scale_items=args.scale_items or base.scale_items,
    )
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    machine = report.machine_facts()
    started = time.monotonic()
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    if set(contenders) - set(CONTENDERS):
        parser.error(f"unknown contender(s) {', '.join(sorted(set(contenders) - set(CONTENDERS)))}")
    results = run(sections, sizes, workdir=args.workdir, profile=not args.quick, contenders=contenders)
    if set(sections) != set(SECTIONS) or set(contenders) != set(CONTENDERS):
        results = _merge(args.out / "latest.json", results)
    machine["load_average_end"] = list(os.getloadavg())
    machine["commit_end"] = report.machine_facts()["commit"]  # other work may land while a long run goes
    settings = {
        "contenders": ", ".join(label for _, label in CONTENDERS.values()),
        "wall_s": round(time.monotonic() - started, 1),
        **({"mode": "quick"} if args.quick else {}),
        **results.get("settings", {}),
    }
    path = report.write(args.out, results=results, settings=settings, machine=machine)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
