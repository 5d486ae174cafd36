"""The billing log: one record per billed image, the independent proof of what was paid.

The service bills every successfully generated image, once, when its task
succeeds; failed images and failed or canceled tasks are free. A record is
written when its task ends in simulated time, with that end time:

    {"time": 1767225600.123, "task_id": "...", "image_index": 0, "model": "wan2.6-t2i",
     "fingerprint": "<sha256 of the canonical request body>", "key_id": "...",
     "account": "demo", "endpoint": "async", "neighbour": false}

``image_index`` is the image's place in the task's results (0-based),
``endpoint`` the create endpoint (``legacy``, ``async`` or ``sync``), and
``neighbour`` true for a task another user of the account made (a simulated
neighbour), so that a check of what *we* paid can leave those out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from wanbatch.sim.persist import read_lines
from wanbatch.sim.tasks import Task

__all__ = ["BillingLog"]


class BillingLog:
    """Billing records in memory, and appended (flushed) to a JSON-lines file when one is given."""

    def __init__(self, path: Path | None) -> None:
        self.records: list[dict[str, Any]] = []
        self._path = path
        self._file: IO[str] | None = None

    def load(self) -> set[str]:
        """Take in the records an earlier process appended to the file; returns the task ids billed."""
        if self._path is None or not self._path.is_file():
            return set()
        for line in read_lines(self._path):
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
        return {record["task_id"] for record in self.records}

    def open(self) -> None:
        if self._path is not None and self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def bill(self, task: Task) -> None:
        """Record every generated image of ``task`` (called once, when it ends)."""
        lines = []
        for image in task.succeeded_images:
            record = {
                "time": round(task.end_s, 3),
                "task_id": task.task_id,
                "image_index": image.index,
                "model": task.model,
                "fingerprint": task.fingerprint,
                "key_id": task.key_id,
                "account": task.account,
                "endpoint": task.endpoint.kind,
                "neighbour": task.neighbour,
            }
            self.records.append(record)
            lines.append(json.dumps(record, ensure_ascii=False))
        if lines and self._file is not None:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
