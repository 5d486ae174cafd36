"""How a fleet worker keeps in touch: its lease and heartbeat (no database driver needed to name them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FleetConfig"]

_HEARTBEAT_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    #: wall seconds without a heartbeat after which a worker is dead and its items are taken over; longer than
    #: any request is held (the client's timeouts), so that a worker that is only slow is not taken for dead
    lease_s: float = 90.0
    heartbeat_s: float = _HEARTBEAT_S  #: wall seconds between heartbeats, and between looks for dead workers

    @classmethod
    def for_lease(cls, lease_s: float) -> FleetConfig:
        """A lease of ``lease_s`` with heartbeats often enough that one or two lost never lose it."""
        return cls(lease_s=lease_s, heartbeat_s=min(_HEARTBEAT_S, lease_s / 5))
