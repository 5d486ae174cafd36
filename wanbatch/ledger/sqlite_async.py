"""The SQLite ledger behind the async protocol: :class:`SqliteLedger`, over the synchronous
:class:`~wanbatch.ledger.sqlite.Ledger`.

Each method calls the synchronous method of the same name directly, on the event loop's thread, and returns
without suspending. No worker thread: a call is a local file's commit or an indexed read, well under a
millisecond (an fsync only for the few ``durable`` moves), so a hop to a thread and back would cost more than
the call itself; and calls sent to a pool of threads could commit in another order than they were made,
where the money rules depend on that order (``submitting`` committed before its POST, an image's row before
its item settles). One thread also keeps the one SQLite connection to the one thread that made it.

The iterators wrap the synchronous ones, which already read in pages: no read stays open while the caller
works, between two rows or across an ``await`` of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from typing import Any

from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow, Recorded
from wanbatch.ledger.sqlite import Ledger
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["SqliteLedger"]


class SqliteLedger(RunLedger):
    """A run folder's SQLite :class:`~wanbatch.ledger.sqlite.Ledger` as a :class:`RunLedger`: each method is
    the synchronous one of the same name, as the protocol documents it, run at once. Opened (and closed) by
    :func:`wanbatch.ledger.opener.open_ledger`."""

    def __init__(self, sync: Ledger) -> None:
        #: The synchronous ledger every call goes to (for what only SQLite has, such as its connection).
        self.sync = sync
        self.path = sync.path

    # ── runs and planning ───────────────────────────────────────────────────────────────────────────

    async def begin_run(self) -> int:
        return self.sync.begin_run()

    async def add_items(
        self,
        items: Iterable[ItemLike],
        *,
        run: int,
        price_of: Callable[[ItemLike], float] | None = None,
        currency: str = "CNY",
        batch_size: int = 5000,
    ) -> AddResult:
        return self.sync.add_items(items, run=run, price_of=price_of, currency=currency, batch_size=batch_size)

    async def stale_count(self, run: int) -> int:
        return self.sync.stale_count(run)

    async def meta(self, key: str) -> str | None:
        return self.sync.meta(key)

    async def set_meta(self, key: str, value: str) -> None:
        self.sync.set_meta(key, value)

    async def delete_meta(self, key: str) -> None:
        self.sync.delete_meta(key)

    # ── items ───────────────────────────────────────────────────────────────────────────────────────

    async def get(self, item_id: str) -> ItemRow:
        return self.sync.get(item_id)

    async def get_many(self, item_ids: Collection[str]) -> list[ItemRow]:
        return self.sync.get_many(item_ids)

    async def state_of(self, item_id: str) -> ItemState:
        return self.sync.state_of(item_id)

    async def known_tasks(self, task_ids: Collection[str]) -> set[str]:
        return self.sync.known_tasks(task_ids)

    async def times_unknown(self, item_id: str) -> int:
        return self.sync.times_unknown(item_id)

    async def run_spans(self, at_ms: Collection[int]) -> dict[int, tuple[int, int]]:
        return self.sync.run_spans(at_ms)

    async def recent_tasks(
        self, region: str, limit: int, *, since_ms: int = 0, until_ms: int = 2**62, account: str | None = None
    ) -> list[tuple[str, int]]:
        return self.sync.recent_tasks(region, limit, since_ms=since_ms, until_ms=until_ms, account=account)

    async def iter_items(
        self,
        states: Collection[ItemState],
        *,
        run: int | None = None,
        region: str | None = None,
        model: str | None = None,
        after_seq: int = 0,
        order_by: str = "seq",
        limit: int | None = None,
    ) -> AsyncIterator[ItemRow]:
        rows = self.sync.iter_items(
            states, run=run, region=region, model=model, after_seq=after_seq, order_by=order_by, limit=limit
        )
        for row in rows:
            yield row

    async def take_planned(
        self, *, run: int | None, region: str, model: str, after_seq: int, limit: int
    ) -> list[ItemRow]:
        return self.sync.take_planned(run=run, region=region, model=model, after_seq=after_seq, limit=limit)

    async def held_elsewhere(self, *, run: int | None, region: str, model: str) -> bool:
        return self.sync.held_elsewhere(run=run, region=region, model=model)

    async def lanes(self, states: Collection[ItemState], *, run: int | None = None) -> set[tuple[str, str]]:
        return self.sync.lanes(states, run=run)

    async def account_lanes(self, states: Collection[ItemState]) -> set[tuple[str, str, str]]:
        return self.sync.account_lanes(states)

    async def account_summary(self) -> dict[str, dict[str, Any]]:
        return self.sync.account_summary()

    async def counts(self, *, run: int | None = None) -> dict[ItemState, int]:
        return self.sync.counts(run=run)

    async def spent_cost(self) -> float:
        return self.sync.spent_cost()

    async def planned_images(self) -> int:
        return self.sync.planned_images()

    async def summary(self) -> dict[str, Any]:
        return self.sync.summary()

    async def transition(
        self,
        item_id: str,
        to: ItemState,
        *,
        expect: ItemState | None = None,
        note: str = "",
        durable: bool = False,
        **item_fields: Any,
    ) -> ItemRow:
        return self.sync.transition(item_id, to, expect=expect, note=note, durable=durable, **item_fields)

    async def finish_task(
        self,
        item_id: str,
        to: ItemState,
        *,
        images: Sequence[ImageRecord],
        expect: ItemState | None = None,
        note: str = "",
        durable: bool = False,
        **item_fields: Any,
    ) -> Recorded:
        return self.sync.finish_task(
            item_id, to, images=images, expect=expect, note=note, durable=durable, **item_fields
        )

    async def update(self, item_id: str, **item_fields: Any) -> ItemRow:
        return self.sync.update(item_id, **item_fields)

    # ── images ──────────────────────────────────────────────────────────────────────────────────────

    async def images_of(self, item_id: str) -> list[ImageRow]:
        return self.sync.images_of(item_id)

    async def iter_images(
        self, states: Collection[ImageState], *, order_by_deadline: bool = True
    ) -> AsyncIterator[ImageRow]:
        for image in self.sync.iter_images(states, order_by_deadline=order_by_deadline):
            yield image

    async def iter_saved(self) -> AsyncIterator[tuple[ImageRow, ItemRow]]:
        for pair in self.sync.iter_saved():
            yield pair

    async def image_saved(
        self, item_id: str, index: int, *, file_name: str, sha256: str, size_bytes: int, settle: bool = False
    ) -> Recorded | None:
        return self.sync.image_saved(
            item_id, index, file_name=file_name, sha256=sha256, size_bytes=size_bytes, settle=settle
        )

    async def image_final(
        self, item_id: str, index: int, state: ImageState, *, code: str = "", message: str = "", settle: bool = False
    ) -> Recorded | None:
        return self.sync.image_final(item_id, index, state, code=code, message=message, settle=settle)

    async def reopen_image(self, item_id: str, index: int, *, reason: str) -> None:
        self.sync.reopen_image(item_id, index, reason=reason)

    async def update_image(
        self, item_id: str, index: int, *, error_code: str | None, error_message: str | None
    ) -> None:
        self.sync.update_image(item_id, index, error_code=error_code, error_message=error_message)

    async def settle(self, item_id: str) -> Recorded | None:
        return self.sync.settle(item_id)
