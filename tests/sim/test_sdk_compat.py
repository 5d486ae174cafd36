"""The official dashscope SDK, unchanged, against the simulator.

The SDK (a test dependency pinned to 2.0.2) is a client none of us wrote;
whatever it can do against the real service it must be able to do here, and
it must read every answer as it would read the service's. Section numbers
(§) refer to shared/reference/dashscope-wan-t2i-api.md.

Time: the SDK's ``wait()`` sleeps real seconds (1, 1, 2, 2, 2, 4, ...), so
most tests freeze the simulator's clock and step it, letting a task end
before ``wait()`` first polls; the few that prove the polling itself run
the clock fast enough that a task ends between two polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from http import HTTPStatus

import dashscope
import pytest
import requests
from dashscope.aigc.image_generation import AioImageGeneration, ImageGeneration
from dashscope.aigc.image_synthesis import AioImageSynthesis, ImageSynthesis
from dashscope.api_entities.aio_session import close_shared_aio_session
from dashscope.common.error import InvalidTask
from dashscope.v2 import errors as v2_errors

from helpers.sdk import FAST, FROZEN, KEYS, SimThread, fetch_png, generation_image_urls, sdk_base_url
from wanbatch.sim import AccountConfig, SimConfig

BEIJING = KEYS["beijing"]
WAN25 = "wan2.5-t2i-preview"
WAN26 = "wan2.6-t2i"
FLASH = "wan2.2-t2i-flash"  # concurrency 2 in Beijing (§5): the easiest queue to fill

TIME_FORMAT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")  # §3.2, UTC+8
CANCEL_REFUSED = "Failed to cancel the task, please confirm if the task is in PENDING status."  # §3.4
BEIJING_TZ = dt.timezone(dt.timedelta(hours=8))
DAY_S = 24 * 3600

StartSim = Callable[..., SimThread]
MakeClient = Callable[..., dashscope.Client]


@pytest.fixture
def start_sim_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[StartSim]:
    """Start simulators (``SimConfig`` keywords), the SDK pointed at the latest; stop them all afterwards."""
    # Both of the SDK's HTTP stacks honour proxy variables; loopback must never go through one.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdk_base_url(dashscope.base_http_api_url))  # puts the SDK's address back at the end

        def start(**config: object) -> SimThread:
            config.setdefault("region", "beijing")
            config.setdefault("seed", 0)
            sim = stack.enter_context(SimThread(SimConfig(**config)))
            dashscope.base_http_api_url = sim.base_url
            return sim

        yield start


@pytest.fixture
def frozen(start_sim_thread: StartSim) -> SimThread:
    """A Beijing simulator whose clock moves only when the test advances it."""
    return start_sim_thread(speed=FROZEN)


@pytest.fixture
def fast(start_sim_thread: StartSim) -> SimThread:
    """A Beijing simulator running a simulated minute per tenth of a second."""
    return start_sim_thread(speed=FAST)


@pytest.fixture
def v2_client(tmp_path) -> Iterator[MakeClient]:
    """Make v2 ``dashscope.Client``s for a simulator (key ``sk-sim-beijing`` unless told); close them afterwards."""
    with contextlib.ExitStack() as stack:

        def make(sim: SimThread, key: str = BEIJING) -> dashscope.Client:
            # An explicit base_url is the v2 client's documented escape hatch for private gateways; the
            # config file is pinned to an empty place so nothing from the machine leaks in, and retries are
            # off so that every request the client sends is one the test expects.
            client = dashscope.Client(
                api_key=key, base_url=sim.base_url, config_path=tmp_path / "none.toml", max_retries=0
            )
            return stack.enter_context(client)

        yield make


def submit(model: str, prompt: str, **params: object):
    """``ImageSynthesis.async_call`` with the Beijing key, asserting the task was created."""
    rsp = ImageSynthesis.async_call(model=model, prompt=prompt, api_key=BEIJING, **params)
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.output.task_status in ("PENDING", "RUNNING"), rsp
    assert rsp.output.task_id
    return rsp


def billed_by_task(sim: SimThread) -> dict[str, list[int]]:
    """The billing log as task_id -> sorted image indexes."""
    out: dict[str, list[int]] = {}
    for record in sim.billing():
        out.setdefault(record["task_id"], []).append(record["image_index"])
    return {task_id: sorted(indexes) for task_id, indexes in out.items()}


def _list_ids(**filters: object) -> tuple[list[str], dict]:
    rsp = ImageSynthesis.list(api_key=BEIJING, **filters)
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.request_id  # the SDK pops it out of the body
    return [item["task_id"] for item in rsp.output["data"]], rsp.output


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"text": text}]}]


async def _no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


# --- the legacy protocol: ImageSynthesis --------------------------------------------------------------------------


def test_call_wan25_n2_returns_two_pngs_of_the_requested_size(start_sim_thread: StartSim) -> None:
    """ImageSynthesis.call (async_call, then wait polling) gives wan2.5 n=2 two URLs of PNGs of the asked size."""
    sim = start_sim_thread(speed=60)  # the task takes about a wall second: wait() polls it unfinished, then finished
    rsp = ImageSynthesis.call(
        model=WAN25, prompt="a flower shop with a wooden door", n=2, size="1440*1152", seed=7, api_key=BEIJING
    )
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.output.task_status == "SUCCEEDED"
    urls = [result.url for result in rsp.output.results]
    assert len(urls) == 2 and len(set(urls)) == 2
    bodies = []
    for url in urls:
        body, size = fetch_png(url)
        assert size == (1440, 1152)
        bodies.append(body)
    assert bodies[0] != bodies[1], "n>1 images use seed, seed+1 (§2.1): they must differ"
    assert rsp.usage.image_count == 2
    assert rsp.output.task_metrics == {"TOTAL": 2, "SUCCEEDED": 2, "FAILED": 0}
    assert sim.requests()["query"] >= 2


def test_async_call_fetch_wait_follow_one_task_to_its_end(frozen: SimThread) -> None:
    """async_call answers PENDING with a task_id, fetch sees it unfinished, wait returns the §3.2 SUCCEEDED body."""
    prompt = "一间有着精致窗户的花店，漂亮的木质门，摆放着花朵"  # the docs' own example (§2.1)
    created = submit(FLASH, prompt, n=1, size="1024*768", seed=3)
    task_id = created.output.task_id
    assert created.output.results == []  # the SDK's view of a §3.1 body

    early = ImageSynthesis.fetch(task=created, api_key=BEIJING)
    assert early.status_code == HTTPStatus.OK, early
    assert early.output.task_id == task_id
    assert early.output.task_status in ("PENDING", "RUNNING")
    assert TIME_FORMAT.match(early.output.submit_time)

    frozen.advance(600)
    done = ImageSynthesis.wait(task=task_id, api_key=BEIJING)
    assert done.status_code == HTTPStatus.OK, done
    assert done.request_id
    out = done.output
    assert out.task_id == task_id and out.task_status == "SUCCEEDED"
    for field in ("submit_time", "scheduled_time", "end_time"):
        assert TIME_FORMAT.match(out[field]), (field, out.get(field))
    assert out.submit_time <= out.scheduled_time <= out.end_time
    assert out.task_metrics == {"TOTAL": 1, "SUCCEEDED": 1, "FAILED": 0}
    assert done.usage.image_count == 1
    [result] = out.results
    assert result.orig_prompt == prompt
    assert result.actual_prompt and result.actual_prompt != result.orig_prompt  # prompt_extend defaults on (§2.1)
    assert fetch_png(result.url)[1] == (1024, 768)


def test_prompt_extend_off_gives_no_actual_prompt_and_n_defaults_to_4(frozen: SimThread) -> None:
    """Without n the service makes 4 images (§2.1 default); with prompt_extend=False no actual_prompt comes back."""
    created = submit(FLASH, "a quiet harbour", prompt_extend=False)
    frozen.advance(600)
    done = ImageSynthesis.wait(task=created, api_key=BEIJING)
    assert done.output.task_status == "SUCCEEDED", done
    assert len(done.output.results) == 4
    assert done.usage.image_count == 4
    for result in done.output.results:
        assert "actual_prompt" not in result
        assert fetch_png(result.url)[1] == (1024, 1024)  # wan2.2 default size


def test_image_i_of_a_task_is_the_image_of_seed_plus_i(frozen: SimThread) -> None:
    """With n>1 image i uses seed+i (§2.1): byte-identical to image 0 of the same prompt at seed+i; prompts differ."""
    pair = submit(FLASH, "the same harbour", n=2, seed=500, size="512*512")
    frozen.advance(1)
    single = submit(FLASH, "the same harbour", n=1, seed=501, size="512*512")
    frozen.advance(1)
    other = submit(FLASH, "another harbour", n=1, seed=500, size="512*512")
    frozen.advance(600)
    pair_pngs = [fetch_png(r.url)[0] for r in ImageSynthesis.wait(task=pair, api_key=BEIJING).output.results]
    [single_png] = [fetch_png(r.url)[0] for r in ImageSynthesis.wait(task=single, api_key=BEIJING).output.results]
    [other_png] = [fetch_png(r.url)[0] for r in ImageSynthesis.wait(task=other, api_key=BEIJING).output.results]
    assert pair_pngs[1] == single_png
    assert pair_pngs[0] != single_png and other_png != pair_pngs[0]


def test_cancel_of_a_queued_task_succeeds_and_it_is_never_billed(frozen: SimThread) -> None:
    """Past the model's concurrency a task waits PENDING; cancel then answers 200, the task ends CANCELED, unbilled."""
    running = []
    for i in range(2):  # FLASH runs 2 at once in Beijing (§5)
        running.append(submit(FLASH, f"busy {i}", n=1))
        frozen.advance(1)  # keeps to the 2 submissions per second
    queued = submit(FLASH, "waiting in line", n=1)
    assert ImageSynthesis.fetch(task=queued, api_key=BEIJING).output.task_status == "PENDING"

    canceled = ImageSynthesis.cancel(task=queued, api_key=BEIJING)
    assert canceled.status_code == HTTPStatus.OK, canceled
    assert canceled.request_id
    after = ImageSynthesis.fetch(task=queued, api_key=BEIJING)
    assert after.output.task_status == "CANCELED"
    again = ImageSynthesis.cancel(task=queued, api_key=BEIJING)
    assert (again.status_code, again.code) == (400, "UnsupportedOperation"), again

    frozen.advance(600)
    assert ImageSynthesis.wait(task=queued, api_key=BEIJING).output.task_status == "CANCELED"
    for rsp in running:
        assert ImageSynthesis.wait(task=rsp, api_key=BEIJING).output.task_status == "SUCCEEDED"
    billed = billed_by_task(frozen)
    assert queued.output.task_id not in billed
    assert billed == {rsp.output.task_id: [0] for rsp in running}


def test_cancel_of_a_finished_task_is_unsupported_operation(frozen: SimThread) -> None:
    """Cancel of a SUCCEEDED task: HTTP 400, code UnsupportedOperation, the §3.4 message verbatim."""
    created = submit(FLASH, "a lighthouse", n=1)
    frozen.advance(600)
    assert ImageSynthesis.wait(task=created, api_key=BEIJING).output.task_status == "SUCCEEDED"
    rsp = ImageSynthesis.cancel(task=created, api_key=BEIJING)
    assert rsp.status_code == HTTPStatus.BAD_REQUEST
    assert rsp.code == "UnsupportedOperation"
    assert rsp.message == CANCEL_REFUSED
    assert rsp.request_id


def test_cancel_of_a_running_task_is_unsupported_operation(frozen: SimThread) -> None:
    """Only PENDING tasks can be canceled: a RUNNING one gets 400 UnsupportedOperation and still completes."""
    created = submit(FLASH, "a windmill", n=1)
    frozen.advance(1)
    assert ImageSynthesis.fetch(task=created, api_key=BEIJING).output.task_status == "RUNNING"
    rsp = ImageSynthesis.cancel(task=created, api_key=BEIJING)
    assert (rsp.status_code, rsp.code, rsp.message) == (400, "UnsupportedOperation", CANCEL_REFUSED)
    frozen.advance(600)
    assert ImageSynthesis.wait(task=created, api_key=BEIJING).output.task_status == "SUCCEEDED"


def test_list_shows_the_tasks_with_their_filters_and_pages(frozen: SimThread) -> None:
    """ImageSynthesis.list finds every task, filters by model_name and status, pages, and uses epoch-ms times (§3.5)."""
    flash_ids = []
    for i in range(2):
        flash_ids.append(submit(FLASH, f"flash {i}", n=1).output.task_id)
        frozen.advance(1)
    wan25_id = submit(WAN25, "preview", n=1, size="1280*1280").output.task_id
    frozen.advance(600)
    late_id = submit(FLASH, "still running", n=1).output.task_id  # starts at once: the others are done
    for task_id in [*flash_ids, wan25_id]:
        assert ImageSynthesis.wait(task=task_id, api_key=BEIJING).output.task_status == "SUCCEEDED"
    everything = {*flash_ids, wan25_id, late_id}

    ids, body = _list_ids(page_size=50)
    assert set(ids) == everything
    assert body["total"] == 4 and body["page_no"] == 1 and body["page_size"] == 50 and body["total_page"] == 1
    item = next(i for i in body["data"] if i["task_id"] == wan25_id)
    assert item["model_name"] == WAN25 and item["status"] == "SUCCEEDED" and item["region"] == "cn-beijing"
    for field in ("gmt_create", "start_time", "end_time"):
        assert isinstance(item[field], int) and item[field] > 1_600_000_000_000, (field, item.get(field))
    assert item["user_api_unique_key"] == f"apikey:v1:aigc:text2image:image-synthesis:{WAN25}"
    late = next(i for i in body["data"] if i["task_id"] == late_id)
    assert late["status"] == "RUNNING" and "end_time" not in late

    assert set(_list_ids(model_name=WAN25)[0]) == {wan25_id}
    assert set(_list_ids(model_name=FLASH, status="SUCCEEDED")[0]) == set(flash_ids)
    assert _list_ids(status="FAILED")[0] == []
    assert set(_list_ids(region="cn-beijing", page_size=50)[0]) == everything
    assert _list_ids(region="ap-southeast-1")[0] == []

    page1, body1 = _list_ids(page_size=3, page_no=1)
    page2, body2 = _list_ids(page_size=3, page_no=2)
    assert (len(page1), len(page2)) == (3, 1)
    assert set(page1) | set(page2) == everything
    assert body1["total"] == body2["total"] == 4 and body1["total_page"] == 2 and body2["page_no"] == 2


def test_list_time_window_uses_the_sdk_format(frozen: SimThread) -> None:
    """start_time/end_time as YYYYMMDDhhmmss (the SDK's format) select tasks inside the window only."""
    task_id = submit(FLASH, "a window", n=1).output.task_id
    now = dt.datetime.fromtimestamp(frozen.now_s(), BEIJING_TZ)

    def stamp(moment: dt.datetime) -> str:
        return moment.strftime("%Y%m%d%H%M%S")

    # A 24-hour window around now, in Beijing time: it holds the task whether the service reads it as UTC+8 or UTC.
    around = {"start_time": stamp(now - dt.timedelta(hours=12)), "end_time": stamp(now + dt.timedelta(hours=11))}
    assert _list_ids(**around)[0] == [task_id]
    past = {"start_time": stamp(now - dt.timedelta(days=3)), "end_time": stamp(now - dt.timedelta(days=2))}
    assert _list_ids(**past)[0] == []


def test_unknown_task_id_is_unknown_and_wait_stops_on_it(frozen: SimThread) -> None:
    """A made-up task id answers 200 UNKNOWN (§3.2), wait returns it at once, cancel is 400 UnsupportedOperation."""
    fake = "00000000-0000-4000-8000-000000000000"
    rsp = ImageSynthesis.fetch(task=fake, api_key=BEIJING)
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.output.task_id == fake and rsp.output.task_status == "UNKNOWN"
    assert ImageSynthesis.wait(task=fake, api_key=BEIJING).output.task_status == "UNKNOWN"
    assert frozen.requests()["query"] == 2
    # Canceling it (open question 5): the simulator answers as for any task that is not PENDING.
    rsp = ImageSynthesis.cancel(task=fake, api_key=BEIJING)
    assert (rsp.status_code, rsp.code, rsp.message) == (400, "UnsupportedOperation", CANCEL_REFUSED)


def test_a_day_after_it_ends_the_task_is_unknown_and_its_urls_are_dead(frozen: SimThread) -> None:
    """24 simulated hours after the end the task reads UNKNOWN and its URL answers 403 with the OSS XML error (§7)."""
    created = submit(FLASH, "a comet", n=1)
    frozen.advance(600)
    done = ImageSynthesis.wait(task=created, api_key=BEIJING)
    url = done.output.results[0].url
    fetch_png(url)
    frozen.advance(DAY_S + 60)
    assert ImageSynthesis.fetch(task=created, api_key=BEIJING).output.task_status == "UNKNOWN"
    dead = requests.get(url, timeout=10)
    assert dead.status_code == HTTPStatus.FORBIDDEN
    assert "<Code>AccessDenied</Code>" in dead.text


# --- the legacy protocol from asyncio: AioImageSynthesis ----------------------------------------------------------


async def test_aio_image_synthesis_does_everything_the_sync_api_does(frozen: SimThread) -> None:
    """AioImageSynthesis async_call, fetch and cancel (trailing-slash paths), wait and list all work."""
    try:
        created = []
        for i in range(3):  # the third waits PENDING behind FLASH's concurrency of 2
            rsp = await AioImageSynthesis.async_call(model=FLASH, prompt=f"aio {i}", n=1, api_key=BEIJING)
            assert rsp.status_code == HTTPStatus.OK, rsp
            created.append(rsp)
            await asyncio.to_thread(frozen.advance, 1)
        fetched = await AioImageSynthesis.fetch(task=created[2], api_key=BEIJING)
        assert fetched.status_code == HTTPStatus.OK, fetched
        assert fetched.output.task_status == "PENDING"

        canceled = await AioImageSynthesis.cancel(task=created[2], api_key=BEIJING)
        assert canceled.status_code == HTTPStatus.OK, canceled

        await asyncio.to_thread(frozen.advance, 600)
        done = await AioImageSynthesis.wait(task=created[0], api_key=BEIJING)
        assert done.status_code == HTTPStatus.OK and done.output.task_status == "SUCCEEDED", done
        assert done.usage.image_count == 1
        refused = await AioImageSynthesis.cancel(task=created[0], api_key=BEIJING)
        assert (refused.status_code, refused.code, refused.message) == (400, "UnsupportedOperation", CANCEL_REFUSED)
        assert (await AioImageSynthesis.wait(task=created[2], api_key=BEIJING)).output.task_status == "CANCELED"

        listed = await AioImageSynthesis.list(api_key=BEIJING, status="CANCELED")
        assert listed.status_code == HTTPStatus.OK, listed
        assert [item["task_id"] for item in listed.output["data"]] == [created[2].output.task_id]
        assert listed.output["total"] == 1
    finally:
        await close_shared_aio_session()


async def test_aio_image_synthesis_call_polls_until_done(start_sim_thread: StartSim) -> None:
    """AioImageSynthesis.call (async_call + async wait) returns the finished task with its PNG."""
    await asyncio.to_thread(start_sim_thread, speed=FAST)
    try:
        rsp = await AioImageSynthesis.call(model=WAN25, prompt="aio call", n=1, size="1280*1280", api_key=BEIJING)
        assert rsp.status_code == HTTPStatus.OK and rsp.output.task_status == "SUCCEEDED", rsp
        [result] = rsp.output.results
        assert (await asyncio.to_thread(fetch_png, result.url))[1] == (1280, 1280)
    finally:
        await close_shared_aio_session()


# --- wan2.6: ImageGeneration (sync multimodal and async image-generation endpoints) and the v2 client -------------


def test_image_generation_call_hits_the_sync_endpoint_and_returns_a_png(fast: SimThread) -> None:
    """ImageGeneration.call for wan2.6 answers in one request with the §3.3 body: choices, image URL, usage."""
    rsp = ImageGeneration.call(
        model=WAN26,
        messages=_messages("a paper boat"),
        n=1,
        size="1440*1152",
        negative_prompt="blurry",
        api_key=BEIJING,
    )
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.request_id
    assert rsp.output.finished is True
    [choice] = rsp.output.choices
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    [url] = generation_image_urls(rsp.output)
    assert fetch_png(url)[1] == (1440, 1152)
    assert rsp.usage["image_count"] == 1
    counts = fast.requests()
    assert counts["sync"] == 1 and counts["create"] == 0
    assert len(fast.billing()) == 1


def test_image_generation_async_call_and_wait(frozen: SimThread) -> None:
    """ImageGeneration.async_call creates a wan2.6 task (stray is_async parameter ignored); wait returns choices."""
    created = ImageGeneration.async_call(model=WAN26, messages=_messages("a glass whale"), n=1, api_key=BEIJING)
    assert created.status_code == HTTPStatus.OK, created
    assert created.output.task_status in ("PENDING", "RUNNING")
    task_id = created.output.task_id
    frozen.advance(600)
    done = ImageGeneration.wait(task=task_id, api_key=BEIJING)
    assert done.status_code == HTTPStatus.OK, done
    assert done.output.task_status == "SUCCEEDED" and done.output.task_id == task_id
    assert done.output.finished is True
    [url] = generation_image_urls(done.output)
    assert fetch_png(url)[1] == (1280, 1280)  # wan2.6 default size
    assert done.usage["image_count"] == 1 and done.usage["size"] == "1280*1280"
    listed = ImageGeneration.list(api_key=BEIJING, model_name=WAN26)
    [item] = listed.output["data"]
    assert item["task_id"] == task_id
    assert item["user_api_unique_key"] == f"apikey:v1:aigc:image-generation:generation:{WAN26}"


def test_image_generation_n2_returns_two_images(frozen: SimThread) -> None:
    """wan2.6 with n=2 yields two distinct images, whichever choices layout the simulator picked (§9 q1)."""
    created = ImageGeneration.async_call(model=WAN26, messages=_messages("two kites"), n=2, seed=11, api_key=BEIJING)
    assert created.status_code == HTTPStatus.OK, created
    frozen.advance(600)
    done = ImageGeneration.wait(task=created, api_key=BEIJING)
    urls = generation_image_urls(done.output)
    assert len(urls) == 2 and len(set(urls)) == 2
    assert fetch_png(urls[0])[0] != fetch_png(urls[1])[0]
    assert done.usage["image_count"] == 2


async def test_aio_image_generation_call_async_call_and_wait(frozen: SimThread) -> None:
    """AioImageGeneration.call (sync endpoint), async_call and wait work for wan2.6 against the simulator."""
    try:
        await asyncio.to_thread(frozen.set_speed, FAST)
        sync = await AioImageGeneration.call(model=WAN26, messages=_messages("aio sync"), n=1, api_key=BEIJING)
        assert sync.status_code == HTTPStatus.OK and len(generation_image_urls(sync.output)) == 1, sync
        await asyncio.to_thread(frozen.set_speed, FROZEN)
        await asyncio.to_thread(frozen.advance, 2)  # one wan2.6 submission per second
        created = await AioImageGeneration.async_call(model=WAN26, messages=_messages("aio kite"), n=1, api_key=BEIJING)
        assert created.status_code == HTTPStatus.OK, created
        await asyncio.to_thread(frozen.advance, 600)
        done = await AioImageGeneration.wait(task=created, api_key=BEIJING)
        assert done.status_code == HTTPStatus.OK and done.output.task_status == "SUCCEEDED", done
        assert len(generation_image_urls(done.output)) == 1
    finally:
        await close_shared_aio_session()


def test_wan26_alternative_layouts_read_as_the_sdk_expects(start_sim_thread: StartSim, v2_client: MakeClient) -> None:
    """wan26_choices="per_image" and wan26_usage="width_height" (§9 q1, q2) still give the SDK n images."""
    sim = start_sim_thread(speed=FAST, wan26_choices="per_image", wan26_usage="width_height")
    rsp = ImageGeneration.call(model=WAN26, messages=_messages("two moons"), n=2, size="1280*1280", api_key=BEIJING)
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert len(rsp.output.choices) == 2
    assert len(generation_image_urls(rsp.output)) == 2
    assert (rsp.usage["image_count"], rsp.usage["width"], rsp.usage["height"]) == (2, 1280, 1280)
    sim.advance(2)  # wan2.6 takes one submission per second
    job = v2_client(sim).images.generate(model=WAN26, prompt="two suns", n=2)
    assert len(job.image_urls) == 2


def test_v2_client_images_for_wan26_and_the_legacy_models(frozen: SimThread, v2_client: MakeClient) -> None:
    """dashscope.Client with base_url=sim: images.generate (wan2.6 sync) and images.jobs create/fetch/wait/cancel."""
    client = v2_client(frozen)
    frozen.set_speed(FAST)  # generate() on wan2.6 is one request held until the image is made
    job = client.images.generate(model=WAN26, prompt="v2 lantern", n=1, size="1280*1280")
    frozen.set_speed(FROZEN)
    assert job.succeeded and len(job.image_urls) == 1
    assert fetch_png(job.image_urls[0])[1] == (1280, 1280)

    first = client.images.jobs.create(model=FLASH, prompt="v2 one", n=1, size="1024*1024")
    frozen.advance(1)
    second = client.images.jobs.create(model=FLASH, prompt="v2 two", n=1)
    frozen.advance(1)
    queued = client.images.jobs.create(model=FLASH, prompt="v2 three", n=1)
    assert client.images.jobs.fetch(queued.task_id).status == "PENDING"
    client.images.jobs.cancel(queued.task_id)
    with pytest.raises(v2_errors.APIStatusError) as refused:
        client.images.jobs.cancel(queued.task_id)
    assert refused.value.code == "UnsupportedOperation" and refused.value.status_code == 400

    task = client.images.jobs.create(model=WAN26, prompt="v2 async wan2.6", n=1)  # image-generation endpoint
    frozen.advance(600)
    for created in (first, second, task):
        finished = client.images.jobs.wait(created, poll_interval=0.01, _sleep=lambda s: None)
        assert finished.succeeded and len(finished.image_urls) == 1, finished
    assert client.images.jobs.fetch(queued.task_id).status == "CANCELED"
    page = client.images.jobs.list(page_size=20)
    # The wan2.6 sync call makes no listed task. The v2 JobList reads its entries from a "tasks" key, which
    # the documented list body (§3.5, "data") does not have, so only the total can be checked through it.
    assert page.total == 4


async def test_v2_async_client_images(frozen: SimThread, tmp_path) -> None:
    """dashscope.AsyncClient with base_url=sim: images.jobs.create + wait for wan2.5 and wan2.6, generate for wan2.6."""
    client = dashscope.AsyncClient(
        api_key=BEIJING, base_url=frozen.base_url, config_path=tmp_path / "none.toml", max_retries=0
    )
    try:
        legacy = await client.images.jobs.create(model=WAN25, prompt="async v2", n=1, size="1280*1280")
        modern = await client.images.jobs.create(model=WAN26, prompt="async v2 wan2.6", n=1)
        await asyncio.to_thread(frozen.advance, 600)
        for created in (legacy, modern):
            done = await client.images.jobs.wait(created, poll_interval=0.01, _sleep=_no_sleep)
            assert done.succeeded and len(done.image_urls) == 1, done
        await asyncio.to_thread(frozen.set_speed, FAST)
        job = await client.images.generate(model=WAN26, prompt="async v2 sync", n=1)
        assert job.succeeded and len(job.image_urls) == 1
    finally:
        await client.aclose()


# --- regions, keys and accounts -----------------------------------------------------------------------------------


def test_a_singapore_key_on_the_beijing_service_is_401_invalid_api_key(
    frozen: SimThread, v2_client: MakeClient
) -> None:
    """Every call with another region's key (or an unknown key) fails as the SDK reports a 401 InvalidApiKey."""
    for key in (KEYS["singapore"], KEYS["virginia"], "sk-not-a-key"):
        rsp = ImageSynthesis.async_call(model=WAN25, prompt="wrong region", n=1, api_key=key)
        assert (rsp.status_code, rsp.code) == (401, "InvalidApiKey"), rsp
        assert rsp.message and rsp.request_id
    sg = KEYS["singapore"]
    # call() hands the failed create to wait(), which refuses it: the SDK raises, quoting the 401 body.
    with pytest.raises(InvalidTask, match="InvalidApiKey"):
        ImageSynthesis.call(model=WAN25, prompt="wrong region", n=1, api_key=sg)
    assert ImageSynthesis.fetch(task="00000000-0000-4000-8000-000000000000", api_key=sg).status_code == 401
    assert ImageSynthesis.list(api_key=sg).status_code == 401
    assert ImageGeneration.call(model=WAN26, messages=_messages("x"), n=1, api_key=sg).code == "InvalidApiKey"
    with pytest.raises(v2_errors.AuthenticationError) as raised:
        v2_client(frozen, key=sg).images.jobs.create(model=WAN25, prompt="x", n=1)
    assert raised.value.status_code == 401 and raised.value.code == "InvalidApiKey"
    assert frozen.task_ids() == set() and frozen.billing() == []


def test_the_singapore_service_takes_its_own_key_and_model_names(start_sim_thread: StartSim) -> None:
    """A Singapore simulator serves sk-sim-singapore with the wan2.1-... names and refuses the Beijing key."""
    sim = start_sim_thread(region="singapore", speed=FROZEN)
    sg = KEYS["singapore"]
    created = ImageSynthesis.async_call(model="wan2.1-t2i-turbo", prompt="merlion", n=1, api_key=sg)
    assert created.status_code == HTTPStatus.OK, created
    sim.advance(600)
    assert ImageSynthesis.wait(task=created, api_key=sg).output.task_status == "SUCCEEDED"
    [item] = ImageSynthesis.list(api_key=sg).output["data"]
    assert item["region"] == "ap-southeast-1" and item["model_name"] == "wan2.1-t2i-turbo"
    assert ImageSynthesis.fetch(task=created, api_key=BEIJING).status_code == 401


def test_virginia_sells_only_wan26(start_sim_thread: StartSim) -> None:
    """The Virginia service takes its own key for wan2.6 and answers "Model not exist." for the legacy models."""
    start_sim_thread(region="virginia", speed=FAST)
    us = KEYS["virginia"]
    rsp = ImageGeneration.call(model=WAN26, messages=_messages("liberty"), n=1, api_key=us)
    assert rsp.status_code == HTTPStatus.OK and len(generation_image_urls(rsp.output)) == 1, rsp
    legacy = ImageSynthesis.async_call(model=WAN25, prompt="liberty", n=1, api_key=us)
    assert (legacy.status_code, legacy.code, legacy.message) == (400, "InvalidParameter", "Model not exist."), legacy
    beijing_name = ImageSynthesis.async_call(model="wanx2.1-t2i-turbo", prompt="x", n=1, api_key=BEIJING)
    assert beijing_name.status_code == HTTPStatus.UNAUTHORIZED


def test_tasks_list_and_quota_belong_to_the_account_not_the_key(start_sim_thread: StartSim) -> None:
    """Any key of an account sees and cancels its tasks and shares its quota (§3.5, §5); another account sees none."""
    team = AccountConfig(name="team", keys={"sk-team-one": "beijing", "sk-team-two": "beijing"})
    sim = start_sim_thread(speed=FROZEN, accounts=(team,))
    one = ImageSynthesis.async_call(model=FLASH, prompt="team one", n=1, api_key="sk-team-one")
    two = ImageSynthesis.async_call(model=FLASH, prompt="team two", n=1, api_key="sk-team-two")
    assert one.status_code == two.status_code == HTTPStatus.OK
    over = ImageSynthesis.async_call(model=FLASH, prompt="team three", n=1, api_key="sk-team-one")
    assert (over.status_code, over.code) == (429, "Throttling.RateQuota"), over
    demo = submit(FLASH, "another account", n=1)  # same instant, its own quota

    assert ImageSynthesis.fetch(task=one, api_key="sk-team-two").output.task_status == "RUNNING"
    assert ImageSynthesis.fetch(task=one, api_key=BEIJING).output.task_status == "UNKNOWN"
    assert ImageSynthesis.cancel(task=one, api_key=BEIJING).code == "UnsupportedOperation"
    team_list = ImageSynthesis.list(api_key="sk-team-two").output
    assert {i["task_id"] for i in team_list["data"]} == {one.output.task_id, two.output.task_id}
    assert [i["task_id"] for i in ImageSynthesis.list(api_key=BEIJING).output["data"]] == [demo.output.task_id]
    key_one = next(i["api_key_id"] for i in team_list["data"] if i["task_id"] == one.output.task_id)
    assert "sk-team" not in key_one
    by_key = ImageSynthesis.list(api_key="sk-team-two", api_key_id=key_one).output["data"]
    assert [i["task_id"] for i in by_key] == [one.output.task_id]
    sim.advance(600)
    assert {r["key_id"] for r in sim.billing() if r["task_id"] == one.output.task_id} == {key_one}


def test_an_account_in_arrears_is_refused_on_create_but_can_still_read(start_sim_thread: StartSim) -> None:
    """An account refusal (Arrearage, §4) answers every create with its 400; the SDK's reads still work."""
    broke = AccountConfig(name="broke", keys={"sk-broke": "beijing"}, refusal="Arrearage")
    start_sim_thread(speed=FROZEN, accounts=(broke,))
    rsp = ImageSynthesis.async_call(model=FLASH, prompt="on credit", n=1, api_key="sk-broke")
    assert (rsp.status_code, rsp.code, rsp.message) == (
        400,
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    ), rsp
    sync = ImageGeneration.call(model=WAN26, messages=_messages("on credit"), n=1, api_key="sk-broke")
    assert (sync.status_code, sync.code) == (400, "Arrearage"), sync
    assert ImageSynthesis.list(api_key="sk-broke").output["total"] == 0


# --- refused requests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (FLASH, "768*2700"),  # 2700 > 1440 per side (§2.3), though the area is allowed for wan2.5
        (FLASH, "500*1024"),  # 500 < 512
        (WAN25, "700*700"),  # under the 768*768 pixel floor (vendor page)
        (WAN25, "2880*680"),  # area allowed, aspect 4.2:1 over the 4:1 bound
        (FLASH, "big"),
    ],
)
def test_a_bad_size_is_400_invalid_parameter(frozen: SimThread, model: str, size: str) -> None:
    """A size outside the model's rule is refused at submit: 400 InvalidParameter, and no task is made."""
    rsp = ImageSynthesis.async_call(model=model, prompt="bad size", n=1, size=size, api_key=BEIJING)
    assert (rsp.status_code, rsp.code) == (400, "InvalidParameter"), rsp
    assert rsp.message and rsp.request_id
    assert frozen.task_ids() == set()


def test_wan25_takes_the_documented_768x2700(frozen: SimThread) -> None:
    """768*2700 (1440² pixels, 1:3.5) is the doc's own valid example for wan2.5 (§2.2) and yields that PNG."""
    created = submit(WAN25, "a tall tower", n=1, size="768*2700")
    frozen.advance(600)
    done = ImageSynthesis.wait(task=created, api_key=BEIJING)
    assert fetch_png(done.output.results[0].url)[1] == (768, 2700)


def test_wan26_takes_the_docs_recommended_sizes(frozen: SimThread) -> None:
    """The sizes the docs recommend for wan2.6 (§2.2: 1104*1472, 1472*1104, 960*1696, 1696*960) are accepted."""
    refused = {}
    for size in ("1104*1472", "1472*1104", "960*1696", "1696*960"):
        rsp = ImageGeneration.async_call(
            model=WAN26, messages=_messages("recommended"), n=1, size=size, api_key=BEIJING
        )
        if rsp.status_code != HTTPStatus.OK:
            refused[size] = f"{rsp.status_code} {rsp.code}: {rsp.message}"
        frozen.advance(1.5)  # wan2.6 takes one submission per second, refused or not
    assert refused == {}, "below 1280*1280 pixels, yet the docs' own recommendation (the vendor page floor is 768*768)"


def test_x_sizes_are_refused_unless_the_client_rewrites_them(frozen: SimThread, v2_client: MakeClient) -> None:
    """By default "1024x1024" is 400 InvalidParameter for the 1.x API (§9 q11); the v2 client sends 1024*1024."""
    rsp = ImageSynthesis.async_call(model=FLASH, prompt="x", n=1, size="1024x1024", api_key=BEIJING)
    assert (rsp.status_code, rsp.code) == (400, "InvalidParameter"), rsp
    job = v2_client(frozen).images.jobs.create(model=FLASH, prompt="x", n=1, size="1024x768")
    frozen.advance(600)
    done = ImageSynthesis.wait(task=job.task_id, api_key=BEIJING)
    assert fetch_png(done.output.results[0].url)[1] == (1024, 768)


def test_an_unknown_model_is_400_model_not_exist(frozen: SimThread) -> None:
    """An unknown model on any create endpoint: 400 InvalidParameter "Model not exist." (§4), no task."""
    rsp = ImageSynthesis.async_call(model="wan9.9-t2i", prompt="nothing", n=1, api_key=BEIJING)
    assert (rsp.status_code, rsp.code, rsp.message) == (400, "InvalidParameter", "Model not exist."), rsp
    gen = ImageGeneration.call(model="wan9.9-t2i", messages=_messages("nothing"), n=1, api_key=BEIJING)
    assert (gen.status_code, gen.code, gen.message) == (400, "InvalidParameter", "Model not exist."), gen
    assert frozen.task_ids() == set()


def test_a_model_on_the_wrong_endpoint_is_refused(frozen: SimThread) -> None:
    """wan2.6 on text2image and wan2.5 on the multimodal endpoints are 400 InvalidParameter (§9 q10), no task."""
    legacy = ImageSynthesis.async_call(model=WAN26, prompt="wrong door", n=1, api_key=BEIJING)
    assert (legacy.status_code, legacy.code) == (400, "InvalidParameter"), legacy
    sync = ImageGeneration.call(model=WAN25, messages=_messages("wrong door"), n=1, api_key=BEIJING)
    assert (sync.status_code, sync.code) == (400, "InvalidParameter"), sync
    task = ImageGeneration.async_call(model=WAN25, messages=_messages("wrong door"), n=1, api_key=BEIJING)
    assert (task.status_code, task.code) == (400, "InvalidParameter"), task
    assert frozen.task_ids() == set()


def test_the_async_header_on_the_sync_endpoint_is_403(frozen: SimThread) -> None:
    """ImageGeneration.call with X-DashScope-Async: enable gets 403 AccessDenied, nothing made (§9 q13)."""
    rsp = ImageGeneration.call(
        model=WAN26, messages=_messages("x"), n=1, api_key=BEIJING, headers={"X-DashScope-Async": "enable"}
    )
    assert (rsp.status_code, rsp.code, rsp.message) == (
        403,
        "AccessDenied",
        "Current user api does not support asynchronous calls.",
    ), rsp
    assert frozen.requests()["sync"] == 1 and frozen.task_ids() == set()


@pytest.mark.parametrize("n", [0, 5])
def test_n_outside_1_to_4_is_400_invalid_parameter(frozen: SimThread, n: int) -> None:
    """n must be 1..4 (§2.1): 0 and 5 are refused with 400 InvalidParameter."""
    rsp = ImageSynthesis.async_call(model=FLASH, prompt="how many", n=n, api_key=BEIJING)
    assert (rsp.status_code, rsp.code) == (400, "InvalidParameter"), rsp
    assert frozen.task_ids() == set()


def test_submitting_faster_than_the_quota_is_429_throttling(frozen: SimThread) -> None:
    """wan2.6 takes 1 submission per second in Beijing (§5): a second one in the same instant is 429 Throttling.*."""

    def submit_one():
        return ImageGeneration.async_call(model=WAN26, messages=_messages("quota"), n=1, api_key=BEIJING)

    assert submit_one().status_code == HTTPStatus.OK
    throttled = submit_one()
    assert throttled.status_code == HTTPStatus.TOO_MANY_REQUESTS, throttled
    assert throttled.code in ("Throttling.RateQuota", "Throttling.BurstRate") and throttled.message
    frozen.advance(2)
    assert submit_one().status_code == HTTPStatus.OK
    assert len(frozen.task_ids()) == 2


def test_sync_call_is_refused_403_by_default_as_the_docs_say(frozen: SimThread) -> None:
    """sync_call (no async header) gets 403 AccessDenied by default: the docs' word over the SDK's (§9 q9)."""
    rsp = ImageSynthesis.sync_call(model=FLASH, prompt="now please", n=1, api_key=BEIJING)
    assert rsp.status_code == HTTPStatus.FORBIDDEN, rsp
    assert (rsp.code, rsp.message) == ("AccessDenied", "current user api does not support synchronous calls.")
    assert frozen.task_ids() == set()


def test_sync_call_with_legacy_sync_answers_wan22_in_one_request(start_sim_thread: StartSim) -> None:
    """With legacy_sync on, sync_call for wan2.2 returns the finished task at once; other models stay 403."""
    sim = start_sim_thread(speed=FAST, legacy_sync=True)
    rsp = ImageSynthesis.sync_call(model=FLASH, prompt="now please", n=1, size="768*512", api_key=BEIJING)
    assert rsp.status_code == HTTPStatus.OK, rsp
    assert rsp.output.task_status == "SUCCEEDED" and rsp.usage.image_count == 1
    assert fetch_png(rsp.output.results[0].url)[1] == (768, 512)
    assert sim.requests()["create"] == 1 and sim.requests()["query"] == 0
    refused = ImageSynthesis.sync_call(model=WAN25, prompt="now please", n=1, api_key=BEIJING)
    assert (refused.status_code, refused.code) == (403, "AccessDenied"), refused


def test_param_errors_as_failed_tasks_read_as_the_sdk_expects(
    start_sim_thread: StartSim, v2_client: MakeClient
) -> None:
    """Under param_errors="task" a bad size is a 200 and a task that FAILED with InvalidParameter (§8), unbilled."""
    sim = start_sim_thread(speed=FROZEN, param_errors="task")
    created = ImageSynthesis.async_call(model=FLASH, prompt="tiny", n=2, size="100*100", api_key=BEIJING)
    assert created.status_code == HTTPStatus.OK, created
    done = ImageSynthesis.wait(task=created, api_key=BEIJING)
    assert (done.output.task_status, done.output.code) == ("FAILED", "InvalidParameter"), done
    assert done.output.message
    assert done.output.task_metrics == {"TOTAL": 2, "SUCCEEDED": 0, "FAILED": 2}
    with pytest.raises(v2_errors.BadRequestError):
        v2_client(sim).images.jobs.fetch(created.output.task_id)
    unknown = ImageSynthesis.async_call(model="wan9.9-t2i", prompt="x", n=1, api_key=BEIJING)
    assert (unknown.status_code, unknown.code) == (400, "InvalidParameter"), "request-level errors stay immediate"
    sim.advance(600)
    assert sim.billing() == []


# --- content moderation and failed images -------------------------------------------------------------------------


def test_input_moderation_refuses_at_submit(frozen: SimThread) -> None:
    """A trigger word in the prompt or negative prompt is 400 DataInspectionFailed or IPInfringementSuspect."""
    inspected = ImageSynthesis.async_call(model=FLASH, prompt="a sim-inappropriate scene", n=1, api_key=BEIJING)
    assert (inspected.status_code, inspected.code, inspected.message) == (
        400,
        "DataInspectionFailed",
        "Input data may contain inappropriate content.",
    ), inspected
    in_negative = ImageSynthesis.async_call(
        model=FLASH, prompt="fine", negative_prompt="sim-inappropriate", n=1, api_key=BEIJING
    )
    assert (in_negative.status_code, in_negative.code) == (400, "DataInspectionFailed"), in_negative
    infringing = ImageGeneration.call(model=WAN26, messages=_messages("a sim-trademark mouse"), n=1, api_key=BEIJING)
    assert (infringing.status_code, infringing.code, infringing.message) == (
        400,
        "IPInfringementSuspect",
        "Input data is suspected of being involved in IP infringement.",
    ), infringing
    assert frozen.task_ids() == set()


def test_output_moderation_fails_the_task_and_bills_nothing(frozen: SimThread, v2_client: MakeClient) -> None:
    """An output trigger word makes a FAILED task the SDK reads (code, message, metrics); the sync call gets a 400."""
    created = submit(FLASH, "sim-unsafe-output", n=2)
    frozen.advance(600)
    done = ImageSynthesis.wait(task=created, api_key=BEIJING)
    assert done.status_code == HTTPStatus.OK, done
    out = done.output
    assert (out.task_status, out.code, out.message) == (
        "FAILED",
        "DataInspectionFailed",
        "Output data may contain inappropriate content.",
    )
    assert out.task_metrics == {"TOTAL": 2, "SUCCEEDED": 0, "FAILED": 2}
    assert done.usage is None

    task = ImageGeneration.async_call(model=WAN26, messages=_messages("sim-unsafe-output"), n=1, api_key=BEIJING)
    frozen.advance(600)
    failed = ImageGeneration.wait(task=task, api_key=BEIJING)
    assert (failed.output.task_status, failed.output.code) == ("FAILED", "DataInspectionFailed"), failed
    with pytest.raises(v2_errors.ContentFilterError):
        v2_client(frozen).images.jobs.fetch(task.output.task_id)

    frozen.set_speed(FAST)
    sync = ImageGeneration.call(model=WAN26, messages=_messages("sim-unsafe-output"), n=1, api_key=BEIJING)
    assert (sync.status_code, sync.code) == (400, "DataInspectionFailed"), sync
    frozen.set_speed(FROZEN)
    assert frozen.billing() == []


def test_partial_failure_reads_as_the_sdk_expects(start_sim_thread: StartSim) -> None:
    """Failed images leave the task SUCCEEDED with code/message results (§3.2); usage and billing count successes."""
    sim = start_sim_thread(speed=FROZEN, image_failure_rate=0.4)
    created = []
    for i in range(3):
        created.append(submit(FLASH, f"fragile {i}", n=4))
        sim.advance(1)
    sim.advance(600)
    mixed = 0
    billed = {}
    for rsp in created:
        done = ImageSynthesis.wait(task=rsp, api_key=BEIJING)
        results = done.output.results
        assert len(results) == 4
        ok = [i for i, r in enumerate(results) if r.url]
        for i, result in enumerate(results):
            if i not in ok:
                assert result.code in ("InternalError.Timeout", "DataInspectionFailed") and result.message
        if ok:
            assert done.output.task_status == "SUCCEEDED"
            assert done.usage.image_count == len(ok)
            assert done.output.task_metrics == {"TOTAL": 4, "SUCCEEDED": len(ok), "FAILED": 4 - len(ok)}
            billed[rsp.output.task_id] = ok
        else:
            assert done.output.task_status == "FAILED"
        mixed += 0 < len(ok) < 4
    assert mixed, "seed 0 at a 40% failure rate gives at least one partly failed task"
    assert billed_by_task(sim) == billed


# --- faults -------------------------------------------------------------------------------------------------------


def test_injected_errors_reach_the_sdk_as_the_service_would_send_them(frozen: SimThread) -> None:
    """500 InternalError and 503 ModelServingError faults come back through the SDK with their codes, no task made."""
    frozen.set_faults(internal_error=1.0)
    rsp = ImageSynthesis.async_call(model=FLASH, prompt="x", n=1, api_key=BEIJING)
    assert (rsp.status_code, rsp.code) == (500, "InternalError"), rsp
    frozen.set_faults("none", model_serving=1.0)
    rsp = ImageSynthesis.fetch(task="00000000-0000-4000-8000-000000000000", api_key=BEIJING)
    assert (rsp.status_code, rsp.code) == (503, "ModelServingError"), rsp
    frozen.set_faults("none")
    assert frozen.task_ids() == set()


def test_a_reset_after_create_makes_the_sdk_pay_twice(frozen: SimThread) -> None:
    """The SDK resends a create once when the connection drops (§6.1): a reset after the task exists bills twice."""
    frozen.set_faults(reset_after=1.0)
    with pytest.raises(requests.exceptions.ConnectionError):
        ImageSynthesis.async_call(model=FLASH, prompt="paid twice", n=1, api_key=BEIJING)
    frozen.set_faults("none")
    assert frozen.requests()["create"] == 2
    assert len(frozen.task_ids()) == 2
    frozen.advance(600)
    assert len(frozen.billing()) == 2


# --- billing ------------------------------------------------------------------------------------------------------


def test_billing_log_has_exactly_n_images_per_successful_task(frozen: SimThread) -> None:
    """The billing log holds one record per generated image: n per SUCCEEDED task, none for refused or canceled ones."""
    expected: dict[str, int] = {}
    for i, n in enumerate((1, 3)):
        expected[submit(FLASH, f"billed {i}", n=n, seed=100 + i).output.task_id] = n
        frozen.advance(1)
    canceled = submit(FLASH, "never made", n=2)
    assert ImageSynthesis.cancel(task=canceled, api_key=BEIJING).status_code == HTTPStatus.OK
    assert ImageSynthesis.async_call(model=FLASH, prompt="x", n=1, size="1*1", api_key=BEIJING).status_code == 400
    frozen.advance(600)
    for task_id, n in expected.items():
        done = ImageSynthesis.wait(task=task_id, api_key=BEIJING)
        assert done.usage.image_count == n
    assert billed_by_task(frozen) == {task_id: list(range(n)) for task_id, n in expected.items()}
    key_ids = {item["api_key_id"] for item in ImageSynthesis.list(api_key=BEIJING).output["data"]}
    for record in frozen.billing():
        i, n = next((i, n) for i, (task_id, n) in enumerate(expected.items()) if task_id == record["task_id"])
        # The body the SDK sent, canonical: the fingerprint proves which request was paid for.
        sent = {"model": FLASH, "input": {"prompt": f"billed {i}"}, "parameters": {"n": n, "seed": 100 + i}}
        canonical = json.dumps(sent, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert record["fingerprint"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert record["model"] == FLASH
        assert record["key_id"] in key_ids and BEIJING not in str(record), "the key's id, never the key"
