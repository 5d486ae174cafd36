"""What the stages need of the ledger, as an async protocol: the seam where another database plugs in.

The stages (submit, track, reconcile, results, download, cancel), the engine, the outputs and the command
line hold a :class:`RunLedger`, never a class: :class:`wanbatch.ledger.sqlite_async.SqliteLedger` is one
implementation (one file, one process, under the run folder's lock); a ledger shared by several machines is
another. One is opened and closed by :func:`wanbatch.ledger.opener.open_ledger`, an async context manager.

Every method is a coroutine and every iterator an async iterator (``async for``): a database across the
network answers in milliseconds, and the event loop must go on tracking and saving meanwhile, so its calls
suspend. SQLite answers in microseconds from a local file, so its adapter runs each call at once and never
suspends; to the caller both look alike. A caller must still write as if any call may suspend: state read
before an ``await`` of the ledger may have moved by the time it returns.

The contract every implementation keeps:

- **Durability.** Every write returns once it is committed. A write made with ``durable=True`` (the
  ``submitting`` move a POST is sent on the strength of, a sync answer's results, whose URLs are nowhere
  else) survives a power loss; the others survive a crash of the process, and a power loss may undo only the
  last of them, back to a state a resume heals.
- **Transitions.** A state move is checked against the table of :mod:`wanbatch.ledger.states` and refused
  with :class:`~wanbatch.errors.IllegalTransition` naming both states; with ``expect`` it is a
  compare-and-set (moved only if the item is still in that state), which is what keeps "POST at most once"
  when two callers race. Each move is recorded in the item's audit with its note.
- **Writes return what they wrote**, so that a caller never reads back its own write.
- **Iterators** stream in pages: no read stays open while the caller works, rows moved meanwhile are not
  repeated, and the order is the one each method names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from wanbatch.ledger.records import AddResult, ImageRecord, ImageRow, ItemLike, ItemRow, Recorded
from wanbatch.ledger.states import ImageState, ItemState

__all__ = ["RunLedger"]


class RunLedger(Protocol):
    """The ledger of one run folder, as the stages use it."""

    #: Where the ledger lives, for messages (a file, or a database's address).
    path: Path

    # Iterators are declared with ``def ... -> AsyncIterator[...]``: an implementation writes them as async
    # generators (``async def`` with ``yield``), which is what a caller gets by calling them.

    # ── runs and planning ───────────────────────────────────────────────────────────────────────────

    async def begin_run(self) -> int:
        """Record a new run of the folder (committed) and return its number: 1, 2, ..."""
        ...

    async def add_items(
        self,
        items: Iterable[ItemLike],
        *,
        run: int,
        price_of: Callable[[ItemLike], float] | None = None,
        currency: str = "CNY",
        batch_size: int = 5000,
    ) -> AddResult:
        """Plan the items not yet held and mark every item given as seen in ``run``, reading ``items`` lazily.

        An item already held keeps its state. A part of a plan lost to a crash costs nothing (planning sends
        nothing): the next run plans it again."""
        ...

    async def stale_count(self, run: int) -> int:
        """Items the manifest of ``run`` no longer has (not seen in it)."""
        ...

    async def meta(self, key: str) -> str | None:
        """A value the folder keeps (its clock, backend, manifest record, layout), or None."""
        ...

    async def set_meta(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` (committed)."""
        ...

    async def delete_meta(self, key: str) -> None:
        """Forget ``key`` (committed)."""
        ...

    # ── items ───────────────────────────────────────────────────────────────────────────────────────

    async def get(self, item_id: str) -> ItemRow:
        """The item's row; :class:`~wanbatch.errors.LedgerError` when there is none."""
        ...

    async def get_many(self, item_ids: Collection[str]) -> list[ItemRow]:
        """The rows of ``item_ids``, in no set order, read together; :class:`~wanbatch.errors.LedgerError` when
        one has none."""
        ...

    async def state_of(self, item_id: str) -> ItemState:
        """The item's state alone."""
        ...

    async def known_tasks(self, task_ids: Collection[str]) -> set[str]:
        """Which of the service's tasks ``task_ids`` an item holds."""
        ...

    async def times_unknown(self, item_id: str) -> int:
        """How many of the item's attempts ended with their outcome unknown (from its audit)."""
        ...

    async def run_spans(self, at_ms: Collection[int]) -> dict[int, tuple[int, int]]:
        """For each of the times ``at_ms`` (our clock), when the run going on then began, and when the next one
        did (or the end of time)."""
        ...

    async def recent_tasks(
        self, region: str, limit: int, *, since_ms: int = 0, until_ms: int = 2**62, account: str | None = None
    ) -> list[tuple[str, int]]:
        """Up to ``limit`` task ids of ``region`` (made by ``account``'s key, if given) whose attempts began in
        [``since_ms``, ``until_ms``), with when they began: newest first."""
        ...

    def iter_items(
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
        """Items in ``states`` (seen in ``run``, of ``region`` and ``model``, after manifest position
        ``after_seq``, if given), ordered by ``order_by``: ``seq`` (manifest order) or a time column, then seq."""
        ...

    async def take_planned(
        self, *, run: int | None, region: str, model: str, after_seq: int, limit: int
    ) -> list[ItemRow]:
        """Up to ``limit`` planned items of ``region`` and ``model`` (seen in ``run``) after manifest position
        ``after_seq``, in manifest order, for this process to send. A ledger that several workers share gives
        each planned item to one of them at a time (the others are not given it until it lets it go); taking is
        not sending: the move to submitting is still the compare-and-set that sends at most once."""
        ...

    async def held_elsewhere(self, *, run: int | None, region: str, model: str) -> bool:
        """Whether other workers of a shared ledger hold items of ``region`` and ``model`` (seen in ``run``) that
        may still come to this one to send: planned ones (back to everyone if their worker stops or dies) and
        creates under way or in doubt (a taker's reconciler may find them never made). Always False for a ledger
        of one process."""
        ...

    async def lanes(self, states: Collection[ItemState], *, run: int | None = None) -> set[tuple[str, str]]:
        """The (region, model) pairs with items in ``states`` (seen in ``run``, if given)."""
        ...

    async def account_lanes(self, states: Collection[ItemState]) -> set[tuple[str, str, str]]:
        """The (region, account, model) of items in ``states`` (the few open ones): whose key made what is in
        flight ('' for the environment's key)."""
        ...

    async def account_summary(self) -> dict[str, dict[str, Any]]:
        """Per named account: items per state, images generated and saved, cost per currency."""
        ...

    async def counts(self, *, run: int | None = None) -> dict[ItemState, int]:
        """Items per state, every state present; only those seen in ``run`` if given."""
        ...

    async def spent_cost(self) -> float:
        """What the service has billed so far: every image generated, at its item's stored price."""
        ...

    async def planned_images(self) -> int:
        """How many images the items ask for, at n each."""
        ...

    async def summary(self) -> dict[str, Any]:
        """Items and images per state, images billed, cost spent and planned per currency, and runs made."""
        ...

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
        """Move the item to ``to`` (checked by the table; with ``expect``, a compare-and-set), setting
        ``item_fields`` (task_id, task_status, error_code, error_message, cost, endpoint, the times;
        ``request_id`` is appended), committed (fsynced with ``durable``); returns the new row. Back to
        planned, the item forgets its task and that task's images."""
        ...

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
        """:meth:`transition` to generated or failed with the task's results recorded in the same commit (an
        image already saved or final is left alone; the images generated and the cost follow them); returns
        the new row and every image of the item, by index."""
        ...

    async def update(self, item_id: str, **item_fields: Any) -> ItemRow:
        """Set fields other than the state (as :meth:`transition` takes them), committed; returns the row."""
        ...

    # ── images ──────────────────────────────────────────────────────────────────────────────────────

    async def images_of(self, item_id: str) -> list[ImageRow]:
        """The item's images, by index."""
        ...

    def iter_images(self, states: Collection[ImageState], *, order_by_deadline: bool = True) -> AsyncIterator[ImageRow]:
        """Images in ``states``: soonest URL death first (none last), else by item and index."""
        ...

    def iter_saved(self) -> AsyncIterator[tuple[ImageRow, ItemRow]]:
        """Every saved image with its item, by item and image index."""
        ...

    async def image_saved(
        self, item_id: str, index: int, *, file_name: str, sha256: str, size_bytes: int, settle: bool = False
    ) -> Recorded | None:
        """Record a pending image saved (its file is on disk, fsynced, before this is called), committed; with
        ``settle``, :meth:`settle` in the same commit, returning its answer."""
        ...

    async def image_final(
        self, item_id: str, index: int, state: ImageState, *, code: str = "", message: str = "", settle: bool = False
    ) -> Recorded | None:
        """Record a pending image failed or expired, with why; ``settle`` as for :meth:`image_saved`."""
        ...

    async def reopen_image(self, item_id: str, index: int, *, reason: str) -> None:
        """A saved image whose file is gone: pending again, and its saved item generated again, in one commit."""
        ...

    async def update_image(
        self, item_id: str, index: int, *, error_code: str | None, error_message: str | None
    ) -> None:
        """Note why a pending image is not saved yet; its state stays."""
        ...

    async def settle(self, item_id: str) -> Recorded | None:
        """Move a generated item whose images are all final to saved or expired (committed) and return its new
        row and images; None when an image is still pending or the item is not generated."""
        ...
