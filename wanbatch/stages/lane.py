"""One lane per (account, model): what every stage that sends, follows or reconciles a create shares.

A lane carries the client of its account's key (in the account's region), the
model's offer with the account's quotas (rate, concurrency, price, protocol),
the pacing of its creates, its claims (places for open tasks, and the budget)
and what tells its creates apart while their outcome is not known: the
service's task list is the account's, so every account has its own doubts.

Without an account pool each region's key from the environment is one account
(``account`` is '' and its ``scope`` is the region). The lanes of one (region,
model) over several accounts share one reader of the planned rows (the
submitter's), and one ``changed`` event, set when any of them frees a place or
settles a doubt.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

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
    """One (account, model): the client of the account's key, its quota, pacing and claims."""

    region: str
    offer: Offer
    client: WanClient
    pacer: Pacer
    claims: Claims
    account: str = ""  #: the pool's name for the account; '' for the environment's key of ``region``
    blocked: ApiError | None = None
    skipped: set[str] = field(default_factory=set)  #: left planned after transient errors, for a later run
    #: item_id -> prompt of every create whose outcome is not known yet (in flight, or unknown)
    doubt: dict[str, str] = field(default_factory=dict)
    prompts_hidden: bool = False  #: a result of this lane's model came without its prompt: tell creates apart by time
    unreachable: int = 0  #: connections that failed to open in a row
    probe_started_s: float | None = None  #: when this run's first create of the lane went out (our clock)
    submitted: int = 0  #: creates this run that the service answered with a task (or a sync result)
    answered: bool = False  #: whether a create of the lane has ended this run (answered, refused or in doubt)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  #: set when a doubt settles

    def placed(self, row: ItemRow) -> dict[str, Any]:
        """For an item allowed several regions, the region this lane sends it to and its price there (recorded
        with the move to submitting: the claim, tracker, reconciler and report read them); nothing for an item
        of this lane's region alone."""
        if row.request.get("region", self.region) == self.region:
            return {}
        return {"region": self.region, "price_per_image": self.offer.price}

    @property
    def scope(self) -> str:
        """Whose quotas, query allowance and task list this lane's creates share: its account (or, without a
        pool, the region's one key)."""
        return self.account or self.region

    @property
    def label(self) -> str:
        """The lane as reports and logs name it: account/model in a pool, region/model without."""
        return f"{self.scope}/{self.model}"

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
