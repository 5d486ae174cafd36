"""The submit pacer's spacing: the quota's interval plus a wall-clock guard that never outgrows the quota."""

from __future__ import annotations

import pytest

from wanbatch import catalog
from wanbatch.clock import ScaledClock
from wanbatch.service.pacing import Pacer


@pytest.mark.parametrize("offer", sorted(catalog._OFFERS.values(), key=lambda o: (o.region, o.api_name)))
def test_every_catalog_quota_keeps_the_whole_guard_up_to_speed_100(offer):
    """A real quota, even on the benchmarks' fastest clock, is spaced by its interval plus the full guard."""
    pacer = Pacer(offer.submit_rps, clock=ScaledClock(speed=100.0), guard_s=0.01)
    assert pacer.interval_s == pytest.approx(1 / (offer.submit_rps * 0.9 * 100.0) + 0.01)


def test_an_unlimited_quota_is_not_held_to_the_guard():
    """A quota far above what a process can send is spaced by its own tiny interval, not 10 ms a create."""
    pacer = Pacer(1e6, clock=ScaledClock(speed=100.0), guard_s=0.01)
    assert pacer.interval_s < 1e-6
