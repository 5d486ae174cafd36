"""An account's quota shared through PostgreSQL: two workers' creates spaced as one lane's, their open claims
never more than the account's places, a budget that all of them spend, and a dead worker's places freed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from helpers.run_ledger import FakeItem
from wanbatch.clock import ScaledClock
from wanbatch.fleet.members import FleetConfig, Membership
from wanbatch.fleet.shared import PlaceWriter, SharedClaims, SharedPacer
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claim, Refusal

BATCH = "s3://fleet/shared"
MODEL = "wan2.2-t2i-flash"


@pytest.fixture
async def ledgers(pg_url: str) -> AsyncIterator:
    """Opens the batch's ledger for worker ``name`` (each its own pool), as worker processes do."""
    clock = ScaledClock()
    async with AsyncExitStack() as stack:

        async def open_for(name: str) -> PgLedger:
            return await stack.enter_async_context(await PgLedger.open(pg_url, batch=BATCH, clock=clock, worker=name))

        yield open_for


def _claims(ledger: PgLedger, writer: PlaceWriter, *, capacity: int, budget: Budget) -> SharedClaims:
    return SharedClaims(
        capacity,
        budget,
        pool=ledger.pool,
        writer=writer,
        batch_id=ledger.batch_id,
        worker_id=ledger.worker,
        lane="team-a",
        model=MODEL,
    )


async def _rows(ledger: PgLedger, count: int, price: float = 0.14) -> list[ItemRow]:
    """``count`` planned items at ``price`` each, taken by ``ledger``'s worker."""
    await ledger.add_items([FakeItem(item_id=f"item-{i:02d}") for i in range(count)], run=1, price_of=lambda _: price)
    return await ledger.take_planned(run=1, region="beijing", model=MODEL, after_seq=0, limit=count)


async def test_two_workers_creates_are_spaced_as_one_lanes(ledgers) -> None:
    """Two workers pacing one account and model at 10 per second take slots 0.1 s (and a little) apart in
    turn: together they send at the account's rate, not twice it, with no burst where they meet."""
    clock = ScaledClock()
    pacers = [
        SharedPacer(10.0, clock=clock, pool=(await ledgers(name)).pool, lane="team-a", model=MODEL)
        for name in ("a", "b")
    ]
    times: list[float] = []

    async def send(pacer: SharedPacer, count: int) -> None:
        for _ in range(count):
            await pacer.wait()
            times.append(time.monotonic())

    await asyncio.gather(send(pacers[0], 6), send(pacers[1], 6))
    gaps = [later - earlier for earlier, later in zip(sorted(times), sorted(times)[1:], strict=False)]
    assert min(gaps) > 0.08, gaps  # 1 / (10 * 0.9) = 0.111 s, less the statements' own time
    assert 11 * 0.1 < max(times) - min(times) < 11 * 0.25


async def test_open_claims_of_all_workers_stay_within_the_accounts_places(ledgers) -> None:
    """Each worker has room for 3 claims of its own, but the account has 2 places: the third claim, whichever
    worker asks, waits until one of the first two ends."""
    a, b = await ledgers("a"), await ledgers("b")
    rows = await _rows(a, 3)
    writers = [PlaceWriter(a.pool), PlaceWriter(b.pool)]
    claims_a = _claims(a, writers[0], capacity=2, budget=Budget())
    claims_b = _claims(b, writers[1], capacity=2, budget=Budget())
    stop = asyncio.Event()
    first = await claims_a.open(rows[0], stop)
    second = await claims_b.open(rows[1], stop)
    assert isinstance(first, Claim) and isinstance(second, Claim)
    third = asyncio.create_task(claims_b.open(rows[2], stop))
    await asyncio.sleep(0.3)
    assert not third.done()  # two places held, by two workers
    first.settle(0.14)  # a's task ended: its place is given back (through a's writer)
    assert isinstance(await asyncio.wait_for(third, 2.0), Claim)
    for writer in writers:
        await writer.drain()


async def test_a_budget_is_spent_by_all_workers_together(ledgers) -> None:
    """With a budget of 0.30 and items at 0.14, two workers together open two claims, not two each."""
    a, b = await ledgers("a"), await ledgers("b")
    rows = await _rows(a, 4)
    writer_a, writer_b = PlaceWriter(a.pool), PlaceWriter(b.pool)
    claims_a = _claims(a, writer_a, capacity=10, budget=Budget(0.30))
    claims_b = _claims(b, writer_b, capacity=10, budget=Budget(0.30))
    stop = asyncio.Event()
    assert isinstance(await claims_a.open(rows[0], stop), Claim)
    assert isinstance(await claims_b.open(rows[1], stop), Claim)
    assert await claims_a.open(rows[2], stop) is Refusal.budget
    assert await claims_b.open(rows[3], stop) is Refusal.budget


async def test_a_dead_workers_places_are_freed_when_it_is_taken_over(ledgers) -> None:
    """A worker killed with claims open keeps its places held (its tasks still occupy the service) until another
    worker takes it over; then the taker's resumed claims hold them, and a new claim finds room once they end."""
    clock = ScaledClock()
    lease = FleetConfig(lease_s=0.3, heartbeat_s=0.05)
    a, b = await ledgers("a"), await ledgers("b")
    members = {
        ledger.worker: Membership(ledger.pool, ledger.batch_id, worker_id=ledger.worker, clock=clock, config=lease)
        for ledger in (a, b)
    }
    for member in members.values():
        await member.join()
    rows = await _rows(a, 3)
    writer_a, writer_b = PlaceWriter(a.pool), PlaceWriter(b.pool)
    claims_a = _claims(a, writer_a, capacity=2, budget=Budget())
    stop = asyncio.Event()
    for row in rows[:2]:
        assert isinstance(await claims_a.open(row, stop), Claim)
        await a.transition(row.item_id, "submitting", expect="planned")
    # a dies here; b cannot open a claim until it takes a over
    claims_b = _claims(b, writer_b, capacity=2, budget=Budget())
    waiting = asyncio.create_task(claims_b.open(rows[2], stop))
    await asyncio.sleep(lease.lease_s + 0.1)
    assert not waiting.done()
    await members["b"].beat()
    taken = await members["b"].take_over()
    assert sorted(row.item_id for row in taken) == sorted(row.item_id for row in rows[:2])
    resumed = [claims_b.resume(row) for row in taken]  # the taker's claims hold the places again
    await writer_b.drain()
    await asyncio.sleep(0.2)
    assert not waiting.done()
    resumed[0].release()  # the reconciler proves one was never made
    assert isinstance(await asyncio.wait_for(waiting, 2.0), Claim)
    await writer_b.drain()


async def test_a_place_whose_give_back_was_lost_is_freed_when_its_worker_leaves(ledgers, pg_url: str) -> None:
    """A place given back by a write that failed (the database away a moment) stays held while its worker works;
    once the worker leaves, the account's places are whole again for the others."""
    lease = FleetConfig(lease_s=0.3, heartbeat_s=0.05)
    a, b = await ledgers("a"), await ledgers("b")
    member_a = Membership(a.pool, a.batch_id, worker_id="a", clock=ScaledClock(), config=lease)
    await member_a.join()
    rows = await _rows(a, 2)
    async with AsyncConnectionPool(pg_url, min_size=1, open=False) as gone:
        pass  # closed: every write through it fails
    lost = PlaceWriter(gone)
    claim = await _claims(a, lost, capacity=1, budget=Budget()).open(rows[0], asyncio.Event())
    assert isinstance(claim, Claim)
    claim.release()  # its DELETE fails and is logged
    await lost.drain()
    writer_b = PlaceWriter(b.pool)
    waiting = asyncio.create_task(_claims(b, writer_b, capacity=1, budget=Budget()).open(rows[1], asyncio.Event()))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the place a's lost write should have freed is held while a works
    await member_a.leave()
    assert isinstance(await asyncio.wait_for(waiting, 2.0), Claim)
    await writer_b.drain()


async def test_a_dead_worker_of_another_batch_does_not_hold_the_accounts_places_for_good(pg_url: str) -> None:
    """A worker of another batch on the same account killed with claims open, and never taken over (no worker of
    its batch came after it), holds the account's places only while its lease lasts."""
    clock, lease = ScaledClock(), FleetConfig(lease_s=1.0, heartbeat_s=0.05)  # room for the setup under load
    async with (
        await PgLedger.open(pg_url, batch="s3://fleet/killed", clock=clock, worker="x") as other,
        await PgLedger.open(pg_url, batch=BATCH, clock=clock, worker="a") as mine,
    ):
        await Membership(other.pool, other.batch_id, worker_id="x", clock=clock, config=lease).join()
        await Membership(mine.pool, mine.batch_id, worker_id="a", clock=clock, config=lease).join()
        stop = asyncio.Event()
        for row in await _rows(other, 2):  # x is killed with both of the account's places held
            assert isinstance(
                await _claims(other, PlaceWriter(other.pool), capacity=2, budget=Budget()).open(row, stop), Claim
            )
        writer = PlaceWriter(mine.pool)
        claims = _claims(mine, writer, capacity=2, budget=Budget())  # x is judged by its own lease
        (row,) = await _rows(mine, 1)
        waiting = asyncio.create_task(claims.open(row, stop))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # x's places count while its lease lasts
        assert isinstance(await asyncio.wait_for(waiting, lease.lease_s + 2.0), Claim)
        await writer.drain()


async def test_a_dead_workers_reservations_count_against_the_budget_while_it_is_taken_over(ledgers) -> None:
    """A worker killed with two creates under way (0.28 of a budget of 0.30 reserved) is taken over: the places
    of its tasks, and their prices, stay held from the takeover on, so that no worker spends them meanwhile."""
    clock, lease = ScaledClock(), FleetConfig(lease_s=0.3, heartbeat_s=0.05)
    a, b = await ledgers("a"), await ledgers("b")
    member_b = Membership(b.pool, b.batch_id, worker_id="b", clock=clock, config=lease)
    await Membership(a.pool, a.batch_id, worker_id="a", clock=clock, config=lease).join()
    await member_b.join()
    rows = await _rows(a, 3)
    stop = asyncio.Event()
    for row in rows[:2]:
        assert isinstance(
            await _claims(a, PlaceWriter(a.pool), capacity=10, budget=Budget(0.30)).open(row, stop), Claim
        )
        await a.transition(row.item_id, "submitting", expect="planned")
    await asyncio.sleep(lease.lease_s + 0.1)  # a is dead
    await member_b.beat()
    assert len(await member_b.take_over()) == 2  # before b's stages resume them (and claim their places again)
    writer = PlaceWriter(b.pool)
    assert await _claims(b, writer, capacity=10, budget=Budget(0.30)).open(rows[2], stop) is Refusal.budget
    await writer.drain()


async def test_a_dead_workers_lost_sync_call_gives_its_place_back_at_the_takeover(ledgers, pg_url: str) -> None:
    """A sync call under way when its worker died is written off by the taker, which opens no claim for it: its
    place is freed at the takeover, not passed on to be held until the taker leaves; an async create's is passed."""
    clock = ScaledClock()
    lease = FleetConfig(lease_s=0.3, heartbeat_s=0.05)
    a, b = await ledgers("a"), await ledgers("b")
    members = [Membership(x.pool, x.batch_id, worker_id=x.worker, clock=clock, config=lease) for x in (a, b)]
    for member in members:
        await member.join()
    sync_row, async_row = await _rows(a, 2)
    claims_a = _claims(a, PlaceWriter(a.pool), capacity=4, budget=Budget())
    for row, endpoint in ((sync_row, "sync"), (async_row, "async")):
        assert isinstance(await claims_a.open(row, asyncio.Event()), Claim)
        await a.transition(row.item_id, "submitting", expect="planned", endpoint=endpoint)
    await asyncio.sleep(lease.lease_s + 0.1)  # a dies
    await members[1].beat()
    assert len(await members[1].take_over()) == 2
    with psycopg.connect(pg_url) as conn:
        held = dict(conn.execute("SELECT item_id, worker_id FROM places").fetchall())
    assert held == {async_row.item_id: "b"}
