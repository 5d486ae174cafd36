"""What a person watching a run sees: a live view per stage, and log lines when nobody is watching.

In a terminal, a ``rich`` display refreshed a few times a second shows the
items per stage (planned, submitted, running on the service, generated,
saved, failed), images saved with their rate, the ETA and the cost so far;
warnings print above it. Elsewhere (a pipe, cron, a file) each event is one
plain log line, or one JSON object per line with ``--log-format json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

__all__ = ["JsonFormatter", "format_duration", "live_progress", "render"]


#: The fields a log call may give (``extra=``) beside its event's name, in the order they are written.
EVENT_FIELDS = ("item", "task", "image", "region", "model", "state", "code", "images")


class JsonFormatter(logging.Formatter):
    """One JSON object per event: time, level, the event's name, its fields, and the line a person reads.

    A log call names its event and fields with ``extra={"event": "generated", "item": ...}``; a line that
    names none is the event ``"log"`` with only its message.
    """

    def format(self, record: logging.LogRecord) -> str:
        event = {"time": round(record.created, 3), "level": record.levelname.lower()}
        event["event"] = getattr(record, "event", "log")
        event |= {name: getattr(record, name) for name in EVENT_FIELDS if hasattr(record, name)}
        event["message"] = record.getMessage()
        return json.dumps(event, ensure_ascii=False, default=str)


def render(snapshot: dict) -> Group:
    """The display for one snapshot of the engine (see ``Engine.snapshot``)."""
    counts = snapshot["counts"]
    done = sum(counts.get(s, 0) for s in ("saved", "failed", "rejected", "expired", "canceled"))
    total = sum(counts.values())
    bar = Progress(TextColumn("items"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[eta]}"))
    rate = snapshot["images_saved"] / max(snapshot["elapsed_s"], 1e-9) * 60
    left = max(total - done, 0)
    eta = "" if not done or not left else f"ETA {format_duration(snapshot['elapsed_s'] / done * left)}"
    bar.add_task("items", total=max(total, 1), completed=done, eta=eta)
    table = Table(box=None, show_header=True, pad_edge=False)
    for column in ("planned", "submitted", "running", "generated", "saved", "failed", "images", "per min", "cost"):
        table.add_column(column, justify="right")
    table.add_row(
        str(counts.get("planned", 0)),
        str(counts.get("queued", 0) + counts.get("submitting", 0) + counts.get("unknown", 0)),
        str(snapshot["running"]),
        str(counts.get("generated", 0)),
        str(counts.get("saved", 0)),
        str(sum(counts.get(s, 0) for s in ("failed", "rejected", "expired"))),
        str(snapshot["images_saved"]),
        f"{rate:.1f}",
        f"{snapshot['cost']:.2f} {snapshot['currency']}",
    )
    return Group(bar, table)


@contextlib.asynccontextmanager
async def live_progress(engine, console: Console, *, interval_s: float = 0.25):
    """Show ``render(engine.snapshot())`` live on ``console`` while the body runs."""
    with Live(console=console, auto_refresh=False, transient=False) as live:

        async def refresh() -> None:
            while True:
                started = time.perf_counter()
                snapshot = engine.snapshot()
                if snapshot is not None:
                    live.update(render(snapshot), refresh=True)
                # Counting a very large ledger takes a while: never spend more than a few percent of the loop on it.
                await asyncio.sleep(max(interval_s, 30 * (time.perf_counter() - started)))

        task = asyncio.create_task(refresh())
        try:
            yield live
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            snapshot = engine.snapshot(final=True)
            if snapshot is not None:
                live.update(render(snapshot), refresh=True)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
