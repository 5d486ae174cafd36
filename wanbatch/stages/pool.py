"""Which accounts a run sends with, and the lanes it builds for them.

Without an account pool a run has one key per region, from the environment:
each is an account of its own, named '' (its scope is the region). With a
pool (:mod:`wanbatch.service.accounts`), every account of a region serves each
of that region's models. A lane is keyed (region, account, model): the
region is the account's, kept in the key so that the lanes of one (region,
model) over several accounts are found together (they share one reader of
the planned rows, and one event that says a place or a doubt came free).

An item in flight (submitting, unknown, queued, generated) is followed and
reconciled only with the key that made it: its task is in that account's
task list and no other. A run that has no key of that account refuses to
start (:func:`check_in_flight`), before anything is sent or moved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import aiohttp
from aiolimiter import AsyncLimiter

from wanbatch import catalog
from wanbatch.clock import Clock
from wanbatch.errors import KEY_WIDE_CODES, ApiError, ConfigError
from wanbatch.service.accounts import Account
from wanbatch.service.client import WanClient
from wanbatch.service.pacing import Pacer, even_limiter
from wanbatch.service.quotas import QuotaTable, apply_quotas
from wanbatch.stages.budget import Budget
from wanbatch.stages.claims import Claims
from wanbatch.stages.lane import Lane

__all__ = ["LaneKey", "SharedParts", "account_figures", "block_lanes", "build_lanes", "check_in_flight", "plan_lanes"]

log = logging.getLogger("wanbatch")

#: (region, account, model); account '' for the environment's key of the region.
LaneKey = tuple[str, str, str]


class SharedParts(Protocol):
    """Makes a lane's pacer and claims whose quota other processes share (``FleetWorker.lane_parts``)."""

    def __call__(
        self,
        *,
        account: str,
        region: str,
        model: str,
        rate_per_s: float,
        capacity: int,
        budget: Budget,
        freed: asyncio.Event,
    ) -> tuple[Pacer, Claims]: ...


def check_in_flight(pool: Sequence[Account] | None, in_flight: AbstractSet[LaneKey]) -> None:
    """Refuse items in flight (``in_flight``: the lane keys of the ledger's open items) on a key this run does not
    have (``pool`` None: the environment's keys, which are no pool account's)."""
    if pool is None:
        strangers = sorted({account for _, account, _ in in_flight if account})
        if strangers:
            raise ConfigError(
                f"items are in flight on account(s) {', '.join(strangers)} of a pool: nothing was sent. Run with "
                "--accounts and a file naming them, so that each is followed and reconciled with its own key"
            )
        return
    names = {account.name for account in pool}
    strangers = sorted({(account, region) for region, account, _ in in_flight if account not in names})
    if strangers:
        named = ", ".join(
            f"account {account}" if account else f"the environment's key of {region}" for account, region in strangers
        )
        raise ConfigError(
            f"items are in flight on {named}, which the accounts file does not name: nothing was sent. Name the "
            "account(s) again (each item in flight is reconciled with the key that made it), or let a run with "
            "that key finish them first"
        )


def plan_lanes(
    *,
    pool: Sequence[Account] | None,
    keys: Mapping[str, str],
    quotas: QuotaTable,
    in_flight: AbstractSet[LaneKey],
    wanted: AbstractSet[tuple[str, str]],
) -> tuple[dict[str, Account], set[LaneKey], dict[tuple[str, str], list[LaneKey]]]:
    """The accounts a run sends with (scope -> account), its lanes, and its readers: for each (region, model) of
    ``wanted`` (a region value: one region, several joined by ``|``, or ``any``), the lanes of every account of
    every region it allows that sells the model; and the lane of every item in flight. Without a ``pool``,
    ``keys`` (region -> key) are the accounts, with ``quotas`` (the ``--quotas`` file's) as theirs."""
    if pool is None:
        accounts = {region: Account(name="", region=region, key=key, quotas=quotas) for region, key in keys.items()}
    else:
        accounts = {account.scope: account for account in pool}
    lanes = set(in_flight)
    readers: dict[tuple[str, str], list[LaneKey]] = {}
    for value, model in sorted(wanted):
        allowed = [offer.region for offer in catalog.offers_for(value, model)]
        serving = [a for a in accounts.values() if a.region in allowed]
        if not serving and not any(key[0] in allowed and key[2] == model for key in lanes):
            if pool is not None:
                raise ConfigError(f"no account of the pool is in {value}, where the manifest's {model} items go")
            raise ConfigError(f"no API key for region(s) {', '.join(allowed)}")
        if pool is None and len(allowed) == 1 and allowed[0] not in keys:
            raise ConfigError(f"no API key for region(s) {allowed[0]}")
        readers[(value, model)] = sorted({(a.region, a.name, model) for a in serving})
        lanes |= set(readers[(value, model)])
    # A lane of items in flight only (its account's lanes are not wanted for new work) still has a reader,
    # which finds nothing planned and ends.
    for key in sorted(lanes):
        if not any(key in keyed for keyed in readers.values()):
            readers.setdefault((key[0], key[2]), []).append(key)
    return accounts, lanes, readers


def build_lanes(
    session: aiohttp.ClientSession,
    accounts: Mapping[str, Account],
    lane_keys: AbstractSet[LaneKey],
    budget: Budget,
    *,
    clock: Clock,
    base_url: str | None,
    base_urls: Mapping[str, str],
    query_qps: float,
    request_timeout_s: float,
    sync_timeout_s: float,
    backlog: int,
    shared: SharedParts | None = None,
) -> tuple[dict[LaneKey, Lane], dict[str, AsyncLimiter]]:
    """One client and one query limiter per account (scope), one lane per (account, model); the lanes by key,
    and the limiters by scope (the read allowance, for query, list and cancel, is the account's). ``shared``: what
    makes a lane's pacer and claims when its quota is shared with other workers (a fleet's), instead of its own."""
    scopes = {account or region for region, account, _ in lane_keys}
    limiters = {scope: even_limiter(query_qps, clock=clock) for scope in scopes}
    clients = {
        scope: WanClient(
            session,
            base_url=catalog.endpoint(accounts[scope].region, base_url=base_url, base_urls=base_urls),
            api_key=accounts[scope].key,
            request_timeout_s=request_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
        for scope in scopes
    }
    # The lanes of one model share one event: a reader waits for a place or a doubt on any of its lanes, which
    # may be of several regions (items allowed several).
    events: dict[str, asyncio.Event] = {}
    lanes = {}
    for region, account, model in sorted(lane_keys):
        scope = account or region
        offer = catalog.offer(region, model)
        if offer is None:
            raise ConfigError(f"{model} is not offered in {region}")
        offer = apply_quotas(offer, accounts[scope].quotas)
        changed = events.setdefault(model, asyncio.Event())
        capacity = offer.concurrency + backlog
        if shared is None:
            pacer, claims = Pacer(offer.submit_rps, clock=clock), Claims(capacity, budget, freed=changed)
        else:
            pacer, claims = shared(
                account=account,
                region=region,
                model=model,
                rate_per_s=offer.submit_rps,
                capacity=capacity,
                budget=budget,
                freed=changed,
            )
        lanes[(region, account, model)] = Lane(
            region=region,
            account=account,
            offer=offer,
            client=clients[scope],
            pacer=pacer,
            claims=claims,
            changed=changed,
        )
    return lanes, limiters


def account_figures(lanes: Iterable[Lane]) -> dict[str, Any]:
    """For the report, per account of a pool: this run's creates and its stopped lanes (nothing without a pool)."""
    figures: dict[str, dict[str, Any]] = {}
    for lane in lanes:
        if not lane.account:
            continue
        entry = figures.setdefault(lane.account, {"region": lane.region, "submitted": 0, "blocked": {}})
        entry["submitted"] += lane.submitted
        if lane.blocked:
            entry["blocked"][lane.model] = f"{lane.blocked.code}: {lane.blocked.message}"
    return {"accounts_this_run": figures} if figures else {}


def block_lanes(lanes: Iterable[Lane], lane: Lane, error: ApiError) -> None:
    """Stop ``lane`` for ``error``, and with it every lane of its account (its key) when the error is the
    account's (arrears, an invalid key: :data:`KEY_WIDE_CODES`); other accounts' lanes go on."""
    for other in lanes:
        affected = other is lane or (error.code in KEY_WIDE_CODES and other.scope == lane.scope)
        if affected and other.blocked is None:
            other.blocked = error
            log.error(
                "■ %s %s: submitting stopped: %s. %s",
                other.scope,
                other.model,
                error,
                error.advice,
                extra={
                    "event": "lane_stopped",
                    "region": other.region,
                    "account": other.account,
                    "model": other.model,
                    "code": error.code,
                },
            )
