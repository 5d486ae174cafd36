"""Items allowed several regions (`region: [beijing, singapore]`, `region: any`): their identity, their checks,
their plan, and runs that send each to a region with free quota, priced there, paid once (from the billing logs
of each region's simulator)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import wanbatch
from helpers.manifest import load_manifest, numbered, write_manifest
from helpers.proc import read_billing
from wanbatch import catalog
from wanbatch.clock import ScaledClock
from wanbatch.engine import Engine, EngineConfig
from wanbatch.errors import ManifestInvalid
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ItemState
from wanbatch.manifest.plan import make_plan
from wanbatch.service.accounts import Account
from wanbatch.sim.config import AccountConfig

FLASH = "wan2.2-t2i-flash"
PRICE = {region: catalog.offer(region, FLASH).price for region in ("beijing", "singapore")}


def rows_of(run_dir: Path) -> list:
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        return list(ledger.iter_items(list(ItemState)))


def test_a_list_of_regions_is_one_canonical_value_and_any_is_its_own(tmp_path):
    """`[singapore, beijing]` and `[beijing, singapore]` make the same items (region "beijing|singapore"); a list
    of one is that region (the same items as before lists); `any` is a request of its own."""

    def items(region: str) -> list:
        path = write_manifest(tmp_path, f"name: r\nregion: {region}\ndefaults: {{model: {FLASH}}}\nprompts: [a fox]\n")
        return list(load_manifest(tmp_path, path.read_text()).items())

    (listed,) = items("[singapore, beijing]")
    assert listed.region == "beijing|singapore" and listed.item_id == items("[beijing, singapore]")[0].item_id
    assert items("[beijing]")[0].item_id == items("beijing")[0].item_id
    (anywhere,) = items("any")
    assert anywhere.region == "any" and anywhere.item_id != listed.item_id


def test_a_region_in_the_list_that_does_not_sell_the_model_is_refused_with_its_line(tmp_path):
    """`[beijing, virginia]` for a model Virginia does not sell, and an unknown region in a list: each named at its
    file:line with what is allowed."""
    path = write_manifest(
        tmp_path,
        f"""\
        name: r
        defaults: {{model: {FLASH}}}
        prompts:
          - {{prompt: a, region: [beijing, virginia]}}
          - {{prompt: b, region: [beijing, mars]}}
        """,
    )
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(tmp_path, path.read_text())
    message = str(caught.value)
    assert f"{FLASH!r}, which region 'virginia'" in message
    assert "job.yaml:5: prompts[1].region: found text ('mars'); allowed: one of beijing, singapore, virginia" in message


def test_the_plan_prices_items_of_several_regions_at_the_dearest_and_adds_their_rates(tmp_path):
    """One row for the items allowed two regions: priced at Singapore's (the dearer: an upper bound), the quota
    time the items over both regions' rates."""
    prompts = json.dumps(numbered(30, "a travelling kite"))
    path = write_manifest(
        tmp_path, f"name: r\nregion: [beijing, singapore]\ndefaults: {{model: {FLASH}, n: 1}}\nprompts: {prompts}\n"
    )
    job = load_manifest(tmp_path, path.read_text())
    plan = make_plan(job)
    (row,) = plan["lanes"]
    assert row["region"] == "beijing|singapore" and row["regions"] == ["beijing", "singapore"]
    assert row["cost"] == pytest.approx(30 * PRICE["singapore"])
    assert row["quota_time_s"] == pytest.approx(30 / (2 * min(2, 2 / 40)))
    assert plan["regions"] == ["beijing", "singapore"]


async def test_a_simulated_run_sends_each_item_to_a_region_and_prices_it_there(tmp_path):
    """`run(simulate=True)` over 16 items allowed both regions: both regions' simulators make tasks, each item's
    row says the region it went to at that region's price, the run's cost is the sum, and each region's billing
    log bills each request once."""
    path = write_manifest(
        tmp_path,
        f"name: r\nregion: [beijing, singapore]\ndefaults: {{model: {FLASH}, n: 1, size: '512*512'}}\n"
        f"prompts: {json.dumps(numbered(16, 'a two-region heron'))}\n",
    )
    out = tmp_path / "run"
    report = await wanbatch.run(path, out=out, simulate=True, speed=100.0, gallery=False)
    assert report["items"]["saved"] == 16
    rows = rows_of(out)
    regions = Counter(row.region for row in rows)
    assert set(regions) == {"beijing", "singapore"}, regions
    assert all(row.price_per_image == PRICE[row.region] for row in rows)
    assert report["cost"]["CNY"] == pytest.approx(sum(PRICE[row.region] for row in rows))
    for region, count in regions.items():
        billed = read_billing(out / ".sim" / region / "billing.jsonl")
        assert len(billed) == count and len({r["fingerprint"] for r in billed}) == count


async def test_an_account_in_arrears_sends_its_region_s_items_to_the_other_region(start_sim, tmp_path):
    """A pool of one account per region, Beijing's in arrears: the items allowed both regions are all made in
    Singapore, the refused one too (its row back to the joined regions, then Singapore's), nothing billed in
    Beijing, each billed once."""
    beijing = await start_sim(
        speed=50.0,
        durations={"*": 6.0},
        accounts=(AccountConfig(name="bj", keys={"sk-bj": "beijing"}, refusal="Arrearage"),),
    )
    singapore = await start_sim(
        region="singapore",
        speed=50.0,
        durations={"*": 6.0},
        accounts=(AccountConfig(name="sg", keys={"sk-sg": "singapore"}),),
    )
    path = write_manifest(
        tmp_path,
        f"name: r\nregion: any\ndefaults: {{model: {FLASH}, n: 1, size: '512*512'}}\n"
        f"prompts: {json.dumps(numbered(8, 'a rerouted gull'))}\n",
    )
    engine = Engine(
        run_dir=tmp_path / "run",
        accounts=[
            Account(name="bj", region="beijing", key="sk-bj"),
            Account(name="sg", region="singapore", key="sk-sg"),
        ],
        config=EngineConfig(base_urls={"beijing": beijing.base_url, "singapore": singapore.base_url}, speed=50.0),
        clock=beijing.clock,
    )
    report = await engine.run(load_manifest(tmp_path, path.read_text()))
    assert report["items"]["saved"] == 8 and not report["halted"]
    assert beijing.billing == [] and beijing.statuses[("create", 400)] == 1
    assert len({r["fingerprint"] for r in singapore.billing}) == len(singapore.billing) == 8
    assert {(row.region, row.account, row.price_per_image) for row in rows_of(tmp_path / "run")} == {
        ("singapore", "sg", PRICE["singapore"])
    }
