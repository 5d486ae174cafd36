"""The workers of one batch in PostgreSQL: the run they share, planned items each takes for itself, the takeover
of a worker silent past its lease (its open items the taker's, its planned ones everyone's), the fence that
refuses a taken-over worker's moves, and who is last to leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import psycopg
import pytest

from helpers.run_ledger import FakeItem
from wanbatch.clock import ScaledClock
from wanbatch.errors import LeaseLost
from wanbatch.fleet.members import FleetConfig, Membership, workers_of
from wanbatch.fleet.worker import FleetWorker
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.records import ImageRecord
from wanbatch.ledger.states import ImageState, ItemState

S = ItemState
BATCH = "s3://fleet/members"
LEASE = FleetConfig(lease_s=0.3, heartbeat_s=0.05)


class Worker:
    """One worker's ledger and membership, as a worker process holds them."""

    def __init__(self, ledger: PgLedger, membership: Membership) -> None:
        self.ledger, self.membership = ledger, membership


@pytest.fixture
async def fleet(pg_url: str) -> AsyncIterator:
    """Opens workers ``a``, ``b``, ... of one batch (each its own pool), planned with 10 items."""
    clock = ScaledClock()
    async with AsyncExitStack() as stack:

        async def worker(name: str) -> Worker:
            ledger = await stack.enter_async_context(await PgLedger.open(pg_url, batch=BATCH, clock=clock, worker=name))
            return Worker(ledger, Membership(ledger.pool, ledger.batch_id, worker_id=name, clock=clock, config=LEASE))

        yield worker


async def _plan(worker: Worker, run: int, count: int = 10) -> None:
    await worker.ledger.add_items([FakeItem(item_id=f"item-{i:02d}") for i in range(count)], run=run)


async def test_workers_started_together_share_one_run_and_a_later_batch_gets_a_new_one(fleet) -> None:
    """A worker joining while another is at work joins its run (so that "seen in this run" means the same to
    both); once every worker has left, the next one begins the next run."""
    a, b = await fleet("a"), await fleet("b")
    assert await a.membership.join() == 1
    assert await b.membership.join() == 1
    await a.membership.leave()
    await b.membership.leave()
    c = await fleet("c")
    assert await c.membership.join() == 2


async def test_planned_items_are_taken_by_one_worker_each(fleet) -> None:
    """Two workers asking for the same planned rows at once are each given other items; a worker asking again
    is given its own back with the rest, and held_elsewhere tells the other that some are held."""
    a, b = await fleet("a"), await fleet("b")
    run = await a.membership.join()
    await b.membership.join()
    await _plan(a, run)
    take = {"run": run, "region": "beijing", "model": "wan2.2-t2i-flash", "after_seq": 0, "limit": 4}
    first, second = await asyncio.gather(a.ledger.take_planned(**take), b.ledger.take_planned(**take))
    assert len(first) == len(second) == 4
    assert not {row.item_id for row in first} & {row.item_id for row in second}
    again = await a.ledger.take_planned(**{**take, "limit": 10})
    assert {row.item_id for row in first} <= {row.item_id for row in again}
    assert len(again) == 6  # its 4 and the 2 nobody held
    where = {"run": run, "region": "beijing", "model": "wan2.2-t2i-flash"}
    assert await b.ledger.held_elsewhere(**where)
    await b.membership.leave()  # b's planned items go back to everyone
    assert len(await a.ledger.take_planned(**{**take, "limit": 10})) == 10
    assert not await a.ledger.held_elsewhere(**where)


async def test_a_silent_worker_is_taken_over_and_fenced(fleet) -> None:
    """A worker silent past its lease loses its open items to the one that takes it over (which resumes them),
    its planned items go back to everyone; its own moves and heartbeat are refused from then on."""
    a, b = await fleet("a"), await fleet("b")
    run = await a.membership.join()
    await b.membership.join()
    await _plan(a, run)
    take = {"run": run, "region": "beijing", "model": "wan2.2-t2i-flash", "after_seq": 0, "limit": 3}
    mine = await a.ledger.take_planned(**take)
    sent, queued, held = mine
    await a.ledger.transition(sent.item_id, S.submitting, expect=S.planned)
    await a.ledger.transition(queued.item_id, S.submitting, expect=S.planned)
    await a.ledger.transition(queued.item_id, S.queued, expect=S.submitting, task_id="t-1")
    assert await b.membership.take_over() == []  # a is alive
    await asyncio.sleep(LEASE.lease_s + 0.1)
    assert await b.membership.beat()
    taken = await b.membership.take_over()
    assert {row.item_id: row.state for row in taken} == {sent.item_id: S.submitting, queued.item_id: S.queued}
    assert await b.membership.take_over() == []  # once
    # b sees a's open items as its own now, and the planned one a held is free
    open_items = [row.item_id async for row in b.ledger.iter_items([S.submitting, S.queued])]
    assert sorted(open_items) == sorted([sent.item_id, queued.item_id])
    assert [row.item_id async for row in a.ledger.iter_items([S.submitting, S.queued])] == []
    assert held.item_id in {row.item_id for row in await b.ledger.take_planned(**{**take, "limit": 10})}
    with pytest.raises(LeaseLost, match="taken over"):
        await a.ledger.transition(queued.item_id, S.generated, expect=S.queued)
    with pytest.raises(LeaseLost):
        await a.ledger.update(queued.item_id, task_status="RUNNING")
    assert not await a.membership.beat()
    await b.ledger.transition(sent.item_id, S.unknown, expect=S.submitting, note="taken over")
    shown = {worker.worker_id: worker for worker in await workers_of(b.ledger.pool, b.ledger.batch_id)}
    assert shown["a"].taken_by == "b" and not shown["a"].alive and shown["a"].items_held == 0
    assert shown["b"].alive and shown["b"].items_held == 2


async def test_images_of_an_item_taken_over_are_the_takers_to_save(fleet) -> None:
    """The images of a generated item are saved by its owner only: the worker it was taken from is refused."""
    a, b = await fleet("a"), await fleet("b")
    run = await a.membership.join()
    await b.membership.join()
    await _plan(a, run, count=1)
    (row,) = await a.ledger.take_planned(run=run, region="beijing", model="wan2.2-t2i-flash", after_seq=0, limit=1)
    await a.ledger.transition(row.item_id, S.submitting, expect=S.planned)
    await a.ledger.transition(row.item_id, S.queued, expect=S.submitting, task_id="t-9")
    await a.ledger.finish_task(
        row.item_id, S.generated, expect=S.queued, images=[ImageRecord(index=0, url="http://x/0.png")]
    )
    await asyncio.sleep(LEASE.lease_s + 0.1)
    await b.membership.beat()
    assert [r.item_id for r in await b.membership.take_over()] == [row.item_id]
    assert [image.item_id async for image in a.ledger.iter_images([ImageState.pending])] == []
    with pytest.raises(LeaseLost):
        await a.ledger.image_saved(row.item_id, 0, file_name="x.png", sha256="0" * 64, size_bytes=1, settle=True)
    pending = [image async for image in b.ledger.iter_images([ImageState.pending])]
    assert [image.item_id for image in pending] == [row.item_id]
    done = await b.ledger.image_saved(row.item_id, 0, file_name="x.png", sha256="0" * 64, size_bytes=1, settle=True)
    assert done is not None and done.row.state is S.saved


async def test_the_last_worker_to_leave_is_told_so(fleet, pg_url: str) -> None:
    """Of two workers leaving at the same moment exactly one is the last; a worker that died is not waited for
    once its lease is past."""
    a, b, c = await fleet("a"), await fleet("b"), await fleet("c")
    for worker in (a, b, c):
        await worker.membership.join()
    await asyncio.sleep(LEASE.lease_s + 0.1)  # c falls silent (it never beats again): dead
    await a.membership.beat()
    await b.membership.beat()
    lasts = await asyncio.gather(a.membership.leave(), b.membership.leave())
    assert sorted(lasts) == [False, True]
    with psycopg.connect(pg_url) as conn:
        ended = conn.execute("SELECT count(*) FROM workers WHERE ended_ms IS NOT NULL").fetchone()[0]
    assert ended == 2


def _fleet_worker(worker: Worker) -> FleetWorker:
    return FleetWorker(worker.ledger, clock=ScaledClock(), config=LEASE)


def _beating(*workers: FleetWorker) -> list[asyncio.Task]:
    """The workers' heartbeats, as their processes run them; cancel them to make a worker fall silent."""
    return [asyncio.create_task(worker.heartbeat(on_lost=lambda: None)) for worker in workers]


async def test_a_dead_worker_is_taken_over_by_one_leaver_only_and_only_it_is_last(fleet) -> None:
    """``a`` leaves while ``b`` is at work; ``c`` dies; ``b`` leaves after ``c``'s lease is past. Only one of
    ``a`` (waiting for the others to end) and ``b`` may take ``c`` over and write the batch's outputs."""
    a, b, c = [_fleet_worker(await fleet(name)) for name in "abc"]
    for worker in (a, b, c):
        await worker.join()
    beats = _beating(a, b)
    first = asyncio.create_task(a.leave())  # b and c are at work: a waits
    await asyncio.sleep(LEASE.lease_s + 0.1)  # c falls silent (it never beats): dead
    beats[1].cancel()
    second = await b.leave()
    lasts = [await asyncio.wait_for(first, 2.0), second]
    beats[0].cancel()
    assert sorted(lasts) == [False, True]
    shown = {row.worker_id: row for row in await workers_of(b.ledger.pool, b.ledger.batch_id)}
    assert shown[c.worker_id].taken_by == (a.worker_id if lasts[0] else b.worker_id)  # the last is c's taker


async def test_workers_whose_submitting_ended_with_planned_items_taken_do_not_wait_for_each_other(fleet) -> None:
    """Two workers whose lanes were all stopped (an account in arrears) end their submitting with planned items
    taken but never sent; each must give them back rather than wait forever for the other's."""
    a, b = await fleet("a"), await fleet("b")
    run = await a.membership.join()
    await b.membership.join()
    await _plan(a, run)
    take = {"run": run, "region": "beijing", "model": "wan2.2-t2i-flash", "after_seq": 0, "limit": 4}
    assert await a.ledger.take_planned(**take) and await b.ledger.take_planned(**take)
    done, stop = asyncio.Event(), asyncio.Event()
    done.set()

    async def nothing(rows: list) -> None:
        raise AssertionError(f"nothing to take over, got {rows}")

    workers = [_fleet_worker(worker) for worker in (a, b)]
    beats = _beating(*workers)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker.watch(nothing, done, stop, manifest_run=run) for worker in workers)), 2.0
        )
    finally:
        for beat in beats:
            beat.cancel()


async def test_a_taken_over_worker_cannot_send_a_planned_item_it_had_taken(fleet) -> None:
    """``a`` took planned items, fell silent past its lease and was taken over; before it learns so (its next
    heartbeat), it goes on sending the items it had read. Its move to submitting is refused: one it made would
    hold the item as ``a``'s, an open item no worker takes over any more (``a`` is taken over already), which
    every other worker would wait for forever, its images never saved."""
    a, b = await fleet("a"), await fleet("b")
    run = await a.membership.join()
    await b.membership.join()
    await _plan(a, run, count=2)
    first, second = await a.ledger.take_planned(
        run=run, region="beijing", model="wan2.2-t2i-flash", after_seq=0, limit=2
    )
    await asyncio.sleep(LEASE.lease_s + 0.1)
    await b.membership.beat()
    assert await b.membership.take_over() == []  # a held nothing open: its planned items are everyone's
    with pytest.raises(LeaseLost):
        await a.ledger.transition(first.item_id, S.submitting, expect=S.planned)
    assert await a.ledger.state_of(first.item_id) is S.planned
    assert not await b.membership.others_working(run)
    # one of its items saved before, whose file it finds gone, is not reopened as its own either
    await b.ledger.take_planned(run=run, region="beijing", model="wan2.2-t2i-flash", after_seq=0, limit=2)
    await b.ledger.transition(second.item_id, S.submitting, expect=S.planned)
    await b.ledger.transition(second.item_id, S.queued, expect=S.submitting, task_id="t-2")
    await b.ledger.finish_task(
        second.item_id, S.generated, expect=S.queued, images=[ImageRecord(index=0, url="http://x/0.png")]
    )
    await b.ledger.image_saved(second.item_id, 0, file_name="x.png", sha256="0" * 64, size_bytes=1, settle=True)
    with pytest.raises(LeaseLost):
        await a.ledger.reopen_image(second.item_id, 0, reason="file gone")
    assert await a.ledger.state_of(second.item_id) is S.saved
