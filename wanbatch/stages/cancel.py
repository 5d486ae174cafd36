"""Canceling tasks on the service: one task (:func:`cancel_on_service`, which the tracker uses when the user
stops a run with ``--cancel-pending``) and ``wanbatch cancel DIR``, what a stopped run left waiting.

Only a task still PENDING can be canceled (the service refuses the others
with UnsupportedOperation); those are left queued for a later run to save,
since they are being paid for already. The service is the one the folder was
made against (its ledger's record), so a simulated folder is canceled on its
embedded simulator and never sends its task ids, or a key, to the real hosts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from wanbatch import catalog
from wanbatch.clock import ScaledClock
from wanbatch.errors import NOT_CANCELABLE, ApiError, ConfigError, RunLocked, TransportError
from wanbatch.ledger import RunLedger, RunLock, backend, open_ledger
from wanbatch.ledger.states import ItemState
from wanbatch.service.client import WanClient
from wanbatch.service.pacing import even_limiter

__all__ = ["CancelOutcome", "cancel_in_folder", "cancel_on_service", "cancel_queued"]

log = logging.getLogger("wanbatch")


class CancelOutcome(enum.StrEnum):
    """What came of asking the service to cancel one task."""

    #: The service canceled it (it cost nothing); the ledger says so.
    canceled = "canceled"
    #: It has started, so it is being paid for: it stays queued, to be saved.
    running = "running"
    #: No answer, or another refusal: it stays queued.
    failed = "failed"


async def cancel_on_service(
    ledger: RunLedger, client: WanClient, item_id: str, task_id: str, *, note: str
) -> CancelOutcome:
    """Ask the service to cancel ``task_id``, the task of ``item_id``; once it has, the ledger's item is canceled."""
    try:
        await client.cancel_task(task_id)
    except ApiError as exc:
        if exc.code == NOT_CANCELABLE:
            log.info("cancel %s: it has started; it is saved when it ends", task_id)
            return CancelOutcome.running
        log.warning("cancel %s: %s", task_id, exc)
        return CancelOutcome.failed
    except TransportError as exc:
        log.warning("cancel %s: %s", task_id, exc)
        return CancelOutcome.failed
    await ledger.transition(item_id, ItemState.canceled, expect=ItemState.queued, task_status="CANCELED", note=note)
    return CancelOutcome.canceled


async def cancel_in_folder(
    run_dir: Path,
    *,
    environ: Mapping[str, str],
    simulate: bool = False,
    base_url: str | None = None,
    pool: Any = None,
) -> dict[CancelOutcome, int]:
    """Cancel the folder's PENDING tasks on the service it was made against, unless ``simulate``/``base_url``
    name one (which must be that service: another is refused, since it does not know the folder's tasks).
    ``pool``: the accounts file the folder ran with (a :class:`wanbatch.service.accounts.Pool`): each task is
    canceled with the key of the account that made it."""
    from wanbatch.service.client import keys_from_env

    async with open_ledger(run_dir, clock=ScaledClock(), create=False) as ledger:
        regions = sorted({region for region, _ in await ledger.lanes([ItemState.queued])})
    # Cancel reaches every region with a task of the folder waiting, whether or not the folder's latest manifest
    # still uses it (the record keeps every region a run used), and only those: a region with nothing to cancel
    # is not reached, so what its record says is no reason to refuse, nor to choose the service.
    known, base_url = backend.recorded(run_dir), base_url or None
    # A record without those regions (a folder whose record lost them) tells the service by what it does hold.
    reached = None if known is None else {region: url for region, url in known.items() if region in regions} or known
    if not simulate and base_url is None and reached:
        simulate = set(reached.values()) == {backend.SIMULATED}
        base_url = backend.base_url_of(reached)
    wanted = {
        region: url
        for region, url in backend.describe(simulate=simulate, base_url=base_url).items()
        if region in regions
    }
    backend.check(run_dir, known, wanted, force=False, command="cancel")
    if not simulate:
        if pool is not None:
            keys = {account.scope: account.key for account in pool.resolve(environ)}
        else:
            keys = keys_from_env(regions, environ)
        return await cancel_queued(run_dir, keys=keys, base_url=base_url)
    from wanbatch.sim.embedded import demo_key, pool_accounts, start_embedded
    from wanbatch.sim.persist import SimInUse

    async with contextlib.AsyncExitStack() as stack:
        bases = {} if pool is None else pool_accounts(pool, regions, {})
        try:
            sims = await start_embedded(stack, run_dir, regions, speed=None, bases=bases)
        except SimInUse as exc:
            raise RunLocked(f"{run_dir} is in use by another run: {exc}") from None
        keys = {region: demo_key(region) for region in sims}
        if pool is not None:
            keys = {spec.name: demo_key(spec.region, account=spec.name) for spec in pool.accounts}
        return await cancel_queued(run_dir, keys=keys, base_urls={r: sim.base_url for r, sim in sims.items()})


async def cancel_queued(
    run_dir: Path,
    *,
    keys: Mapping[str, str],
    base_url: str | None = None,
    base_urls: Mapping[str, str] | None = None,
    query_qps: float = 18.0,
) -> dict[CancelOutcome, int]:
    """Cancel every queued task of the run folder that has not started; how many came to each outcome.
    ``keys``: per region (the environment's keys), or per account of a pool (its name) for the tasks it made."""
    counts = dict.fromkeys(CancelOutcome, 0)
    clock = ScaledClock()
    with RunLock(run_dir):
        async with open_ledger(run_dir, clock=clock, create=False) as ledger:
            queued = await ledger.account_lanes([ItemState.queued])
            missing = sorted({account or region for region, account, _ in queued} - set(keys))
            if missing:
                raise ConfigError(
                    f"{run_dir}: tasks wait in {', '.join(missing)}, but no key for it was given"
                    " (tasks a pool's account made need --accounts with the file naming it)"
                )
            async with aiohttp.ClientSession() as session:
                limiter = even_limiter(query_qps, clock=clock)
                clients: dict[str, WanClient] = {}
                async for row in ledger.iter_items([ItemState.queued]):
                    if not row.task_id:
                        continue
                    scope = row.account or row.region  # the key that made the task: only it may cancel it
                    if scope not in clients:
                        url = catalog.endpoint(row.region, base_url=base_url, base_urls=base_urls)
                        clients[scope] = WanClient(session, base_url=url, api_key=keys[scope])
                    await limiter.acquire()
                    outcome = await cancel_on_service(
                        ledger, clients[scope], row.item_id, row.task_id, note="wanbatch cancel"
                    )
                    counts[outcome] += 1
    return counts
