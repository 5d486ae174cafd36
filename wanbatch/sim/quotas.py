"""The account quotas of the simulated service, all counted in simulated time.

Two limits guard the submit endpoints, per account and model:

- the **rate** (``submit_rps``): a token bucket holding at most one second's
  allowance and refilling continuously, so no one-second window takes more
  than ``submit_rps`` requests (a fractional rate still allows one at a time).
  A request beyond it gets 429 ``Throttling.RateQuota``.
- a **burst from idle**: after ``burst_idle_s`` without a submit, only
  ``burst_allowance`` submits are accepted during the next second, even when
  the rate would allow more; the rest get 429 ``Throttling.BurstRate``. This is
  the service's "sudden spike below the limit"; it matters only for quotas
  above the allowance (wan2.5, and wan2.6 outside Beijing).

Query, list and cancel each have their own bucket per account (20 per second).
Concurrency is not a rejection: extra tasks wait PENDING (see ``tasks.Lane``).
"""

from __future__ import annotations

import enum

__all__ = ["Admission", "SubmitGate", "TokenBucket"]


class Admission(enum.StrEnum):
    """What a quota says about one request."""

    #: within every limit
    OK = "ok"
    #: over the per-second rate: 429 Throttling.RateQuota
    RATE = "Throttling.RateQuota"
    #: a spike right after an idle period: 429 Throttling.BurstRate
    BURST = "Throttling.BurstRate"


class TokenBucket:
    """At most ``rate_per_s`` requests in any second; None means unlimited."""

    def __init__(self, rate_per_s: float | None) -> None:
        self.rate_per_s = rate_per_s
        self._capacity = max(1.0, rate_per_s or 0.0)
        self._tokens = self._capacity
        self._updated_s: float | None = None

    def take(self, now_s: float) -> bool:
        """Spend one request's token at ``now_s``; False when none is left."""
        if self.rate_per_s is None:
            return True
        if self._updated_s is not None and now_s > self._updated_s:
            self._tokens = min(self._capacity, self._tokens + (now_s - self._updated_s) * self.rate_per_s)
        self._updated_s = now_s if self._updated_s is None else max(self._updated_s, now_s)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class SubmitGate:
    """The submit quota of one account for one model: rate, then burst after idle."""

    def __init__(self, rate_per_s: float | None, *, burst_idle_s: float | None, burst_allowance: int) -> None:
        self._bucket = TokenBucket(rate_per_s)
        # Unlimited quotas have no burst protection either: unlimited means unlimited.
        self._burst_idle_s = burst_idle_s if rate_per_s is not None else None
        self._burst_allowance = burst_allowance
        self._last_accepted_s: float | None = None
        self._burst_started_s: float | None = None
        self._burst_count = 0

    def admit(self, now_s: float) -> Admission:
        """Decide on one submit at ``now_s`` and, when accepted, count it."""
        in_burst = self._in_burst_window(now_s)
        if in_burst and self._burst_count >= self._burst_allowance:
            return Admission.BURST
        if not self._bucket.take(now_s):
            return Admission.RATE
        if in_burst:
            self._burst_count += 1
        self._last_accepted_s = now_s
        return Admission.OK

    def _in_burst_window(self, now_s: float) -> bool:
        """Whether ``now_s`` falls in the first second after an idle period (opening one if it starts now)."""
        if self._burst_idle_s is None:
            return False
        idle = self._last_accepted_s is None or now_s - self._last_accepted_s >= self._burst_idle_s
        if idle:
            self._burst_started_s, self._burst_count = now_s, 0
        return self._burst_started_s is not None and now_s - self._burst_started_s < 1.0
