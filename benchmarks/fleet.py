"""A fleet: quota utilisation of one batch run by 1, 2 and 3 worker processes through a PostgreSQL ledger.

For each worker count w, one simulator process (``benchmarks.simproc``, the service's watch of each account)
with two accounts at the catalog's quotas and tasks of a fixed duration, a fresh schema of the benchmarks'
PostgreSQL server (:mod:`benchmarks.database`), and w processes of ``wanbatch run MANIFEST --out D --ledger URL
--accounts FILE --no-gallery`` started at once, as a user starts the workers of one batch. The workers share
each account's pace and places through the database, so the pool's quota bound is that of one process over
the same two accounts (:func:`benchmarks.pools.figures`): max(N / (2·RPS), drawn durations / (2·concurrency),
longest task). Makespan is from the first create any worker made to the last image the service served, on the
service's clock; utilisation is makespan over bound (goal: at most about 1.05 whatever the worker count), and
the 429s the service answered show whether the workers together went past an account's quota. The bound of
the account given the most tasks tells what an uneven split of the items between the accounts costs apart
from what the shared pace and places cost.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from .contenders import Job
from .database import schema, server_url, unreachable
from .pools import figures, saved_images
from .procs import SimServer, child_env, reap, spawn
from .utilisation import account_name, key_of, sim_accounts

__all__ = ["ACCOUNTS", "DURATION_S", "WORKERS", "fleet_lines", "measure"]

WORKERS = (1, 2, 3)
ACCOUNTS = ("fleet-a", "fleet-b")
MODEL, SIZE = "wan2.2-t2i-flash", "1024*1024"
#: Simulated seconds each task takes. Fixed, so that every worker count meets the same work; short enough
#: that the submit rate matters as much as the places (2 places per account at 2 creates per second: a place
#: frees every 4 s, the rate allows 8 creates in that time).
DURATION_S = 8.0
RUN_TIMEOUT_S = 900.0


def measure(
    workdir: Path, *, per_account: int, speed: float, workers: tuple[int, ...] = WORKERS, repeats: int = 1, log=print
) -> dict:
    """Each worker count of ``workers`` on one batch of 2 x ``per_account`` items, ``repeats`` times; results by
    worker count, the repeat of the least makespan (or ``{"skipped": why}`` when there is no PostgreSQL server to
    run against)."""
    url = server_url()
    missing = unreachable(url)
    if missing:
        log(f"  fleet: skipped, {missing}")
        return {"skipped": missing}
    results: dict[str, Any] = {}
    for count in workers:
        # The machine may be shared: other work only ever adds to a makespan, so the least of the repeats is
        # the fleet's own figure (every repeat's utilisation is kept beside it).
        runs = [
            _measure_one(workdir / f"workers-{count}-{repeat}", count, url=url, per_account=per_account, speed=speed)
            for repeat in range(repeats)
        ]
        row = min(runs, key=lambda run: run["makespan_s"] or float("inf"))
        row["repeats"] = [run["utilisation"] for run in runs]
        row["throttled_all"] = sum(run["throttled"] for run in runs)
        results[str(count)] = row
        log(
            f"  {count} worker(s), {row['items']} x {MODEL}: utilisation {_fmt(row['utilisation'])} "
            f"(makespan {_fmt(row['makespan_s'])} s, bound {_fmt(row['bound_s'])} s, busiest account's"
            f" {_fmt(row['busiest_bound_s'])} s; repeats {[_fmt(u) for u in row['repeats']]}),"
            f" {_fmt(row['images_per_s'])} images/s simulated, tasks per account {row['tasks_per_account']},"
            f" 429 {row['throttled']} (all repeats {row['throttled_all']}), {row['images_saved']} saved,"
            f" exits {row['exit_codes']}, wall {row['wall_s']:.1f} s"
        )
    return results


def _measure_one(folder: Path, count: int, *, url: str, per_account: int, speed: float) -> dict[str, Any]:
    """One batch run by ``count`` workers against a fresh simulator and schema: its figures."""
    config = {
        "accounts": sim_accounts(ACCOUNTS),
        "durations": {MODEL: DURATION_S},
        "duration_distribution": "fixed",
    }
    job = Job(model=MODEL, count=per_account * len(ACCOUNTS), size=SIZE, tag=f"fleet{count}")
    with SimServer(folder / "sim", speed=speed, config=config) as sim, schema(url) as ledger_url:
        children = _run(job, count, ledger_url=ledger_url, base_url=sim.base_url, speed=speed, folder=folder)
        stats = [sim.account(account_name(name)) for name in ACCOUNTS]
    row = figures(job, len(ACCOUNTS), stats)
    makespan_s = row["makespan_s"]
    busiest_s = _busiest_bound_s(job, stats)
    row.update(
        busiest_bound_s=busiest_s,
        busiest_utilisation=makespan_s / busiest_s if makespan_s and busiest_s else None,
        workers=count,
        speed=speed,
        duration_s=DURATION_S,
        exit_codes=[child.returncode for child in children],
        wall_s=max(child.wall_s for child in children),
        cpu_s=sum(child.cpu_s for child in children),
        images_saved=saved_images(folder / "run"),
        images_per_s=job.count / makespan_s if makespan_s else None,
    )
    failed = [child for child in children if child.returncode != 0]
    if failed:
        row["notes"] = "; ".join(f"exit {c.returncode}: {c.log_tail(300)}" for c in failed)
    return row


def _busiest_bound_s(job: Job, stats: list[dict[str, Any]]) -> float:
    """The bound of the account given the most work: the pool's bound assumes the items split evenly, and the
    workers' readers may not split them so; makespan over this bound is what the pace and places lose."""
    offer = job.offer
    return max(
        max(s.get("tasks", 0) / offer.submit_rps, s.get("run_s_total", 0.0) / offer.concurrency, s.get("run_s_max", 0))
        for s in stats
    )


def _run(job: Job, count: int, *, ledger_url: str, base_url: str, speed: float, folder: Path) -> list:
    """``count`` worker processes of one batch, started together; each reaped (its exit, wall time, CPU)."""
    manifest = job.write_manifest(folder / "job")
    env = child_env()
    accounts = []
    for index, name in enumerate(ACCOUNTS):
        variable = f"WANBATCH_BENCH_KEY_{index}"
        env[variable] = key_of(name)
        accounts.append({"name": name, "region": job.region, "key_env": variable})
    pool = folder / "accounts.yaml"
    pool.write_text(yaml.safe_dump({"accounts": accounts}, sort_keys=False), encoding="utf-8")
    argv = [sys.executable, "-m", "wanbatch", "run", str(manifest), "--out", str(folder / "run")]
    argv += ["--ledger", ledger_url, "--accounts", str(pool), "--base-url", base_url, "--speed", f"{speed:g}"]
    argv += ["--no-gallery"]
    children = [spawn(argv, log_path=folder / f"worker-{index}.log", env=env) for index in range(count)]
    return [reap(child, timeout_s=RUN_TIMEOUT_S) for child in children]


def fleet_lines(fleet: dict[str, Any] | None) -> list[str]:
    """The section of latest.md: one row per worker count."""
    if not fleet:
        return []
    lines = [
        "## Fleet: worker processes on one batch",
        "",
        f"One batch of {MODEL} over 2 equal accounts at the catalog's quotas, run by 1, 2 and 3 `wanbatch run"
        " --ledger postgresql://...` processes at once (the simulator a process of its own, tasks of a fixed"
        " duration; how: benchmarks/fleet.py). Each worker count runs several times on a shared machine: the row is"
        " the run of the least makespan (other work only adds time); the 429s are every run's. Bound: the two"
        " accounts' quotas, as for a pool of 2 in one process;"
        " goal: makespan / bound ≤ 1.05 whatever the worker count, and no 429. The busiest account's bound is"
        " that of the account the workers gave the most tasks: makespan over it leaves out an uneven split.",
        "",
    ]
    if "skipped" in fleet:
        return [*lines, f"Not measured: {fleet['skipped']}.", ""]
    lines += [
        "| workers | items | makespan (s) | pool bound (s) | utilisation | met | images/s (simulated) | 429s"
        " | tasks per account | busiest account's bound (s) | makespan / that | every repeat's utilisation | exits"
        " | wall (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for count, row in sorted(fleet.items(), key=lambda entry: int(entry[0])):
        ratio = row.get("utilisation")
        met = "–" if ratio is None else ("yes" if round(ratio, 3) <= 1.05 else "**no**")  # as shown
        lines.append(
            f"| **{count}** | {row['items']} | {_seconds(row['makespan_s'])} | {_seconds(row['bound_s'])}"
            f" | {_fmt(ratio)} | {met} | {_fmt(row['images_per_s'])} | {row.get('throttled_all', row['throttled'])}"
            f" | {', '.join(str(n) for n in row['tasks_per_account'])} | {_seconds(row['busiest_bound_s'])}"
            f" | {_fmt(row['busiest_utilisation'])} | {', '.join(_fmt(u) for u in row.get('repeats', [ratio]))}"
            f" | {', '.join(map(str, row['exit_codes']))}"
            f" | {row['wall_s']:.1f} | {row['cpu_s']:.1f} |"
        )
    return [*lines, ""]


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
