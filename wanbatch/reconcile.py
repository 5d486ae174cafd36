"""Finding out what an ``unknown`` create did, without paying twice.

A create whose answer was lost (a reset or timeout after sending, or a crash
between the ledger's ``submitting`` commit and the reply) may or may not have
made a task. The service's task list is the witness: every task of the model
that the account created in the last 24 hours (the list's own default window,
on the service's clock, so no clock of ours needs to agree with it) and that
the ledger does not know is a candidate. A candidate whose result carries our
prompt is adopted. Once a create can no longer land (the grace time has
passed) and every candidate
has shown its prompt without a match, no task was made and the item may be
sent again. (The grace is measured on the run folder's own clock, which a
resumed run continues.) Until then the item waits: it is never re-sent on a guess.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .aio import wait_event
from .catalog import Protocol
from .errors import ApiError, TransportError
from .results import write_off
from .states import ItemState

__all__ = ["ReconcileConfig", "Reconciler"]

log = logging.getLogger("wanbatch")

FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})  #: a task in these states answers the same ever after


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileConfig:
    grace_s: float = 90.0  #: after the attempt began, how long a create can still land on the service
    retry_s: float = 5.0  #: how often to look again at an unresolved item
    page_size: int = 100
    task_lifetime_s: float = 24 * 3600.0


class Reconciler:
    def __init__(self, *, ledger, clock, limiters, tracker, config: ReconcileConfig = ReconcileConfig()) -> None:
        # What an adopted task costs is settled by the tracker; one proved never made costs nothing.
        self._ledger, self._clock, self._limiters, self._tracker = ledger, clock, limiters, tracker
        self.config = config
        self._pending: dict[str, object] = {}  # item_id -> lane
        #: task_id -> the answer of an unclaimed task that had finished: it cannot change, so it is asked once
        self._finished: dict[str, dict] = {}
        self._changed = asyncio.Event()
        self.adopted = 0
        self.resent = 0

    def add(self, item_id: str, lane) -> None:
        self._pending[item_id] = lane
        self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self._pending):
            lanes = {id(lane): lane for lane in self._pending.values()}
            for lane in lanes.values():
                try:
                    await self._sweep(lane)
                except (ApiError, TransportError) as exc:
                    log.info("↻ reconcile %s %s: %s", lane.region, lane.model, exc)
            if self._pending:
                await self._clock.sleep(self.config.retry_s)
            else:
                self._finished.clear()  # the next unknown outcome looks at the list as it is then
                await wait_event(self._changed, 0.2)

    async def _sweep(self, lane) -> None:
        """One listing of the lane's unclaimed tasks, each queried at most once, against all its unknown items."""
        # Only what the list could already show counts as proof: an attempt is out of its grace only if it was
        # when the list was asked for, not when the (slow) sweep gets to it.
        listed_at_s = self._clock.now()
        candidates = await self._candidates(lane)
        outputs: dict[str, dict] = {}
        for task in candidates:
            task_id = task["task_id"]
            output = self._finished.get(task_id)
            if output is None:
                output = (await self._query(lane, task_id)).get("output")
                output = output if isinstance(output, dict) else {}
                if output.get("task_status") in FINISHED:
                    self._finished[task_id] = output
            outputs[task_id] = output
        items = [i for i, other in self._pending.items() if other is lane]
        if lane.offer.model.protocol is not Protocol.LEGACY:
            self._pair_by_order(lane, items, candidates, outputs)
            items = [i for i in items if i in self._pending]
        for item_id in items:
            if self._reconcile(item_id, lane, candidates, outputs, listed_at_s):
                del self._pending[item_id]
                lane.settle_doubt(item_id)
                self._changed.set()

    def _reconcile(
        self, item_id: str, lane, candidates: list[dict], outputs: dict[str, dict], listed_at_s: float
    ) -> bool:
        """True once the item has left ``unknown``."""
        row = self._ledger.get(item_id)
        now = self._clock.now()
        started_s = (row.submit_started_ms or 0) / 1000
        if now - started_s > self.config.task_lifetime_s:
            write_off(
                self._ledger,
                item_id,
                paid=row.n_images * row.price_per_image,
                code="OutcomeUnknown",
                message="the service no longer lists tasks this old; counted as paid and lost",
                budget=self._tracker.budget,
            )
            lane.slots.release()
            return True
        waiting = False
        prompt = row.request["prompt"][: lane.offer.model.prompt_max]
        for task in list(candidates):
            output = outputs[task["task_id"]]
            status = output.get("task_status")
            if status in ("PENDING", "RUNNING"):
                waiting = True  # its prompt shows only once it has results
                continue
            results = output.get("results")
            prompts = (
                {e.get("orig_prompt") for e in results if isinstance(e, dict)} if isinstance(results, list) else set()
            )
            prompts.discard(None)
            if prompt in prompts:
                candidates.remove(task)
                self._adopt(item_id, lane, task["task_id"], row)
                return True
            if status == "SUCCEEDED" and not prompts and lane.offer.model.protocol is Protocol.LEGACY:
                waiting = True  # a finished task that does not show its prompt rules nothing out
        in_grace = listed_at_s - started_s < self.config.grace_s
        if waiting or in_grace:
            return False
        self._ledger.transition(item_id, ItemState.planned, note="the task list shows no task for this attempt")
        self.resent += 1
        log.info("↻ %s: no task was created; it will be sent again", item_id)
        self._tracker.budget.settle(item_id, 0.0)
        lane.slots.release()
        return True

    def _pair_by_order(self, lane, items: list[str], candidates: list[dict], outputs: dict[str, dict]) -> None:
        """wan2.6 results do not show their prompt: pair unknown items with finished unclaimed tasks in the order
        both were made. The submitter keeps at most one wan2.6 create in doubt, so there is one of each."""
        if any(outputs[t["task_id"]].get("task_status") in ("PENDING", "RUNNING") for t in candidates):
            return  # not all finished yet: pair once they are
        finished = sorted(
            (t for t in candidates if outputs[t["task_id"]].get("task_status") == "SUCCEEDED"),
            key=lambda t: (t.get("gmt_create") if isinstance(t.get("gmt_create"), int) else 0, t["task_id"]),
        )
        rows = sorted((self._ledger.get(i) for i in items), key=lambda r: (r.submit_started_ms or 0, r.seq))
        for row, task in zip(rows, finished, strict=False):
            candidates.remove(task)
            self._adopt(row.item_id, lane, task["task_id"], row)
            del self._pending[row.item_id]
            lane.settle_doubt(row.item_id)
            self._changed.set()

    def _adopt(self, item_id: str, lane, task_id: str, row) -> None:
        self._ledger.transition(
            item_id, ItemState.queued, task_id=task_id, note="adopted from the task list after an unknown outcome"
        )
        self.adopted += 1
        log.info("⇐ %s adopted task %s", item_id, task_id)
        submitted_s = (row.submit_started_ms or 0) / 1000
        self._tracker.add(task_id=task_id, item_id=item_id, lane=lane, submitted_s=submitted_s, resumed=True)

    async def _candidates(self, lane) -> list[dict]:
        """Tasks of this model from the last 24 hours that the ledger does not know."""
        found, page = [], 1
        while True:
            await self._limiters[lane.region].acquire()
            data = await lane.client.list_tasks(
                model_name=lane.offer.api_name, page_no=page, page_size=self.config.page_size
            )
            rows = data.get("data")
            rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
            found += [
                r
                for r in rows
                if isinstance(r.get("task_id"), str)
                and r["task_id"]
                and self._ledger.item_for_task(r["task_id"]) is None
            ]
            total_pages = data.get("total_page")
            if not rows or not isinstance(total_pages, int) or page >= total_pages:
                return found
            page += 1

    async def _query(self, lane, task_id: str) -> dict:
        await self._limiters[lane.region].acquire()
        return await lane.client.get_task(task_id)
