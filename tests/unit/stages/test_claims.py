"""Claims: an item's place among its lane's open tasks and its price in the budget, taken and given back once.

The rows are real ledger rows of a planned manifest (two images each at 0.14 CNY: a full price of 0.28).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from helpers.manifest import load_manifest, numbered
from wanbatch.clock import ScaledClock
from wanbatch.ledger import Ledger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claim, Claims, ClaimState, Refusal, full_price

PRICE = 0.28  #: two images at 0.14


def planned_rows(directory: Path, count: int) -> list[ItemRow]:
    manifest = load_manifest(directory, prompts=numbered(count, "a claimed kea"), n=2)
    with Ledger.open(directory / "run", clock=ScaledClock()) as ledger:
        ledger.add_items(manifest.items(), run=ledger.begin_run(), price_of=lambda item: 0.14)
        return list(ledger.iter_items([ItemState.planned]))


async def opened(claims: Claims, row: ItemRow, stop: asyncio.Event | None = None) -> Claim:
    claim = await claims.open(row, stop or asyncio.Event())
    assert isinstance(claim, Claim), claim
    return claim


async def test_a_claim_takes_a_place_and_reserves_the_full_price(tmp_path):
    """Opening takes one place and reserves every image the item asks for; nothing is spent yet."""
    (row,) = planned_rows(tmp_path, 1)
    budget = Budget(1.0)
    claims = Claims(2, budget)
    claim = await opened(claims, row)
    assert (claim.state, claim.price, claims.taken) == (ClaimState.open, pytest.approx(PRICE), 1)
    assert (budget.spent, budget.committed) == (0.0, pytest.approx(PRICE))


async def test_a_second_settle_or_release_changes_nothing(tmp_path):
    """Settle and release end a claim once: whatever comes after (settle, release) moves no place and no money."""
    first, second = planned_rows(tmp_path, 2)
    budget = Budget()
    claims = Claims(2, budget)
    settled, released = await opened(claims, first), await opened(claims, second)
    settled.settle(0.14)
    settled.settle(0.28)
    settled.release()
    released.release()
    released.release()
    released.settle(0.28)
    assert (settled.state, released.state) == (ClaimState.settled, ClaimState.released)
    assert (claims.taken, budget.spent, budget.committed) == (0, pytest.approx(0.14), pytest.approx(0.14))


async def test_a_claim_in_doubt_counts_its_price_until_the_reconciler_decides(tmp_path):
    """An unknown create keeps its place and its full price; held, the price is spent; adopted, it is open again."""
    held_row, adopted_row = planned_rows(tmp_path, 2)
    budget = Budget()
    claims = Claims(2, budget)
    held, adopted = await opened(claims, held_row), await opened(claims, adopted_row)
    held.doubt()
    adopted.doubt()
    assert (held.state, adopted.state) == (ClaimState.in_doubt, ClaimState.in_doubt)
    assert (claims.taken, budget.committed) == (2, pytest.approx(2 * PRICE))
    adopted.confirm()
    assert (held.state, adopted.state) == (ClaimState.in_doubt, ClaimState.open)
    held.settle(held.price)  # held for the user: a task may exist and be billed
    adopted.doubt()  # a claim is in doubt only while its create's outcome is unknown: an ended one stays ended
    held.doubt()
    assert (held.state, adopted.state) == (ClaimState.settled, ClaimState.in_doubt)
    assert (claims.taken, budget.spent) == (1, pytest.approx(PRICE))


async def test_a_claim_over_the_budget_is_refused_and_so_is_every_one_after_it(tmp_path):
    """The budget refuses a price that would take committed spending past the limit, and stops there: a cheaper
    item after it is refused too, and a refused claim holds no place."""
    rows = planned_rows(tmp_path, 3)
    budget = Budget(0.6)
    claims = Claims(5, budget)
    first, second = await opened(claims, rows[0]), await opened(claims, rows[1])
    assert await claims.open(rows[2], asyncio.Event()) is Refusal.budget
    first.release()  # room again, but the budget has been reached: what was left stays unsubmitted
    assert await claims.open(rows[2], asyncio.Event()) is Refusal.budget
    cheaper = dataclasses.replace(rows[2], item_id="cheaper", price_per_image=0.01)  # it would fit the limit
    assert full_price(cheaper) + budget.committed <= budget.limit
    assert await claims.open(cheaper, asyncio.Event()) is Refusal.budget
    assert (claims.taken, budget.exhausted, budget.committed) == (1, True, pytest.approx(PRICE))
    second.settle(PRICE)


async def test_a_claim_waits_for_a_place_and_a_stop_drops_its_reservation(tmp_path):
    """With every place taken, opening waits until a claim ends; told to stop while waiting, it gives its
    reservation back and takes no place."""
    first, second, third = planned_rows(tmp_path, 3)
    budget = Budget()
    claims, stop = Claims(1, budget), asyncio.Event()
    holder = await opened(claims, first)
    waiting = asyncio.create_task(claims.open(second, stop))
    await asyncio.sleep(0.01)
    assert not waiting.done() and claims.taken == 1
    holder.settle(0.14)
    waiter = await asyncio.wait_for(waiting, 1.0)
    assert isinstance(waiter, Claim) and claims.taken == 1
    stopped = asyncio.create_task(claims.open(third, stop))
    await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(stopped, 1.0) is Refusal.stopped
    assert (claims.taken, budget.committed) == (1, pytest.approx(0.14 + PRICE))


async def test_resumed_tasks_may_fill_the_places_past_capacity_and_new_claims_wait(tmp_path):
    """Tasks left open by an earlier run hold a claim each even past the capacity (their price reserved over the
    budget: they may have been billed); no new claim opens until fewer than the capacity are open."""
    rows = planned_rows(tmp_path, 4)
    budget = Budget(0.5)
    claims = Claims(2, budget)
    resumed = [claims.resume(row) for row in rows[:3]]
    assert (claims.taken, budget.committed) == (3, pytest.approx(3 * PRICE))
    budget.limit = None  # the place, not the budget, is what this test waits on
    waiting = asyncio.create_task(claims.open(rows[3], asyncio.Event()))
    resumed[0].settle(PRICE)
    await asyncio.sleep(0.01)
    assert not waiting.done()  # two open: still no place
    resumed[1].release()
    assert isinstance(await asyncio.wait_for(waiting, 1.0), Claim) and claims.taken == 2


async def test_an_item_cannot_hold_two_claims_at_once(tmp_path):
    """A second claim for an item whose claim is open would mean two creates of it in flight: refused loudly."""
    (row,) = planned_rows(tmp_path, 1)
    claims = Claims(3, Budget())
    claim = await opened(claims, row)
    with pytest.raises(RuntimeError, match="already holds a claim"):
        await claims.open(row, asyncio.Event())
    claim.release()
    again = await opened(claims, row)  # once it has ended, the item may be claimed again (sent again)
    assert again is not claim and claims.taken == 1


async def test_places_are_never_negative_nor_past_capacity_whatever_order_claims_end_in(tmp_path):
    """Opening, doubting, settling and releasing in a random order (ends repeated) keeps the places taken
    between 0 and the capacity, and the budget's committed sum equal to spent plus what open claims reserve."""
    rows = planned_rows(tmp_path, 12)
    budget = Budget()
    claims, stop = Claims(3, budget), asyncio.Event()
    chance = random.Random(7)
    made: list[Claim] = []
    spent = 0.0
    for _ in range(400):
        move = chance.choice(["open", "doubt", "settle", "release"])
        if move == "open":
            free = [row for row in rows if all(c.item_id != row.item_id or c.ended for c in made)]
            if free and claims.taken < claims.capacity:
                made.append(await opened(claims, chance.choice(free), stop))
        elif made:
            claim = chance.choice(made)
            if move == "settle":
                spent += 0.14 if not claim.ended else 0.0
                claim.settle(0.14)
            else:
                getattr(claim, move)()
        live = [claim for claim in made if not claim.ended]
        assert 0 <= claims.taken == len(live) <= claims.capacity
        assert budget.committed == pytest.approx(spent + PRICE * len(live))
        assert budget.spent == pytest.approx(spent)
