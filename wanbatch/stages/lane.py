"""One lane per (region, model): what every stage that sends, follows or reconciles a create shares.

A lane carries the client for its region, the model's offer (quota, price,
protocol), the pacing of its creates, its claims (places for open tasks, and
the budget) and what tells its creates apart while their outcome is not known.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from wanbatch.catalog import Offer, Protocol
from wanbatch.errors import ApiError
from wanbatch.ledger.records import ItemRow
from wanbatch.service.client import WanClient
from wanbatch.service.pacing import Pacer
from wanbatch.stages.claims import Claims

__all__ = ["SHARED_KEY", "SYNC_KEY", "Lane"]

SHARED_KEY = ""  #: the doubt key of every wan2.6 create: its results do not show the prompt
SYNC_KEY = "sync "  #: the doubt keys of sync calls begin so: a lost sync answer is never sent again


@dataclass(eq=False)
class Lane:
    """One (region, model): the client for that region, its quota, pacing and claims."""

    region: str
    offer: Offer
    client: WanClient
    pacer: Pacer
    claims: Claims
    blocked: ApiError | None = None
    skipped: set[str] = field(default_factory=set)  #: left planned after transient errors, for a later run
    #: item_id -> prompt of every create whose outcome is not known yet (in flight, or unknown)
    doubt: dict[str, str] = field(default_factory=dict)
    prompts_hidden: bool = False  #: a result of this lane's model came without its prompt: tell creates apart by time
    unreachable: int = 0  #: connections that failed to open in a row
    probe_started_s: float | None = None  #: when this run's first create of the lane went out (our clock)
    answered: bool = False  #: whether a create of the lane has ended this run (answered, refused or in doubt)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  #: set when a doubt settles

    def doubt_key(self, row: ItemRow) -> str:
        """What tells this item's task apart in the service's list: its prompt, where results show it.
        wan2.6's results do not, so its creates are in doubt one at a time."""
        return SHARED_KEY if self.one_at_a_time else row.request["prompt"]

    @property
    def one_at_a_time(self) -> bool:
        """Whether every create of the lane shares one doubt key: wan2.6's, and a legacy lane whose results were
        seen without their prompt (as some of the service's answers come); then one is in doubt at a time."""
        return self.offer.model.protocol is not Protocol.LEGACY or self.prompts_hidden

    @property
    def async_in_doubt(self) -> bool:
        """Whether a create that the task list could show is in doubt (a sync call's never is)."""
        return any(not key.startswith(SYNC_KEY) for key in self.doubt.values())

    def settle_doubt(self, item_id: str) -> None:
        self.doubt.pop(item_id, None)
        self.changed.set()

    @property
    def model(self) -> str:
        return self.offer.model.name
