"""``wanbatch cancel DIR``: the regions it reaches, and the service it checks them against."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from helpers.ledger import crashed_mid_submit
from helpers.manifest import load_manifest, numbered
from helpers.sim import post_as_the_engine_would
from wanbatch.ledger import Ledger
from wanbatch.ledger.backend import BACKEND_META, SIMULATED, BackendMismatch
from wanbatch.ledger.states import ItemState
from wanbatch.stages.cancel import cancel_in_folder

ENVIRON = {"DASHSCOPE_API_KEY": "sk-sim-beijing"}


async def queued_in_beijing(sim, api, tmp_path, endpoints: dict[str, str]) -> None:
    """A folder with four Beijing tasks waiting on ``sim`` (long ones: two run, two wait), recorded as made
    against ``endpoints``."""
    manifest = load_manifest(tmp_path, prompts=numbered(4, "a slow kiln"))
    rows = crashed_mid_submit(tmp_path / "run", manifest, sim.clock, endpoint="async")
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        for row in rows:
            ledger.transition(row.item_id, ItemState.queued, task_id=await post_as_the_engine_would(api, row))
            await asyncio.sleep(0.05)  # two and a half simulated seconds: within the account's rate
        ledger.set_meta(BACKEND_META, json.dumps(endpoints))


async def test_cancel_checks_only_the_regions_it_reaches(start_sim, sim_api_for, tmp_path):
    """Tasks wait in Beijing only; the record's Singapore endpoint (a region an earlier manifest used, with
    nothing queued) differs from the service named: the cancel goes on, against Beijing's record, and cancels
    the Beijing tasks still waiting."""
    sim = await start_sim(speed=50.0, durations={"*": 600.0})
    await queued_in_beijing(sim, sim_api_for(sim), tmp_path, {"beijing": sim.base_url, "singapore": SIMULATED})
    counts = await cancel_in_folder(tmp_path / "run", environ=ENVIRON, base_url=sim.base_url)
    assert counts == {"canceled": 2, "running": 2, "failed": 0}
    assert sorted(task.status for task in sim.tasks.values()) == ["CANCELED", "CANCELED", "RUNNING", "RUNNING"]


async def test_cancel_refuses_another_service_for_a_region_with_tasks(start_sim, sim_api_for, tmp_path):
    """The region that has tasks waiting was made against another host than the one named: refused, and not one
    task id is sent."""
    sim = await start_sim(speed=50.0, durations={"*": 600.0})
    await queued_in_beijing(sim, sim_api_for(sim), tmp_path, {"beijing": "http://127.0.0.1:9", "singapore": SIMULATED})
    with pytest.raises(BackendMismatch, match="Nothing was sent"):
        await cancel_in_folder(tmp_path / "run", environ=ENVIRON, base_url=sim.base_url)
    assert sim.requests["cancel"] == 0


async def test_a_pool_s_tasks_are_canceled_each_with_its_own_account_s_key(start_sim, sim_api_for, tmp_path):
    """Four tasks waiting, two made by each of two accounts (two run and two wait on each): `cancel --accounts`
    cancels each waiting one with the key of the account that made it; without the pool, the folder's tasks of
    a pool's account are refused, naming it, and nothing is sent."""
    from wanbatch.errors import ConfigError
    from wanbatch.service.accounts import AccountSpec, Pool
    from wanbatch.sim.config import AccountConfig

    accounts = tuple(AccountConfig(name=name, keys={f"sk-{name}": "beijing"}) for name in ("a1", "a2"))
    sim = await start_sim(speed=50.0, durations={"*": 600.0}, accounts=accounts)
    manifest = load_manifest(tmp_path, prompts=numbered(8, "a pooled slow kiln"))
    rows = crashed_mid_submit(tmp_path / "run", manifest, sim.clock, endpoint="async")
    with Ledger.open(tmp_path / "run", clock=sim.clock, create=False) as ledger:
        for index, row in enumerate(rows):
            name = ("a1", "a2")[index % 2]
            task_id = await post_as_the_engine_would(sim_api_for(sim, key=f"sk-{name}"), row)
            ledger.transition(row.item_id, ItemState.queued, task_id=task_id)
            ledger.update(row.item_id, account=name)
            await asyncio.sleep(0.05)
        ledger.set_meta(BACKEND_META, json.dumps({"beijing": sim.base_url}))
    with pytest.raises(ConfigError, match="tasks wait in a1, a2, but no key"):
        await cancel_in_folder(tmp_path / "run", environ=ENVIRON, base_url=sim.base_url)
    assert sim.requests["cancel"] == 0
    pool = Pool(accounts=tuple(AccountSpec(name=n, region="beijing", key_env=f"KEY_{n.upper()}") for n in ("a1", "a2")))
    environ = {"KEY_A1": "sk-a1", "KEY_A2": "sk-a2"}
    counts = await cancel_in_folder(tmp_path / "run", environ=environ, base_url=sim.base_url, pool=pool)
    assert counts == {"canceled": 4, "running": 4, "failed": 0}
    canceled = Counter(task.account for task in sim.tasks.values() if task.status == "CANCELED")
    assert canceled == {"a1": 2, "a2": 2}
