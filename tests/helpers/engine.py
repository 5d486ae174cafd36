"""Running the engine in-process against a simulator: what many test modules share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers.manifest import write_manifest
from wanbatch.engine import Engine, EngineConfig
from wanbatch.manifest import Manifest
from wanbatch.outputs.stores import Store
from wanbatch.service.accounts import Account
from wanbatch.sim import SimConfig, running_sim


def engine_for(
    sim,
    run_dir: Path,
    *,
    clock=None,
    key: str = "sk-sim-beijing",
    budget: float | None = None,
    retry_failed: bool = False,
    retry_moderated: bool = False,
    retry_held: bool = False,
    store: Store | None = None,
    **config,
) -> Engine:
    """An engine for the Beijing simulator ``sim`` on its clock; ``config`` are EngineConfig fields."""
    return Engine(
        run_dir=run_dir,
        keys={"beijing": key},
        config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=sim.clock.speed, **config),
        clock=clock or sim.clock,
        budget=budget,
        retry_failed=retry_failed,
        retry_moderated=retry_moderated,
        retry_held=retry_held,
        store=store,
    )


def pool_engine_for(sim, run_dir: Path, accounts, *, clock=None, budget: float | None = None, **config) -> Engine:
    """An engine over a pool of the Beijing simulator ``sim``'s accounts: ``accounts`` are names (each with the
    key ``sk-<name>`` and the catalog's quotas) or :class:`Account` objects; ``config`` are EngineConfig fields."""
    pool = [
        account if isinstance(account, Account) else Account(name=account, region="beijing", key=f"sk-{account}")
        for account in accounts
    ]
    return Engine(
        run_dir=run_dir,
        accounts=pool,
        config=EngineConfig(base_urls={"beijing": sim.base_url}, speed=sim.clock.speed, **config),
        clock=clock or sim.clock,
        budget=budget,
    )


async def run_stopped_when(engine: Engine, manifest: Manifest, done: Callable[[], bool], *, timeout_s: float = 30.0):
    """Run ``engine`` and stop it as the user would (Ctrl-C) once ``done()`` holds; its report."""
    running = asyncio.create_task(engine.run(manifest))
    async with asyncio.timeout(timeout_s):
        while not done() and not running.done():
            await asyncio.sleep(0.02)
        engine.interrupt()
        return await running


def run_batch(tmp_dir: Path, manifest_text: str, **sim_config) -> Path:
    """Run a manifest against a fast simulator in a thread of its own (for sync tests and fixtures); the run folder,
    where every image the run generated is saved (the run writes its gallery too)."""
    manifest_path = write_manifest(tmp_dir, manifest_text)
    run_dir = tmp_dir / "run"

    async def run() -> dict:
        async with running_sim(SimConfig(**{"speed": 200.0, "durations": {"*": 4.0}, **sim_config})) as sim:
            return await engine_for(sim, run_dir).run(Manifest.from_yaml(manifest_path))

    with ThreadPoolExecutor(1) as pool:
        report = pool.submit(asyncio.run, run()).result()
    assert report["images"]["saved"] == report["images_generated"] > 0, report
    return run_dir
