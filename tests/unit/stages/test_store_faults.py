"""Runs into a bucket under random fault schedules of the store, seeded: the money rules checked from the
simulator's billing log and the bucket's contents, whatever the schedule.

Each schedule refuses some image uploads with 503 (they never reach the store), hides some uploads the store
took behind a 500 or a wrong ETag (the client is told they failed), and may stop the run dead just after the
store took an image, before the run heard of it (its task cancelled there: no commit follows). A second run
with the store working then finishes. Whatever happened: no request billed twice, every billed image whole in
the bucket and in its ``metadata.jsonl``, every image stored once (an object a HEAD found is recorded, not
uploaded again), nothing left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from pathlib import Path

import pytest

from helpers.engine import engine_for
from helpers.manifest import load_manifest, numbered
from helpers.outputs import audit
from helpers.seaweed import Proxy, SeaweedServer
from helpers.unkind import sim_with
from wanbatch.outputs.stores import open_store
from wanbatch.stages.download import DownloadConfig

SPEED = 200.0
QUICK_RETRIES = DownloadConfig(retry_base_s=1.0, retry_max_s=10.0)
ITEMS = 5
#: Schedules with every kind of fault, the stop among them (30 seeds were run once when this was written).
SEEDS = [9, 16, 23, 25]


def image_put(method: str, path: str) -> bool:
    return method == "PUT" and "/images/" in path


class Schedule:
    """One seed's faults, by the order of image uploads: the n-th refused, hidden, or the run stopped there."""

    def __init__(self, seed: int, proxy: Proxy) -> None:
        rng = random.Random(seed)
        self.refused = set(rng.sample(range(12), rng.randint(0, 4)))  #: answered 503, never reaching the store
        self.hidden = set(rng.sample(range(12), rng.randint(0, 3)))  #: taken, the client hears 500
        self.wrong_etag = set(rng.sample(range(12), rng.randint(0, 2)))  #: taken, the client hears another ETag
        self.stop_at = rng.choice([None, rng.randrange(ITEMS)])  #: taken, and the run stops dead before it hears
        self.proxy, self.tried, self.taken, self.run = proxy, 0, 0, None
        self.etag_next = False
        proxy.refuse, proxy.on_answer = self._refuse, self._on_answer
        proxy.rewrite = self._rewrite

    def _refuse(self, method: str, path: str) -> int | None:
        if not image_put(method, path):
            return None
        self.tried += 1
        return 503 if self.tried - 1 in self.refused else None

    def _on_answer(self, method: str, path: str, status: int) -> int | None:
        if not (image_put(method, path) and status == 200):
            return None
        taken, self.taken = self.taken, self.taken + 1
        if taken == self.stop_at and self.run is not None:
            self.run.cancel()  # a kill: the run hears nothing more, its commit never comes
            return 500
        if taken in self.hidden:
            return 500
        self.etag_next = taken in self.wrong_etag
        return None

    def _rewrite(self, headers: dict[str, str]) -> None:
        if self.etag_next and "ETag" in headers:
            headers["ETag"] = '"00000000000000000000000000000000"'
        self.etag_next = False

    def off(self) -> None:
        self.proxy.refuse = lambda method, path: None
        self.proxy.on_answer = lambda method, path, status: None
        self.proxy.rewrite = lambda headers: None


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_store_faults_lose_nothing_and_pay_nothing_twice(
    proxy: Proxy, seaweed: SeaweedServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Under this seed's faults and a second run without them: every billed image once, whole in the bucket and
    in its metadata.jsonl; each image stored by one upload the store took; every item saved."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    schedule = Schedule(seed, proxy)
    manifest = load_manifest(tmp_path, prompts=numbered(ITEMS, f"a lamp {seed}"))
    state = tmp_path / "state"
    async with sim_with([], speed=SPEED, durations=2.0) as sim:
        async with open_store(f"s3://{bucket}/r") as store:
            engine = engine_for(sim, state, store=store, download=QUICK_RETRIES, gallery=False)
            schedule.run = asyncio.create_task(engine.run(manifest))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(schedule.run, 60)
        schedule.off()
        async with open_store(f"s3://{bucket}/r") as store:
            engine = engine_for(sim, state, store=store, download=QUICK_RETRIES, gallery=False)
            report = await asyncio.wait_for(engine.run(manifest), 60)
        billing = sim.billing
    assert report["images"] == {"pending": 0, "saved": ITEMS, "failed": 0, "expired": 0}, report["images"]
    mirror = tmp_path / "bucket"
    seaweed.download(bucket, "r", mirror)
    result = audit(state, billing, outputs=mirror)
    assert result.clean and result.saved == len(billing) == ITEMS, result.summary()
    stored = Counter(path for method, path, status in proxy.answered if image_put(method, path) and status == 200)
    assert len(stored) == ITEMS, stored
    found: set[str] = set()  # images a HEAD found in the store: never uploaded again
    for method, path, status in proxy.answered:
        if method == "HEAD" and status == 200:
            found.add(path)
        assert not (image_put(method, path) and path in found), f"{path} uploaded again after a HEAD found it"
