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

from wanbatch.sim.config import SimConfig
from wanbatch.sim.handle import SimHandle, running_sim
from wanbatch.sim.persist import BILLING_FILE, SimStore

__all__ = ["DEFAULT_SPEED", "SIM_DIR", "demo_key", "start_embedded"]

SIM_DIR = ".sim"  #: the embedded simulators' folder in a run folder, one folder per region in it
DEFAULT_SPEED = 60.0  #: a simulated minute per wall second


def demo_key(region: str) -> str:
    """The demo key every simulator knows for ``region``."""
    return f"sk-sim-{region}"


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
