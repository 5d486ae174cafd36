"""What a person watching a run sees: a live view per stage, and log lines when nobody is watching.

In a terminal, a ``rich`` display refreshed a few times a second shows the
items per stage (planned, submitted, running on the service, generated,
saved, failed), images saved and the cost, in two rows: over all runs of
the folder, and this run's share with its rate; the ETA comes from this
run's pace. Warnings print above it. Elsewhere (a pipe, cron, a file) each
event is one plain log line, or one JSON object per line with
``--log-format json``, and the same figures, labelled the same way, come as
a ``progress:`` line every half minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table


class Snapshots(Protocol):
    """What the progress line reads of a run: the engine's snapshot of its counts (None before it starts)."""

    async def snapshot(self, *, final: bool = False) -> dict[str, Any] | None: ...


__all__ = [
    "Figures",
    "JsonFormatter",
    "figures",
    "format_duration",
    "live_progress",
    "log_progress",
    "progress_line",
    "render",
    "setup_logging",
]

log = logging.getLogger("wanbatch")


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


#: Item states that end an item (for this manifest's run): counted as done.
DONE_STATES = ("saved", "failed", "rejected", "expired", "canceled")
FAILED_STATES = ("failed", "rejected", "expired")


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """One snapshot's figures: totals over every run of the folder, and this run's share of them.

    Rates and the ETA come from this run alone (what it finished over the time it has run), so a resume
    that finds most items done does not promise the rest at the speed of the runs before it.
    """

    total: int  #: items in the ledger
    done: int  #: of which finished, by any run
    done_this_run: int
    saved: int
    saved_this_run: int
    failed: int
    failed_this_run: int
    images: int  #: images saved, by any run
    images_this_run: int
    cost: float
    cost_this_run: float
    elapsed_s: float  #: of this run

    @property
    def left(self) -> int:
        return max(self.total - self.done, 0)

    @property
    def images_per_min(self) -> float:
        return self.images_this_run / max(self.elapsed_s, 1e-9) * 60

    @property
    def eta_s(self) -> float | None:
        """Seconds until every item is done at this run's pace; None before this run has finished any."""
        if not self.left or self.done_this_run <= 0:
            return None
        return self.elapsed_s / self.done_this_run * self.left


def figures(snapshot: dict) -> Figures:
    """The figures of one snapshot of the engine (see ``Engine.snapshot``)."""
    counts, before = snapshot["counts"], snapshot["at_start"]["counts"]

    def total(states: tuple[str, ...], of: dict) -> int:
        return sum(of.get(state, 0) for state in states)

    return Figures(
        total=sum(counts.values()),
        done=total(DONE_STATES, counts),
        done_this_run=max(total(DONE_STATES, counts) - total(DONE_STATES, before), 0),
        saved=counts.get("saved", 0),
        saved_this_run=max(counts.get("saved", 0) - before.get("saved", 0), 0),
        failed=total(FAILED_STATES, counts),
        failed_this_run=max(total(FAILED_STATES, counts) - total(FAILED_STATES, before), 0),
        images=snapshot["at_start"]["images_saved"] + snapshot["images_saved"],
        images_this_run=snapshot["images_saved"],
        cost=snapshot["cost"],
        cost_this_run=max(snapshot["cost"] - snapshot["at_start"]["cost"], 0.0),
        elapsed_s=snapshot["elapsed_s"],
    )


def _eta(f: Figures) -> str:
    return "" if f.eta_s is None else f"ETA {format_duration(f.eta_s)}"


def render(snapshot: dict) -> Group:
    """The display for one snapshot: items per stage and totals over all runs, then this run's share and pace."""
    counts, f = snapshot["counts"], figures(snapshot)
    bar = Progress(TextColumn("items (all runs)"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[eta]}"))
    bar.add_task("items", total=max(f.total, 1), completed=f.done, eta=_eta(f))
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("")
    for column in ("planned", "submitted", "running", "generated", "saved", "failed", "images", "per min", "cost"):
        table.add_column(column, justify="right")
    currency = snapshot["currency"]
    table.add_row(
        "all runs",
        str(counts.get("planned", 0)),
        str(counts.get("queued", 0) + counts.get("submitting", 0) + counts.get("unknown", 0)),
        str(snapshot["running"]),
        str(counts.get("generated", 0)),
        str(f.saved),
        str(f.failed),
        str(f.images),
        "",
        f"{f.cost:.2f} {currency}",
    )
    table.add_row(
        "this run",
        "",
        "",
        "",
        "",
        str(f.saved_this_run),
        str(f.failed_this_run),
        str(f.images_this_run),
        f"{f.images_per_min:.1f}",
        f"{f.cost_this_run:.2f} {currency}",
    )
    return Group(bar, table)


def progress_line(snapshot: dict) -> str:
    """The same figures as :func:`render`, labelled the same way, as one log line."""
    f = figures(snapshot)
    eta = f"; {_eta(f)}" if f.eta_s is not None else ""
    return (
        f"progress: {f.done}/{f.total} items done, {f.images} images saved (all runs); this run: "
        f"{f.done_this_run} items, {f.images_this_run} images in {format_duration(f.elapsed_s)}, "
        f"{f.images_per_min:.1f} images/min{eta}"
    )


@contextlib.asynccontextmanager
async def log_progress(engine: Snapshots, *, interval_s: float = 30.0):
    """Log :func:`progress_line` every ``interval_s`` while the body runs: the live display's figures where
    there is no terminal (cron, a pipe, a file)."""

    async def report() -> None:
        while True:
            await asyncio.sleep(interval_s)
            snapshot = await engine.snapshot()
            if snapshot is not None:
                log.info("%s", progress_line(snapshot))

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def live_progress(engine: Snapshots, console: Console, *, interval_s: float = 0.25):
    """Show ``render(engine.snapshot())`` live on ``console`` while the body runs."""
    with Live(console=console, auto_refresh=False, transient=False) as live:

        async def refresh() -> None:
            while True:
                started = time.perf_counter()
                snapshot = await engine.snapshot()
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
            snapshot = await engine.snapshot(final=True)
            if snapshot is not None:
                live.update(render(snapshot), refresh=True)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def setup_logging(*, verbose: int, quiet: bool, log_format: str, live: bool) -> Console | None:
    """The ``wanbatch`` logger's one handler: JSON lines, a live display's console (``live``, unless ``quiet``;
    events under it only when ``verbose``), or plain lines. The console of a live display, or None."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    console = None
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif live and not quiet:
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        level = logging.INFO if verbose else logging.WARNING
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("wanbatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    return console
