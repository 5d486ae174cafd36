"""Accounts, their API keys and their quotas.

A key belongs to one account and one region. One simulator serves one region:
a key of another region is refused exactly like an unknown key (401
InvalidApiKey), as a cross-region call is on the real service. Quotas are per
account (summed over its keys) and per model; the catalog gives the defaults,
``SimConfig.quotas`` and each account's ``quotas`` override them (None =
unlimited).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from wanbatch import catalog
from wanbatch.sim import wire
from wanbatch.sim.config import ACCOUNT_REFUSALS, DEMO_ACCOUNT, DEMO_KEYS, AccountConfig, QuotaTable, SimConfig
from wanbatch.sim.quotas import Admission, SubmitGate, TokenBucket

__all__ = ["Accounts", "ApiKey", "key_id"]

READ_KINDS = ("query", "list", "cancel")


def key_id(key: str) -> str:
    """The key's public id (list bodies, billing log): derived from the key, never revealing it."""
    return str(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller."""

    account: str
    account_uid: str
    key_id: str
    region: str
    refusal: str = ""  #: the account's standing refusal of creates (ACCOUNT_REFUSALS), if any

    def refused(self) -> wire.SimError | None:
        """The error every create of this account gets (arrears and the like), or None."""
        if not self.refusal:
            return None
        status, message = ACCOUNT_REFUSALS[self.refusal]
        return wire.SimError(status, self.refusal, message)


class Accounts:
    """Who may call this simulator, and how much."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._quota_tables: dict[str, QuotaTable] = {}
        self._keys: dict[str, ApiKey] = {}
        for account in (AccountConfig(name=DEMO_ACCOUNT, keys=DEMO_KEYS), *config.accounts):
            uid = account.uid or str(int(hashlib.sha256(account.name.encode()).hexdigest()[:14], 16))
            self._quota_tables[account.name] = account.quotas
            for key, region in account.keys.items():
                self._keys[key] = ApiKey(account.name, uid, key_id(key), region, account.refusal)
        self._gates: dict[tuple[str, str], SubmitGate] = {}
        self._reads: dict[tuple[str, str], TokenBucket] = {}

    def keys_by_region(self) -> dict[str, list[str]]:
        """The known keys of each region (for the CLI banner)."""
        found: dict[str, list[str]] = {}
        for key, info in self._keys.items():
            found.setdefault(info.region, []).append(key)
        return found

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The caller of ``Authorization: Bearer <key>``, or 401 InvalidApiKey."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if not scheme or (scheme.lower() == "bearer" and not key.strip()):
            raise wire.SimError(401, "InvalidApiKey", wire.NO_API_KEY)
        found = self._keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if found is None or found.region != self._config.region:
            raise wire.SimError(401, "InvalidApiKey", wire.INVALID_API_KEY)
        return found

    def neighbour_key(self, caller: ApiKey) -> ApiKey:
        """A key of ``caller``'s account that no client holds: the one a simulated neighbour sends through."""
        return ApiKey(caller.account, caller.account_uid, key_id(f"{caller.account}/neighbour"), caller.region)

    def quota(self, account: str, model: catalog.Model, offer: catalog.Offer) -> tuple[float | None, int | None]:
        """(submit_rps, concurrency) of ``account`` for ``model``; None = unlimited."""
        values: dict[str, float | None] = {"submit_rps": offer.submit_rps, "concurrency": offer.concurrency}
        for table in (self._config.quotas, self._quota_tables.get(account, {})):
            for scope in ("*", model.name):
                values.update(table.get(scope, {}))
        concurrency = values["concurrency"]
        return values["submit_rps"], None if concurrency is None else int(concurrency)

    def admit_submit(self, caller: ApiKey, offer: catalog.Offer, now_s: float) -> Admission:
        gate = self._gates.get((caller.account, offer.model.name))
        if gate is None:
            rps, _ = self.quota(caller.account, offer.model, offer)
            gate = SubmitGate(rps, burst_idle_s=self._config.burst_idle_s, burst_allowance=self._config.burst_allowance)
            self._gates[(caller.account, offer.model.name)] = gate
        return gate.admit(now_s)

    def admit_read(self, caller: ApiKey, kind: str, now_s: float) -> bool:
        """One query, list or cancel request against the account's per-second allowance for that kind."""
        bucket = self._reads.get((caller.account, kind))
        if bucket is None:
            bucket = self._reads[(caller.account, kind)] = TokenBucket(self._config.query_qps)
        return bucket.take(now_s)

    def throttled(self, admission: Admission | None = None) -> wire.SimError:
        """The 429 for a refused request (RateQuota unless it was a burst)."""
        if admission is Admission.BURST:
            return wire.SimError(429, "Throttling.BurstRate", wire.BURST_RATE)
        return wire.SimError(429, "Throttling.RateQuota", wire.RATE_QUOTA)
