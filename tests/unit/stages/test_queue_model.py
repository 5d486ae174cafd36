"""The tracker's model of the service's queue, stepped on a manual clock: no network, no sleeping."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from wanbatch import catalog
from wanbatch.clock import ManualClock
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.service.wire import TaskStatus
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claims
from wanbatch.stages.queue_model import QueueModel, TrackerConfig

FLASH = catalog.offer("beijing", "wan2.2-t2i-flash")  # typical 40 s: first likely end 28 s, last 52 s


@dataclass
class _Lane:
    """What the model reads of a lane: its offer (model, concurrency) and its region."""

    offer: catalog.Offer
    region: str = "beijing"


def _claimed(item_id: str, sent_s: float | None = None) -> dict:
    """A queued item whose create was sent at ``sent_s`` (our clock), if known, and its claim: what add takes."""
    started_ms = None if sent_s is None else int(sent_s * 1000)
    fields = {**dict.fromkeys(ItemRow.__dataclass_fields__), "item_id": item_id, "state": ItemState.queued}
    row = ItemRow(**{**fields, "n_images": 1, "price_per_image": 0.14, "submit_started_ms": started_ms})
    return {"row": row, "claim": Claims(capacity=10, budget=Budget()).resume(row)}


def _model(policy: str = "prompt", concurrency: int = 2) -> tuple[ManualClock, QueueModel, _Lane]:
    clock = ManualClock(start_s=1000.0)
    return (
        clock,
        QueueModel(clock=clock, config=TrackerConfig(policy=policy)),
        _Lane(replace(FLASH, concurrency=concurrency)),
    )


def test_a_task_with_a_free_place_is_first_due_at_its_earliest_likely_end():
    """Prompt policy: a task sent at 1000 with the lane's places free is due at 1000 + 28 s, and not before."""
    clock, model, lane = _model()
    task = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    assert model.running == 1 and task.due_s == pytest.approx(1028.0)
    clock.advance(27.0)
    assert model.pop_due(clock.now()) == []
    clock.advance(1.0)
    assert model.pop_due(clock.now()) == [task]


def test_frugal_tracking_looks_first_at_the_latest_likely_end():
    """Frugal policy: the first look waits for the longest likely running time (52 s)."""
    _, model, lane = _model(policy="frugal")
    task = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    assert task.due_s == pytest.approx(1052.0)


def test_a_queued_task_starts_when_an_earlier_one_ends():
    """With the lane's places taken, a task waits; when a running one ends at 1030, it is inferred to start
    then, and is due its earliest likely end after that."""
    clock, model, lane = _model(concurrency=1)
    first = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    second = model.add(task_id="t-2", **_claimed("i-2"), lane=lane, submitted_s=1000.0)
    assert (model.running, model.queued) == (1, 1) and second.running_since_s is None
    clock.set(1040.0)
    model.pop_due(clock.now())
    model.ended(first, 1030.0)
    assert (model.running, model.queued) == (1, 0)
    assert second.running_since_s == 1030.0 and second.due_s == pytest.approx(1058.0)


def test_a_task_seen_running_is_placed_by_the_services_start_and_never_queued_again():
    """Seen RUNNING since 1010, a task thought queued starts there; a later PENDING (an older page) is ignored."""
    clock, model, lane = _model(concurrency=1)
    model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    second = model.add(task_id="t-2", **_claimed("i-2"), lane=lane, submitted_s=1000.0)
    clock.set(1015.0)
    model.seen(second, TaskStatus.RUNNING, 1010.0)
    assert second.seen_running and second.running_since_s == 1010.0 and second.due_s == pytest.approx(1038.0)
    model.seen(second, TaskStatus.PENDING, None)
    assert second.running_since_s == 1010.0 and model.queued == 0


def test_a_task_thought_running_but_seen_pending_goes_back_to_the_queue():
    """The account runs other tasks too: a task the model started but the service shows PENDING waits first in
    line, ahead of one queued before it, and is the one that starts when a single place frees."""
    clock, model, lane = _model(concurrency=2)
    first, pending, waiting = (
        model.add(task_id=f"t-{i}", **_claimed(f"i-{i}"), lane=lane, submitted_s=1000.0) for i in "123"
    )
    assert (model.running, model.queued) == (2, 1) and waiting.running_since_s is None
    model.seen(pending, TaskStatus.PENDING, None)
    assert (model.running, model.queued) == (1, 2) and pending.running_since_s is None
    model.add(task_id="t-4", **_claimed("i-4"), lane=lane, submitted_s=1010.0)  # takes the place thought free
    assert (model.running, model.queued) == (2, 2)
    clock.set(1040.0)
    model.ended(first, 1030.0)  # one place frees: the first in line takes it
    assert pending.running_since_s == 1030.0 and waiting.running_since_s is None


def test_a_garbled_start_never_puts_a_look_out_of_reach():
    """A start far in the future is held to now (not to its sending), one before the task was sent to its sending
    (not to now): its look stays near."""
    clock, model, lane = _model(concurrency=1)
    model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    task = model.add(task_id="t-2", **_claimed("i-2"), lane=lane, submitted_s=1000.0)
    clock.set(1005.0)
    model.seen(task, TaskStatus.RUNNING, 1e12)
    assert task.running_since_s == 1005.0
    late = model.add(task_id="t-3", **_claimed("i-3"), lane=replace(lane), submitted_s=1002.0)
    clock.set(1009.0)
    model.seen(late, TaskStatus.RUNNING, 0.0)
    assert late.running_since_s == 1002.0


def test_a_running_task_keeps_its_cadence_from_its_due_times():
    """Still open at a look due at 1028 but answered at 1029: next due 1029.6 (1028 + 1.6), not 1030.6."""
    clock, model, lane = _model()
    task = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    clock.set(1029.0)
    (due,) = model.pop_due(clock.now())
    assert model.next_due(due, due.due_s, clock.now()) == pytest.approx(1029.6)
    assert task is due


def test_the_service_may_forget_a_task_only_after_its_lifetime():
    """An UNKNOWN answer is believable only a task lifetime after the task was made (or seen ended)."""
    clock, model, lane = _model()
    task = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    clock.set(1000.0 + 24 * 3600 - 1)
    assert not model.forgettable(task)
    clock.advance(1.0)
    assert model.forgettable(task)


def test_a_list_pays_only_when_several_due_tasks_likely_still_run():
    """Two tasks just started: a list is cheaper than two queries; two tasks long past their latest end: not."""
    clock, model, lane = _model()
    tasks = [model.add(task_id=f"t-{i}", **_claimed(f"i-{i}"), lane=lane, submitted_s=1000.0) for i in range(2)]
    assert model.list_saves(tasks)
    clock.set(1100.0)
    assert not model.list_saves(tasks)


def test_recent_running_times_replace_the_catalogs_guess():
    """Five tasks that ran 10 s each: the next task is first due 9.8 s after it starts."""
    _, model, lane = _model()
    for _ in range(5):
        model.learn(lane, 10.0)
    model.learn(lane, None)  # an answer without both ends teaches nothing
    task = model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    assert task.due_s == pytest.approx(1009.8)


def test_a_start_placed_from_the_send_time_is_looked_at_as_late_as_it_can_be():
    """Sent at 1000 and answered at 1002, the service's times may be placed up to 2 s early: a start placed at
    1001 is taken as 1003, so the first look is never early (the deadlines keep the early, safe, placing)."""
    clock, model, lane = _model(concurrency=1)
    model.add(task_id="t-1", **_claimed("i-1"), lane=lane, submitted_s=1000.0)
    task = model.add(task_id="t-2", **_claimed("i-2", sent_s=1000.0), lane=lane, submitted_s=1002.0)
    clock.set(1010.0)
    model.seen(task, TaskStatus.RUNNING, 1001.0)
    assert task.running_since_s == 1003.0 and task.due_s == pytest.approx(1031.0)
