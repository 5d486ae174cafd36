"""Output stores: a bucket on a real S3 server (SeaweedFS over loopback) and a local folder, one contract.

An object counts as stored only when the store proved it holds all of it;
``stat`` tells a held object from a changed one; a missing bucket or refused
credentials is a configuration error with no secret in it; a store that is
down is a retryable error and works again once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.seaweed import ACCESS_KEY, DOMAIN, SECRET_KEY, Proxy, SeaweedServer
from wanbatch.errors import ConfigError, StoreConfigError, StoreError
from wanbatch.outputs.stores import LocalStore, S3Store, Store, StoreConfig, open_store

BLOB = os.urandom(1_500_000)  #: the size of one of the service's PNGs


@pytest.fixture
async def s3_store(s3_env: SeaweedServer, bucket: str) -> AsyncIterator[Store]:
    """A store on a fresh bucket, under a prefix, as ``--out s3://bucket/run`` opens it."""
    async with open_store(f"s3://{bucket}/run") as store:
        yield store


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A store on a temporary folder, as ``--out DIR`` opens it."""
    async with open_store(str(tmp_path / "out")) as store:
        yield store


@pytest.fixture(params=["s3", "local"])
def any_store(request: pytest.FixtureRequest) -> Store:
    """Each kind of store in turn: the contract is the same."""
    return request.getfixturevalue(f"{request.param}_store")


# ── the contract, on both stores ──────────────────────────────────────────────────────────────────


async def test_put_verified_then_stat(any_store: Store) -> None:
    """What put_verified returns is what stat later finds: size, MD5 and sha256; an absent key is None."""
    stored = await any_store.put_verified("images/0001-a.png", BLOB)
    assert stored.size_bytes == len(BLOB) and stored.matches(BLOB)
    found = await any_store.stat("images/0001-a.png")
    assert found == stored
    assert await any_store.stat("images/0002-b.png") is None


async def test_stat_tells_a_changed_object(any_store: Store, request: pytest.FixtureRequest) -> None:
    """An object replaced behind the store's back (same size, other bytes) does not match what was stored."""
    await any_store.put_verified("images/x.png", BLOB)
    other = bytes([BLOB[0] ^ 1]) + BLOB[1:]
    if isinstance(any_store, S3Store):
        request.getfixturevalue("seaweed").client().put_object(
            Bucket=any_store.bucket, Key="run/images/x.png", Body=other
        )
    else:
        Path(any_store.url_for("images/x.png")).write_bytes(other)
    found = await any_store.stat("images/x.png")
    assert found is not None and found.size_bytes == len(BLOB)
    assert not found.matches(BLOB) and found.matches(other)


async def test_write_text_replaces_whole(any_store: Store) -> None:
    """write_text leaves the new text, whole, in place of the old."""
    await any_store.write_text("report.json", '{"v": 1}')
    stored = await any_store.write_text("report.json", '{"v": 2, "é": true}')
    found = await any_store.stat("report.json")
    assert found == stored and found.matches('{"v": 2, "é": true}'.encode())


async def test_keys_stay_inside(local_store: Store) -> None:
    """A key that could leave the store (.., absolute, backslash, empty names) is refused before any write."""
    for key in ("../x.png", "/x.png", "a//b.png", "a\\b.png", "", "a/./b.png"):
        with pytest.raises(ValueError, match="not a store key"):
            await local_store.put_verified(key, b"x")


# ── the bucket ────────────────────────────────────────────────────────────────────────────────────


async def test_s3_object_carries_type_and_sha256(s3_store: S3Store, seaweed: SeaweedServer) -> None:
    """The uploaded object has our sha256 as metadata and a content type (the gallery is served from the bucket)."""
    stored = await s3_store.put_verified("gallery.html", b"<html></html>")
    head = seaweed.client().head_object(Bucket=s3_store.bucket, Key="run/gallery.html")
    assert head["ContentType"].startswith("text/html")
    assert head["Metadata"]["sha256"] == stored.sha256
    assert s3_store.url_for("gallery.html") == f"s3://{s3_store.bucket}/run/gallery.html"


async def test_wrong_etag_is_not_accepted(proxy: Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose answer's ETag is not our MD5 has not proved the object: a retryable error, not a save."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.rewrite = lambda headers: headers.update(ETag='"0123456789abcdef0123456789abcdef"')
    async with open_store(f"s3://{bucket}/run") as store:
        with pytest.raises(StoreError, match="not counted as saved") as caught:
            await store.put_verified("images/a.png", BLOB)
    assert caught.value.retryable and not isinstance(caught.value, ConfigError)


async def test_a_store_whose_etags_prove_nothing_is_refused_at_check(
    proxy: Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that answers every upload with an ETag that is not its MD5 (as an SSE-KMS bucket does) is refused at
    the start, saying why and what to do, rather than taken as down for a while: no upload there could be proved."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    proxy.rewrite = lambda headers: headers.update(ETag='"0123456789abcdef0123456789abcdef"')
    async with open_store(f"s3://{bucket}/run") as store:
        with pytest.raises(StoreConfigError, match="SSE-KMS"):
            await store.check()


async def test_altered_body_is_refused_by_the_store(
    proxy: Proxy,
    bucket: str,
    seaweed: SeaweedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body changed on the way is refused by the store (Content-MD5): nothing is stored, the error is retryable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    altered: list[int] = []

    def flip_last_byte(body: bytes) -> bytes:
        if len(body) != len(BLOB):
            return body
        altered.append(len(body))
        return body[:-1] + bytes([body[-1] ^ 1])

    proxy.alter_body = flip_last_byte
    async with open_store(f"s3://{bucket}/run") as store:
        with pytest.raises(StoreError) as caught:
            await store.put_verified("images/a.png", BLOB)
    assert altered and caught.value.retryable and not isinstance(caught.value, ConfigError)
    assert seaweed.client().list_objects_v2(Bucket=bucket, Prefix="run/images/").get("KeyCount", 0) == 0


async def test_missing_bucket_at_check(s3_env: SeaweedServer) -> None:
    """check() on a bucket that does not exist names the bucket and what to do, and is a configuration error."""
    async with open_store("s3://no-such-bucket-here/run") as store:
        with pytest.raises(StoreConfigError, match=r"bucket no-such-bucket-here does not exist.*create it") as caught:
            await store.check()
    assert isinstance(caught.value, ConfigError) and not caught.value.retryable


async def test_wrong_credentials_at_check(
    s3_env: SeaweedServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong secret is a configuration error that says what to check, with neither key nor secret in any output."""
    wrong = "not-the-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    caplog.set_level(logging.DEBUG, logger="wanbatch")
    async with open_store(f"s3://{bucket}/run") as store:
        with pytest.raises(StoreConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as caught:
            await store.check()
    text = f"{caught.value!s} {caught.value!r} {caplog.text}"
    assert bucket in str(caught.value)
    for secret in (wrong, SECRET_KEY, ACCESS_KEY):
        assert secret not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no traceback shows the original


async def test_no_credentials_at_all_is_a_configuration_error(
    s3_env: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials anywhere (the S3 client finds none to sign with): a configuration error saying which variables
    to set, not a store that is down for a while (a run would be told to try again once the store answers)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with open_store(f"s3://{bucket}/run") as store:
        with pytest.raises(StoreConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            await store.check()


async def test_check_passes_and_proves_a_write(s3_store: S3Store, seaweed: SeaweedServer) -> None:
    """check() on a good bucket passes by writing its small proof object under the prefix."""
    await s3_store.check()
    head = seaweed.client().head_object(Bucket=s3_store.bucket, Key="run/.wanbatch/write-check")
    assert head["ContentLength"] == len(b"wanbatch")


async def test_server_stopped_then_restarted(s3_store: S3Store, seaweed: SeaweedServer) -> None:
    """While the server is down a put fails retryably; once it is back the same put succeeds and nothing is lost."""
    first = await s3_store.put_verified("images/1.png", BLOB)
    seaweed.stop()
    try:
        with pytest.raises(StoreError) as caught:
            await s3_store.put_verified("images/2.png", BLOB)
        assert caught.value.retryable and not isinstance(caught.value, ConfigError)
    finally:
        seaweed.start()
    second = await s3_store.put_verified("images/2.png", BLOB)
    assert await s3_store.stat("images/1.png") == first
    assert await s3_store.stat("images/2.png") == second


async def test_concurrency_is_bounded(proxy: Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No more requests are in flight than the store's max_concurrency, however many puts are asked at once."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    async with open_store(f"s3://{bucket}/run", config=StoreConfig(max_concurrency=3)) as store:
        await asyncio.gather(*(store.put_verified(f"images/{n}.png", BLOB[:50_000]) for n in range(24)))
    assert 1 < proxy.most_in_flight <= 3


async def test_virtual_hosted_addressing(proxy: Proxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With virtual-hosted addressing (Alibaba OSS's S3 endpoint needs it) the bucket travels in the host name."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{DOMAIN}:{proxy.url.rsplit(':', 1)[1]}")
    config = StoreConfig(addressing_style="virtual")
    store = open_store(f"s3://{bucket}/run", config=config)
    assert isinstance(store, S3Store)
    store.fs.config_kwargs["proxies"] = {"http": proxy.url}
    async with store:
        stored = await store.put_verified("images/v.png", BLOB)
        assert await store.stat("images/v.png") == stored
    assert proxy.hosts and all(host.startswith(f"{bucket}.{DOMAIN}") for host in proxy.hosts)


async def test_oss_endpoint_gets_virtual_hosted_addressing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Alibaba OSS endpoint (``*.aliyuncs.com``) is given virtual-hosted addressing unless told otherwise."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.oss-cn-beijing.aliyuncs.com")
    store = open_store("s3://bucket/run")
    assert isinstance(store, S3Store)
    assert store.fs.config_kwargs["s3"] == {"addressing_style": "virtual"}
    assert store.endpoint == "https://s3.oss-cn-beijing.aliyuncs.com"
    path_style = open_store("s3://bucket/run", config=StoreConfig(addressing_style="path"))
    assert path_style.fs.config_kwargs["s3"] == {"addressing_style": "path"}


# ── the folder ────────────────────────────────────────────────────────────────────────────────────


async def test_local_write_is_whole_or_nothing(local_store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before its rename leaves the old file as it was and no partial file behind."""
    await local_store.write_text("metadata.jsonl", "old\n")

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError, match=r"cannot write metadata\.jsonl") as caught:
        await local_store.write_text("metadata.jsonl", "new\n" * 1000)
    assert caught.value.retryable
    monkeypatch.undo()
    folder = Path(local_store.location)
    assert (folder / "metadata.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl"]


async def test_local_check_refuses_an_unusable_folder(tmp_path: Path) -> None:
    """check() on a folder that cannot be made (a file is in the way) is a configuration error naming it."""
    (tmp_path / "taken").write_text("a file")
    async with open_store(tmp_path / "taken" / "out") as store:
        with pytest.raises(StoreConfigError, match="cannot write to the output folder"):
            await store.check()
    async with open_store(tmp_path / "fine") as store:
        await store.check()
    assert (tmp_path / "fine").is_dir() and not any((tmp_path / "fine").iterdir())


# ── opening a store from --out ────────────────────────────────────────────────────────────────────


def test_open_store_by_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain paths and file:// are folders, s3:// a bucket; oss:// without ossfs and other schemes say what to do."""
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").location == str(tmp_path)
    s3 = open_store("s3://bucket/a/b/")
    assert isinstance(s3, S3Store) and s3.location == "s3://bucket/a/b" and s3.bucket == "bucket"
    with pytest.raises(ConfigError, match="name the bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ConfigError, match="unsupported scheme gs://"):
        open_store("gs://bucket/x")
    monkeypatch.setitem(sys.modules, "ossfs", None)
    with pytest.raises(ConfigError, match=r"wanbatch\[oss\]"):
        open_store("oss://bucket/x")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(ConfigError, match=r"wanbatch\[s3\]"):
        open_store("s3://bucket/x")


def test_an_out_with_credentials_or_a_query_in_it_is_refused_without_echoing_it(s3_env: SeaweedServer) -> None:
    """--out with a user and password before the bucket is refused, and the message holds neither (it is printed,
    and a store's location names the state folder); a '?' or '#', which a URL would drop from the prefix, and
    empty or dot parts, which a store may read as another prefix, are refused rather than mean another place."""
    with pytest.raises(ConfigError) as refused:
        open_store("s3://AKIDEXAMPLE0001:very-secret-value@bucket/run")
    assert "very-secret-value" not in str(refused.value) and "AKIDEXAMPLE0001" not in str(refused.value)
    assert "credentials" in str(refused.value)
    for out in ("s3://bucket/run#2", "s3://bucket/run?v=2", "s3://bucket/a//b", "s3://bucket/a/../b", "s3://b:1/x"):
        with pytest.raises(ConfigError, match="--out"):
            open_store(out)


async def test_a_prefix_with_odd_characters_holds_its_objects_under_it_as_written(
    s3_env: SeaweedServer, bucket: str
) -> None:
    """A prefix with a space, a plus, an equals sign, a percent escape and a letter outside ASCII: the objects are
    stored under that very prefix, and stat and read find them there."""
    prefix = "runs/a b+c=é%41~"
    async with open_store(f"s3://{bucket}/{prefix}") as store:
        await store.check()
        stored = await store.put_verified("images/x.png", BLOB)
        assert await store.stat("images/x.png") == stored
        assert await store.read("images/x.png") == BLOB
    listed = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert {entry["Key"] for entry in listed} == {f"{prefix}/images/x.png", f"{prefix}/.wanbatch/write-check"}
