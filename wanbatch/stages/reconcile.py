"""Finding out what an ``unknown`` create did, without paying twice and without guessing.

A create whose answer was lost (a 5xx, reset or timeout after sending, or a
crash between the ledger's ``submitting`` commit and the reply) may or may
not have made a task, now or later: the gateway may hold a create for its
whole request window (300 s) before the task exists, and the task list may
show a new task late. The list is the witness, read with care:

- **Candidates** are tasks of the lane's model, made by our key (its
  ``api_key_id``, learned from a task we know), created in the attempt's
  window (from its start until the request window has passed, placed on the
  service's clock through tasks we know), that the ledger does not know.
  Tasks that failed or were canceled cost nothing and are passed over.
- A candidate **fits** when its results fit the request: the prompt it echoes
  (when it echoes one) is ours, allowing for the service's truncation and
  whitespace normalisation; it has no more images than we asked for; and
  every image has the requested size. A candidate that does not fit is not ours.
- **One** fitting candidate and no other that could still be ours: adopt it,
  at once when its echoed prompt and our key prove it, otherwise once the
  window has passed and a list read after the list's lag agrees.
- **More than one**: never guess; the item is held (still ``unknown``, its
  candidates named in its error message) for the user.
- **None**, by a list read after the window and the lag have passed: no task
  was made; the item is planned again, unless it has gone unknown
  ``max_unknowns`` times: then it is held with the evidence, not sent again.

Until a decision an item keeps its claim, in doubt (its place on the service
and its full price in the budget), and its lane's doubt (no other create that
the list could confuse with it is sent). A held item's price is counted as
spent while a task may exist, unless the list proved none. Held items are
reconciled again by the next run, which may see more.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aiolimiter import AsyncLimiter

from wanbatch.catalog import Protocol
from wanbatch.clock import Clock
from wanbatch.errors import ApiError, TransportError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ItemState
from wanbatch.service.wire import ListPage, ListRow, list_page
from wanbatch.stages.candidates import Judge, Verdict
from wanbatch.stages.claims import Claim
from wanbatch.stages.lane import Lane
from wanbatch.stages.results import write_off
from wanbatch.stages.track import Tracker

__all__ = ["ReconcileConfig", "Reconciler"]

log = logging.getLogger("wanbatch")

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileConfig:
    request_window_s: float = 300.0  #: the gateway may hold a create this long before its task exists
    list_lag_s: float = 120.0  #: a new task may show in the task list this much later than it was made
    clock_margin_s: float = 120.0  #: slack either side of an attempt's window, with the clocks' offset learned
    #: slack either side where the offset is known only from the folder's other runs (their clock may have moved)
    other_run_clock_margin_s: float = 300.0
    #: slack either side where no offset is known at all (the clocks are taken to agree)
    unknown_clock_margin_s: float = 900.0
    facts_ttl_s: float = 60.0  #: how long what was learned of our key and the clocks is trusted
    undecided_max_s: float = 1800.0  #: after the window, how long candidates still running may hold an item
    max_unknowns: int = 2  #: an item unknown this many times is held, not sent again, when no task is found
    retry_s: float = 5.0  #: how often to look again at unresolved items
    page_size: int = 100
    max_pages: int = 50  #: pages of one listing; a longer list decides nothing that needs it whole
    probe_timeout_s: float = 30.0  #: reading an image's header to check its size
    task_lifetime_s: float = 24 * 3600.0


@dataclass(slots=True)
class _KeyFacts:
    """What the service's list tells of one run's key in one region, learned from tasks that run made there."""

    key_id: str | None = None  #: our key's ``api_key_id``
    offset_ms: tuple[int, int] | None = None  #: (least, most) service creation time minus our attempt's start
    learned_s: float = float("-inf")
    #: where the run made no task we know: what the newest tasks of the folder's other runs tell (most likely
    #: the same key and clock, but not proven: used to break ties, never to prove that no task was made)
    likely_key_id: str | None = None
    likely_offset_ms: tuple[int, int] | None = None


class _Doubt(NamedTuple):
    """An unknown create waiting for a decision: its lane, and its claim, kept in doubt until then."""

    lane: Lane
    claim: Claim


@dataclass(slots=True)
class _Listing:
    entries: list[ListRow] = field(default_factory=list)  #: unclaimed tasks, readable, each once
    complete: bool = True  #: every page was read, and every row on them
    at_s: float = 0.0  #: when it was asked for (our clock): proof only of what could show by then


class Reconciler:
    def __init__(
        self,
        *,
        ledger: RunLedger,
        clock: Clock,
        limiters: Mapping[str, AsyncLimiter],
        tracker: Tracker,
        config: ReconcileConfig = ReconcileConfig(),
        retry_held: bool = False,
    ) -> None:
        # An adopted task's claim is settled by the tracker when it ends; one proved never made is released.
        self._ledger, self._clock, self._limiters, self._tracker = ledger, clock, limiters, tracker
        self.config = config
        self.retry_held = retry_held  #: the user asks to send once more the items held as unknown twice
        self._pending: dict[str, _Doubt] = {}  # item_id -> its lane and claim
        self._judge = Judge(clock=clock, limiters=limiters, probe_timeout_s=config.probe_timeout_s)
        #: (account, a run's span) -> what the tasks that run made tell of its key and clock there
        self._keys: dict[tuple[str, int, int], _KeyFacts] = {}
        #: tasks that fit an attempt held for the user: whose they are stays unproven for the other attempts too
        self._contested: set[str] = set()
        self._changed = asyncio.Event()
        self.adopted = self.resent = self.held = 0

    def add(self, lane: Lane, claim: Claim) -> None:
        """Find out what the unknown create of ``claim``'s item did; the claim is kept, in doubt, until then."""
        claim.doubt()
        self._pending[claim.item_id] = _Doubt(lane, claim)
        self._changed.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self._pending):
            lanes = {id(pending.lane): pending.lane for pending in self._pending.values()}
            for lane in lanes.values():
                try:
                    await self._sweep(lane)
                except (ApiError, TransportError) as exc:
                    log.info("↻ reconcile %s %s: %s", lane.scope, lane.model, exc)
                    await self._hold_overdue(lane)
            if self._pending:
                await self._clock.sleep(self.config.retry_s)
            else:
                self._judge.forget()  # the next unknown outcome looks at the list as it is then
                # Nothing waits on time here: an unknown outcome announces itself; a stop does not, and is
                # looked for at least five times a wall second, whatever the clock's speed.
                await self._clock.wait_event(self._changed, math.inf, at_most_wall_s=0.2)

    async def _rows(self, lane: Lane) -> list[ItemRow]:
        """The lane's items in doubt, oldest attempt first: read together, once a sweep."""
        return sorted(
            await self._ledger.get_many([i for i, pending in self._pending.items() if pending.lane is lane]),
            key=lambda row: (row.submit_started_ms or 0, row.seq),
        )

    async def _sweep(self, lane: Lane) -> None:
        """One listing of the lane's unclaimed tasks against all its unknown items, oldest attempt first."""
        rows = await self._rows(lane)
        spans = await self._ledger.run_spans({row.submit_started_ms or 0 for row in rows})
        # What one run's tasks tell is learned once a sweep, however many of its attempts are in doubt.
        learned = {span: await self._facts(lane, span) for span in set(spans.values())}
        facts = {row.item_id: learned[spans[row.submit_started_ms or 0]] for row in rows}
        listing = await self._listing(lane, rows, facts)
        verdicts = {row.item_id: await self._verdicts(lane, row, listing, facts[row.item_id]) for row in rows}
        # A task that fits several of our attempts, with no prompt to tell whose it is, is none's for sure.
        fitted = Counter(
            entry.task_id for found in verdicts.values() for entry, verdict in found if verdict is Verdict.FITS
        )
        # So is one that fit an attempt already held: that attempt's window may close before another's.
        shared = {task_id for task_id, count in fitted.items() if count > 1} | self._contested
        for row in rows:
            # Not one adopted by an earlier row of this sweep.
            found = [(entry, verdict) for entry, verdict in verdicts[row.item_id] if entry in listing.entries]
            if await self._decide(lane, row, listing, facts[row.item_id], found, shared):
                self._leave(lane, row)

    def _claim(self, row: ItemRow) -> Claim:
        return self._pending[row.item_id].claim

    def _leave(self, lane: Lane, row: ItemRow) -> None:
        """``row`` is decided (adopted, planned again, held or written off): its lane may send what it held back."""
        del self._pending[row.item_id]
        lane.settle_doubt(row.item_id)
        self._changed.set()

    async def _verdicts(self, lane: Lane, row: ItemRow, listing: _Listing, facts: _KeyFacts) -> list:
        found = []
        for entry in listing.entries:
            if self._in_window(entry, row, facts):
                verdict = await self._judge.verdict(lane, row, entry)
                if verdict is not Verdict.NOT_OURS:
                    found.append((entry, verdict))
        return found

    async def _decide(
        self, lane: Lane, row: ItemRow, listing: _Listing, facts: _KeyFacts, found: list, shared: set[str]
    ) -> bool:
        """Settle ``row`` if the listing allows (``shared``: tasks that fit other attempts too); True once it has
        left the reconciler."""
        cfg, now = self.config, self._clock.now()
        started_s = (row.submit_started_ms or 0) / 1000
        if now - started_s > cfg.task_lifetime_s and row.error_code != "HeldUnknownTwice":  # that one made no task
            await self._write_off(row)
            return True
        fits_all = [(entry, verdict) for entry, verdict in found if verdict is not Verdict.MAYBE]
        maybe_all = [entry for entry, verdict in found if verdict is Verdict.MAYBE]
        fits, maybe = fits_all, maybe_all
        if facts.key_id is None and facts.likely_key_id is not None:
            # The run's key is not known; the folder's is likely it: enough to tell ours from another program's,
            # never to prove that no task was made (that takes every key's tasks to be out of the way).
            likely = facts.likely_key_id
            fits = [(entry, verdict) for entry, verdict in fits if entry.api_key_id in (None, likely)]
            maybe = [entry for entry in maybe if entry.api_key_id in (None, likely)]
        closed_s = self._closed_s(row)
        closed = listing.complete and listing.at_s >= closed_s
        ambiguous = len(fits) > 1 or any(entry.task_id in shared for entry, _ in fits)
        if ambiguous:
            if not closed:
                return False  # more may show; decide once none can
            return await self._hold(row, "HeldAmbiguous", "more than one task could be this attempt's", fits, maybe)
        if len(fits) == 1 and not maybe:
            entry, verdict = fits[0]
            proven = verdict is Verdict.FITS_BY_PROMPT and facts.key_id is not None
            if proven or closed:
                listing.entries.remove(entry)
                await self._adopt(lane, row, entry.task_id)
                return True
            return False
        if closed and not fits_all and not maybe_all:
            return await self._no_task(lane, row)
        if listing.at_s >= closed_s + cfg.undecided_max_s:
            reason = "tasks that could be this attempt's did not finish in time to tell"
            return await self._hold(row, "HeldUndecided", reason, fits, maybe)
        return False

    def _closed_s(self, row: ItemRow) -> float:
        """When no task of the attempt can be made any more nor be missing from the list (our clock)."""
        return (row.submit_started_ms or 0) / 1000 + self.config.request_window_s + self.config.list_lag_s

    async def _hold_overdue(self, lane: Lane) -> None:
        """The list cannot be read: items past their time to decide are held rather than kept open for ever."""
        now = self._clock.now()
        for row in await self._rows(lane):
            if now >= self._closed_s(row) + self.config.undecided_max_s:
                await self._hold(row, "HeldUndecided", "the task list could not be read in time to tell", [], [])
                self._leave(lane, row)

    # -- what the list says -----------------------------------------------------------------------------------

    async def _facts(self, lane: Lane, span: tuple[int, int]) -> _KeyFacts:
        """The key's id and the clocks' offset of the run that made an attempt (``span``: when that run began and
        the next did), from up to five tasks that run made in the region (another run may have had another key,
        or a clock set otherwise)."""
        facts = await self._learn(lane, span)
        if facts.key_id is None or facts.offset_ms is None:
            folder = await self._learn(lane, (0, 2**62))
            facts.likely_key_id, facts.likely_offset_ms = folder.key_id, folder.offset_ms
        return facts

    async def _learn(self, lane: Lane, span: tuple[int, int]) -> _KeyFacts:
        """What the newest tasks made in ``span`` (our clock, ms) tell of their key and the clocks' offset."""
        facts = self._keys.setdefault((lane.scope, *span), _KeyFacts())
        now = self._clock.now()
        if facts.offset_ms is not None and now - facts.learned_s < self.config.facts_ttl_s:
            return facts
        offsets = []
        for task_id, started_ms in await self._ledger.recent_tasks(
            lane.region, 5, since_ms=span[0], until_ms=span[1], account=lane.account
        ):
            page = await self._list_page(lane, 1, task_id=task_id)
            entry = page.by_id.get(task_id)
            if entry is None or entry.created_ms is None:
                continue
            if entry.api_key_id is not None:
                facts.key_id = entry.api_key_id
            offset = entry.created_ms - started_ms
            if abs(offset) < _DAY_MS:  # a garbled time teaches nothing
                offsets.append(offset)
        if offsets:
            facts.offset_ms, facts.learned_s = (min(offsets), max(offsets)), now
        return facts

    async def _listing(self, lane: Lane, rows: list[ItemRow], facts: dict[str, _KeyFacts]) -> _Listing:
        """The unclaimed tasks of the lane's model (of our key, where every row's attempt is known to use it)."""
        listing = _Listing(at_s=self._clock.now())
        params: dict[str, str] = {"model_name": lane.offer.api_name}
        keys = {facts[row.item_id].key_id for row in rows}
        if len(keys) == 1 and None not in keys:
            params["api_key_id"] = keys.pop()
        seen: set[str] = set()
        for page in range(1, self.config.max_pages + 1):
            found = await self._list_page(lane, page, **params)
            entries = [entry for entry in found.rows if entry.created_ms is not None]  # else no window holds it
            if not found.whole or len(entries) < len(found.rows):
                listing.complete = False  # a row or the page count could not be read: nothing is proven absent
            known = await self._ledger.known_tasks([entry.task_id for entry in entries if entry.task_id not in seen])
            for entry in entries:
                if entry.task_id not in seen and entry.task_id not in known:
                    listing.entries.append(entry)
                seen.add(entry.task_id)
            if found.raw_rows < self.config.page_size or (found.total_pages is not None and page >= found.total_pages):
                return listing
        listing.complete = False
        return listing

    async def _list_page(self, lane: Lane, page: int, **params: str) -> ListPage:
        await self._limiters[lane.scope].acquire()
        return list_page(await lane.client.list_tasks(page_no=page, page_size=self.config.page_size, **params))

    def _in_window(self, entry: ListRow, row: ItemRow, facts: _KeyFacts) -> bool:
        """Whether the listed task may be the attempt's: made in its window (as far as the clocks' offset is known
        for its run), by its run's key (where known)."""
        if facts.key_id is not None and entry.api_key_id not in (None, facts.key_id):
            return False
        offset, margin_s = facts.offset_ms, self.config.clock_margin_s
        if offset is None:
            offset, margin_s = facts.likely_offset_ms, self.config.other_run_clock_margin_s
        if offset is None:
            offset, margin_s = (0, 0), self.config.unknown_clock_margin_s
        least, most = offset
        start_ms = row.submit_started_ms or 0
        low = start_ms + least - margin_s * 1000
        high = start_ms + most + (self.config.request_window_s + margin_s) * 1000
        return entry.created_ms is not None and low <= entry.created_ms <= high

    # -- decisions --------------------------------------------------------------------------------------------

    async def _adopt(self, lane: Lane, row: ItemRow, task_id: str) -> None:
        queued = await self._ledger.transition(
            row.item_id,
            ItemState.queued,
            expect=ItemState.unknown,
            task_id=task_id,
            note="adopted from the task list after an unknown outcome",
        )
        self.adopted += 1
        log.info("⇐ %s adopted task %s", row.item_id, task_id)
        submitted_s = (row.submit_started_ms or 0) / 1000
        claim = self._claim(row)
        claim.confirm()
        self._tracker.add(task_id=task_id, row=queued, claim=claim, lane=lane, submitted_s=submitted_s, resumed=True)

    async def _no_task(self, lane: Lane, row: ItemRow) -> bool:
        """The list proves that the attempt made no task: send again, unless the item has been unknown too often."""
        if row.endpoint is None and lane.offer.model.protocol is not Protocol.LEGACY:
            # Recorded before attempts noted their endpoint: it may have been a sync call, which no list shows.
            reason = "the attempt may have been a sync call (its endpoint was not recorded), which no list shows"
            return await self._hold(row, "HeldUndecided", reason, [], [])
        released = self.retry_held and row.error_code == "HeldUnknownTwice"
        if await self._ledger.times_unknown(row.item_id) >= self.config.max_unknowns and not released:
            reason = f"no task was found, but the item has gone unknown {self.config.max_unknowns} times"
            return await self._hold(row, "HeldUnknownTwice", reason, [], [])
        await self._ledger.transition(
            row.item_id, ItemState.planned, note="the task list shows no task for this attempt"
        )
        self.resent += 1
        log.info("↻ %s: no task was created; it will be sent again", row.item_id)
        self._claim(row).release()
        return True

    async def _hold(self, row: ItemRow, code: str, reason: str, fits: list, maybe: list) -> bool:
        """Leave the item unknown for the user, with the evidence; True (it has left the reconciler)."""
        named = [entry.task_id for entry, _ in fits] + [entry.task_id for entry in maybe]
        evidence = f"; candidate tasks: {', '.join(named)}" if named else ""
        advice = "--retry-held sends it once more" if code == "HeldUnknownTwice" else "a later run looks again"
        message = f"{reason}{evidence}. Not sent again; {advice} (see the README's money rules)"
        await self._ledger.update(row.item_id, error_code=code, error_message=message)
        self._contested.update(entry.task_id for entry, verdict in fits if verdict is Verdict.FITS)
        claim = self._claim(row)
        if code == "HeldUnknownTwice":
            claim.release()  # the list proved that no task was made
        else:
            claim.settle(claim.price)  # counted as spent while a task may exist
        self.held += 1
        log.warning("? %s held: %s%s", row.item_id, reason, evidence)
        return True

    async def _write_off(self, row: ItemRow) -> None:
        claim = self._claim(row)
        await write_off(
            self._ledger,
            row.item_id,
            paid=claim.price,
            code="OutcomeUnknown",
            message="the service no longer lists tasks this old; counted as paid and lost",
            claim=claim,
        )
