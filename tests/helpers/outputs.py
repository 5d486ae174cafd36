"""What a run folder holds, read as a test checks it: metadata.jsonl, the saved PNGs, and the audit of the folder
against the simulator's billing log (nothing paid twice, nothing paid and lost, every item settled).

The audit is the independent record of the money rules: the chaos, resume and signal tests (and
benchmarks/soak.py) all end with it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from helpers.ledger import ledger_rows
from wanbatch.errors import HELD_CODES

__all__ = [
    "FINAL_STATES",
    "Audit",
    "assert_billed_once_and_saved",
    "audit",
    "metadata",
    "png_problem",
    "read_jsonl",
]

#: Item states a run leaves an item in for good (a later run may make a canceled or failed one again).
FINAL_STATES = frozenset({"saved", "rejected", "failed", "expired", "canceled"})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, blank lines skipped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metadata(run_dir: Path) -> list[dict[str, Any]]:
    """The run folder's metadata.jsonl, one record per saved image."""
    return read_jsonl(run_dir / "metadata.jsonl")


def assert_billed_once_and_saved(sim, run_dir: Path) -> None:
    """Every image ``sim`` billed is on disk, its sha256 as metadata.jsonl says; no request was billed twice."""
    billed = sim.billing
    tasks_per_request = Counter(fingerprint for fingerprint, _ in {(r["fingerprint"], r["task_id"]) for r in billed})
    assert [fp for fp, tasks in tasks_per_request.items() if tasks > 1] == [], "a request was paid twice"
    rows = {(m["task_id"], m["image_index"]): m for m in metadata(run_dir)}
    for record in billed:
        row = rows[(record["task_id"], record["image_index"])]
        data = (run_dir / row["file_name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert len(rows) == len(billed)


def png_problem(path: Path, size: str) -> str | None:
    """None when ``path`` is a whole PNG of ``size`` ("W*H"), else what is wrong."""
    if not path.is_file():
        return f"no file {path}"
    width, _, height = size.partition("*")
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != (int(width), int(height)):
                return f"{path}: {image.format} {image.size}, expected a PNG of {size}"
            image.verify()
    except Exception as exc:  # Pillow raises many kinds for a broken file
        return f"{path}: not a valid PNG ({exc})"
    return None


@dataclass
class Audit:
    """What the billing log and the run folder say together. Every list empty means nothing lost or paid twice."""

    billed: int = 0
    saved: int = 0
    items: Counter = field(default_factory=Counter)
    duplicates: list[str] = field(default_factory=list)  #: fingerprints billed more than once
    lost: list[str] = field(default_factory=list)  #: billed images not on disk as a valid PNG in metadata.jsonl
    open_items: list[str] = field(default_factory=list)  #: items not in a final state
    unexplained: list[str] = field(default_factory=list)  #: final but not saved, with no reason recorded

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.lost or self.open_items or self.unexplained)

    def summary(self) -> dict[str, Any]:
        return {
            "items": dict(self.items),
            "images_billed": self.billed,
            "images_saved": self.saved,
            "duplicates": len(self.duplicates),
            "lost": len(self.lost),
            "open_items": len(self.open_items),
            "unexplained": len(self.unexplained),
        }


def audit(
    run_dir: Path,
    billing: list[dict[str, Any]],
    *,
    outputs: Path | None = None,
    rows: list[Mapping[str, Any]] | None = None,
) -> Audit:
    """Check every billed image of ours against metadata.jsonl and the disk, and every item against the ledger.

    ``outputs``: where metadata.jsonl and the images are when not in ``run_dir`` (a bucket's copy, for a run into
    object storage; ``run_dir`` then is its state folder). ``rows``: the items (item_id, state, error_code,
    error_message) when the ledger is not the folder's (a shared database's). The simulator's neighbours (other
    users of the account) are billed too; their records are not ours.
    """
    outputs = outputs or run_dir
    billing = [record for record in billing if not record.get("neighbour")]
    result = Audit(billed=len(billing))
    tasks = Counter((r["fingerprint"], r["task_id"]) for r in billing)
    per_fingerprint = Counter(fingerprint for fingerprint, _ in tasks)
    result.duplicates = sorted(f for f, count in per_fingerprint.items() if count > 1)
    listed = {(m["task_id"], m["image_index"]): m for m in metadata(outputs)}
    for record in billing:
        key = (record["task_id"], record["image_index"])
        entry = listed.get(key)
        problem = None if entry else "not in metadata.jsonl"
        if entry:
            problem = png_problem(outputs / entry["file_name"], entry["size"])
        if problem:
            result.lost.append(f"task {key[0]} image {key[1]}: {problem}")
        else:
            result.saved += 1
    if rows is None:
        rows = ledger_rows(run_dir, "SELECT item_id, state, error_code, error_message FROM items")
    for row in rows:
        result.items[row["state"]] += 1
        held = row["state"] == "unknown" and row["error_code"] in HELD_CODES  # left for the user, with the evidence
        if row["state"] not in FINAL_STATES and not held:
            result.open_items.append(f"{row['item_id']} {row['state']}")
        elif row["state"] != "saved" and not (row["error_code"] or row["error_message"]):
            result.unexplained.append(f"{row['item_id']} {row['state']}")
    return result
