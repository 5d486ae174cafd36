"""What a run leaves for people and tools: ``metadata.jsonl`` and ``report.json``.

``metadata.jsonl`` follows the ``imagefolder`` layout: one JSON object per
saved image, its ``file_name`` relative to the run folder, so the folder loads
as a dataset as it is. ``report.json`` says what happened: counts per state,
images, cost, timings and every failure with its code, message and the
manifest line it came from. Both are rewritten whole from the ledger, to a
temporary file renamed into place (:mod:`wanbatch.atomic`), so a reader never sees half a file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from wanbatch.atomic import write_atomic
from wanbatch.errors import WRITE_OFF_CODES
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["METADATA_FILE", "POOL_META", "REPORT_FILE", "build_report", "write_metadata", "write_report"]

METADATA_FILE = "metadata.jsonl"
REPORT_FILE = "report.json"

FAILURE_STATES = (ItemState.rejected, ItemState.failed, ItemState.expired, ItemState.unknown, ItemState.canceled)


async def write_metadata(run_dir: Path, ledger: RunLedger) -> int:
    """One line per saved image; returns how many.

    Every row has the same columns with the same types: a dataset loader infers them from the first part of
    the file only, so a variable some items lack is "" there, not absent, and so is a missing text value.
    """
    names: set[str] = set()
    async for _, item in ledger.iter_saved():
        names.update(item.variables)
    lines = []
    async for image, item in ledger.iter_saved():
        request = item.request
        row = {
            "file_name": image.file_name,
            "prompt": request["prompt"],
            "actual_prompt": image.actual_prompt or "",
            "negative_prompt": request.get("negative_prompt") or "",
            "model": item.model,
            "region": item.region,
            "size": request["size"],
            "seed": image.seed,
            "variables": {name: str(item.variables.get(name, "")) for name in sorted(names)},
            "item_id": item.item_id,
            "task_id": item.task_id or "",
            "image_index": image.image_index,
            "sha256": image.sha256,
            "source": item.source,
            # Every row of the manifest that asked for this request: a row repeating another finds its image here.
            "sources": [item.source, *item.more_sources],
        }
        if not names:
            del row["variables"]  # a struct with no fields cannot be stored
        lines.append(json.dumps(row, ensure_ascii=False))
    write_atomic(run_dir / METADATA_FILE, "".join(line + "\n" for line in lines))
    return len(lines)


async def write_report(run_dir: Path, ledger: RunLedger, *, run: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Write and return ``report.json``: the ledger's summary, failures grouped by code (each with the
    message of every state it ended items in), and ``extra``."""
    report = await build_report(ledger, run=run, extra=extra)
    write_atomic(run_dir / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _count_failure(group: dict[str, Any], row: ItemRow) -> None:
    """One failed item into its code's group. The message is kept per state: one code can mean two things
    (DataInspectionFailed refuses a prompt at submit, rejected, or an image after generating it, failed)."""
    state = str(row.state)
    group["count"] += 1
    per_state = group["states"].setdefault(state, {"count": 0, "message": row.error_message or ""})
    per_state["count"] += 1
    if len(group["sources"]) < 20:
        group["sources"].append({"item_id": row.item_id, "state": state, "source": row.source, "entry": row.entry})


async def build_report(ledger: RunLedger, *, run: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The report as it stands now; ``wanbatch status`` builds it too, while a run goes on."""
    failures: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "states": {}, "sources": []})
    lost_cost = defaultdict(float)
    async for row in ledger.iter_items(FAILURE_STATES):
        if row.error_code in WRITE_OFF_CODES:  # possibly billed, images never had: counted as paid and lost
            lost_cost[row.currency] += row.cost
        _count_failure(failures[row.error_code or str(row.state)], row)
    lost = []
    async for image in ledger.iter_images([ImageState.expired]):
        item = await ledger.get(image.item_id)
        lost_cost[item.currency] += item.price_per_image
        if len(lost) < 50:
            lost.append({"item_id": image.item_id, "image_index": image.image_index, "error": image.error_message})
    waiting = []
    async for image in ledger.iter_images([ImageState.pending]):
        # Generated and paid, not on disk yet (a download error, a full disk): a later run saves it.
        waiting.append(
            {
                "item_id": image.item_id,
                "image_index": image.image_index,
                "deadline_ms": image.deadline_ms,
                "error": image.error_message,
            }
        )
    report = {
        **(await ledger.summary()),
        "run": run,
        "failures": dict(failures),
        "images_expired": lost,
        "cost_lost": {currency: round(cost, 6) for currency, cost in lost_cost.items()},
        "images_not_saved_yet": waiting[:50],
        **extra,
    }
    if await ledger.meta(POOL_META):  # a folder run with an account pool: the figures of each account
        report["accounts"] = await _per_account(ledger, extra.get("accounts_this_run") or {})
    return report


#: The ledger's meta key that names the accounts of the pools a folder was run with (comma-separated).
POOL_META = "accounts"


async def _per_account(ledger: RunLedger, this_run: dict[str, Any]) -> dict[str, Any]:
    """Per account: items per state (where its key made the latest attempt), images generated and saved, cost,
    and this run's creates and stopped lanes."""
    found = await ledger.account_summary()
    names = [name for name in (await ledger.meta(POOL_META) or "").split(",") if name]
    figures = {}
    for name in dict.fromkeys([*names, *found, *this_run]):
        entry = found.get(name) or {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}}
        run = this_run.get(name) or {}
        figures[name] = {
            **entry,
            "items_submitted": sum(n for state, n in entry["items"].items() if state != "planned"),
            "submitted_this_run": run.get("submitted", 0),
            "blocked": run.get("blocked", {}),
        }
    return figures
