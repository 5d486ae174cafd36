"""What a finished task leaves in the ledger: its images, each with the time its URL dies on our clock.

Shared by the tracker (a query found the task SUCCEEDED) and the submitter's sync calls (the answer holds
the results).
"""

from __future__ import annotations

import logging

from wanbatch.errors import WRITE_OFF_CODES
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ImageRecord, ItemRow, Recorded
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.service.wire import TaskView
from wanbatch.stages.claims import Claim, full_price
from wanbatch.stages.queue_model import TrackerConfig

__all__ = ["record_results", "sync_answer_lost", "write_off"]

log = logging.getLogger("wanbatch")


async def write_off(
    ledger: RunLedger,
    item_id: str,
    *,
    paid: float,
    code: str,
    message: str,
    claim: Claim | None = None,
    **fields,
) -> ItemRow:
    """End an item that may have been paid for but can never give its images: expired, its cost counted as
    ``paid`` (and as lost in the report), never sent again; its claim settled to that cost. Returns its row.

    ``paid`` is the full price its claim reserved (``Claim.price``): what an item that may have been billed can
    have cost at most."""
    if code not in WRITE_OFF_CODES:
        raise ValueError(f"write-off code {code!r}: allowed {', '.join(sorted(WRITE_OFF_CODES))}")
    row = await ledger.transition(
        item_id, ItemState.expired, error_code=code, error_message=message, cost=paid, **fields
    )
    if claim is not None:
        claim.settle(paid)
    return row


async def sync_answer_lost(ledger: RunLedger, row: ItemRow, reason: str, claim: Claim | None = None) -> None:
    """A sync call whose answer was lost (a fault, or a stop before it was recorded): it has no task id to find
    again and may have been billed, so sending it again could pay twice. It ends expired, counted as paid."""
    if row.state is ItemState.submitting:
        await ledger.transition(row.item_id, ItemState.unknown, error_code="OutcomeUnknown", error_message=reason)
    await write_off(
        ledger,
        row.item_id,
        # The price its claim reserved, as every write-off counts it; one found on start has no claim yet, and its
        # row holds what the claim would have.
        paid=full_price(row) if claim is None else claim.price,
        code="SyncAnswerLost",
        message=f"the sync call's answer was lost ({reason}); not sent again, counted as paid",
        claim=claim,
    )


async def record_results(
    ledger: RunLedger,
    row: ItemRow,
    view: TaskView,
    *,
    now_s: float,
    config: TrackerConfig,
    common: dict,
    claim: Claim | None = None,
    durable: bool = False,
) -> Recorded:
    """Record a SUCCEEDED task's images (read, their times on our clock, in ``view``) and move its queued item
    (``row``, as the tracker holds it) to generated (or failed if none came out), and settle its ``claim`` to what
    the service billed (the images it generated); returns what was recorded, for the downloader.

    ``durable``: the commit must survive a power loss (a sync answer: its URLs are nowhere else)."""
    item_id, request = row.item_id, row.request
    images, good = [], 0
    # The service keeps a task's results a day after it ends, whatever a signed URL's Expires says (some say a
    # week), and no answer of ours can be older than now: the deadline is the soonest of these.
    ended_s = view.ended_s if view.ended_s is not None else now_s
    latest_s = min(ended_s, now_s) + config.url_lifetime_s
    seed = request.get("seed")
    for result in view.results:
        deadline_s = latest_s if result.expires_s is None else min(result.expires_s, latest_s)
        images.append(
            ImageRecord(
                index=result.index,
                state=ImageState.pending if result.url else ImageState.failed,
                url=result.url,
                deadline_ms=int((deadline_s - config.deadline_margin_s) * 1000),
                seed=None if seed is None else seed + result.index,
                actual_prompt=result.actual_prompt,
                error_code=result.code,
                error_message=result.message,
            )
        )
        good += result.url is not None
    # The images are recorded in the item's own move: one commit per task. The ledger counts the cost from
    # them, at the price stored when the item was planned (the catalog may have moved since).
    if good:
        recorded = await ledger.finish_task(
            item_id, ItemState.generated, expect=ItemState.queued, images=images, durable=durable, **common
        )
        log.info(
            "✓ %s generated %d/%d image(s)",
            item_id,
            good,
            len(images),
            extra={"event": "generated", "item": item_id, "state": "generated", "images": good},
        )
    else:
        first = next((r for r in images if r.error_code), None)
        recorded = await ledger.finish_task(
            item_id,
            ItemState.failed,
            expect=ItemState.queued,
            images=images,
            error_code=first.error_code if first else "NoImages",
            error_message=first.error_message if first else "the task returned no image",
            **common,
        )
    if claim is not None:
        claim.settle(recorded.row.cost)
    return recorded
