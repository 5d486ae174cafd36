"""The Python API: ``await wanbatch.run("jobs/x.yaml", out="runs/x")`` does what ``wanbatch run`` does.

Example::

    import asyncio, wanbatch

    report = asyncio.run(wanbatch.run("jobs/foxes.yaml", out="runs/foxes", simulate=True))
    print(report["images"]["saved"], report["cost"])

The key comes from the environment (``DASHSCOPE_API_KEY``, or a region's own
``DASHSCOPE_API_KEY_SINGAPORE``...) unless ``keys`` is given; ``accounts`` (an
accounts file, see :mod:`wanbatch.service.accounts`) runs the batch over a pool
of accounts instead, each key from the variable the file names; ``simulate``
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

import yaml
from rich.console import Console

from wanbatch import catalog
from wanbatch.engine import Engine, EngineConfig
from wanbatch.errors import BudgetExceeded, ConfigError, RunLocked
from wanbatch.fleet.config import FleetConfig
from wanbatch.ledger import backend
from wanbatch.manifest import Manifest
from wanbatch.manifest.plan import make_plan
from wanbatch.outputs.location import before_sending, check_outputs, check_state_marker, locate
from wanbatch.outputs.progress import live_progress, log_progress
from wanbatch.outputs.stores import Store
from wanbatch.service.accounts import Pool, check_pool_serves, load_accounts
from wanbatch.service.client import keys_from_env
from wanbatch.service.quotas import QuotaTable, check_quotas, load_quotas
from wanbatch.stages.intake import refuse_other_manifest, stored_plan
from wanbatch.stages.submit import SubmitConfig
from wanbatch.stages.track import TrackerConfig

__all__ = ["run"]

log = logging.getLogger("wanbatch")


async def run(
    manifest: str | Path | Manifest,
    *,
    out: str | Path,
    state: str | Path | None = None,
    simulate: bool = False,
    speed: float | None = None,
    base_url: str | None = None,
    keys: Mapping[str, str] | None = None,
    budget: float | None = None,
    sync: bool = False,
    retry_failed: bool = False,
    retry_moderated: bool = False,
    retry_held: bool = False,
    handle_signals: bool = False,
    cancel_pending: bool = False,
    on_engine: Callable[[Engine], None] | None = None,
    progress: Console | None = None,
    gallery: bool = True,
    tracking: str = "prompt",
    quotas: str | Path | QuotaTable | None = None,
    accounts: str | Path | Pool | None = None,
    sim_config: str | Path | None = None,
    force_backend: bool = False,
    force: bool = False,
    ledger_url: str | None = None,
    lease_s: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``manifest`` into ``out`` and return the report.

    ``out`` is a run folder, or object storage (``s3://bucket/prefix``, ``oss://bucket/prefix``): the images,
    ``metadata.jsonl``, the gallery and ``report.json`` then go there, and the run's state (its ledger) to the
    folder ``state`` (default: one under the user's cache named after ``out``, see
    :mod:`wanbatch.outputs.location`). The store is proved to exist and take writes before anything is sent.

    ``budget`` (CNY) overrides the manifest's ``budget:``: a plan over it is refused before anything is
    sent (:class:`BudgetExceeded`), and submitting stops before spent plus in-flight cost would pass it.
    ``handle_signals`` makes SIGINT/SIGTERM stop submitting (and with ``cancel_pending`` cancel tasks
    still waiting on the service) while what is paid for is finished; a second signal quits at once.
    ``progress`` shows a live display of the run on that ``rich`` console; ``gallery`` writes
    ``gallery.html`` with thumbnails at the end. ``tracking`` is ``"prompt"`` (a task's end is seen within
    about two seconds, a few queries per task) or ``"frugal"`` (about one query per task, ends seen later).
    ``quotas`` are the account's quotas where they differ from the catalog's (a YAML file or a mapping, see
    :mod:`wanbatch.service.quotas`). ``accounts`` is a pool of accounts (a YAML file or a
    :class:`~wanbatch.service.accounts.Pool`): each (account, model) is a lane with the account's own quotas,
    and the planned items go to the account with free quota; each account's key comes from the variable the
    file names (with ``simulate``, each has a demo key of its own). ``sim_config`` configures the embedded
    simulator (``wanbatch sim --config``'s file).
    A run folder resumes only against the service it was made against (``simulate``, ``base_url``): another
    is refused (:class:`wanbatch.ledger.backend.BackendMismatch`, a ConfigError) unless ``force_backend``.
    A folder filled from another manifest is refused (:class:`~wanbatch.stages.intake.OtherManifest`) unless
    ``force``: the two would mix in one ``metadata.jsonl``.
    ``ledger_url`` (``postgresql://...``) keeps the run's ledger in that database instead of the folder, as one worker
    of the batch named by ``out``: every worker started on the same manifest, ``out``, ledger and accounts shares
    the batch, its accounts' quotas and its budget, and takes over the items of a worker silent for ``lease_s``
    (default 90); the last to finish writes the outputs (docs/fleet.md).
    """
    _check_options(speed=speed, budget=budget, simulate=simulate, sim_config=sim_config)
    if ledger_url is not None and simulate:
        raise ConfigError(
            "--simulate starts a simulator inside each process; the workers of a shared ledger must share one "
            "service: start `wanbatch sim` once and give every worker its --base-url"
        )
    if accounts is not None and quotas is not None:
        raise ConfigError("quotas are for one account; with an accounts file, give each account its quotas there")
    account_quotas = _quotas(quotas)
    pool = load_accounts(accounts) if isinstance(accounts, str | Path) else accounts
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_yaml(manifest)
    where = locate(out, state=state)
    folder = where.state_dir
    check_outputs(where, force=force)
    if not force and ledger_url is None:  # a shared ledger's batch is checked by the engine, in the database
        refuse_other_manifest(folder, manifest)
    # A run folder that holds this very manifest (same digest) was checked and planned when it was filled.
    plan = stored_plan(folder, manifest)
    if plan is None:
        survey = manifest.survey()
        for warning in survey.warnings:
            log.warning("warning: %s", warning)
        plan = make_plan(manifest, survey)
    if pool is not None:
        check_pool_serves(pool, plan)
    limit = budget if budget is not None else manifest.budget
    planned_cost = sum(plan["cost"].values())
    if limit is not None and planned_cost > limit + 1e-9:
        raise BudgetExceeded(
            f"{manifest.path}: the plan costs {planned_cost:.2f} CNY ({plan['images']} images), over the budget of "
            f"{limit:.2f} CNY; raise `budget:` or --budget, or trim the manifest (see `wanbatch plan`)"
        )
    base_url = None if simulate else base_url or os.environ.get(catalog.BASE_URL_ENV)
    # Only the regions this manifest uses: another region's host is no concern of this folder's.
    endpoints = {
        region: url
        for region, url in backend.describe(simulate=simulate, base_url=base_url).items()
        if region in plan["regions"]
    }
    # Looked at before any simulator starts; the engine checks again under the folder's lock.
    backend.check(folder, backend.recorded(folder), endpoints, force=force_backend)
    submit, track = SubmitConfig(sync_wan26=sync), TrackerConfig(policy=tracking)
    async with contextlib.AsyncExitStack() as stack:
        if where.store is not None:
            stack.push_async_callback(where.store.aclose)
            await _check_store(where.store, folder)
            if ledger_url is None:  # a shared ledger is no state folder: the bucket names none
                await check_state_marker(where, force=force)
        pooled = None
        if simulate:
            keys, config, clock = await _simulators(
                stack, folder, plan["regions"], speed=speed, submit=submit, config_file=sim_config, pool=pool
            )
            config = replace(config, gallery=gallery, track=track, quotas=account_quotas)
            if pool is not None:
                pooled = pool.resolve({}, keys=keys)
        elif pool is not None:
            pooled = pool.resolve(os.environ, keys=keys)
            config = EngineConfig(base_url=base_url, speed=speed or 1.0, submit=submit, track=track, gallery=gallery)
            clock = None
        else:
            keys = dict(keys) if keys is not None else _env_keys(plan, os.environ)
            config = EngineConfig(
                base_url=base_url,
                speed=speed or 1.0,
                submit=submit,
                track=track,
                gallery=gallery,
                quotas=account_quotas,
            )
            clock = None
        config = replace(config, backend=endpoints, force_backend=force_backend)
        if ledger_url is not None:
            fleet = FleetConfig() if lease_s is None else FleetConfig.for_lease(lease_s)
            config = replace(config, ledger_url=ledger_url, batch=str(where.out), fleet=fleet)
        engine = Engine(
            run_dir=folder,
            store=where.store,
            keys=keys if pooled is None else None,
            accounts=pooled,
            config=config,
            clock=clock,
            budget=limit,
            retry_failed=retry_failed,
            retry_moderated=retry_moderated,
            retry_held=retry_held,
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


def _env_keys(plan: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment's key of each region the plan needs: every region of an item allowed only one; for items
    allowed several, the keys of those regions that have one, at least one of them."""
    needed = sorted({lane["region"] for lane in plan["lanes"] if len(lane.get("regions", [lane["region"]])) == 1})
    keys = keys_from_env(needed, environ)
    keys |= keys_from_env(plan["regions"], environ, require=False)
    for lane in plan["lanes"]:
        if not set(lane.get("regions", [lane["region"]])) & set(keys):
            # Said as for one region: the first of them is named, with the variables that serve it.
            keys_from_env(lane["regions"], environ)
    return keys


async def _check_store(store: Store, state_dir: Path) -> None:
    """Prove the store exists and takes writes, before anything is sent: a run that could not save its images
    would pay for them and lose them."""
    with before_sending():
        await store.check()
    log.info("outputs: %s; the run's state (ledger): %s", store.location, state_dir)


def _check_options(*, speed: float | None, budget: float | None, simulate: bool, sim_config: str | Path | None) -> None:
    """Refuse what cannot be meant, before anything is read or sent."""
    if speed is not None and not speed > 0:
        raise ConfigError(f"speed {speed:g}: the service clock's speed must be above 0 (1 is real time)")
    if budget is not None and not budget >= 0:
        raise ConfigError(f"budget {budget:g}: a budget is an amount of CNY, 0 or more")
    if sim_config is not None and not simulate:
        raise ConfigError("a simulator config is only for --simulate; a real service is configured by its account")


def _quotas(quotas: str | Path | QuotaTable | None) -> dict[str, dict[str, float]]:
    if quotas is None:
        return {}
    return load_quotas(quotas) if isinstance(quotas, str | Path) else check_quotas(quotas)


def _sim_configs(regions: list[str], config_file: str | Path | None) -> tuple[dict, float | None]:
    """The embedded simulators' settings from ``config_file`` (``wanbatch sim --config``'s), one per region,
    and the speed the file sets, if it sets one."""
    from wanbatch.sim import SimConfig
    from wanbatch.sim.config import read_config_file

    if config_file is None:
        return {}, None
    try:
        config = SimConfig(config_file=Path(config_file)).resolved()
        speed = config.speed if "speed" in read_config_file(Path(config_file)) else None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"simulator config {config_file}: {exc}") from exc
    # Read once: the simulator would read the file again over the region set for it.
    return {region: replace(config, region=region, config_file=None) for region in regions}, speed


async def _simulators(
    stack: contextlib.AsyncExitStack,
    out: str | Path,
    regions: list[str],
    *,
    speed: float | None,
    submit: SubmitConfig,
    config_file: str | Path | None = None,
    pool: Pool | None = None,
):
    """One embedded simulator per region the manifest uses, with its demo key; they stop with ``stack``.
    ``speed`` None: the config file's, else the folder's earlier speed, else 60 (a simulated minute per second).
    With a ``pool`` each simulator knows the pool's accounts of its region, each with a demo key of its own and
    the file's quotas; the keys returned are then per account (name -> key)."""
    from wanbatch.sim.embedded import demo_key, pool_accounts, start_embedded
    from wanbatch.sim.persist import SimInUse

    bases, file_speed = _sim_configs(regions, config_file)
    if pool is not None:
        bases = pool_accounts(pool, regions, bases)
    try:
        sims = await start_embedded(stack, Path(out), regions, speed=speed or file_speed, bases=bases)
    except SimInUse as exc:
        raise RunLocked(f"{out} is in use by another run: {exc}") from None
    speed = next(iter(sims.values())).clock.speed if sims else 1.0
    log.info("simulating %s at %gx speed", ", ".join(sims), speed)
    keys = {region: demo_key(region) for region in sims}
    if pool is not None:
        keys = {spec.name: demo_key(spec.region, account=spec.name) for spec in pool.accounts}
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
