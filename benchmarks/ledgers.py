"""The database's cost per task: one batch run once on the SQLite ledger and once on the PostgreSQL one.

The same batch (``items`` one-image items of wan2.2-t2i-flash, no gallery) runs in this process against the
in-process simulator (fast clock, the catalog's quotas, tasks that take no time, every task succeeds), once
with the run folder's SQLite ledger and once as the single worker of a batch in PostgreSQL (``ledger_url``, a
fresh schema of :mod:`benchmarks.database`'s server). For each:

- statements: every statement sent to the database, by kind (:func:`benchmarks.statements.kind_of`). SQLite's
  are counted by the connection's trace callback; PostgreSQL's where psycopg sends them (each cursor's
  ``execute``/``executemany``, and the BEGIN, COMMIT and ROLLBACK of its transactions), the fleet's own
  (heartbeat, the shared pace and places) included: they are the database's work for the batch too.
  ``pg_stat_statements`` would count on the server, but it needs the server started with the library
  preloaded, which a user's database may not be.
- ledger milliseconds: the wall time of every call of the engine into the ledger (each method of
  :class:`~wanbatch.ledger.interface.RunLedger`, an iterator's time being that of its steps), outermost calls
  only. Calls the stages make at once overlap, so the sum may be more than the run's wall time: it is the
  time the work spent waiting on its ledger. For PostgreSQL also the wall time of every statement, the fleet's
  included (``db_ms``).

Both are divided by the tasks (items) of the batch; planning's upserts are counted apart, as in figure 8.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import psycopg

# psycopg sends a transaction's BEGIN and COMMIT through this class's ``_exec_command``, not through a cursor:
# counting them needs its private name (psycopg 3.2 and 3.3 keep it there).
from psycopg._connection_base import BaseConnection

import wanbatch.engine
from wanbatch.engine import Engine, EngineConfig
from wanbatch.ledger.interface import RunLedger
from wanbatch.sim import SimConfig, running_sim

from .database import schema, server_url, unreachable
from .statements import KINDS, counted_sqlite, kind_of, write_manifest

__all__ = ["LEDGERS", "ledger_lines", "measure"]

LEDGERS = ("sqlite", "postgresql")
SPEED = 100.0
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("ledger_call_depth", default=0)


class _Tally:
    """What one run's ledger cost: statements by kind, milliseconds in ledger calls and in statements."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.ledger_s = 0.0
        self.calls = 0
        self.db_s = 0.0

    def timed(self, method):
        """``method`` (a bound coroutine method of the ledger) whose outermost calls add to ``ledger_s``."""

        @functools.wraps(method)
        async def call(*args, **kwargs):
            token = _depth.set(_depth.get() + 1)
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                _depth.reset(token)
                if _depth.get() == 0:
                    self.ledger_s += time.perf_counter() - started
                    self.calls += 1

        return call

    def timed_iterator(self, method):
        """``method`` (a bound async-generator method): the time of each of its steps adds to ``ledger_s``."""

        @functools.wraps(method)
        async def iterate(*args, **kwargs):
            steps = method(*args, **kwargs).__aiter__()
            self.calls += 1
            while True:
                token = _depth.set(_depth.get() + 1)
                started = time.perf_counter()
                try:
                    row = await steps.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    _depth.reset(token)
                    if _depth.get() == 0:
                        self.ledger_s += time.perf_counter() - started
                yield row

        return iterate

    def instrument(self, ledger: RunLedger) -> None:
        """Time every call of the protocol's methods on ``ledger`` (replaced on the instance alone)."""
        for name, declared in inspect.getmembers(RunLedger, inspect.isfunction):
            if name.startswith("_"):
                continue
            method = getattr(ledger, name)
            if inspect.isasyncgenfunction(method) or (
                not inspect.iscoroutinefunction(method) and "AsyncIterator" in str(declared.__annotations__)
            ):
                setattr(ledger, name, self.timed_iterator(method))
            elif inspect.iscoroutinefunction(method):
                setattr(ledger, name, self.timed(method))


@contextmanager
def _instrumented(tally: _Tally) -> Iterator[None]:
    """The engine's ledgers, opened within the block, timed by ``tally``."""
    opener = wanbatch.engine.open_ledger

    @asynccontextmanager
    async def open_timed(*args, **kwargs):
        async with opener(*args, **kwargs) as ledger:
            tally.instrument(ledger)
            yield ledger

    wanbatch.engine.open_ledger = open_timed
    try:
        yield
    finally:
        wanbatch.engine.open_ledger = opener


def _text(query: Any) -> str:
    if isinstance(query, bytes):
        return query.decode(errors="replace")
    if isinstance(query, str):
        return query
    try:
        return query.as_string(None)
    except Exception:  # a composed query psycopg cannot render without a connection: its kind is unknown
        return ""


@contextmanager
def _counted_pg(tally: _Tally) -> Iterator[None]:
    """Count and time every statement psycopg's async cursors send, and every transaction command."""
    execute, executemany = psycopg.AsyncCursor.execute, psycopg.AsyncCursor.executemany
    command = BaseConnection._exec_command

    async def counted_execute(cursor, query, *args, **kwargs):
        tally.counts.update((kind_of(_text(query)),))
        started = time.perf_counter()
        try:
            return await execute(cursor, query, *args, **kwargs)
        finally:
            tally.db_s += time.perf_counter() - started

    async def counted_executemany(cursor, query, params_seq, *args, **kwargs):
        rows = list(params_seq)
        tally.counts.update({kind_of(_text(query)): len(rows)})
        started = time.perf_counter()
        try:
            return await executemany(cursor, query, rows, *args, **kwargs)
        finally:
            tally.db_s += time.perf_counter() - started

    def counted_command(conn, sent, *args, **kwargs):
        tally.counts.update((kind_of(_text(sent)),))
        started = time.perf_counter()
        try:
            return (yield from command(conn, sent, *args, **kwargs))
        finally:
            tally.db_s += time.perf_counter() - started

    psycopg.AsyncCursor.execute, psycopg.AsyncCursor.executemany = counted_execute, counted_executemany
    BaseConnection._exec_command = counted_command
    try:
        yield
    finally:
        psycopg.AsyncCursor.execute, psycopg.AsyncCursor.executemany = execute, executemany
        BaseConnection._exec_command = command


async def _run(workdir: Path, *, items: int, ledger_url: str | None) -> dict[str, Any]:
    manifest = write_manifest(workdir, items=items, n=1)
    tally = _Tally()
    async with running_sim(SimConfig(speed=SPEED, durations=0)) as sim:
        engine = Engine(
            run_dir=workdir / "run",
            keys={"beijing": "sk-sim-beijing"},
            config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=SPEED, gallery=False, ledger_url=ledger_url),
            clock=sim.clock,
        )
        counting = counted_sqlite(tally.counts) if ledger_url is None else _counted_pg(tally)
        started = time.perf_counter()
        with counting, _instrumented(tally):
            report = await engine.run(manifest)
        wall_s = time.perf_counter() - started
    saved = report["images_saved_this_run"]
    if saved != items:
        raise RuntimeError(f"the run saved {saved} of {items} images: the figures would not be per task")
    counts = tally.counts
    per_task = sum(counts[k] for k in KINDS if k != "plan") + counts["other"]
    return {
        "items": items,
        "statements_per_task": round(per_task / items, 2),
        "by_kind_per_task": {kind: round(counts[kind] / items, 2) for kind in (*KINDS[:-1], "other")},
        "plan_statements": counts["plan"],
        "ledger_ms_per_task": round(1000 * tally.ledger_s / items, 3),
        "ledger_calls_per_task": round(tally.calls / items, 2),
        "db_ms_per_task": round(1000 * tally.db_s / items, 3) if ledger_url else None,
        "wall_s": round(wall_s, 2),
    }


def measure(workdir: Path, *, items: int, log=print) -> dict[str, Any]:
    """The batch on each ledger of :data:`LEDGERS`; results by ledger and their ratios (PostgreSQL over SQLite),
    or the SQLite run alone with ``skipped`` when there is no PostgreSQL server."""
    results: dict[str, Any] = {}
    for name in LEDGERS:
        folder = workdir / name
        shutil.rmtree(folder, ignore_errors=True)
        if name == "sqlite":
            results[name] = asyncio.run(_run(folder, items=items, ledger_url=None))
        else:
            url = server_url()
            missing = unreachable(url)
            if missing:
                results["skipped"] = missing
                log(f"  ledgers: postgresql skipped, {missing}")
                break
            with schema(url) as ledger_url:
                results[name] = asyncio.run(_run(folder, items=items, ledger_url=ledger_url))
        log(f"  {name}: {results[name]}")
    if "postgresql" in results:
        pg, lite = results["postgresql"], results["sqlite"]
        results["ratio"] = {
            measure: round(pg[measure] / lite[measure], 2) if lite[measure] else None
            for measure in ("statements_per_task", "ledger_ms_per_task", "wall_s")
        }
    return results


def ledger_lines(ledgers: dict[str, Any] | None) -> list[str]:
    """The section of latest.md: one row per ledger and the ratio."""
    if not ledgers:
        return []
    lines = [
        "## The database's cost per task: PostgreSQL against SQLite",
        "",
        "The same batch of one-image wan2.2-t2i-flash items (no gallery, tasks that take no time) in one process,"
        " on the run folder's SQLite ledger and as the one worker of a batch in PostgreSQL on this machine"
        " (how: benchmarks/ledgers.py). Statements: all sent to the database (PostgreSQL's include the fleet's"
        " heartbeat and shared pace and places); planning's upserts apart. Ledger ms: wall time in the engine's"
        " ledger calls, overlapping calls added up.",
        "",
        "| ledger | items | statements / task | reads | writes | transaction commands | other | plan statements"
        " | ledger calls / task | ledger ms / task | statement ms / task | run wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in LEDGERS:
        row = ledgers.get(name)
        if not row:
            continue
        kinds = row["by_kind_per_task"]
        db_ms = "–" if row["db_ms_per_task"] is None else f"{row['db_ms_per_task']:.3g}"
        lines.append(
            f"| **{name}** | {row['items']} | {row['statements_per_task']:g} | {kinds['read']:g} | {kinds['write']:g}"
            f" | {kinds['transaction']:g} | {kinds['other'] + kinds['pragma']:g} | {row['plan_statements']}"
            f" | {row['ledger_calls_per_task']:g} | {row['ledger_ms_per_task']:.3g} | {db_ms} | {row['wall_s']:g} |"
        )
    if "ratio" in ledgers:
        ratio = ledgers["ratio"]
        lines.append(
            f"| **PostgreSQL / SQLite** | | {_times(ratio['statements_per_task'])} | | | | | | |"
            f" {_times(ratio['ledger_ms_per_task'])} | | {_times(ratio['wall_s'])} |"
        )
    if "skipped" in ledgers:
        lines += ["", f"PostgreSQL not measured: {ledgers['skipped']}."]
    return [*lines, ""]


def _times(value: float | None) -> str:
    return "–" if value is None else f"×{value:g}"
