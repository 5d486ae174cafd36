"""Images between two tries: due soonest first, their bytes held under the cap and let go when they leave."""

from __future__ import annotations

from wanbatch.ledger.records import ImageRow
from wanbatch.ledger.states import ImageState
from wanbatch.stages.retries import Job, Waiting


def job(index: int, body: bytes | None) -> Job:
    image = ImageRow(
        item_id="item",
        image_index=index,
        state=ImageState.pending,
        url=f"https://x/{index}",
        deadline_ms=1000 + index,
        seed=None,
        actual_prompt=None,
        file_name=None,
        sha256=None,
        size_bytes=None,
        error_code=None,
        error_message=None,
        saved_ms=None,
        updated_ms=0,
    )
    return Job(deadline_ms=1000 + index, item_id="item", index=index, image=image, body=body)


def test_jobs_come_back_when_due_soonest_first_with_their_bytes() -> None:
    """A job is not due before its time; due ones come out soonest first, bytes kept, and the count held drops."""
    waiting = Waiting(max_held_bytes=100)
    waiting.put(job(0, b"a" * 10), 5.0)
    waiting.put(job(1, b"b" * 20), 2.0)
    assert waiting.held_bytes == 30 and waiting.next_s() == 2.0
    assert list(waiting.due(1.9)) == []
    assert [(j.index, j.body) for j in waiting.due(5.0)] == [(1, b"b" * 20), (0, b"a" * 10)]
    assert waiting.held_bytes == 0 and not waiting and waiting.next_s() is None


def test_bytes_past_the_cap_are_let_go() -> None:
    """A job whose bytes would pass the cap waits without them (fetched again later); those within it keep theirs."""
    waiting = Waiting(max_held_bytes=25)
    waiting.put(job(0, b"a" * 20), 1.0)
    waiting.put(job(1, b"b" * 10), 1.0)
    assert waiting.held_bytes == 20
    assert [j.body is not None for j in waiting.due(1.0)] == [True, False]


def test_drain_lets_every_byte_go() -> None:
    """At the end of a stopped run every waiting job comes out, its bytes dropped."""
    waiting = Waiting(max_held_bytes=100)
    waiting.put(job(0, b"a" * 10), 9.0)
    drained = list(waiting.drain())
    assert [j.body for j in drained] == [None] and waiting.held_bytes == 0 and not waiting
