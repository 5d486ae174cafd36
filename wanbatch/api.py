"""The Python API: ``await wanbatch.run("jobs/x.yaml", out="runs/x")`` does what ``wanbatch run`` does.

Example::

    import asyncio, wanbatch

    report = asyncio.run(wanbatch.run("jobs/foxes.yaml", out="runs/foxes", simulate=True))
    print(report["images"]["saved"], report["cost"])

The key comes from the environment (``DASHSCOPE_API_KEY``, or a region's own
``DASHSCOPE_API_KEY_SINGAPORE``...) unless ``keys`` is given; ``simulate``
runs against the embedded simulator instead, with demo keys and a fast clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from .engine import Engine, EngineConfig, keys_from_env, stored_plan
from .errors import ConfigError
from .manifest import Manifest
from .plan import make_plan
from .progress import live_progress, log_progress
from .submit import SubmitConfig
from .track import TrackerConfig

__all__ = ["BudgetExceeded", "run"]

log = logging.getLogger("wanbatch")

SIM_SPEED = 60.0  #: the embedded simulator's default clock: a simulated minute per second


class BudgetExceeded(ConfigError):
    """The manifest's plan costs more than its budget: nothing was sent."""


async def run(
    manifest: str | Path | Manifest,
    *,
    out: str | Path,
    simulate: bool = False,
    speed: float | None = None,
    base_url: str | None = None,
    keys: Mapping[str, str] | None = None,
    budget: float | None = None,
    sync: bool = False,
    retry_failed: bool = False,
    retry_moderated: bool = False,
    handle_signals: bool = False,
    cancel_pending: bool = False,
    on_engine: Callable[[Engine], None] | None = None,
    progress: Console | None = None,
    gallery: bool = True,
    tracking: str = "prompt",
) -> dict[str, Any]:
    """Run (or resume) ``manifest`` into the run folder ``out`` and return the report.

    ``budget`` (CNY) overrides the manifest's ``budget:``: a plan over it is refused before anything is
    sent (:class:`BudgetExceeded`), and submitting stops before spent plus in-flight cost would pass it.
    ``handle_signals`` makes SIGINT/SIGTERM stop submitting (and with ``cancel_pending`` cancel tasks
    still waiting on the service) while what is paid for is finished; a second signal quits at once.
    ``progress`` shows a live display of the run on that ``rich`` console; ``gallery`` writes
    ``gallery.html`` with thumbnails at the end. ``tracking`` is ``"prompt"`` (a task's end is seen within
    about two seconds, a few queries per task) or ``"frugal"`` (about one query per task, ends seen later).
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_yaml(manifest)
    # A run folder that holds this very manifest (same digest) was checked and planned when it was filled.
    plan = stored_plan(Path(out), manifest)
    if plan is None:
        survey = manifest.survey()
        for warning in survey.warnings:
            log.warning("warning: %s", warning)
        plan = make_plan(manifest, survey)
    limit = budget if budget is not None else manifest.budget
    planned_cost = sum(plan["cost"].values())
    if limit is not None and planned_cost > limit + 1e-9:
        raise BudgetExceeded(
            f"{manifest.path}: the plan costs {planned_cost:.2f} CNY ({plan['images']} images), over the budget of "
            f"{limit:.2f} CNY; raise `budget:` or --budget, or trim the manifest (see `wanbatch plan`)"
        )
    submit, track = SubmitConfig(sync_wan26=sync), TrackerConfig(policy=tracking)
    async with contextlib.AsyncExitStack() as stack:
        if simulate:
            keys, config, clock = await _simulators(stack, plan["regions"], speed=speed or SIM_SPEED, submit=submit)
            config = replace(config, gallery=gallery, track=track)
        else:
            keys = dict(keys) if keys is not None else keys_from_env(plan["regions"], os.environ)
            config = EngineConfig(
                base_url=base_url or os.environ.get("DASHSCOPE_HTTP_BASE_URL"),
                speed=speed or 1.0,
                submit=submit,
                track=track,
                gallery=gallery,
            )
            clock = None
        engine = Engine(
            run_dir=Path(out),
            keys=keys,
            config=config,
            clock=clock,
            budget=limit,
            retry_failed=retry_failed,
            retry_moderated=retry_moderated,
        )
        if on_engine is not None:
            on_engine(engine)
        if handle_signals:
            stack.enter_context(_signals(engine, cancel_pending=cancel_pending))
        if progress is not None:
            await stack.enter_async_context(live_progress(engine, progress))
        else:
            await stack.enter_async_context(log_progress(engine))
        return await engine.run(manifest, plan=plan)


async def _simulators(stack: contextlib.AsyncExitStack, regions: list[str], *, speed: float, submit: SubmitConfig):
    """One embedded simulator per region the manifest uses, with its demo key; they stop with ``stack``."""
    from .sim import SimConfig, running_sim

    sims = {
        region: await stack.enter_async_context(running_sim(SimConfig(region=region, speed=speed)))
        for region in regions
    }
    log.info("simulating %s at %gx speed", ", ".join(sims), speed)
    keys = {region: f"sk-sim-{region}" for region in sims}
    config = EngineConfig(base_urls={r: s.base_url for r, s in sims.items()}, speed=speed, submit=submit)
    return keys, config, next(iter(sims.values())).clock if sims else None


@contextlib.contextmanager
def _signals(engine: Engine, *, cancel_pending: bool):
    """First SIGINT/SIGTERM: stop submitting, finish what is paid for. Second: cancel the run at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            log.warning(
                "■ stopping: nothing new is submitted; finishing what is paid for. "
                "Press Ctrl-C again to quit at once (the run folder stays resumable)."
            )
            engine.interrupt(cancel_pending=cancel_pending)
        elif task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
