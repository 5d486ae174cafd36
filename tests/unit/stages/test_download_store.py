"""Saving paid images into object storage that is unkind: a real S3 server (SeaweedFS) behind a loopback proxy.

The proxy makes the store refuse for a while (503), refuse our credentials
(403), or take an object and tell us it failed (500 after the commit). The
image's bytes are held while the store refuses, not fetched again; a store
that refuses our credentials stops saving and leaves the images pending for
a later run; an object the store took is recorded from the store, not
uploaded twice, even once its URL has died.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from helpers.engine import engine_for, run_stopped_when
from helpers.manifest import load_manifest, numbered
from helpers.seaweed import Proxy, SeaweedServer
from helpers.unkind import StorageRefusals, sim_with
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ImageState
from wanbatch.outputs.stores import open_store
from wanbatch.stages.download import DownloadConfig

SPEED = 200.0
QUICK_RETRIES = DownloadConfig(retry_base_s=1.0, retry_max_s=20.0)


@pytest.fixture
def via_proxy(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    """The S3 variables pointed at the proxy, so that stores opened in the test go through it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    return proxy


def image_put(method: str, path: str) -> bool:
    return method == "PUT" and "/images/" in path


def puts_by_status(proxy: Proxy) -> Counter:
    return Counter(status for method, path, status in proxy.answered if image_put(method, path))


def refuse_first(count: int, status: int):
    """A proxy rule: the first ``count`` image uploads answered ``status`` without reaching the server."""
    refused = []

    def rule(method: str, path: str) -> int | None:
        if image_put(method, path) and len(refused) < count:
            refused.append(path)
            return status
        return None

    return rule


async def test_an_image_the_store_refuses_for_a_while_is_saved_without_fetching_it_again(
    via_proxy: Proxy, bucket: str, tmp_path: Path
) -> None:
    """The first six image uploads answered 503: each image is retried with its bytes held, and saved once the
    store takes it; every image's URL was fetched exactly once."""
    via_proxy.refuse = refuse_first(6, 503)
    gets = StorageRefusals({}, times=0)
    prompts = numbered(3, "a teapot")
    async with sim_with([gets.middleware], speed=SPEED, durations=2.0) as sim, open_store(f"s3://{bucket}/r") as store:
        engine = engine_for(sim, tmp_path / "state", store=store, download=QUICK_RETRIES, gallery=False)
        report = await engine.run(load_manifest(tmp_path, prompts=prompts, n=2))
    assert report["images"]["saved"] == 6, report["images"]
    assert puts_by_status(via_proxy) == {503: 6, 200: 6}
    assert {prompt: len(gets.gets[prompt]) for prompt in prompts} == dict.fromkeys(prompts, 2)  # n=2: two URLs


async def test_a_store_that_refuses_our_credentials_stops_saving_and_a_later_run_saves_everything(
    via_proxy: Proxy, bucket: str, tmp_path: Path
) -> None:
    """Image uploads answered 403 AccessDenied (credentials withdrawn mid-run): saving stops with the reason and so
    does submitting (nothing more is paid for only to wait), the images paid for stay pending while their URLs
    live, nothing is written off; the next run, the store working again, makes the rest and saves them all, each
    paid once."""
    via_proxy.refuse = lambda method, path: 403 if image_put(method, path) else None
    manifest = load_manifest(tmp_path, prompts=numbered(12, "a lamp"))
    async with sim_with([], speed=SPEED, durations=2.0) as sim:
        async with open_store(f"s3://{bucket}/r") as store:
            first = await engine_for(sim, tmp_path / "state", store=store, gallery=False).run(manifest)
        billed = len(sim.billing)
        assert 0 < billed < 12 and first["items_in_manifest"].get("planned", 0) > 0, first["items_in_manifest"]
        assert first["images"] == {"pending": billed, "saved": 0, "failed": 0, "expired": 0}
        with Ledger.open(tmp_path / "state", clock=sim.clock, create=False) as ledger:
            pending = list(ledger.iter_images([ImageState.pending]))
        assert {image.error_code for image in pending} == {"StoreRefused"}
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in pending[0].error_message
        assert set(puts_by_status(via_proxy)) == {403}

        via_proxy.refuse = lambda method, path: None
        async with open_store(f"s3://{bucket}/r") as store:
            second = await engine_for(sim, tmp_path / "state", store=store, gallery=False).run(manifest)
    assert second["images"]["saved"] == 12 and len(sim.billing) == 12
    assert len({record["fingerprint"] for record in sim.billing}) == 12


async def test_an_object_the_store_took_is_recorded_from_it_even_after_the_url_died(
    via_proxy: Proxy, seaweed: SeaweedServer, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store takes each upload but the client hears 500; the bytes are not held (a cap of 0) and the next
    try comes after the URL has died: the image is recorded from the store (its owner and sha256 on the object),
    neither uploaded again nor written off."""
    caplog.set_level(logging.INFO, logger="wanbatch")
    via_proxy.on_answer = lambda method, path, status: 500 if image_put(method, path) and status == 200 else None
    config = DownloadConfig(retry_base_s=600.0, retry_max_s=600.0, max_held_bytes=0)
    async with (
        sim_with([], speed=SPEED, durations=2.0, url_ttl_s=120.0) as sim,
        open_store(f"s3://{bucket}/r") as store,
    ):
        engine = engine_for(sim, tmp_path / "state", store=store, download=config, gallery=False)
        report = await engine.run(load_manifest(tmp_path, prompts=numbered(2, "a clock")))
        with Ledger.open(tmp_path / "state", clock=sim.clock, create=False) as ledger:
            saved = list(ledger.iter_images([ImageState.saved]))
    assert report["images"] == {"pending": 0, "saved": 2, "failed": 0, "expired": 0}
    healed = [r.getMessage() for r in caplog.records if "recorded, though its URL has died" in r.getMessage()]
    assert sorted(message.split()[1] for message in healed) == sorted(image.file_name for image in saved)
    client = seaweed.client()
    for image in saved:
        head = client.head_object(Bucket=bucket, Key=f"r/{image.file_name}")
        assert head["Metadata"]["sha256"] == image.sha256 and head["ContentLength"] == image.size_bytes


async def test_images_whose_names_meet_are_each_stored_under_a_name_of_their_own(
    s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """Six items whose pattern gives every image the same name, saved by eight workers at once: one image takes
    the name, each other its other name; six objects in the bucket, each the image the ledger records there."""
    manifest = load_manifest(tmp_path, prompts=numbered(6, "a bowl"), output="{model}.png")
    async with sim_with([], speed=SPEED, durations=2.0) as sim, open_store(f"s3://{bucket}/r") as store:
        report = await engine_for(sim, tmp_path / "state", store=store, gallery=False).run(manifest)
        with Ledger.open(tmp_path / "state", clock=sim.clock, create=False) as ledger:
            saved = list(ledger.iter_images([ImageState.saved]))
    assert report["images"]["saved"] == 6 == len(saved)
    assert len({image.file_name for image in saved}) == 6, sorted(image.file_name for image in saved)
    client = s3_env.client()
    for image in saved:
        head = client.head_object(Bucket=bucket, Key=f"r/{image.file_name}")
        assert head["Metadata"]["sha256"] == image.sha256, image.file_name


async def test_an_image_whose_url_died_while_the_store_was_down_stays_pending_and_is_recorded_later(
    via_proxy: Proxy, bucket: str, tmp_path: Path
) -> None:
    """The store takes each upload but the client hears 500, then stops answering HEADs; the next try comes after
    the URL has died, when the store cannot say whether it holds the image: the image stays pending with the
    reason, not written off. The next run, the store answering, records it from the store: no second upload."""
    taken: list[str] = []

    def hide_the_upload(method: str, path: str, status: int) -> int | None:
        if image_put(method, path) and status == 200:
            taken.append(path)
            return 500
        return None

    via_proxy.on_answer = hide_the_upload
    # Only the HEADs of what the store took: an image whose first HEAD came after another's upload is uploaded too.
    via_proxy.refuse = lambda method, path: 503 if method == "HEAD" and path in taken else None
    config = DownloadConfig(retry_base_s=600.0, retry_max_s=600.0, max_held_bytes=0)
    manifest = load_manifest(tmp_path, prompts=numbered(2, "a kettle"))
    async with sim_with([], speed=SPEED, durations=2.0, url_ttl_s=120.0) as sim:
        async with open_store(f"s3://{bucket}/r") as store:
            engine = engine_for(sim, tmp_path / "state", store=store, download=config, gallery=False)
            first = await engine.run(manifest)
        assert first["images"] == {"pending": 2, "saved": 0, "failed": 0, "expired": 0}, first["images"]
        with Ledger.open(tmp_path / "state", clock=sim.clock, create=False) as ledger:
            pending = list(ledger.iter_images([ImageState.pending]))
        assert all("Service Unavailable" in image.error_message for image in pending), pending

        via_proxy.on_answer, via_proxy.refuse = lambda method, path, status: None, lambda method, path: None
        async with open_store(f"s3://{bucket}/r") as store:
            engine = engine_for(sim, tmp_path / "state", store=store, download=config, gallery=False)
            second = await engine.run(manifest)
    assert second["images"] == {"pending": 0, "saved": 2, "failed": 0, "expired": 0}, second["images"]
    assert sorted(taken) == sorted(path for method, path, status in via_proxy.answered if image_put(method, path))
    assert len(sim.billing) == 2


async def test_a_stop_while_the_store_refuses_ends_without_trying_the_waiting_images_again(
    via_proxy: Proxy, bucket: str, tmp_path: Path
) -> None:
    """Every image upload answered 503, and the user stops the run once each image has failed once: the images
    waiting for their retry are left pending at once, not tried again and again while the others' tries are under
    way (each try is at most the S3 client's two requests)."""
    via_proxy.refuse = lambda method, path: 503 if image_put(method, path) else None
    images = 3
    at_stop: list[int] = []

    def each_failed_once() -> bool:
        failed = {path for method, path, status in via_proxy.answered if image_put(method, path)}
        if len(failed) == images and not at_stop:
            at_stop.append(sum(puts_by_status(via_proxy).values()))
        return bool(at_stop)

    async with sim_with([], speed=SPEED, durations=2.0) as sim, open_store(f"s3://{bucket}/r") as store:
        engine = engine_for(sim, tmp_path / "state", store=store, gallery=False)
        report = await run_stopped_when(
            engine, load_manifest(tmp_path, prompts=numbered(images, "a bell")), each_failed_once
        )
    assert report["images"] == {"pending": images, "saved": 0, "failed": 0, "expired": 0}, report["images"]
    assert sum(puts_by_status(via_proxy).values()) - at_stop[0] <= 2 * images, puts_by_status(via_proxy)


async def test_an_object_already_under_an_images_name_is_left_alone(
    s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """The bucket holds a truncated PNG under the name an image is to take: the HEAD tells it from the image, so
    it is neither recorded as the image nor replaced; the image is stored whole under its other name."""
    junk = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    s3_env.client().put_object(Bucket=bucket, Key="r/images/fixed.png", Body=junk)
    async with sim_with([], speed=SPEED, durations=2.0) as sim, open_store(f"s3://{bucket}/r") as store:
        engine = engine_for(sim, tmp_path / "state", store=store, gallery=False)
        report = await engine.run(load_manifest(tmp_path, prompts=["a bowl"], output="fixed.png"))
        with Ledger.open(tmp_path / "state", clock=sim.clock, create=False) as ledger:
            (saved,) = ledger.iter_images([ImageState.saved])
    assert report["images"]["saved"] == 1 and saved.file_name == f"images/fixed-{saved.item_id}-0.png"
    client = s3_env.client()
    assert client.get_object(Bucket=bucket, Key="r/images/fixed.png")["Body"].read() == junk
    head = client.head_object(Bucket=bucket, Key=f"r/{saved.file_name}")
    assert head["Metadata"]["sha256"] == saved.sha256 and head["ContentLength"] == saved.size_bytes


async def test_an_earlier_tasks_image_of_the_same_item_is_not_taken_for_a_lost_one(
    via_proxy: Proxy, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """A run with a state folder of its own stores an item's image in the bucket; a second run of the same item
    into the same --out with another state folder pays for a new task, whose image the store refuses until its
    URL dies: the first task's image under its name is not recorded as the new one (another task's image, seed
    and all); the new one is written off as expired, the first left as it was."""
    manifest = load_manifest(tmp_path, prompts=["a bowl"])
    config = DownloadConfig(retry_base_s=600.0, retry_max_s=600.0, max_held_bytes=0)
    async with sim_with([], speed=SPEED, durations=2.0, url_ttl_s=120.0) as sim:
        async with open_store(f"s3://{bucket}/r") as store:
            first = await engine_for(sim, tmp_path / "one", store=store, gallery=False).run(manifest)
        assert first["images"]["saved"] == 1
        via_proxy.refuse = lambda method, path: 503 if image_put(method, path) else None
        async with open_store(f"s3://{bucket}/r") as store:
            engine = engine_for(sim, tmp_path / "two", store=store, download=config, gallery=False)
            second = await engine.run(manifest)
        with Ledger.open(tmp_path / "one", clock=sim.clock, create=False) as ledger:
            (kept,) = ledger.iter_images([ImageState.saved])
    assert second["images"] == {"pending": 0, "saved": 0, "failed": 0, "expired": 1}, second["images"]
    assert len(sim.billing) == 2
    head = seaweed.client().head_object(Bucket=bucket, Key=f"r/{kept.file_name}")
    assert head["Metadata"]["sha256"] == kept.sha256
