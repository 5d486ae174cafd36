"""Figure 7: how many requests per second the simulator serves, so it is visibly not what limits 1 to 6.

The simulator process (with the benchmark's watch, as in every other figure)
gets unlimited quotas and tasks that take no time; a load generator in the
benchmark's own process keeps ``CONNECTIONS`` requests in flight for a fixed
wall time per kind: creates, queries of finished tasks, and downloads of a
cached 512*512 image. On this two-core machine the generator and the
simulator each have a core, so the figure is what one simulator core serves
to one client core: a floor, not the simulator's limit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from .ceiling import UNLIMITED
from .procs import SimServer
from .utilisation import key_of, sim_accounts

__all__ = ["CONNECTIONS", "measure"]

CONNECTIONS = 32
CREATE_PATH = "services/aigc/text2image/image-synthesis"


def _create_body(index: int) -> dict[str, Any]:
    # One prompt and seed, so every image is the same cached render: the simulator's request path is measured.
    parameters = {"size": "512*512", "n": 1, "seed": 7, "prompt_extend": False}
    return {"model": "wan2.2-t2i-flash", "input": {"prompt": "capacity test card"}, "parameters": parameters}


async def _hammer(duration_s: float, send) -> tuple[int, int, float]:
    """``CONNECTIONS`` loops calling ``send(i)`` for ``duration_s``; (answers, non-200 answers, elapsed)."""
    counts = [0, 0]
    stop_at = time.monotonic() + duration_s

    async def worker(worker_id: int) -> None:
        index = worker_id
        while time.monotonic() < stop_at:
            status = await send(index)
            counts[0] += 1
            counts[1] += status != 200
            index += CONNECTIONS

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))
    return counts[0], counts[1], time.monotonic() - started


async def _load(base_url: str, key: str, duration_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-Async": "enable"}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    results: dict[str, Any] = {}
    task_ids: list[str] = []
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def create(index: int) -> int:
            async with session.post(f"{base_url}/{CREATE_PATH}", json=_create_body(index)) as resp:
                body = await resp.json()
                if resp.status == 200:
                    task_ids.append(body["output"]["task_id"])
                return resp.status

        async def query(index: int) -> int:
            async with session.get(f"{base_url}/tasks/{task_ids[index % len(task_ids)]}") as resp:
                await resp.read()
                return resp.status

        for name, send in (("create", create), ("query", query)):
            answers, errors, elapsed = await _hammer(duration_s, send)
            results[name] = {"requests": answers, "errors": errors, "per_s": answers / elapsed}
        async with session.get(f"{base_url}/tasks/{task_ids[0]}") as resp:
            url = (await resp.json())["output"]["results"][0]["url"]

        async def image(index: int) -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        answers, errors, elapsed = await _hammer(duration_s, image)
        results["image"] = {"requests": answers, "errors": errors, "per_s": answers / elapsed}
    return results


def measure(workdir: Path, *, duration_s: float, log=print) -> dict[str, Any]:
    config = {"accounts": sim_accounts(("load",)), **UNLIMITED}
    with SimServer(workdir / "sim", speed=1.0, config=config) as sim:
        results = asyncio.run(_load(sim.base_url, key_of("load"), duration_s))
        results["sim_cpu_s"] = sim.stats()["cpu_s"]
    log("  simulator: " + ", ".join(f"{k} {v['per_s']:.0f}/s" for k, v in results.items() if isinstance(v, dict)))
    return results
