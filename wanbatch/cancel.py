"""``wanbatch cancel DIR``: cancel what a run left waiting on the service.

Only a task still PENDING can be canceled (the service refuses the others
with UnsupportedOperation); those are left queued for a later run to save,
since they are being paid for already.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from . import catalog
from .client import WanClient
from .clock import ScaledClock
from .errors import ApiError, TransportError
from .ledger import Ledger, RunLock
from .pacing import even_limiter
from .states import ItemState

__all__ = ["cancel_queued"]

log = logging.getLogger("wanbatch")


async def cancel_queued(
    run_dir: Path,
    *,
    keys: Mapping[str, str],
    base_url: str | None = None,
    base_urls: Mapping[str, str] | None = None,
    query_qps: float = 18.0,
) -> dict[str, int]:
    """Cancel every queued task of the run folder that has not started; returns counts."""
    counts = {"canceled": 0, "running": 0, "errors": 0}
    clock = ScaledClock()
    with RunLock(run_dir), Ledger.open(run_dir, clock=clock, create=False) as ledger:
        async with aiohttp.ClientSession() as session:
            limiter = even_limiter(query_qps)
            clients: dict[str, WanClient] = {}
            for row in ledger.iter_items([ItemState.queued]):
                if not row.task_id:
                    continue
                if row.region not in clients:
                    url = (base_urls or {}).get(row.region) or base_url or catalog.REGIONS[row.region].base_url
                    clients[row.region] = WanClient(session, base_url=url, api_key=keys[row.region])
                await limiter.acquire()
                try:
                    await clients[row.region].cancel_task(row.task_id)
                except ApiError as exc:
                    if exc.code == "UnsupportedOperation":
                        counts["running"] += 1
                    else:
                        counts["errors"] += 1
                        log.warning("cancel %s: %s", row.task_id, exc)
                    continue
                except TransportError as exc:
                    counts["errors"] += 1
                    log.warning("cancel %s: %s", row.task_id, exc)
                    continue
                ledger.transition(row.item_id, ItemState.canceled, task_status="CANCELED", note="wanbatch cancel")
                counts["canceled"] += 1
    return counts
