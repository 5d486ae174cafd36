"""Figures 1 to 4: quota utilisation, tracking cost, detection lag and 429s, for each contender.

One simulator process, with the catalog's quotas and durations, and one
account per job and contender, so each starts cold on its own quota and the
simulator's per-account watch tells their requests apart. The contenders run
one after the other, never at once: on two cores they would slow each other.

- makespan: from the first create the service received to the last image it
  served, on the service's clock;
- quota bound: max(N / submit_rps, sum of the task durations the service drew
  / concurrency, the longest task), i.e. the issue's
  max(N/RPS, N·mean_duration/concurrency) with the mean the service actually
  drew; no client can finish sooner (the longest task only counts in tiny runs);
- tracking cost: query and list requests per task;
- detection lag: from a task's end to the first query that reported it;
- 429s: answers 429 to creates, in the first minute after the first create
  (cold start) and after it (steady state);
- wall time after the last request: what a contender does once the service
  has nothing more to give (the engine writes its report, metadata and
  gallery), in real seconds, since the fast clock does not speed it up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .contenders import CONTENDERS, Job, Outcome
from .procs import SimServer

__all__ = [
    "COLD_WINDOW_S",
    "account_name",
    "job_accounts",
    "key_of",
    "measure",
    "percentile",
    "sim_accounts",
    "summarise",
]

COLD_WINDOW_S = 60.0  #: 429s this soon after the first create count as the cold start's


def account_name(name: str) -> str:
    return f"bench-{name}"


def key_of(name: str) -> str:
    return f"sk-bench-{name}"


def sim_accounts(names: list[str] | tuple[str, ...], region: str = "beijing") -> dict[str, Any]:
    """An account with one key of ``region`` per name, for the simulator's config file."""
    return {account_name(n): {"keys": {key_of(n): region}} for n in names}


def job_accounts(jobs: list[Job], contenders: tuple[str, ...] = tuple(CONTENDERS)) -> dict[str, Any]:
    """The accounts :func:`measure` uses for ``jobs``: one per job and contender."""
    accounts: dict[str, Any] = {}
    for job in jobs:
        accounts |= sim_accounts([_name(job, c) for c in contenders], job.region)
    return accounts


def _name(job: Job, contender: str) -> str:
    return f"{job.tag}-{job.model}-{contender}"


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in (0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(job: Job, outcome: Outcome, stats: dict[str, Any], *, speed: float) -> dict[str, Any]:
    """The figures of one contender's run, from its own report and the service's watch."""
    offer = job.offer
    requests = stats.get("requests", {})
    tasks = stats.get("tasks", 0)
    first, last = stats.get("first_create_s"), stats.get("last_image_s")
    makespan_s = (last - first) if first is not None and last is not None else None
    bound_rate_s = job.count / offer.submit_rps
    bound_work_s = stats.get("run_s_total", 0.0) / offer.concurrency
    bound_s = max(bound_rate_s, bound_work_s, stats.get("run_s_max", 0.0))
    throttled = [t - first for t in stats.get("throttled_s", [])] if first is not None else []
    lags = stats.get("lags_s", [])
    tracking = requests.get("query", 0) + requests.get("list", 0)
    wall_busy_s = (stats.get("last_request_mono") or 0) - (stats.get("first_request_mono") or 0)
    last_mono = stats.get("last_request_mono")
    tail_s = outcome.started_mono + outcome.wall_s - last_mono if last_mono else None
    return {
        "contender": outcome.name,
        "model": job.model,
        "items": job.count,
        "size": job.size,
        "speed": speed,
        "makespan_s": makespan_s,
        "bound_s": bound_s,
        "bound_nominal_s": max(bound_rate_s, job.count * offer.model.typical_duration_s / offer.concurrency),
        "utilisation": makespan_s / bound_s if makespan_s and bound_s else None,
        "tasks": tasks,
        "creates": requests.get("create", 0) + requests.get("sync", 0),
        "queries": requests.get("query", 0),
        "lists": requests.get("list", 0),
        "tracking_per_task": tracking / tasks if tasks else None,
        "lag_p50_s": percentile(lags, 0.50),
        "lag_p99_s": percentile(lags, 0.99),
        "lag_max_s": max(lags) if lags else None,
        "tasks_detected": len(lags),
        "throttled_cold": sum(1 for t in throttled if t < COLD_WINDOW_S),
        "throttled_steady": sum(1 for t in throttled if t >= COLD_WINDOW_S),
        "images_billed": stats.get("images_billed", 0),
        "images_served": stats.get("images_ok", 0),
        "images_saved": outcome.images_saved,
        "failed": outcome.failed,
        "exit_code": outcome.exit_code,
        "wall_s": outcome.wall_s,
        "after_last_request_wall_s": tail_s,
        "cpu_s": outcome.cpu_s,
        "sim_load_rps": sum(requests.values()) / wall_busy_s if wall_busy_s > 0 else None,
        "statuses": stats.get("statuses", {}),
        "query_answers": stats.get("query_answers", {}),
        "notes": outcome.notes,
    }


def measure(
    job: Job,
    *,
    sim: SimServer,
    workdir: Path,
    contenders: tuple[str, ...] = tuple(CONTENDERS),
    log=print,
) -> dict[str, Any]:
    """Run ``job`` through each contender against ``sim`` (its accounts from :func:`job_accounts`)."""
    results: dict[str, Any] = {}
    cpu0 = sim.stats()["cpu_s"]
    for name in contenders:
        runner, _ = CONTENDERS[name]
        key = key_of(_name(job, name))
        outcome = runner(job, base_url=sim.base_url, key=key, speed=sim.speed, workdir=workdir / name)
        stats = sim.account(account_name(_name(job, name)))
        results[name] = summarise(job, outcome, stats, speed=sim.speed)
        row = results[name]
        log(
            f"  {job.model} x{job.count} {name}: utilisation {_fmt(row['utilisation'])}, "
            f"tracking {_fmt(row['tracking_per_task'])}/task, lag p50 {_fmt(row['lag_p50_s'])} s "
            f"p99 {_fmt(row['lag_p99_s'])} s, 429 {row['throttled_cold']}+{row['throttled_steady']}, "
            f"{row['images_saved']} saved, wall {row['wall_s']:.1f} s"
        )
    results["sim_cpu_s"] = sim.stats()["cpu_s"] - cpu0
    return results


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
