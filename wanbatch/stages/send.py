"""Sending one item's create at most once, and what the ledger records of how it went.

The submitter (:mod:`wanbatch.stages.submit`) decides which planned item goes through which lane, and when;
:class:`ItemSender` sends it. The money rule is in :meth:`ItemSender._attempt`: the item is committed as
``submitting`` before the POST; an error response or a connection that never opened proves no task was made and
the item may go again; anything else leaves it ``unknown`` for the reconciler.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from wanbatch.catalog import Protocol
from wanbatch.clock import Clock
from wanbatch.errors import (
    UNREACHABLE,
    AccountError,
    ApiError,
    IllegalTransition,
    OutcomeUnknown,
    RejectedError,
    ThrottledError,
    TransportError,
)
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.service.wire import build_body
from wanbatch.stages.claims import Claim
from wanbatch.stages.lane import Lane
from wanbatch.stages.reconcile import Reconciler
from wanbatch.stages.results import sync_answer_lost
from wanbatch.stages.track import Tracker

if TYPE_CHECKING:
    from wanbatch.stages.submit import SubmitConfig  # the submit stage's settings, both halves'

__all__ = ["ItemSender", "Sent"]

log = logging.getLogger("wanbatch")


class Sent(enum.Enum):
    """How an item's submit ended, as its last write recorded it: what its claim and doubt do next."""

    #: Queued with a task on the service: the tracker settles its claim when it sees the task end.
    tracked = "tracked"
    #: The outcome is unknown: its claim is kept, in doubt, and so is the lane's, until the reconciler decides.
    in_doubt = "in_doubt"
    #: Final, blocked, answered at once (sync) or left planned for later: its claim has ended, or is released.
    done = "done"


class ItemSender:
    """Sends the creates the submitter dispatches: each item's tries until it is queued, final or left for later."""

    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock: Clock,
        tracker: Tracker,
        reconciler: Reconciler,
        on_sync_images: Callable[[ItemRow, Claim, dict], Awaitable[None]],
        config: SubmitConfig,
        stop: asyncio.Event,
        block: Callable[[Lane, ApiError], None],
        may_send: Callable[[], bool],
    ) -> None:
        """``stop``: the submitter's (looked at between tries; set here when a worker is unsure of its lease);
        ``block``: stops the lanes an account's refusal or an unreachable service affects; ``may_send``: asked just
        before each request that creates a task (a fleet's worker answers whether its lease is surely still its
        own)."""
        self._ledger, self._clock = ledger, clock
        self._tracker, self._reconciler, self._on_sync_images = tracker, reconciler, on_sync_images
        self.config = config
        self.stop, self._block, self._may_send = stop, block, may_send
        self.submitted = 0  #: creates that made a task (or a sync answer)

    def is_sync(self, lane: Lane, row: ItemRow) -> bool:
        """Whether this item goes to wan2.6's synchronous endpoint (the answer holds the images, no task id)."""
        return lane.offer.model.protocol is Protocol.MULTIMODAL and bool(
            row.request.get("sync") or self.config.sync_wan26
        )

    async def send(self, lane: Lane, row: ItemRow, claim: Claim) -> Sent:
        """Try until the item is queued, final or left for later."""
        for attempt in range(1, self.config.attempts + 1):
            if attempt > 1:
                if self.stop.is_set() or lane.blocked:
                    return Sent.done
                await self._clock.sleep(min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (attempt - 2)))
                await lane.pacer.wait()
            outcome = await self._attempt(lane, row, claim)
            if outcome is not None:
                return outcome
        lane.skipped.add(row.item_id)
        log.warning(
            "… %s left planned after %d transient errors; a later run will try again", row.item_id, self.config.attempts
        )
        return Sent.done

    async def _attempt(self, lane: Lane, row: ItemRow, claim: Claim) -> Sent | None:
        """One POST and the write that records how it went; None: known not made, try again."""
        ledger, item_id = self._ledger, row.item_id
        sync = self.is_sync(lane, row)
        body = build_body(row.request, api_name=lane.offer.api_name, protocol=lane.offer.model.protocol)
        try:
            # Where it goes is committed with it: a lost sync answer has no task to find, and must never be re-sent.
            row = await ledger.transition(
                item_id,
                ItemState.submitting,
                expect=ItemState.planned,
                account=lane.account,  # whose key makes it: its task is in that account's list only
                **lane.placed(row),
                submit_started_ms=self._clock.now_ms(),
                endpoint="sync" if sync else "async",
                durable=True,  # the POST goes out on the strength of this commit: it must survive a power loss
            )
        except IllegalTransition as exc:
            # The compare-and-set is the last guard of "POST at most once": someone else moved it first.
            log.warning("… %s not sent: %s", item_id, exc)
            return Sent.done
        if not self._may_send():
            # A worker that cannot be sure its lease holds sends nothing: another may have taken its items over
            # and be reconciling this one. Not sent, so planned again (refused if it is another's already).
            self.stop.set()
            await ledger.transition(item_id, ItemState.planned, expect=ItemState.submitting, note="not sent: lease")
            return Sent.done
        try:
            if sync:
                data = await lane.client.generate_sync(body)
            else:
                created = await lane.client.create_task(body, protocol=lane.offer.model.protocol)
        except OutcomeUnknown as exc:
            if sync:
                return await self._sync_lost(row, claim, str(exc))
            await ledger.transition(
                item_id,
                ItemState.unknown,
                expect=ItemState.submitting,
                error_code="OutcomeUnknown",
                error_message=str(exc),
            )
            log.warning(
                "? %s outcome unknown (%s): reconciling, not resending",
                item_id,
                exc,
                extra={"event": "unknown", "item": item_id, "state": "unknown"},
            )
            self._reconciler.add(lane, claim)
            return Sent.in_doubt  # a task may exist and occupy the service: its claim is kept until reconciled
        except ThrottledError as exc:
            lane.pacer.throttled()
            return await self._again(item_id, exc)
        except AccountError as exc:
            # The lane stops first: no other create of it may go out on a refused key while the write is made.
            self._block(lane, exc)
            await self._refused(item_id, ItemState.planned, exc)  # planned again: the run after the fix sends it
            return Sent.done
        except RejectedError as exc:
            await self._refused(item_id, ItemState.rejected, exc)
            log.warning(
                "✗ %s rejected: %s %s",
                item_id,
                exc.code,
                exc.message,
                extra={"event": "rejected", "item": item_id, "state": "rejected", "code": exc.code},
            )
            return Sent.done
        except (ApiError, TransportError) as exc:
            self._count_unreachable(lane, exc)
            return await self._again(item_id, exc)
        lane.unreachable = 0
        lane.pacer.succeeded()
        self.submitted += 1
        lane.submitted += 1
        if sync:
            queued = await ledger.transition(
                item_id,
                ItemState.queued,
                expect=ItemState.submitting,
                request_id=data.get("request_id", ""),
                submitted_ms=self._clock.now_ms(),
            )
            await self._on_sync_images(queued, claim, data)
            return Sent.done
        queued = await ledger.transition(
            item_id,
            ItemState.queued,
            expect=ItemState.submitting,
            task_id=created.task_id,
            request_id=created.request_id,
            task_status=created.task_status,
            submitted_ms=self._clock.now_ms(),
        )
        log.info(
            "→ %s %s task %s%s",
            item_id,
            lane.model,
            created.task_id,
            f" ({lane.account}, {lane.region})" if lane.account else "",
            extra={
                "event": "submitted",
                "item": item_id,
                "task": created.task_id,
                "model": lane.model,
                "account": lane.account,
                "region": lane.region,
                "state": "queued",
            },
        )
        self._tracker.add(task_id=created.task_id, row=queued, claim=claim, lane=lane, submitted_s=self._clock.now())
        return Sent.tracked

    async def _refused(self, item_id: str, state: ItemState, exc: ApiError) -> None:
        """Record the service's refusal of a create (no task was made) and where it leaves the item."""
        await self._ledger.transition(
            item_id,
            state,
            expect=ItemState.submitting,
            error_code=exc.code,
            error_message=exc.message,
            request_id=exc.request_id,
        )

    async def _sync_lost(self, row: ItemRow, claim: Claim, reason: str) -> Sent:
        """``row``: the item as its submitting move wrote it."""
        await sync_answer_lost(self._ledger, row, reason, claim)
        log.warning(
            "✗ %s: the sync answer was lost; not sent again (use async tasks to have it reconciled)", row.item_id
        )
        return Sent.done

    def _count_unreachable(self, lane: Lane, exc: Exception) -> None:
        """Connections that never open, many in a row: the service is not there; stop instead of retrying all."""
        if type(exc) is not TransportError:  # an answer came back, or the request may have arrived
            lane.unreachable = 0
            return
        lane.unreachable += 1
        if lane.unreachable >= self.config.unreachable_after:
            self._block(lane, ApiError(0, UNREACHABLE, f"{lane.unreachable} connections failed in a row: {exc}"))

    async def _again(self, item_id: str, exc: Exception) -> None:
        fields = {"error_code": getattr(exc, "code", type(exc).__name__), "error_message": str(exc)}
        if isinstance(exc, ApiError):
            fields["request_id"] = exc.request_id
        await self._ledger.transition(item_id, ItemState.planned, expect=ItemState.submitting, **fields)
        log.info("↻ %s: %s", item_id, exc)
        return None
