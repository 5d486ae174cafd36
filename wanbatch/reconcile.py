"""Finding out what an ``unknown`` create did, without paying twice.

A create whose answer was lost (a reset or timeout after sending, or a crash
between the ledger's ``submitting`` commit and the reply) may or may not have
made a task. The service's task list is the witness: every task the account
created in the item's submit window that the ledger does not know is a
candidate. A candidate whose result carries our prompt is adopted. When the
window has closed and the list holds no candidate, no task was made and the
item may be sent again. Until then the item waits: it is never re-sent on a
guess.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from .aio import wait_event
from .errors import ApiError, TransportError
from .states import ItemState
from .wire import SERVICE_TZ

__all__ = ["ReconcileConfig", "Reconciler"]

log = logging.getLogger("wanbatch")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileConfig:
    grace_s: float = 90.0  #: after the attempt began, how long a create can still land on the service
    window_margin_s: float = 120.0  #: list from this long before the attempt (clock skew)
    retry_s: float = 5.0  #: how often to look again at an unresolved item
    page_size: int = 100
    task_lifetime_s: float = 24 * 3600.0


def service_time_param(epoch_s: float) -> str:
    """The list endpoint's documented time format, ``YYYYMMDDhhmmss`` in the service's zone."""
    return datetime.fromtimestamp(epoch_s, SERVICE_TZ).strftime("%Y%m%d%H%M%S")


class Reconciler:
    def __init__(self, *, ledger, clock, limiters, tracker, config: ReconcileConfig = ReconcileConfig()) -> None:
        # What an adopted task costs is settled by the tracker; one proved never made costs nothing.
        self._ledger, self._clock, self._limiters, self._tracker = ledger, clock, limiters, tracker
        self.config = config
        self._pending: dict[str, object] = {}  # item_id -> lane
        self._changed = asyncio.Event()
        self.adopted = 0
        self.resent = 0

    def add(self, item_id: str, lane) -> None:
        self._pending[item_id] = lane
        self._changed.set()

    def pending(self, lane=None) -> bool:
        return any(lane is None or other is lane for other in self._pending.values())

    async def settled(self, lane) -> None:
        """Wait until nothing of ``lane`` is being reconciled any more."""
        while self.pending(lane):
            self._changed.clear()
            await self._changed.wait()

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self._pending):
            for item_id, lane in list(self._pending.items()):
                try:
                    done = await self._reconcile(item_id, lane)
                except (ApiError, TransportError) as exc:
                    log.info("↻ reconcile %s: %s", item_id, exc)
                    done = False
                if done:
                    del self._pending[item_id]
                    self._changed.set()
            if self._pending:
                await self._clock.sleep(self.config.retry_s)
            else:
                await wait_event(self._changed, 0.2)

    async def _reconcile(self, item_id: str, lane) -> bool:
        """True once the item has left ``unknown``."""
        row = self._ledger.get(item_id)
        now = self._clock.now()
        started_s = (row.submit_started_ms or 0) / 1000
        if now - started_s > self.config.task_lifetime_s:
            self._ledger.transition(
                item_id,
                ItemState.expired,
                error_code="OutcomeUnknown",
                error_message="the service no longer lists tasks this old",
            )
            self._tracker.budget.settle(item_id, row.n_images * row.price_per_image)  # may have been billed
            lane.slots.release()
            return True
        candidates = await self._candidates(lane, started_s - self.config.window_margin_s, now + 60)
        waiting = False
        prompt = row.request["prompt"][: lane.offer.model.prompt_max]
        for task in candidates:
            data = await self._query(lane, task["task_id"])
            output = data.get("output") or {}
            status = output.get("task_status")
            if status in ("PENDING", "RUNNING"):
                waiting = True  # its prompt shows only once it has results
                continue
            prompts = {e.get("orig_prompt") for e in output.get("results") or [] if isinstance(e, dict)}
            if prompt in prompts or (status == "SUCCEEDED" and self._only_guess(lane, candidates, output)):
                self._adopt(item_id, lane, task["task_id"], row)
                return True
        if waiting or now - started_s < self.config.grace_s:
            return False
        self._ledger.transition(item_id, ItemState.planned, note="the task list shows no task for this attempt")
        self.resent += 1
        log.info("↻ %s: no task was created; it will be sent again", item_id)
        self._tracker.budget.settle(item_id, 0.0)
        lane.slots.release()
        return True

    def _only_guess(self, lane, candidates: list[dict], output: dict) -> bool:
        """wan2.6 results carry no prompt: adopt only when one unknown item and one task can be paired."""
        has_prompts = any("orig_prompt" in e for e in output.get("results") or [] if isinstance(e, dict))
        return not has_prompts and len(candidates) == 1 and sum(o is lane for o in self._pending.values()) == 1

    def _adopt(self, item_id: str, lane, task_id: str, row) -> None:
        self._ledger.transition(
            item_id, ItemState.queued, task_id=task_id, note="adopted from the task list after an unknown outcome"
        )
        self.adopted += 1
        log.info("⇐ %s adopted task %s", item_id, task_id)
        self._tracker.add(task_id=task_id, item_id=item_id, lane=lane, submitted_s=(row.submit_started_ms or 0) / 1000)

    async def _candidates(self, lane, start_s: float, end_s: float) -> list[dict]:
        """Tasks of this model in the window that the ledger does not know."""
        found, page = [], 1
        while True:
            await self._limiters[lane.region].acquire()
            data = await lane.client.list_tasks(
                model_name=lane.offer.api_name,
                start_time=service_time_param(start_s),
                end_time=service_time_param(end_s),
                page_no=page,
                page_size=self.config.page_size,
            )
            rows = data.get("data") or []
            found += [r for r in rows if r.get("task_id") and self._ledger.item_for_task(r["task_id"]) is None]
            if page >= int(data.get("total_page") or 1) or not rows:
                return found
            page += 1

    async def _query(self, lane, task_id: str) -> dict:
        await self._limiters[lane.region].acquire()
        return await lane.client.get_task(task_id)
