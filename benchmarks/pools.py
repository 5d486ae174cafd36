"""Account pools: quota utilisation of one batch over 1, 2 and 4 equal accounts.

For each pool size n, one simulator process with n accounts at the catalog's
quotas, and ``wanbatch run --accounts FILE`` as a user runs it (each key in
the variable the file names) over n x ``per_account`` wan2.2-t2i-flash items.
The pool's quota bound is the one-account bound of figure 1 with the pool's
quotas: max(N / (n x submit_rps), the task durations the service drew / (n x
concurrency), the longest task). Makespan is from the first create any
account's key made to the last image the service served, on the service's
clock; utilisation is makespan over bound (the goal, as for one account: at
most 1.02). Also: each account's tasks (how evenly the reader spread them)
and the 429s the service answered (each account held to its own quota).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from .contenders import Job
from .procs import SimServer, child_env, reap, spawn
from .utilisation import account_name, key_of, sim_accounts

__all__ = ["POOL_SIZES", "figures", "measure", "pool_lines", "saved_images"]

POOL_SIZES = (1, 2, 4)
MODEL, SIZE = "wan2.2-t2i-flash", "1024*1024"


def measure(workdir: Path, *, per_account: int, speed: float, log=print) -> dict[str, Any]:
    """Each pool size of :data:`POOL_SIZES` through ``wanbatch run --accounts``; results by pool size."""
    results: dict[str, Any] = {}
    for count in POOL_SIZES:
        names = [f"pool{count}-{index}" for index in range(count)]
        folder = workdir / f"accounts-{count}"
        with SimServer(folder / "sim", speed=speed, config={"accounts": sim_accounts(names)}) as sim:
            job = Job(model=MODEL, count=per_account * count, size=SIZE, tag=f"pool{count}")
            child = _run(job, names, base_url=sim.base_url, speed=speed, folder=folder)
            stats = [sim.account(account_name(name)) for name in names]
        row = figures(job, count, stats)
        row.update(
            speed=speed,
            exit_code=child.returncode,
            wall_s=child.wall_s,
            cpu_s=child.cpu_s,
            images_saved=saved_images(folder / "run"),
        )
        if child.returncode != 0:
            row["notes"] = f"exit {child.returncode}: {child.log_tail(400)}"
        results[str(count)] = row
        log(
            f"  {count} account(s), {job.count} x {MODEL}: utilisation {_fmt(row['utilisation'])} "
            f"(makespan {_fmt(row['makespan_s'])} s, bound {_fmt(row['bound_s'])} s), tasks per account "
            f"{row['tasks_per_account']}, 429 {row['throttled']}, {row['images_saved']} saved,"
            f" wall {child.wall_s:.1f} s"
        )
    return results


def _run(job: Job, names: list[str], *, base_url: str, speed: float, folder: Path):
    """``wanbatch run MANIFEST --accounts FILE`` in a child process, each account's key in its own variable."""
    manifest = job.write_manifest(folder / "job")
    env = child_env()
    accounts = []
    for index, name in enumerate(names):
        variable = f"WANBATCH_BENCH_KEY_{index}"
        env[variable] = key_of(name)
        accounts.append({"name": name, "region": job.region, "key_env": variable})
    pool = folder / "accounts.yaml"
    pool.write_text(yaml.safe_dump({"accounts": accounts}, sort_keys=False), encoding="utf-8")
    argv = [sys.executable, "-m", "wanbatch", "run", str(manifest), "--out", str(folder / "run")]
    argv += ["--base-url", base_url, "--speed", f"{speed:g}", "--accounts", str(pool)]
    return reap(spawn(argv, log_path=folder / "wanbatch.log", env=env))


def figures(job: Job, count: int, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Makespan, the quota bound of a pool of ``count`` accounts and their ratio, from the service's watch of each
    account (``stats``: each account's statistics)."""
    offer = job.offer
    firsts = [s["first_create_s"] for s in stats if s.get("first_create_s") is not None]
    lasts = [s["last_image_s"] for s in stats if s.get("last_image_s") is not None]
    makespan_s = max(lasts) - min(firsts) if firsts and lasts else None
    bound_s = max(
        job.count / (count * offer.submit_rps),
        sum(s.get("run_s_total", 0.0) for s in stats) / (count * offer.concurrency),
        max((s.get("run_s_max", 0.0) for s in stats), default=0.0),
    )
    return {
        "accounts": count,
        "items": job.count,
        "makespan_s": makespan_s,
        "bound_s": bound_s,
        "utilisation": makespan_s / bound_s if makespan_s and bound_s else None,
        "tasks_per_account": [s.get("tasks", 0) for s in stats],
        "throttled": sum(len(s.get("throttled_s", [])) for s in stats),
        "images_billed": sum(s.get("images_billed", 0) for s in stats),
    }


def saved_images(run_dir: Path) -> int:
    """PNG files under the run's images folder."""
    images = run_dir / "images"
    return sum(1 for _ in images.rglob("*.png")) if images.exists() else 0


def pool_lines(pools: dict[str, Any] | None) -> list[str]:
    """The section of latest.md: one row per pool size."""
    if not pools:
        return []
    lines = [
        "## Account pools",
        "",
        "One batch of wan2.2-t2i-flash over 1, 2 and 4 equal accounts at the catalog's quotas"
        " (`wanbatch run --accounts FILE`; how: benchmarks/pools.py). Bound: the pool's quotas,"
        " max(N / (n·RPS), drawn durations / (n·concurrency), longest task); goal: makespan / bound ≤ 1.02.",
        "",
        "| accounts | items | makespan (s) | pool bound (s) | utilisation | met | tasks per account | 429s"
        " | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for count, row in sorted(pools.items(), key=lambda entry: int(entry[0])):
        ratio = row.get("utilisation")
        met = "–" if ratio is None else ("yes" if ratio <= 1.02 else "**no**")
        lines.append(
            f"| **{count}** | {row['items']} | {_seconds(row['makespan_s'])} | {_seconds(row['bound_s'])}"
            f" | {_fmt(ratio)} | {met} | {', '.join(str(n) for n in row['tasks_per_account'])} | {row['throttled']}"
            f" | {row['wall_s']:.1f} |"
        )
    return [*lines, ""]


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
