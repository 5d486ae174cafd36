"""The simulators that ``wanbatch run --simulate`` and ``wanbatch cancel --simulate`` embed.

One per region, each keeping its state and billing log in the run folder
(``DIR/.sim/<region>/``), so that every process working on a simulated
folder finds the service as the last one left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wanbatch.sim.config import AccountConfig, SimConfig
from wanbatch.sim.handle import SimHandle, running_sim
from wanbatch.sim.persist import BILLING_FILE, SimStore

__all__ = ["DEFAULT_SPEED", "SIM_DIR", "demo_key", "pool_accounts", "start_embedded"]

SIM_DIR = ".sim"  #: the embedded simulators' folder in a run folder, one folder per region in it
DEFAULT_SPEED = 60.0  #: a simulated minute per wall second


def demo_key(region: str, *, account: str = "") -> str:
    """The demo key every simulator knows for ``region``; with ``account``, the demo key of that account of a
    pool, which the simulators started for the pool know (:func:`pool_accounts`)."""
    return f"sk-sim-{region}-{account}" if account else f"sk-sim-{region}"


def pool_accounts(pool: Any, regions: Iterable[str], bases: Mapping[str, SimConfig]) -> dict[str, SimConfig]:
    """Each region's settings (``bases``, default ones where a region has none) with the accounts of ``pool``
    (a :class:`wanbatch.service.accounts.Pool`) in that region added: each its own demo key and the quotas the
    pool's file gives it, so that the simulator holds every account to its own quota."""
    configs = {}
    for region in regions:
        base = bases.get(region) or SimConfig(region=region)
        added = tuple(
            AccountConfig(
                name=spec.name,
                keys={demo_key(region, account=spec.name): region},
                quotas={model: dict(quota) for model, quota in spec.quotas.items()},
            )
            for spec in pool.accounts
            if spec.region == region and spec.name not in {account.name for account in base.accounts}
        )
        configs[region] = dataclasses.replace(base, accounts=base.accounts + added)
    return configs


async def start_embedded(
    stack: contextlib.AsyncExitStack,
    run_dir: Path,
    regions: Iterable[str],
    *,
    speed: float | None,
    bases: Mapping[str, SimConfig] | None = None,
) -> dict[str, SimHandle]:
    """Start one simulator per region on loopback, continuing from the run folder; they stop with ``stack``.

    ``speed`` None: the speed the folder's simulator ran at last (60 for a new one), so that the time it was
    stopped passes as it did for the run that left it. ``bases``: a region's settings (a simulator config file's).
    """
    sims = {}
    for region in regions:
        state_dir = Path(run_dir) / SIM_DIR / region
        region_speed = speed or SimStore(state_dir).last_meta().get("speed") or DEFAULT_SPEED
        base = (bases or {}).get(region) or SimConfig(region=region)
        config = dataclasses.replace(
            base, region=region, speed=region_speed, state_dir=state_dir, billing_log=state_dir / BILLING_FILE
        )
        sims[region] = await stack.enter_async_context(running_sim(config))
    return sims
