"""A plan and a run's report in words: what ``wanbatch plan`` prints, ``wanbatch run`` ends with and
``wanbatch status`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wanbatch import catalog
from wanbatch.manifest.plan import repeats_line
from wanbatch.outputs.progress import format_duration

__all__ = ["plan_summary", "run_summary", "status_summary"]


def plan_summary(name: str, plan: dict[str, Any], *, budget: float | None) -> str:
    """A manifest's plan (:func:`wanbatch.make_plan`'s) as a table: items, images, cost and quota time per lane."""
    lines = [f"{name}: {plan['items']} item(s), {plan['images']} image(s)"]
    if line := repeats_line(plan):
        lines.append(line)
    lines.append(f"{'region':<10} {'model':<20} {'items':>8} {'images':>8} {'cost':>12}  quota time")
    lines += [
        f"{row['region']:<10} {row['model']:<20} {row['items']:>8} {row['images']:>8} "
        f"{row['cost']:>8.2f} {row['currency']}  {format_duration(row['quota_time_s'])}"
        for row in plan["lanes"]
    ]
    lines += [f"total: {cost:.2f} {currency} at {catalog.PRICE_TABLE}" for currency, cost in plan["cost"].items()]
    if plan.get("accounts") is not None:
        lines += _split_lines(plan)
    else:
        whose = "the account's quota allows"
        lines.append(f"time {whose}: {format_duration(plan['quota_time_s'])} (models run in parallel)")
    if budget is not None:
        lines.append(f"budget: {budget:.2f} CNY")
    return "\n".join(lines)


def _split_lines(plan: dict[str, Any]) -> list[str]:
    """The plan's split over a pool's accounts (see :func:`wanbatch.service.accounts.split_plan`)."""
    lines = [f"per account ({plan['accounts_note']}):"]
    lines.append(f"{'account':<16} {'model':<20} {'items':>8} {'images':>8} {'cost':>12}  items/s")
    lines += [
        f"{row['account']:<16} {row['model']:<20} {row['items']:>8g} {row['images']:>8g} "
        f"{row['cost']:>8.2f} {row['currency']}  {row['items_per_s']:g}"
        for row in plan["accounts"]
    ]
    lines.append(
        f"time the pool's quotas allow: {format_duration(plan['quota_time_s'])} (accounts and models in parallel)"
    )
    return lines


def run_summary(report: dict[str, Any], run_dir: Path | str) -> str:
    """The end of a run: counts, cost and time, what went wrong, what is left and why, where the outputs are."""
    lines = [
        f"items (all runs): {_counts(report['items'])}",
        f"images saved: {report['images']['saved']} in all runs, {report['images_saved_this_run']} this run"
        f"  cost: {_money(report['cost'])}  wall time: {report['wall_s']:.1f}s",
        *_failure_lines(report),
    ]
    lines += [f"  submitting stopped for {lane}: {reason}" for lane, reason in report.get("blocked", {}).items()]
    lines += _account_lines(report)
    left = report.get("items_in_manifest", {}).get("planned", 0)
    if left:
        lines.append(f"  {left} item(s) left unsubmitted: {_why_left(report)}")
    stored = report.get("outputs")
    if stored is not None:  # in object storage; the state in a folder here
        location = stored["location"]
        lines += [f"{label:<9} {location}/{name}" for label, name in _OUTPUTS]
        if stored["gallery"]:
            lines.append(f"gallery:  {location}/gallery.html")
        lines.append(f"state:    {stored['state']} (the ledger: keep it to resume)")
        lines += [
            f"  not stored: {name} (it is in {stored['state']}; run again to store it)" for name in stored["not_stored"]
        ]
        return "\n".join(lines)
    run_dir = Path(run_dir)
    lines += [f"{label:<9} {run_dir / name}" for label, name in _OUTPUTS]
    if (run_dir / "gallery.html").exists():
        lines.append(f"gallery:  {run_dir / 'gallery.html'}")
    return "\n".join(lines)


_OUTPUTS = (("images:", "images"), ("metadata:", "metadata.jsonl"), ("report:", "report.json"))


def status_summary(report: dict[str, Any]) -> str:
    """A run folder's state: counts of items and images, cost, what went wrong."""
    lines = [
        f"items:  {_counts(report['items']) or 'none'}",
        f"images: {_counts(report['images']) or 'none'}",
        f"cost:   {_money(report['cost'])}",
        *_failure_lines(report),
        *_account_lines(report),
        *_worker_lines(report),
    ]
    return "\n".join(lines)


def _worker_lines(report: dict[str, Any]) -> list[str]:
    """The workers of a batch in a shared ledger: host, pid, heartbeat, items in hand, and how each ended."""
    if not report.get("workers"):
        return []
    lines = ["workers:"]
    for worker in report["workers"]:
        if worker["alive"]:
            how = "at work"
        elif worker["taken_by"]:
            how = f"taken over by {worker['taken_by']}"
        elif worker["ended"]:
            how = "finished"
        else:
            how = "silent (its items are taken over once its lease is past)"
        lines.append(
            f"  {worker['worker_id']}  host {worker['host']} pid {worker['pid']}  run {worker['run']}  last heartbeat"
            f" {worker['heartbeat_age_s']:.1f} s ago  items in hand: {worker['items_held']}  {how}"
        )
    return lines


def _account_lines(report: dict[str, Any]) -> list[str]:
    """Per account of a pool: its items by state, images saved, cost, and its stopped lanes."""
    if not report.get("accounts"):
        return []
    lines = ["per account:"]
    for name, figures in report["accounts"].items():
        lines.append(
            f"  {name:<16} items: {_counts(figures['items']) or 'none'}; images saved: {figures['images_saved']};"
            f" cost: {_money(figures['cost'])}"
        )
        lines += [f"    stopped for {model}: {why}" for model, why in figures.get("blocked", {}).items()]
    return lines


def _failure_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for code, failure in report["failures"].items():
        for state, group in failure["states"].items():
            first = next((s["source"] for s in failure["sources"] if s["state"] == state), "")
            lines.append(f"  {group['count']} {state} {code}: {group['message']} (first at {first})")
    if report.get("cost_lost"):
        lines.append(f"  paid and lost (URLs expired before saving): {_money(report['cost_lost'])}")
    return lines


def _why_left(report: dict[str, Any]) -> str:
    if report.get("budget", {}).get("reached"):
        return "the budget was reached"
    if report.get("interrupted"):
        return "interrupted"
    if report.get("blocked"):
        return "submitting stopped (see above)"
    return "transient errors; the next run tries again"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n)


def _money(amounts: dict[str, float]) -> str:
    return ", ".join(f"{v:.2f} {k}" for k, v in amounts.items()) or "0"
