"""The ledger's contract, through the async protocol (:class:`~wanbatch.ledger.interface.RunLedger`), on every
implementation (the ``run_ledger`` fixture): moves checked by the table, compare-and-set, writes that return what
they wrote, planning, iterators that page, images and their items settling, counts. Then the protocol itself: the
SQLite adapter has every member of it, alike, and the stages hold it."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import pytest

from helpers.paths import REPO
from helpers.run_ledger import LEDGER_T0_S, PATHS, FakeItem, items
from helpers.source import parameters
from wanbatch.clock import ScaledClock
from wanbatch.errors import IllegalTransition, LedgerError
from wanbatch.ledger import ImageRecord, Ledger, RunLedger, SqliteLedger
from wanbatch.ledger.records import ImageRow, ItemRow
from wanbatch.ledger.states import TRANSITIONS, ImageState, ItemState

S = ItemState
ILLEGAL = [(a, b) for a in ItemState for b in ItemState if b not in TRANSITIONS[a]]


async def planned(ledger: RunLedger, count: int = 1, **overrides: object) -> list[str]:
    run = await ledger.begin_run()
    await ledger.add_items(items(count, **overrides), run=run, price_of=lambda item: 0.14)
    return [f"item-{i:06d}" for i in range(count)]


async def drive(ledger: RunLedger, item_id: str, state: ItemState) -> None:
    for step in PATHS[state]:
        extra = {"task_id": "task-1"} if step is S.queued else {}
        await ledger.transition(item_id, step, **extra)


# ── states and moves ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("source", "target"), ILLEGAL, ids=[f"{a}-{b}" for a, b in ILLEGAL])
async def test_every_illegal_move_is_refused_naming_both_states(
    run_ledger: RunLedger, source: ItemState, target: ItemState
) -> None:
    """Each move the table lacks raises IllegalTransition naming the item and both states; nothing changes."""
    (item_id,) = await planned(run_ledger)
    await drive(run_ledger, item_id, source)
    before = await run_ledger.get(item_id)
    with pytest.raises(IllegalTransition) as refused:
        await run_ledger.transition(item_id, target)
    assert f"item {item_id}" in str(refused.value)
    assert f"{source} → {target}" in str(refused.value)
    assert await run_ledger.get(item_id) == before


async def test_expect_is_checked_against_the_table_before_the_database(run_ledger: RunLedger) -> None:
    """An expect that the table cannot join to the target is refused even if the item is elsewhere."""
    (item_id,) = await planned(run_ledger)
    with pytest.raises(IllegalTransition, match="queued → submitting"):
        await run_ledger.transition(item_id, S.submitting, expect=S.queued)
    assert (await run_ledger.get(item_id)).state is S.planned


async def test_a_missing_item_is_a_ledger_error(run_ledger: RunLedger) -> None:
    """Moving or reading an item the ledger does not have says so."""
    with pytest.raises(LedgerError, match="no item nope"):
        await run_ledger.transition("nope", S.submitting)
    with pytest.raises(LedgerError, match="no item nope"):
        await run_ledger.get("nope")


async def test_transition_records_fields_times_and_request_ids(
    run_ledger: RunLedger, ledger_clock: ScaledClock
) -> None:
    """Entering a state stamps its time; request ids accumulate; errors clear when a new attempt starts."""
    (item_id,) = await planned(run_ledger)
    ledger_clock.advance(1)
    await run_ledger.transition(item_id, S.submitting, expect=S.planned)
    await run_ledger.transition(
        item_id, S.planned, error_code="Throttling.RateQuota", error_message="slow", request_id="r1"
    )
    row = await run_ledger.get(item_id)
    assert (row.error_code, row.request_ids, row.attempts) == ("Throttling.RateQuota", ("r1",), 1)
    ledger_clock.advance(2)
    await run_ledger.transition(item_id, S.submitting)
    ledger_clock.advance(3)
    await run_ledger.transition(item_id, S.queued, task_id="t-9", task_status="PENDING", request_id="r2")
    ledger_clock.advance(4)
    await run_ledger.transition(item_id, S.failed, task_status="FAILED", error_code="InternalError", request_id="r3")
    row = await run_ledger.get(item_id)
    t0_ms = int(LEDGER_T0_S * 1000)
    assert row.attempts == 2
    assert row.request_ids == ("r1", "r2", "r3")
    assert (row.task_id, row.task_status, row.error_code) == ("t-9", "FAILED", "InternalError")
    assert (row.planned_ms, row.submit_started_ms, row.submitted_ms, row.ended_ms) == (
        t0_ms,
        t0_ms + 3000,
        t0_ms + 6000,
        t0_ms + 10000,
    )


async def test_caller_given_times_and_attempts_win_over_the_defaults(run_ledger: RunLedger) -> None:
    """Fields the caller passes override what entering the state would set."""
    (item_id,) = await planned(run_ledger)
    await run_ledger.transition(item_id, S.submitting, submit_started_ms=5, attempts=7)
    await run_ledger.transition(item_id, S.queued, task_id="t", submitted_ms=6)
    await run_ledger.transition(item_id, S.canceled, ended_ms=8)
    row = await run_ledger.get(item_id)
    assert (row.submit_started_ms, row.attempts, row.submitted_ms, row.ended_ms) == (5, 7, 6, 8)


async def test_unknown_fields_and_state_changes_through_update_are_refused(run_ledger: RunLedger) -> None:
    """A field the ledger does not have is an error, and update() never changes state."""
    (item_id,) = await planned(run_ledger)
    with pytest.raises(LedgerError, match="no settable field 'api_key'"):
        await run_ledger.transition(item_id, S.submitting, api_key="sk-123")
    with pytest.raises(LedgerError, match="use transition"):
        await run_ledger.update(item_id, state="saved")
    await run_ledger.update(item_id, task_status="RUNNING", request_id="r7")
    row = await run_ledger.get(item_id)
    assert (row.state, row.task_status, row.request_ids) == (S.planned, "RUNNING", ("r7",))


async def test_retry_to_planned_forgets_the_task_and_its_images(run_ledger: RunLedger) -> None:
    """failed → planned leaves no task id and no image of the old task behind."""
    (item_id,) = await planned(run_ledger)
    await drive(run_ledger, item_id, S.queued)
    await run_ledger.finish_task(item_id, S.failed, images=[ImageRecord(index=0, error_code="InternalError")])
    assert len(await run_ledger.images_of(item_id)) == 1
    await run_ledger.transition(item_id, S.planned, note="retry")
    row = await run_ledger.get(item_id)
    assert (row.state, row.task_id, row.task_status, row.ended_ms) == (S.planned, None, None, None)
    assert await run_ledger.images_of(item_id) == []


async def test_a_move_returns_the_row_it_wrote(run_ledger: RunLedger) -> None:
    """transition and update return the item's new row, the same one a read would give: no read-back needed."""
    (item_id,) = await planned(run_ledger)
    submitting = await run_ledger.transition(item_id, S.submitting, expect=S.planned, endpoint="async")
    assert (submitting.state, submitting.attempts, submitting.endpoint) == (S.submitting, 1, "async")
    assert submitting.submit_started_ms == int(LEDGER_T0_S * 1000)
    queued = await run_ledger.transition(item_id, S.queued, expect=S.submitting, task_id="task-9", request_id="r1")
    assert (queued.state, queued.task_id, queued.request_ids) == (S.queued, "task-9", ("r1",))
    assert queued == await run_ledger.get(item_id)
    updated = await run_ledger.update(item_id, task_status="RUNNING", request_id="r2")
    assert (updated.task_status, updated.request_ids) == ("RUNNING", ("r1", "r2"))
    assert updated == await run_ledger.get(item_id)


async def test_finishing_a_task_returns_its_row_and_images(run_ledger: RunLedger) -> None:
    """finish_task returns the generated row with its cost and every image as recorded, what the downloader
    needs; a stale caller's compare-and-set is refused with nothing recorded."""
    (item_id,) = await planned(run_ledger, n=2)
    await drive(run_ledger, item_id, S.queued)
    images = [
        ImageRecord(index=0, url="u/0", deadline_ms=10, seed=5, actual_prompt="a fox"),
        ImageRecord(index=1, error_code="DataInspectionFailed", error_message="Output data may contain"),
    ]
    with pytest.raises(IllegalTransition, match="it is queued now, not generated"):
        await run_ledger.finish_task(item_id, S.saved, expect=S.generated, images=images)
    assert await run_ledger.images_of(item_id) == []
    recorded = await run_ledger.finish_task(
        item_id, S.generated, expect=S.queued, images=images, task_status="SUCCEEDED"
    )
    assert recorded.row == await run_ledger.get(item_id)
    assert (recorded.row.state, recorded.row.images_generated, recorded.row.cost) == (S.generated, 1, 0.14)
    assert recorded.row.actual_prompts == ("a fox",)
    assert recorded.images == tuple(await run_ledger.images_of(item_id))
    assert [(image.image_index, image.url) for image in recorded.pending] == [(0, "u/0")]


async def test_known_tasks_are_the_task_ids_some_item_holds(run_ledger: RunLedger) -> None:
    """A page of the task list is matched against the ledger by task id, in one read: only the ids an item
    holds come back, however many are asked about (past the ids bound in one query)."""
    first, second = await planned(run_ledger, 2)
    await drive(run_ledger, first, S.queued)
    assert (await run_ledger.get(first)).task_id == "task-1" and (await run_ledger.get(second)).task_id is None
    others = [f"task-other-{i}" for i in range(1200)]
    assert await run_ledger.known_tasks(["task-other", "task-1", "task-1"]) == {"task-1"}
    assert await run_ledger.known_tasks([*others, "task-1"]) == {"task-1"} and await run_ledger.known_tasks([]) == set()


async def test_each_attempt_records_its_account_and_reads_go_by_account(run_ledger: RunLedger) -> None:
    """The move to submitting records the pool's account whose key makes the create ('' for the environment's
    key); the open items' (region, account, model), the newest tasks of one account, and the figures per named
    account are read back by account."""
    first, second, third = await planned(run_ledger, 3)
    for item_id, account, task in ((first, "team-a", "task-a"), (second, "team-b", "task-b"), (third, "", "task-e")):
        moved = await run_ledger.transition(item_id, S.submitting, expect=S.planned, account=account)
        assert moved.account == account
        await run_ledger.transition(item_id, S.queued, task_id=task)
    assert await run_ledger.account_lanes([S.queued]) == {
        ("beijing", "team-a", "wan2.2-t2i-flash"),
        ("beijing", "team-b", "wan2.2-t2i-flash"),
        ("beijing", "", "wan2.2-t2i-flash"),
    }
    assert [task for task, _ in await run_ledger.recent_tasks("beijing", 5, account="team-b")] == ["task-b"]
    assert [task for task, _ in await run_ledger.recent_tasks("beijing", 5, account="")] == ["task-e"]
    assert {task for task, _ in await run_ledger.recent_tasks("beijing", 5)} == {"task-a", "task-b", "task-e"}
    summary = await run_ledger.account_summary()
    assert set(summary) == {"team-a", "team-b"}
    assert summary["team-a"] == {"items": {"queued": 1}, "images_generated": 0, "images_saved": 0, "cost": {"CNY": 0.0}}


class AnyRegionItem(FakeItem):
    """An item allowed two regions, as the manifest makes one: its request holds the joined regions."""

    def request(self) -> dict[str, object]:
        return {**super().request(), "region": self.region}


async def test_an_item_allowed_several_regions_takes_its_attempt_s_and_gets_them_back(run_ledger: RunLedger) -> None:
    """The move to submitting records the region an item allowed several was sent to and its price there; a move
    back to planned gives it its joined regions again (its price stays for the next attempt to set)."""
    run = await run_ledger.begin_run()
    item = AnyRegionItem(item_id="multi", region="beijing|singapore")
    await run_ledger.add_items([item], run=run, price_of=lambda it: 0.183481)
    assert (await run_ledger.get("multi")).region == "beijing|singapore"
    sent = await run_ledger.transition(
        "multi", S.submitting, expect=S.planned, region="beijing", price_per_image=0.14, account="team-a"
    )
    assert (sent.region, sent.price_per_image, sent.account) == ("beijing", 0.14, "team-a")
    back = await run_ledger.transition("multi", S.planned, expect=S.submitting, error_code="Throttling")
    assert back.region == "beijing|singapore"
    assert [row.item_id async for row in run_ledger.iter_items([S.planned], region="beijing|singapore")] == ["multi"]


async def test_many_items_are_read_together_and_a_missing_one_is_named(run_ledger: RunLedger) -> None:
    """get_many gives the row of every id asked for, as get would (past the ids bound in one query), and names
    an id that has no item rather than leaving it out."""
    ids = await planned(run_ledger, 1100)
    await drive(run_ledger, ids[7], S.queued)
    rows = {row.item_id: row for row in await run_ledger.get_many(ids)}
    assert sorted(rows) == ids and rows[ids[7]] == await run_ledger.get(ids[7]) and rows[ids[7]].state is S.queued
    with pytest.raises(LedgerError, match="item-nowhere"):
        await run_ledger.get_many([ids[0], "item-nowhere"])


async def test_run_spans_place_each_time_within_its_run(run_ledger: RunLedger, ledger_clock: ScaledClock) -> None:
    """Each time falls in the run going on then: from that run's start to the next one's (or the end of time);
    a time before the first run is placed from time zero."""
    first = ledger_clock.now_ms()
    await run_ledger.begin_run()
    ledger_clock.advance(10.0)
    second = ledger_clock.now_ms()
    await run_ledger.begin_run()
    spans = await run_ledger.run_spans([first - 1, first, first + 5, second, second + 99])
    assert spans[first - 1] == (0, first)
    assert spans[first] == spans[first + 5] == (first, second)
    assert spans[second] == spans[second + 99] == (second, 2**62)


async def test_add_items_is_idempotent(run_ledger: RunLedger) -> None:
    """The same items twice: counted as existing, nothing duplicated, states kept."""
    run = await run_ledger.begin_run()
    assert (await run_ledger.add_items(items(5), run=run)).added == 5
    await run_ledger.transition("item-000000", S.submitting)
    again = await run_ledger.add_items(items(5), run=run, batch_size=2)
    assert (again.added, again.existing) == (0, 5)
    assert sum((await run_ledger.counts()).values()) == 5
    assert (await run_ledger.get("item-000000")).state is S.submitting


async def test_add_items_records_the_request_origin_and_price(run_ledger: RunLedger) -> None:
    """What the manifest said is stored: canonical request, region, model, source, entry, variables, price."""
    run = await run_ledger.begin_run()
    item = FakeItem(item_id="fox", n=3, variables={"animal": "fox"}, output="{animal}/{index}.png", seed=7)
    await run_ledger.add_items([item], run=run, price_of=lambda it: 0.2)
    row = await run_ledger.get("fox")
    assert row.request == item.request()
    assert (row.region, row.model, row.n_images, row.replica) == ("beijing", "wan2.2-t2i-flash", 3, 0)
    assert (row.source, row.entry, row.variables, row.output) == (
        "jobs/foxes.yaml:4",
        "prompts[0]",
        {"animal": "fox"},
        "{animal}/{index}.png",
    )
    assert (row.price_per_image, row.currency, row.cost, row.first_seen_run) == (0.2, "CNY", 0.0, run)
    assert (await run_ledger.summary())["cost_planned"] == {"CNY": 0.6}


async def test_an_edited_manifest_adds_new_items_and_reports_stale_ones_untouched(run_ledger: RunLedger) -> None:
    """Run 2 drops item 0 and adds item 3: one added, one stale, and the stale one is left as it was."""
    first = await run_ledger.begin_run()
    await run_ledger.add_items(items(3), run=first)
    await run_ledger.transition("item-000000", S.canceled)
    second = await run_ledger.begin_run()
    result = await run_ledger.add_items(items(3, start=1, source="jobs/foxes.yaml:9"), run=second)
    assert (result.added, result.existing) == (1, 2)
    assert await run_ledger.stale_count(second) == 1
    stale = await run_ledger.get("item-000000")
    assert (stale.state, stale.last_seen_run, stale.source) == (S.canceled, first, "jobs/foxes.yaml:4")
    moved = await run_ledger.get("item-000001")
    assert (moved.last_seen_run, moved.source, moved.first_seen_run) == (second, "jobs/foxes.yaml:9", first)
    in_run = [row.item_id async for row in run_ledger.iter_items([S.planned], run=second)]
    assert in_run == ["item-000001", "item-000002", "item-000003"]


async def test_add_items_streams_in_bounded_memory(run_ledger: RunLedger) -> None:
    """Items are read lazily and dropped once converted: the ledger never holds a list of them."""
    alive = peak = 0

    class Counted(FakeItem):
        __slots__ = ()

        def __del__(self) -> None:
            nonlocal alive
            alive -= 1

    def source(count: int) -> Iterator[Counted]:
        nonlocal alive, peak
        for i in range(count):
            alive += 1
            peak = max(peak, alive)
            yield Counted(item_id=f"s{i:06d}", prompt=f"p{i}")

    result = await run_ledger.add_items(source(20_000), run=await run_ledger.begin_run(), batch_size=500)
    assert result.added == 20_000
    assert peak <= 2
    assert (await run_ledger.counts())[S.planned] == 20_000


async def test_iter_items_streams_in_manifest_order_with_filters(run_ledger: RunLedger) -> None:
    """Planned items come in manifest order across pages, filtered by lane and position, merged over states."""
    run = await run_ledger.begin_run()
    await run_ledger.add_items(items(1500), run=run)
    await run_ledger.add_items(items(500, start=1500, model="wan2.6-t2i"), run=run)
    for i in (3, 1200):
        await run_ledger.transition(f"item-{i:06d}", S.submitting)
    flash = [row.seq async for row in run_ledger.iter_items([S.planned], model="wan2.2-t2i-flash")]
    assert len(flash) == 1498 and flash == sorted(flash)
    after = [
        row.item_id async for row in run_ledger.iter_items([S.planned], model="wan2.6-t2i", after_seq=1900, limit=3)
    ]
    assert after == ["item-001900", "item-001901", "item-001902"]
    both = [row.item_id async for row in run_ledger.iter_items([S.planned, S.submitting], limit=5)]
    assert both == ["item-000000", "item-000001", "item-000002", "item-000003", "item-000004"]
    assert await run_ledger.lanes([S.planned]) == {("beijing", "wan2.2-t2i-flash"), ("beijing", "wan2.6-t2i")}
    assert await run_ledger.lanes([S.submitting]) == {("beijing", "wan2.2-t2i-flash")}


async def test_iterating_while_moving_items_visits_each_once(run_ledger: RunLedger) -> None:
    """Moving each item as it is read (as a resume does) neither repeats nor skips any, across pages."""
    run = await run_ledger.begin_run()
    await run_ledger.add_items(items(2500), run=run)
    seen = []
    async for row in run_ledger.iter_items([S.planned]):
        await run_ledger.transition(row.item_id, S.submitting)
        seen.append(row.item_id)
    assert len(seen) == len(set(seen)) == 2500
    assert (await run_ledger.counts())[S.submitting] == 2500


async def test_iter_items_orders_by_a_time_column(run_ledger: RunLedger, ledger_clock: ScaledClock) -> None:
    """Queued items can be taken oldest submission first; an unknown order is refused."""
    ids = await planned(run_ledger, 3)
    for item_id in reversed(ids):
        ledger_clock.advance(1)
        await drive(run_ledger, item_id, S.queued)
    order = [row.item_id async for row in run_ledger.iter_items([S.queued], order_by="submitted_ms")]
    assert order == list(reversed(ids))
    with pytest.raises(LedgerError, match="cannot order items by 'prompt; DROP'"):
        await anext(run_ledger.iter_items([S.queued], order_by="prompt; DROP"))


async def test_images_come_soonest_deadline_first_across_items(run_ledger: RunLedger) -> None:
    """Pending images come by URL deadline whatever their item; failed ones are apart; or all by item and index."""
    a, b = await planned(run_ledger, 2, n=2)
    for item_id in (a, b):
        await drive(run_ledger, item_id, S.queued)
    await run_ledger.finish_task(
        a,
        S.generated,
        images=[ImageRecord(index=0, url="u/a0", deadline_ms=300), ImageRecord(index=1, url="u/a1", deadline_ms=100)],
    )
    await run_ledger.finish_task(
        b,
        S.generated,
        images=[
            ImageRecord(index=0, url="u/b0", deadline_ms=200),
            ImageRecord(index=1, error_code="InternalError.Timeout"),
        ],
    )
    pending = [(image.item_id, image.image_index) async for image in run_ledger.iter_images([ImageState.pending])]
    assert pending == [(a, 1), (b, 0), (a, 0)]
    assert [(i.item_id, i.image_index) async for i in run_ledger.iter_images([ImageState.failed])] == [(b, 1)]
    by_item = [
        (i.item_id, i.image_index) async for i in run_ledger.iter_images(list(ImageState), order_by_deadline=False)
    ]
    assert by_item == [(a, 0), (a, 1), (b, 0), (b, 1)]


async def test_images_stream_by_deadline_across_pages(run_ledger: RunLedger) -> None:
    """More pending images than one page still come in deadline order, each once."""
    ids = await planned(run_ledger, 1200)
    for number, item_id in enumerate(ids):
        await drive(run_ledger, item_id, S.queued)
        await run_ledger.finish_task(
            item_id, S.generated, images=[ImageRecord(index=0, url=f"u/{number}", deadline_ms=(number * 7919) % 1201)]
        )
    deadlines = [image.deadline_ms async for image in run_ledger.iter_images([ImageState.pending])]
    assert len(deadlines) == 1200 and deadlines == sorted(deadlines)


async def test_saved_images_come_with_their_items_across_pages(run_ledger: RunLedger) -> None:
    """iter_saved gives every saved image (and only those) with its own item's row, by item and index, past a
    page of rows."""
    ids = await planned(run_ledger, 600, n=2)
    for number, item_id in enumerate(ids):
        await drive(run_ledger, item_id, S.queued)
        images = [ImageRecord(index=i, url=f"u/{number}/{i}", deadline_ms=9) for i in range(2)]
        await run_ledger.finish_task(item_id, S.generated, images=images)
        await run_ledger.image_saved(item_id, 0, file_name=f"{item_id}-0.png", sha256="0" * 64, size_bytes=1)
        if number % 3:
            await run_ledger.image_saved(item_id, 1, file_name=f"{item_id}-1.png", sha256="1" * 64, size_bytes=1)
    pairs = [each async for each in run_ledger.iter_saved()]
    assert len(pairs) == 600 + 400
    assert [(image.item_id, image.image_index) for image, _ in pairs] == sorted(
        [(image.item_id, image.image_index) async for image in run_ledger.iter_images([ImageState.saved])]
    )
    assert all(item.item_id == image.item_id and image.state is ImageState.saved for image, item in pairs)
    image, item = pairs[-1]
    assert (item, image) == (
        await run_ledger.get(item.item_id),
        (await run_ledger.images_of(item.item_id))[image.image_index],
    )


async def test_partial_failure_bills_only_the_images_produced_and_settles_saved(run_ledger: RunLedger) -> None:
    """Two images of three came out: cost is two images, and once both are saved the item is saved."""
    (item_id,) = await planned(run_ledger, n=3)
    await drive(run_ledger, item_id, S.queued)
    await run_ledger.finish_task(
        item_id,
        S.generated,
        task_status="SUCCEEDED",
        images=[
            ImageRecord(index=0, url="u/0", deadline_ms=10, seed=5, actual_prompt="a fox, snow"),
            ImageRecord(index=1, error_code="DataInspectionFailed", error_message="Output data may contain"),
            ImageRecord(index=2, url="u/2", deadline_ms=20, seed=7),
        ],
    )
    row = await run_ledger.get(item_id)
    assert (row.images_generated, row.cost, row.actual_prompts) == (2, pytest.approx(0.28), ("a fox, snow",))
    await run_ledger.image_saved(item_id, 0, file_name="images/a.png", sha256="ab" * 32, size_bytes=1234)
    assert await run_ledger.settle(item_id) is None
    await run_ledger.image_saved(item_id, 2, file_name="images/c.png", sha256="cd" * 32, size_bytes=99)
    settled = await run_ledger.settle(item_id)
    assert (settled.row.state, settled.images) == (S.saved, tuple(await run_ledger.images_of(item_id)))
    assert (await run_ledger.get(item_id)).state is S.saved
    saved = (await run_ledger.images_of(item_id))[0]
    assert (saved.state, saved.file_name, saved.size_bytes, saved.seed) == (ImageState.saved, "images/a.png", 1234, 5)
    summary = await run_ledger.summary()
    assert summary["images"] == {"pending": 0, "saved": 2, "failed": 1, "expired": 0}
    assert (summary["images_generated"], summary["cost"]) == (2, {"CNY": 0.28})


async def test_an_image_whose_url_died_makes_the_item_expired(run_ledger: RunLedger) -> None:
    """One saved, one expired: the item ends expired, and the expired image keeps its reason."""
    (item_id,) = await planned(run_ledger, n=2)
    await drive(run_ledger, item_id, S.queued)
    images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
    await run_ledger.finish_task(item_id, S.generated, images=images)
    await run_ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    await run_ledger.image_final(item_id, 1, ImageState.expired, code="UrlExpired", message="HTTP 403")
    assert (await run_ledger.settle(item_id)).row.state is S.expired
    lost = (await run_ledger.images_of(item_id))[1]
    assert (lost.state, lost.error_code, lost.error_message) == (ImageState.expired, "UrlExpired", "HTTP 403")
    assert (await run_ledger.get(item_id)).cost == pytest.approx(0.28)


async def test_saving_the_last_image_settles_the_item_in_the_same_call(run_ledger: RunLedger) -> None:
    """With settle, an image's save or end moves its item once no image is pending, and says so."""
    first, second = await planned(run_ledger, 2, n=2)
    for item_id in (first, second):
        await drive(run_ledger, item_id, S.queued)
        images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
        await run_ledger.finish_task(item_id, S.generated, images=images)
    assert await run_ledger.image_saved(first, 0, file_name="a.png", sha256="0" * 64, size_bytes=1, settle=True) is None
    settled = await run_ledger.image_saved(first, 1, file_name="b.png", sha256="1" * 64, size_bytes=1, settle=True)
    assert settled.row == await run_ledger.get(first) and settled.row.state is S.saved
    await run_ledger.image_saved(second, 0, file_name="c.png", sha256="2" * 64, size_bytes=1, settle=True)
    settled = await run_ledger.image_final(second, 1, ImageState.expired, code="UrlExpired", settle=True)
    assert settled.row.state is S.expired
    assert [image.state for image in settled.images] == [ImageState.saved, ImageState.expired]
    assert (await run_ledger.state_of(first), await run_ledger.state_of(second)) == (S.saved, S.expired)
    assert await run_ledger.settle(first) is None  # settled once only


async def test_update_image_notes_a_transient_error_without_moving_it(run_ledger: RunLedger) -> None:
    """A download that failed for now stays pending, with the reason recorded."""
    (item_id,) = await planned(run_ledger)
    await drive(run_ledger, item_id, S.queued)
    await run_ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/0", deadline_ms=5)])
    await run_ledger.update_image(item_id, 0, error_code="DownloadFailed", error_message="reset")
    image = (await run_ledger.images_of(item_id))[0]
    assert (image.state, image.error_code) == (ImageState.pending, "DownloadFailed")
    with pytest.raises(LedgerError, match="no image 3"):
        await run_ledger.update_image(item_id, 3, error_code=None, error_message=None)


async def test_a_pending_result_needs_a_url(run_ledger: RunLedger) -> None:
    """A result said to be pending with nothing to fetch is refused, and nothing is recorded."""
    (item_id,) = await planned(run_ledger)
    with pytest.raises(LedgerError, match="pending with a url"):
        await run_ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, state=ImageState.pending)])
    assert await run_ledger.images_of(item_id) == []


async def test_counts_cover_every_state(run_ledger: RunLedger) -> None:
    """counts() lists every state, zeros included, and the sum is the number of items."""
    ids = await planned(run_ledger, 4)
    await drive(run_ledger, ids[0], S.saved)
    await drive(run_ledger, ids[1], S.rejected)
    counts = await run_ledger.counts()
    assert list(counts) == list(ItemState)
    assert (counts[S.planned], counts[S.saved], counts[S.rejected], counts[S.unknown]) == (2, 1, 1, 0)
    assert (await run_ledger.summary())["items"]["planned"] == 2


# ── the interface ───────────────────────────────────────────────────────────────────────────────────


def kind(method: object) -> str:
    """How a method is called: a coroutine function, an async generator function, or a plain one."""
    if inspect.isasyncgenfunction(method):
        return "async iterator"
    return "coroutine" if inspect.iscoroutinefunction(method) else "plain"


def unlike_the_interface(interface: type, implementation: type) -> list[str]:
    """The methods of ``interface`` that ``implementation`` lacks (has only as the interface's own stub), or has
    with other parameters or return type, or called otherwise: a coroutine where the interface has one, an async
    generator where it returns an async iterator."""
    unlike = []
    for name in (name for name in vars(interface) if not name.startswith("_")):
        theirs = getattr(interface, name)
        ours = getattr(implementation, name, None)
        wanted = (
            "async iterator"
            if str(inspect.signature(theirs).return_annotation).startswith("AsyncIterator")
            else kind(theirs)
        )
        if (
            ours is None
            or ours is theirs
            or list(inspect.signature(ours).parameters.values()) != list(inspect.signature(theirs).parameters.values())
            or inspect.signature(ours).return_annotation != inspect.signature(theirs).return_annotation
            or kind(ours) != wanted
        ):
            unlike.append(name)
    return unlike


def test_the_sqlite_ledger_has_every_member_of_the_interface_alike() -> None:
    """Every method of RunLedger is on the SQLite adapter with the same parameters, async as the protocol's, and
    its path too: the stages hold a RunLedger, so anything they call exists as they call it."""
    members = [name for name in vars(RunLedger) if not name.startswith("_")]
    assert len(members) > 20 and "path" in RunLedger.__annotations__
    assert all(kind(getattr(RunLedger, name)) == "coroutine" for name in members if not name.startswith("iter_"))
    assert unlike_the_interface(RunLedger, SqliteLedger) == []


def test_the_adapter_passes_every_parameter_of_the_synchronous_ledger() -> None:
    """Each of the adapter's methods takes what the synchronous Ledger's method of the same name takes, so
    that it can pass everything on: a parameter added to one and not the other is found."""
    members = [name for name in vars(RunLedger) if not name.startswith("_")]
    differ = [
        name
        for name in members
        if inspect.signature(getattr(SqliteLedger, name)).parameters
        != inspect.signature(getattr(Ledger, name)).parameters
    ]
    assert differ == []


def test_the_likeness_check_finds_a_missing_or_different_method() -> None:
    """The check above can fail: a ledger without one of the interface's methods, or with one that takes other
    parameters (a keyword made positional), returns another type, is not a coroutine or iterates synchronously,
    is named."""

    class Partial:
        async def get(self, item_id: str) -> ItemRow: ...  # alike

        async def known_tasks(self, task_ids: Collection[str]) -> list[str]: ...  # returns another type

        def iter_images(self, states, order_by_deadline=True): ...  # not keyword-only, untyped

        def state_of(self, item_id: str) -> ItemState: ...  # not a coroutine

        async def iter_saved(self) -> AsyncIterator[tuple[ImageRow, ItemRow]]:  # a coroutine, not an iterator
            return None

        def iter_items(self, states: Collection[ItemState]) -> Iterator[ItemRow]: ...  # synchronous

    unlike = unlike_the_interface(RunLedger, Partial)
    assert {"known_tasks", "iter_images", "state_of", "iter_saved", "iter_items", "transition"} <= set(unlike)
    assert "get" not in unlike


def ledgers_not_held_as_the_interface(root: Path) -> list[str]:
    """Where a parameter named ledger under ``root`` is typed other than RunLedger."""
    return [found.place for found in parameters(root) if found.name == "ledger" and found.annotation != "RunLedger"]


def test_the_stages_hold_the_interface_not_the_sqlite_class() -> None:
    """Every parameter named ledger in the package is typed RunLedger."""
    assert ledgers_not_held_as_the_interface(REPO / "wanbatch") == []


def test_the_interface_check_finds_a_ledger_held_otherwise(tmp_path: Path) -> None:
    """The check above can fail: a ledger typed as the SQLite class, or not typed, in a method or a nested
    function, is found; one typed RunLedger is not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "class S:\n"
        "    def a(self, ledger: Ledger) -> None:\n"
        "        async def b(*, ledger) -> None: ...\n"
        "def c(ledger: RunLedger) -> None: ...\n"
    )
    assert ledgers_not_held_as_the_interface(tmp_path / "pkg") == ["pkg/m.py:2", "pkg/m.py:3"]
