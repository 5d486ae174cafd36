"""The money rules as invariants, over many random schedules of an unkind service and of crashes.

Each schedule is drawn from a seed: a small manifest (several models, async and sync, prompts shared between
items and with the account's neighbours), the unkind faults at random rates, and random moments at which the
engine is stopped dead (its task cancelled, as a kill would leave it) and resumed. Afterwards the billing log
alone is the judge:

- no request of ours is paid more often than the manifest asks for it;
- every billed image of ours is saved, a whole PNG of its size, except a lost sync answer, which is reported;
- no task of a neighbour (another program on the account) is adopted;
- every item ends settled, with a reason when it is not saved.

``WANBATCH_MONEY_SCHEDULES`` sets how many schedules run (``make test`` runs a few; the soak benchmark more).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers.engine import engine_for
from helpers.ledger import ledger_rows
from helpers.outputs import png_problem
from wanbatch import catalog
from wanbatch.errors import HELD_CODES
from wanbatch.manifest import Manifest
from wanbatch.service.wire import build_body
from wanbatch.sim import SimConfig, running_sim
from wanbatch.sim.faults import FAULT_PROFILES
from wanbatch.sim.validate import fingerprint
from wanbatch.stages.reconcile import ReconcileConfig

SCHEDULES = int(os.environ.get("WANBATCH_MONEY_SCHEDULES", "8"))
SPEED = 200.0
#: API faults of the chaos profile drawn beside the unkind ones: resets, broken bodies, plain 5xx.
API_FAULTS = ("internal_error", "model_serving", "reset_before", "reset_after", "truncated_body", "malformed_json")
#: Models and how an item may be sent: the legacy protocol, wan2.6 async and wan2.6 sync.
KINDS = (
    {"model": "wan2.2-t2i-flash", "size": "512*512"},
    {"model": "wan2.2-t2i-plus", "size": "768*768"},
    {"model": "wan2.6-t2i", "size": "1280*1280"},
    {"model": "wan2.6-t2i", "size": "1280*1280", "sync": True},
)
FINAL = frozenset({"saved", "rejected", "failed", "expired", "canceled"})


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    manifest: dict
    rates: dict[str, float]
    crashes_s: tuple[float, ...]  #: wall seconds into each run at which it is stopped dead


def draw(seed: int) -> Schedule:
    """A schedule from ``seed``: items, fault rates and crash points."""
    rng = random.Random(seed)
    subjects = [f"a {rng.choice(['red', 'blue', 'grey'])} {noun}" for noun in rng.sample(NOUNS, 4)]
    entries = []
    for _ in range(rng.randint(5, 9)):
        kind = rng.choice(KINDS)
        entry = {"prompt": rng.choice(subjects), **kind, "n": rng.randint(1, 2), "seed": rng.randrange(10**6)}
        if kind["model"] != "wan2.6-t2i" and rng.random() < 0.2:
            entry["prompt"] = entry["prompt"] + ", " + "in fine detail " * 40  # long: echoed cut at 500 or 800
        entries.append(entry)
    manifest = {"name": f"money-{seed}", "defaults": {"prompt_extend": False}, "prompts": entries}
    rates = {fault: rate * rng.uniform(0.0, 2.0) for fault, rate in FAULT_PROFILES["unkind"].items()}
    rates |= {fault: rng.uniform(0.0, 0.08) for fault in API_FAULTS}
    crashes = tuple(sorted(rng.uniform(0.05, 2.5) for _ in range(rng.randint(0, 3))))
    return Schedule(seed, manifest, {k: min(v, 0.3) for k, v in rates.items()}, crashes)


NOUNS = ["fox", "teapot", "harbour", "kite", "lantern", "heron", "violin", "cactus", "bridge", "owl"]


async def play(schedule: Schedule, tmp_path: Path):
    """Run the schedule to its end against an in-process simulator; its handle, for the checks."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(schedule.manifest, sort_keys=False), encoding="utf-8")
    manifest = Manifest.from_yaml(path)
    config = SimConfig(
        speed=SPEED,
        durations={"*": 4.0},
        faults="unkind",
        fault_rates=schedule.rates,
        seed=schedule.seed,
        prompt_max={"wan2.2-t2i-flash": 800},
    )
    reconcile = ReconcileConfig(retry_s=3.0)
    async with running_sim(config) as sim:
        for crash_s in schedule.crashes_s:
            run = asyncio.create_task(engine_for(sim, tmp_path / "run", reconcile=reconcile).run(manifest))
            await asyncio.sleep(crash_s)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        for _ in range(3):  # an item left planned after transient errors is sent by the next run
            report = await engine_for(sim, tmp_path / "run", reconcile=reconcile).run(manifest)
            if not report["items"].get("planned"):
                break
        sim.advance(3600.0)  # every task of ours and the neighbours' ends and is billed
        return sim


def violations(sim, run_dir: Path) -> list[str]:
    """What the billing log and the run folder say against the money rules; empty when they hold."""
    billing = sim.billing
    mine = [r for r in billing if not r["neighbour"]]
    rows = ledger_rows(run_dir, "SELECT item_id, state, task_id, request, model, error_code, error_message FROM items")
    wanted = Counter(_fingerprint(row) for row in rows)
    paid = Counter(fp for fp, _ in {(r["fingerprint"], r["task_id"]) for r in mine})
    found = [f"request {fp[:12]} paid {n} times, wanted {wanted[fp]}" for fp, n in paid.items() if n > wanted[fp]]
    by_task = {row["task_id"]: row for row in rows if row["task_id"]}
    by_fp: dict[str, list] = {}
    for row in rows:
        by_fp.setdefault(_fingerprint(row), []).append(row)
    images = {
        (r["item_id"], r["image_index"]): r
        for r in ledger_rows(run_dir, "SELECT item_id, image_index, state, file_name FROM images")
    }
    for record in mine:
        if record["endpoint"] == "sync":
            settled = any(
                row["state"] == "saved" or row["error_code"] == "SyncAnswerLost" for row in by_fp[record["fingerprint"]]
            )
            if not settled:
                found.append(f"sync task {record['task_id']} billed, its item neither saved nor reported lost")
            continue
        row = by_task.get(record["task_id"])
        image = row and images.get((row["item_id"], record["image_index"]))
        if not image or image["state"] != "saved":
            found.append(f"billed image {record['task_id']}/{record['image_index']} not saved")
            continue
        size = _request(row)["size"]
        problem = png_problem(run_dir / image["file_name"], size)
        if problem:
            found.append(problem)
    for row in rows:  # a held item names its candidates: say whose they are
        if row["error_code"] == "HeldAmbiguous":
            views = [view for task_id, view in sim.tasks.items() if task_id in row["error_message"]]
            found.append(f"held {row['item_id']}: " + "; ".join(_whose(view) for view in views))
    neighbours = set(sim.neighbour_tasks)
    found += [f"item {row['item_id']} adopted a neighbour's task" for row in rows if row["task_id"] in neighbours]
    for row in rows:
        settled = row["state"] in FINAL or (row["state"] == "unknown" and row["error_code"] in HELD_CODES)
        if not settled:
            found.append(f"item {row['item_id']} left {row['state']}")
        elif row["state"] != "saved" and not (row["error_code"] and row["error_message"]):
            found.append(f"item {row['item_id']} {row['state']} without a reason")
    return found


def _whose(view) -> str:
    who = "neighbour" if view.neighbour else "ours"
    return f"{view.task_id[:8]} {who} key {view.key_id[-4:]} {view.size} n={view.n} made {view.landed_s:.0f}"


def _request(row) -> dict:
    return json.loads(row["request"])


def _fingerprint(row) -> str:
    """The simulator's fingerprint of the body the engine sends for this item."""
    offer = catalog.offer("beijing", row["model"])
    return fingerprint(build_body(_request(row), api_name=offer.api_name, protocol=offer.model.protocol))


@pytest.mark.parametrize("seed", range(SCHEDULES))
async def test_random_unkind_schedules_lose_nothing_and_pay_nothing_twice(seed, tmp_path):
    """A random schedule of unkind faults, neighbours and crashes: the billing log shows nothing paid twice,
    every billed image of ours saved (or a lost sync answer reported), no neighbour's task adopted, and every
    item settled with a reason."""
    schedule = draw(seed)
    sim = await play(schedule, tmp_path)
    problems = violations(sim, tmp_path / "run")
    assert problems == [], f"seed {seed}: {schedule.rates}\n" + "\n".join(problems[:20])
