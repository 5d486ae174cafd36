"""The ledger: legal and illegal moves, compare-and-set, durability across a kill, planning, images, the run lock."""

from __future__ import annotations

import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers.paths import REPO
from helpers.source import parameters
from wanbatch.clock import ScaledClock
from wanbatch.errors import IllegalTransition, LedgerError, RunLocked
from wanbatch.ledger import LEDGER_FILE, SCHEMA_VERSION, ImageRecord, Ledger, RunLedger, RunLock
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import FINAL_STATES, TRANSITIONS, ImageState, ItemState

S = ItemState
T0_S = 1_800_000_000.0

#: From planned, the moves that bring an item to each state.
PATHS: dict[ItemState, tuple[ItemState, ...]] = {
    S.planned: (),
    S.submitting: (S.submitting,),
    S.queued: (S.submitting, S.queued),
    S.unknown: (S.submitting, S.unknown),
    S.rejected: (S.submitting, S.rejected),
    S.generated: (S.submitting, S.queued, S.generated),
    S.failed: (S.submitting, S.queued, S.failed),
    S.saved: (S.submitting, S.queued, S.generated, S.saved),
    S.expired: (S.submitting, S.queued, S.expired),
    S.canceled: (S.canceled,),
}
LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
ILLEGAL = [(a, b) for a in ItemState for b in ItemState if b not in TRANSITIONS[a]]


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeItem:
    """The shape of ``wanbatch.manifest.Item``, enough for the ledger."""

    item_id: str
    replica: int = 0
    region: str = "beijing"
    model: str = "wan2.2-t2i-flash"
    prompt: str = "a red fox in fresh snow"
    negative_prompt: str | None = None
    size: str = "1024*1024"
    n: int = 1
    seed: int | None = None
    prompt_extend: bool = False
    watermark: bool = False
    sync: bool = False
    variables: Mapping[str, str] = field(default_factory=dict)
    source: str = "jobs/foxes.yaml:4"
    entry: str = "prompts[0]"
    output: str | None = None

    def request(self) -> dict[str, object]:
        return {"model": self.model, "prompt": self.prompt, "size": self.size, "n": self.n, "seed": self.seed}


def items(count: int, *, start: int = 0, **overrides: object) -> Iterator[FakeItem]:
    for i in range(start, start + count):
        yield FakeItem(item_id=f"item-{i:06d}", prompt=f"prompt {i}", entry=f"prompts[{i}]", **overrides)


@pytest.fixture
def clock() -> ScaledClock:
    """A clock that moves only when the test advances it."""
    return ScaledClock(start_s=T0_S, monotonic=lambda: 0.0)


@pytest.fixture
def ledger(tmp_path: Path, clock: ScaledClock) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "run", clock=clock) as opened:
        yield opened


def planned(ledger: Ledger, count: int = 1, **overrides: object) -> list[str]:
    run = ledger.begin_run()
    ledger.add_items(items(count, **overrides), run=run, price_of=lambda item: 0.14)
    return [f"item-{i:06d}" for i in range(count)]


def drive(ledger: Ledger, item_id: str, state: ItemState) -> None:
    for step in PATHS[state]:
        extra = {"task_id": "task-1"} if step is S.queued else {}
        ledger.transition(item_id, step, **extra)


def audit(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path / LEDGER_FILE) as conn:
        return conn.execute("SELECT from_state, to_state, note FROM transitions ORDER BY id").fetchall()


# ── states and moves ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("source", "target"), LEGAL, ids=[f"{a}-{b}" for a, b in LEGAL])
def test_every_legal_move_is_made_and_audited(ledger: Ledger, source: ItemState, target: ItemState) -> None:
    """Each move the table allows is made, with expect as compare-and-set, and leaves an audit row."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, source)
    ledger.transition(item_id, target, expect=source, note="by the test")
    assert ledger.get(item_id).state is target
    assert audit(ledger.path.parent)[-1] == (str(source), str(target), "by the test")


@pytest.mark.parametrize(("source", "target"), ILLEGAL, ids=[f"{a}-{b}" for a, b in ILLEGAL])
def test_every_illegal_move_is_refused_naming_both_states(ledger: Ledger, source: ItemState, target: ItemState) -> None:
    """Each move the table lacks raises IllegalTransition naming the item and both states; nothing changes."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, source)
    before = ledger.get(item_id)
    with pytest.raises(IllegalTransition) as refused:
        ledger.transition(item_id, target)
    assert f"item {item_id}" in str(refused.value)
    assert f"{source} → {target}" in str(refused.value)
    assert ledger.get(item_id) == before


def test_final_states_are_exactly_those_without_moves() -> None:
    """saved and expired are final; failed, rejected and canceled can go back to planned to be made again."""
    assert {S.saved, S.expired} == FINAL_STATES
    assert TRANSITIONS[S.failed] == TRANSITIONS[S.rejected] == TRANSITIONS[S.canceled] == {S.planned}


def test_compare_and_set_refuses_a_stale_caller(tmp_path: Path, clock: ScaledClock) -> None:
    """Two connections expect planned; the second to move is refused and the item moves once."""
    with Ledger.open(tmp_path, clock=clock) as first, Ledger.open(tmp_path, clock=clock) as second:
        (item_id,) = planned(first)
        first.transition(item_id, S.submitting, expect=S.planned)
        with pytest.raises(IllegalTransition, match=r"it is submitting now, not planned"):
            second.transition(item_id, S.submitting, expect=S.planned)
        row = second.get(item_id)
    assert (row.state, row.attempts) == (S.submitting, 1)
    assert [move[:2] for move in audit(tmp_path)] == [("planned", "submitting")]


def test_expect_is_checked_against_the_table_before_the_database(ledger: Ledger) -> None:
    """An expect that the table cannot join to the target is refused even if the item is elsewhere."""
    (item_id,) = planned(ledger)
    with pytest.raises(IllegalTransition, match="queued → submitting"):
        ledger.transition(item_id, S.submitting, expect=S.queued)
    assert ledger.get(item_id).state is S.planned


def test_a_missing_item_is_a_ledger_error(ledger: Ledger) -> None:
    """Moving or reading an item the ledger does not have says so."""
    with pytest.raises(LedgerError, match="no item nope"):
        ledger.transition("nope", S.submitting)
    with pytest.raises(LedgerError, match="no item nope"):
        ledger.get("nope")


def test_transition_records_fields_times_and_request_ids(ledger: Ledger, clock: ScaledClock) -> None:
    """Entering a state stamps its time; request ids accumulate; errors clear when a new attempt starts."""
    (item_id,) = planned(ledger)
    clock.advance(1)
    ledger.transition(item_id, S.submitting, expect=S.planned)
    ledger.transition(item_id, S.planned, error_code="Throttling.RateQuota", error_message="slow", request_id="r1")
    row = ledger.get(item_id)
    assert (row.error_code, row.request_ids, row.attempts) == ("Throttling.RateQuota", ("r1",), 1)
    clock.advance(2)
    ledger.transition(item_id, S.submitting)
    clock.advance(3)
    ledger.transition(item_id, S.queued, task_id="t-9", task_status="PENDING", request_id="r2")
    clock.advance(4)
    ledger.transition(item_id, S.failed, task_status="FAILED", error_code="InternalError", request_id="r3")
    row = ledger.get(item_id)
    t0_ms = int(T0_S * 1000)
    assert row.attempts == 2
    assert row.request_ids == ("r1", "r2", "r3")
    assert (row.task_id, row.task_status, row.error_code) == ("t-9", "FAILED", "InternalError")
    assert (row.planned_ms, row.submit_started_ms, row.submitted_ms, row.ended_ms) == (
        t0_ms,
        t0_ms + 3000,
        t0_ms + 6000,
        t0_ms + 10000,
    )


def test_caller_given_times_and_attempts_win_over_the_defaults(ledger: Ledger) -> None:
    """Fields the caller passes override what entering the state would set."""
    (item_id,) = planned(ledger)
    ledger.transition(item_id, S.submitting, submit_started_ms=5, attempts=7)
    ledger.transition(item_id, S.queued, task_id="t", submitted_ms=6)
    ledger.transition(item_id, S.canceled, ended_ms=8)
    row = ledger.get(item_id)
    assert (row.submit_started_ms, row.attempts, row.submitted_ms, row.ended_ms) == (5, 7, 6, 8)


def test_unknown_fields_and_state_changes_through_update_are_refused(ledger: Ledger) -> None:
    """A field the ledger does not have is an error, and update() never changes state."""
    (item_id,) = planned(ledger)
    with pytest.raises(LedgerError, match="no settable field 'api_key'"):
        ledger.transition(item_id, S.submitting, api_key="sk-123")
    with pytest.raises(LedgerError, match="use transition"):
        ledger.update(item_id, state="saved")
    ledger.update(item_id, task_status="RUNNING", request_id="r7")
    row = ledger.get(item_id)
    assert (row.state, row.task_status, row.request_ids) == (S.planned, "RUNNING", ("r7",))


def test_retry_to_planned_forgets_the_task_and_its_images(ledger: Ledger) -> None:
    """failed → planned leaves no task id and no image of the old task behind."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, S.queued)
    ledger.finish_task(item_id, S.failed, images=[ImageRecord(index=0, error_code="InternalError")])
    assert len(ledger.images_of(item_id)) == 1
    ledger.transition(item_id, S.planned, note="retry")
    row = ledger.get(item_id)
    assert (row.state, row.task_id, row.task_status, row.ended_ms) == (S.planned, None, None, None)
    assert ledger.images_of(item_id) == []


def test_a_move_returns_the_row_it_wrote(ledger: Ledger) -> None:
    """transition and update return the item's new row, the same one a read would give: no read-back needed."""
    (item_id,) = planned(ledger)
    submitting = ledger.transition(item_id, S.submitting, expect=S.planned, endpoint="async")
    assert (submitting.state, submitting.attempts, submitting.endpoint) == (S.submitting, 1, "async")
    assert submitting.submit_started_ms == int(T0_S * 1000)
    queued = ledger.transition(item_id, S.queued, expect=S.submitting, task_id="task-9", request_id="r1")
    assert (queued.state, queued.task_id, queued.request_ids) == (S.queued, "task-9", ("r1",))
    assert queued == ledger.get(item_id)
    updated = ledger.update(item_id, task_status="RUNNING", request_id="r2")
    assert (updated.task_status, updated.request_ids) == ("RUNNING", ("r1", "r2"))
    assert updated == ledger.get(item_id)


def test_finishing_a_task_returns_its_row_and_images(ledger: Ledger) -> None:
    """finish_task returns the generated row with its cost and every image as recorded, what the downloader
    needs; a stale caller's compare-and-set is refused with nothing recorded."""
    (item_id,) = planned(ledger, n=2)
    drive(ledger, item_id, S.queued)
    images = [
        ImageRecord(index=0, url="u/0", deadline_ms=10, seed=5, actual_prompt="a fox"),
        ImageRecord(index=1, error_code="DataInspectionFailed", error_message="Output data may contain"),
    ]
    with pytest.raises(IllegalTransition, match="it is queued now, not generated"):
        ledger.finish_task(item_id, S.saved, expect=S.generated, images=images)
    assert ledger.images_of(item_id) == []
    recorded = ledger.finish_task(item_id, S.generated, expect=S.queued, images=images, task_status="SUCCEEDED")
    assert recorded.row == ledger.get(item_id)
    assert (recorded.row.state, recorded.row.images_generated, recorded.row.cost) == (S.generated, 1, 0.14)
    assert recorded.row.actual_prompts == ("a fox",)
    assert recorded.images == tuple(ledger.images_of(item_id))
    assert [(image.image_index, image.url) for image in recorded.pending] == [(0, "u/0")]


def test_known_tasks_are_the_task_ids_some_item_holds(ledger: Ledger) -> None:
    """A page of the task list is matched against the ledger by task id, in one read: only the ids an item
    holds come back, however many are asked about (past the ids bound in one query)."""
    first, second = planned(ledger, 2)
    drive(ledger, first, S.queued)
    assert ledger.get(first).task_id == "task-1" and ledger.get(second).task_id is None
    others = [f"task-other-{i}" for i in range(1200)]
    assert ledger.known_tasks(["task-other", "task-1", "task-1"]) == {"task-1"}
    assert ledger.known_tasks([*others, "task-1"]) == {"task-1"} and ledger.known_tasks([]) == set()


def test_many_items_are_read_together_and_a_missing_one_is_named(ledger: Ledger) -> None:
    """get_many gives the row of every id asked for, as get would (past the ids bound in one query), and names
    an id that has no item rather than leaving it out."""
    ids = planned(ledger, 1100)
    drive(ledger, ids[7], S.queued)
    rows = {row.item_id: row for row in ledger.get_many(ids)}
    assert sorted(rows) == ids and rows[ids[7]] == ledger.get(ids[7]) and rows[ids[7]].state is S.queued
    with pytest.raises(LedgerError, match="item-nowhere"):
        ledger.get_many([ids[0], "item-nowhere"])


def test_run_spans_place_each_time_within_its_run(ledger: Ledger, clock: ScaledClock) -> None:
    """Each time falls in the run going on then: from that run's start to the next one's (or the end of time);
    a time before the first run is placed from time zero."""
    first = clock.now_ms()
    ledger.begin_run()
    clock.advance(10.0)
    second = clock.now_ms()
    ledger.begin_run()
    spans = ledger.run_spans([first - 1, first, first + 5, second, second + 99])
    assert spans[first - 1] == (0, first)
    assert spans[first] == spans[first + 5] == (first, second)
    assert spans[second] == spans[second + 99] == (second, 2**62)


# ── opening, durability ─────────────────────────────────────────────────────────────────────────────


def test_reopening_finds_everything_committed_with_wal_and_schema_version(tmp_path: Path, clock: ScaledClock) -> None:
    """After close, a new open sees every row; the file is in WAL mode with its schema version recorded."""
    with Ledger.open(tmp_path / "deep" / "run", clock=clock) as ledger:
        first, second = planned(ledger, 2)
        drive(ledger, first, S.queued)
    with Ledger.open(tmp_path / "deep" / "run", clock=clock, create=False) as ledger:
        assert ledger.get(first).state is S.queued
        assert ledger.get(second).state is S.planned
        assert ledger.begin_run() == 2
    with sqlite3.connect(tmp_path / "deep" / "run" / LEDGER_FILE) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_open_without_create_refuses_a_folder_with_no_ledger(tmp_path: Path, clock: ScaledClock) -> None:
    """Reading a folder that is not a run folder fails clearly and creates nothing."""
    with pytest.raises(LedgerError, match="no ledger in"):
        Ledger.open(tmp_path / "nothing", clock=clock, create=False)
    assert not (tmp_path / "nothing").exists()


def test_a_ledger_of_another_schema_version_is_refused(tmp_path: Path, clock: ScaledClock) -> None:
    """A ledger written by a different schema version is not read as if it were this one."""
    Ledger.open(tmp_path, clock=clock).close()
    with sqlite3.connect(tmp_path / LEDGER_FILE) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match=f"schema version 99, this wanbatch reads version {SCHEMA_VERSION}"):
        Ledger.open(tmp_path, clock=clock)


CRASH_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    from wanbatch.clock import ScaledClock
    from wanbatch.ledger import Ledger
    from wanbatch.ledger.states import ItemState

    def item(i):
        return SimpleNamespace(item_id=f"c{i:04d}", replica=0, region="beijing", model="wan2.2-t2i-flash", n=1,
                               variables={}, source="crash.yaml:1", entry=f"prompts[{i}]", output=None,
                               request=lambda: {"prompt": f"p{i}"})

    ledger = Ledger.open(Path(sys.argv[1]), clock=ScaledClock())
    ledger.add_items((item(i) for i in range(400)), run=ledger.begin_run())
    for i in range(400):
        ledger.transition(f"c{i:04d}", ItemState.submitting, expect=ItemState.planned)
        ledger.transition(f"c{i:04d}", ItemState.queued, task_id=f"t{i}")
        print(i, flush=True)
    while True:  # keep writing, so the kill lands in the middle of something
        ledger.update("c0000", request_id="again")
    """
)


def test_committed_rows_survive_a_sigkill_mid_write(tmp_path: Path, clock: ScaledClock) -> None:
    """A writer killed with SIGKILL loses nothing it reported committed; the file stays intact."""
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        reported = [int(child.stdout.readline()) for _ in range(60)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Ledger.open(tmp_path, clock=clock) as ledger:
        for i in reported:
            row = ledger.get(f"c{i:04d}")
            assert (row.state, row.task_id, row.attempts) == (S.queued, f"t{i}", 1)
        counts = ledger.counts()
        assert counts[S.queued] >= len(reported)
        assert sum(counts.values()) == 400
    with sqlite3.connect(tmp_path / LEDGER_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ── planning ────────────────────────────────────────────────────────────────────────────────────────


def test_add_items_is_idempotent(ledger: Ledger) -> None:
    """The same items twice: counted as existing, nothing duplicated, states kept."""
    run = ledger.begin_run()
    assert ledger.add_items(items(5), run=run).added == 5
    ledger.transition("item-000000", S.submitting)
    again = ledger.add_items(items(5), run=run, batch_size=2)
    assert (again.added, again.existing) == (0, 5)
    assert sum(ledger.counts().values()) == 5
    assert ledger.get("item-000000").state is S.submitting


def test_add_items_records_the_request_origin_and_price(ledger: Ledger) -> None:
    """What the manifest said is stored: canonical request, region, model, source, entry, variables, price."""
    run = ledger.begin_run()
    item = FakeItem(item_id="fox", n=3, variables={"animal": "fox"}, output="{animal}/{index}.png", seed=7)
    ledger.add_items([item], run=run, price_of=lambda it: 0.2)
    row = ledger.get("fox")
    assert row.request == item.request()
    assert (row.region, row.model, row.n_images, row.replica) == ("beijing", "wan2.2-t2i-flash", 3, 0)
    assert (row.source, row.entry, row.variables, row.output) == (
        "jobs/foxes.yaml:4",
        "prompts[0]",
        {"animal": "fox"},
        "{animal}/{index}.png",
    )
    assert (row.price_per_image, row.currency, row.cost, row.first_seen_run) == (0.2, "CNY", 0.0, run)
    assert ledger.summary()["cost_planned"] == {"CNY": 0.6}


def test_an_edited_manifest_adds_new_items_and_reports_stale_ones_untouched(ledger: Ledger) -> None:
    """Run 2 drops item 0 and adds item 3: one added, one stale, and the stale one is left as it was."""
    first = ledger.begin_run()
    ledger.add_items(items(3), run=first)
    ledger.transition("item-000000", S.canceled)
    second = ledger.begin_run()
    result = ledger.add_items(items(3, start=1, source="jobs/foxes.yaml:9"), run=second)
    assert (result.added, result.existing) == (1, 2)
    assert ledger.stale_count(second) == 1
    stale = ledger.get("item-000000")
    assert (stale.state, stale.last_seen_run, stale.source) == (S.canceled, first, "jobs/foxes.yaml:4")
    moved = ledger.get("item-000001")
    assert (moved.last_seen_run, moved.source, moved.first_seen_run) == (second, "jobs/foxes.yaml:9", first)
    in_run = [row.item_id for row in ledger.iter_items([S.planned], run=second)]
    assert in_run == ["item-000001", "item-000002", "item-000003"]


def test_add_items_streams_in_bounded_memory(ledger: Ledger) -> None:
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

    result = ledger.add_items(source(20_000), run=ledger.begin_run(), batch_size=500)
    assert result.added == 20_000
    assert peak <= 2
    assert ledger.counts()[S.planned] == 20_000


def test_iter_items_streams_in_manifest_order_with_filters(ledger: Ledger) -> None:
    """Planned items come in manifest order across pages, filtered by lane and position, merged over states."""
    run = ledger.begin_run()
    ledger.add_items(items(1500), run=run)
    ledger.add_items(items(500, start=1500, model="wan2.6-t2i"), run=run)
    for i in (3, 1200):
        ledger.transition(f"item-{i:06d}", S.submitting)
    flash = [row.seq for row in ledger.iter_items([S.planned], model="wan2.2-t2i-flash")]
    assert len(flash) == 1498 and flash == sorted(flash)
    after = [row.item_id for row in ledger.iter_items([S.planned], model="wan2.6-t2i", after_seq=1900, limit=3)]
    assert after == ["item-001900", "item-001901", "item-001902"]
    both = [row.item_id for row in ledger.iter_items([S.planned, S.submitting], limit=5)]
    assert both == ["item-000000", "item-000001", "item-000002", "item-000003", "item-000004"]
    assert ledger.lanes([S.planned]) == {("beijing", "wan2.2-t2i-flash"), ("beijing", "wan2.6-t2i")}
    assert ledger.lanes([S.submitting]) == {("beijing", "wan2.2-t2i-flash")}


def test_iterating_while_moving_items_visits_each_once(ledger: Ledger) -> None:
    """Moving each item as it is read (as a resume does) neither repeats nor skips any, across pages."""
    run = ledger.begin_run()
    ledger.add_items(items(2500), run=run)
    seen = []
    for row in ledger.iter_items([S.planned]):
        ledger.transition(row.item_id, S.submitting)
        seen.append(row.item_id)
    assert len(seen) == len(set(seen)) == 2500
    assert ledger.counts()[S.submitting] == 2500


def test_iter_items_orders_by_a_time_column(ledger: Ledger, clock: ScaledClock) -> None:
    """Queued items can be taken oldest submission first; an unknown order is refused."""
    ids = planned(ledger, 3)
    for item_id in reversed(ids):
        clock.advance(1)
        drive(ledger, item_id, S.queued)
    order = [row.item_id for row in ledger.iter_items([S.queued], order_by="submitted_ms")]
    assert order == list(reversed(ids))
    with pytest.raises(LedgerError, match="cannot order items by 'prompt; DROP'"):
        ledger.iter_items([S.queued], order_by="prompt; DROP")


# ── images ──────────────────────────────────────────────────────────────────────────────────────────


def test_images_come_soonest_deadline_first_across_items(ledger: Ledger) -> None:
    """Pending images come by URL deadline whatever their item; failed ones are apart; or all by item and index."""
    a, b = planned(ledger, 2, n=2)
    for item_id in (a, b):
        drive(ledger, item_id, S.queued)
    ledger.finish_task(
        a,
        S.generated,
        images=[ImageRecord(index=0, url="u/a0", deadline_ms=300), ImageRecord(index=1, url="u/a1", deadline_ms=100)],
    )
    ledger.finish_task(
        b,
        S.generated,
        images=[
            ImageRecord(index=0, url="u/b0", deadline_ms=200),
            ImageRecord(index=1, error_code="InternalError.Timeout"),
        ],
    )
    pending = [(image.item_id, image.image_index) for image in ledger.iter_images([ImageState.pending])]
    assert pending == [(a, 1), (b, 0), (a, 0)]
    assert [(i.item_id, i.image_index) for i in ledger.iter_images([ImageState.failed])] == [(b, 1)]
    by_item = [(i.item_id, i.image_index) for i in ledger.iter_images(list(ImageState), order_by_deadline=False)]
    assert by_item == [(a, 0), (a, 1), (b, 0), (b, 1)]


def test_images_stream_by_deadline_across_pages(ledger: Ledger) -> None:
    """More pending images than one page still come in deadline order, each once."""
    ids = planned(ledger, 1200)
    for number, item_id in enumerate(ids):
        drive(ledger, item_id, S.queued)
        ledger.finish_task(
            item_id, S.generated, images=[ImageRecord(index=0, url=f"u/{number}", deadline_ms=(number * 7919) % 1201)]
        )
    deadlines = [image.deadline_ms for image in ledger.iter_images([ImageState.pending])]
    assert len(deadlines) == 1200 and deadlines == sorted(deadlines)


def test_saved_images_come_with_their_items_across_pages(ledger: Ledger) -> None:
    """iter_saved gives every saved image (and only those) with its own item's row, by item and index, past a
    page of rows."""
    ids = planned(ledger, 600, n=2)
    for number, item_id in enumerate(ids):
        drive(ledger, item_id, S.queued)
        images = [ImageRecord(index=i, url=f"u/{number}/{i}", deadline_ms=9) for i in range(2)]
        ledger.finish_task(item_id, S.generated, images=images)
        ledger.image_saved(item_id, 0, file_name=f"{item_id}-0.png", sha256="0" * 64, size_bytes=1)
        if number % 3:
            ledger.image_saved(item_id, 1, file_name=f"{item_id}-1.png", sha256="1" * 64, size_bytes=1)
    pairs = list(ledger.iter_saved())
    assert len(pairs) == 600 + 400
    assert [(image.item_id, image.image_index) for image, _ in pairs] == sorted(
        (image.item_id, image.image_index) for image in ledger.iter_images([ImageState.saved])
    )
    assert all(item.item_id == image.item_id and image.state is ImageState.saved for image, item in pairs)
    image, item = pairs[-1]
    assert (item, image) == (ledger.get(item.item_id), ledger.images_of(item.item_id)[image.image_index])


def test_partial_failure_bills_only_the_images_produced_and_settles_saved(ledger: Ledger) -> None:
    """Two images of three came out: cost is two images, and once both are saved the item is saved."""
    (item_id,) = planned(ledger, n=3)
    drive(ledger, item_id, S.queued)
    ledger.finish_task(
        item_id,
        S.generated,
        task_status="SUCCEEDED",
        images=[
            ImageRecord(index=0, url="u/0", deadline_ms=10, seed=5, actual_prompt="a fox, snow"),
            ImageRecord(index=1, error_code="DataInspectionFailed", error_message="Output data may contain"),
            ImageRecord(index=2, url="u/2", deadline_ms=20, seed=7),
        ],
    )
    row = ledger.get(item_id)
    assert (row.images_generated, row.cost, row.actual_prompts) == (2, pytest.approx(0.28), ("a fox, snow",))
    ledger.image_saved(item_id, 0, file_name="images/a.png", sha256="ab" * 32, size_bytes=1234)
    assert ledger.settle(item_id) is None
    ledger.image_saved(item_id, 2, file_name="images/c.png", sha256="cd" * 32, size_bytes=99)
    settled = ledger.settle(item_id)
    assert (settled.row.state, settled.images) == (S.saved, tuple(ledger.images_of(item_id)))
    assert ledger.get(item_id).state is S.saved
    saved = ledger.images_of(item_id)[0]
    assert (saved.state, saved.file_name, saved.size_bytes, saved.seed) == (ImageState.saved, "images/a.png", 1234, 5)
    summary = ledger.summary()
    assert summary["images"] == {"pending": 0, "saved": 2, "failed": 1, "expired": 0}
    assert (summary["images_generated"], summary["cost"]) == (2, {"CNY": 0.28})


def test_an_image_whose_url_died_makes_the_item_expired(ledger: Ledger) -> None:
    """One saved, one expired: the item ends expired, and the expired image keeps its reason."""
    (item_id,) = planned(ledger, n=2)
    drive(ledger, item_id, S.queued)
    images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
    ledger.finish_task(item_id, S.generated, images=images)
    ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    ledger.image_final(item_id, 1, ImageState.expired, code="UrlExpired", message="HTTP 403")
    assert ledger.settle(item_id).row.state is S.expired
    lost = ledger.images_of(item_id)[1]
    assert (lost.state, lost.error_code, lost.error_message) == (ImageState.expired, "UrlExpired", "HTTP 403")
    assert ledger.get(item_id).cost == pytest.approx(0.28)


def test_saving_the_last_image_settles_the_item_in_the_same_call(ledger: Ledger) -> None:
    """With settle, an image's save or end moves its item once no image is pending, and says so."""
    first, second = planned(ledger, 2, n=2)
    for item_id in (first, second):
        drive(ledger, item_id, S.queued)
        images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
        ledger.finish_task(item_id, S.generated, images=images)
    assert ledger.image_saved(first, 0, file_name="a.png", sha256="0" * 64, size_bytes=1, settle=True) is None
    settled = ledger.image_saved(first, 1, file_name="b.png", sha256="1" * 64, size_bytes=1, settle=True)
    assert settled.row == ledger.get(first) and settled.row.state is S.saved
    ledger.image_saved(second, 0, file_name="c.png", sha256="2" * 64, size_bytes=1, settle=True)
    settled = ledger.image_final(second, 1, ImageState.expired, code="UrlExpired", settle=True)
    assert settled.row.state is S.expired
    assert [image.state for image in settled.images] == [ImageState.saved, ImageState.expired]
    assert (ledger.state_of(first), ledger.state_of(second)) == (S.saved, S.expired)
    assert ledger.settle(first) is None  # settled once only


def test_a_saved_image_is_never_moved_or_overwritten(ledger: Ledger) -> None:
    """Re-recording a task's results leaves saved images alone; moving a saved image again is refused."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, S.queued)
    ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/old", deadline_ms=5)])
    ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    # As a folder of an earlier wanbatch may hold it: a queued item whose images were recorded before its move.
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("UPDATE items SET state = 'queued' WHERE item_id = ?", (item_id,))
    ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/new", deadline_ms=9)])
    image = ledger.images_of(item_id)[0]
    assert (image.state, image.url, image.deadline_ms) == (ImageState.saved, "u/old", 5)
    with pytest.raises(IllegalTransition, match="saved → expired"):
        ledger.image_final(item_id, 0, ImageState.expired)
    with pytest.raises(LedgerError, match="image_final\\(\\) takes failed or expired"):
        ledger.image_final(item_id, 0, ImageState.saved)


def test_a_saved_image_whose_file_went_missing_is_reopened_with_its_item(ledger: Ledger) -> None:
    """reopen_image takes a saved image back to pending (its file forgotten) and its saved item back to
    generated, in one move the audit names; an image that is not saved is refused."""
    (item_id,) = planned(ledger, n=2)
    drive(ledger, item_id, S.queued)
    images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
    ledger.finish_task(item_id, S.generated, images=images)
    ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    ledger.image_saved(item_id, 1, file_name="b.png", sha256="1" * 64, size_bytes=1, settle=True)
    ledger.reopen_image(item_id, 1, reason="images/b.png was missing on resume")
    image = ledger.images_of(item_id)[1]
    assert (image.state, image.file_name, image.error_code) == (ImageState.pending, None, "FileMissing")
    assert ledger.state_of(item_id) is S.generated
    assert audit(ledger.path.parent)[-1] == ("saved", "generated", "images/b.png was missing on resume")
    with pytest.raises(IllegalTransition, match="pending → pending"):
        ledger.reopen_image(item_id, 1, reason="again")


def test_a_durable_move_is_fsynced_and_the_others_are_not(ledger: Ledger) -> None:
    """The commit a POST depends on runs with synchronous=FULL (it survives a power loss); the others with
    NORMAL in WAL mode (they survive a crash), so that saving an image costs no fsync of the ledger."""
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first, second = planned(ledger, 2)
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)
    ledger.transition(first, ItemState.submitting, expect=ItemState.planned, durable=True)
    durable, statements[:] = list(statements), []
    ledger.transition(second, ItemState.submitting, expect=ItemState.planned)
    assert (
        durable.index("PRAGMA synchronous = FULL")
        < durable.index("COMMIT")
        < durable.index("PRAGMA synchronous = NORMAL")
    )
    assert not any("synchronous" in statement for statement in statements)
    assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL between durable moves


def test_update_image_notes_a_transient_error_without_moving_it(ledger: Ledger) -> None:
    """A download that failed for now stays pending, with the reason recorded."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, S.queued)
    ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/0", deadline_ms=5)])
    ledger.update_image(item_id, 0, error_code="DownloadFailed", error_message="reset")
    image = ledger.images_of(item_id)[0]
    assert (image.state, image.error_code) == (ImageState.pending, "DownloadFailed")
    with pytest.raises(LedgerError, match="no image 3"):
        ledger.update_image(item_id, 3, error_code=None, error_message=None)


def test_a_pending_result_needs_a_url(ledger: Ledger) -> None:
    """A result said to be pending with nothing to fetch is refused, and nothing is recorded."""
    (item_id,) = planned(ledger)
    with pytest.raises(LedgerError, match="pending with a url"):
        ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, state=ImageState.pending)])
    assert ledger.images_of(item_id) == []


# ── counts and summary ──────────────────────────────────────────────────────────────────────────────


def test_counts_cover_every_state(ledger: Ledger) -> None:
    """counts() lists every state, zeros included, and the sum is the number of items."""
    ids = planned(ledger, 4)
    drive(ledger, ids[0], S.saved)
    drive(ledger, ids[1], S.rejected)
    counts = ledger.counts()
    assert list(counts) == list(ItemState)
    assert (counts[S.planned], counts[S.saved], counts[S.rejected], counts[S.unknown]) == (2, 1, 1, 0)
    assert ledger.summary()["items"]["planned"] == 2


def test_counts_are_read_from_the_state_index(ledger: Ledger) -> None:
    """The count per state scans the (state, seq) index, not the table."""
    with sqlite3.connect(ledger.path) as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT state, count(*) FROM items GROUP BY state").fetchall()
    assert "COVERING INDEX items_state_seq" in " ".join(row[3] for row in plan)


# ── the run lock ────────────────────────────────────────────────────────────────────────────────────

LOCK_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from wanbatch.ledger import RunLock

    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_run_lock_refuses_a_second_process_and_frees_when_the_holder_is_killed(tmp_path: Path) -> None:
    """A live holder in another process blocks a run, named with its pid; after its SIGKILL the folder is free."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_CHILD, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path).acquire()
        assert f"pid {child.pid}" in str(refused.value)
        assert str(tmp_path) in str(refused.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_run_lock_is_exclusive_within_one_process_and_reusable(tmp_path: Path) -> None:
    """Two holders in one process also exclude each other; a released lock can be taken again."""
    with RunLock(tmp_path), pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


# ── the API key ─────────────────────────────────────────────────────────────────────────────────────


def test_the_api_key_is_never_written_to_the_ledger(
    tmp_path: Path, clock: ScaledClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a key in the environment, a full item life leaves no trace of it in the ledger's files."""
    sentinel = "sk-sentinel-4f1d2c9e8b7a"
    monkeypatch.setenv("DASHSCOPE_API_KEY", sentinel)
    with Ledger.open(tmp_path, clock=clock) as ledger:
        run = ledger.begin_run()
        ledger.add_items([FakeItem(item_id="k", prompt="marker-prompt-93c1")], run=run, price_of=lambda it: 0.1)
        ledger.transition("k", S.submitting, expect=S.planned)
        ledger.transition("k", S.queued, task_id="t", request_id="r")
        ledger.finish_task("k", S.generated, images=[ImageRecord(index=0, url="http://127.0.0.1/i.png", deadline_ms=1)])
        ledger.image_saved("k", 0, file_name="images/k-0.png", sha256="0" * 64, size_bytes=10)
        ledger.settle("k")
        written = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    assert b"marker-prompt-93c1" in written  # the bytes searched are the ones the ledger wrote
    assert sentinel.encode() not in written


# ── the interface ───────────────────────────────────────────────────────────────────────────────────


def unlike_the_interface(interface: type, implementation: type) -> list[str]:
    """The methods of ``interface`` that ``implementation`` lacks, or has with other parameters or return type."""
    unlike = []
    for name in (name for name in vars(interface) if not name.startswith("_")):
        ours = getattr(implementation, name, None)
        theirs = inspect.signature(getattr(interface, name))
        if ours is None or (
            list(inspect.signature(ours).parameters.values()) != list(theirs.parameters.values())
            or inspect.signature(ours).return_annotation != theirs.return_annotation
        ):
            unlike.append(name)
    return unlike


def test_the_sqlite_ledger_has_every_member_of_the_interface_alike() -> None:
    """Every method of RunLedger is on the SQLite Ledger with the same parameters, and its path too: the stages
    hold a RunLedger, so anything they call exists as they call it."""
    members = [name for name in vars(RunLedger) if not name.startswith("_")]
    assert len(members) > 20 and "path" in RunLedger.__annotations__
    assert unlike_the_interface(RunLedger, Ledger) == []


def test_the_likeness_check_finds_a_missing_or_different_method() -> None:
    """The check above can fail: a ledger without one of the interface's methods, or with one that takes other
    parameters (a keyword made positional) or returns another type, is named."""

    class Partial:
        def get(self, item_id: str) -> ItemRow: ...  # alike

        def known_tasks(self, task_ids: Collection[str]) -> list[str]: ...  # returns another type

        def iter_images(self, states, order_by_deadline=True): ...  # not keyword-only, untyped

    unlike = unlike_the_interface(RunLedger, Partial)
    assert {"known_tasks", "iter_images", "transition"} <= set(unlike) and "get" not in unlike


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
