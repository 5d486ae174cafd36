"""Injected faults: each one as a client meets it, the profiles, and reproducibility under a seed."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from helpers.sim import task_created
from wanbatch.sim import FAULT_PROFILES, Fault
from wanbatch.sim.faults import AFTER_FAULTS, BEFORE_FAULTS, DOWNLOAD_FAULTS, SERVICE_FAULTS, FaultInjector

LEGACY = "/services/aigc/text2image/image-synthesis"
HEADERS = {"Authorization": "Bearer sk-sim-beijing", "X-DashScope-Async": "enable"}
BODY = {"model": "wan2.2-t2i-flash", "input": {"prompt": "a cat"}, "parameters": {"n": 1}}
UNLIMITED = {"*": {"submit_rps": None}}


async def post_create(sim_http, sim) -> aiohttp.ClientResponse:
    """POST a create and return the response with its body read (raises what the client raises)."""
    async with sim_http.post(sim.base_url + LEGACY, json=BODY, headers=HEADERS) as response:
        await response.read()
        return response


@pytest.mark.parametrize(
    ("fault", "status", "code", "message"),
    [
        (
            Fault.INTERNAL_ERROR,
            500,
            "InternalError",
            "An internal error has occured, please try again later or contact service support.",
        ),
        (
            Fault.MODEL_SERVING,
            503,
            "ModelServingError",
            "Too many requests. Your requests are being throttled due to system capacity limits."
            " Please try again later.",
        ),
    ],
)
async def test_server_errors_create_nothing(start_sim, sim_http, fault, status, code, message):
    """500 InternalError and 503 ModelServingError come before handling: no task is created."""
    sim = await start_sim(fault_rates={fault: 1.0})
    async with sim_http.post(sim.base_url + LEGACY, json=BODY, headers=HEADERS) as response:
        body = await response.json()
    assert (response.status, body["code"], body["message"]) == (status, code, message)
    assert not sim.tasks and sim.faults_injected[fault] == 1


async def test_throttle_storm_lasts_storm_s(start_sim, sim_api_for):
    """A storm answers every API request 429 RateQuota for ``storm_s`` simulated seconds, then passes."""
    sim = await start_sim(storm_s=5, quotas=UNLIMITED)
    api = sim_api_for(sim)
    sim.set_faults(throttle_storm=1.0)
    assert (await api.create())[1]["code"] == "Throttling.RateQuota"
    sim.set_faults("none")
    assert [(await api.call("GET", "/tasks/x"))[0] for _ in range(3)] == [429] * 3
    sim.advance(5)
    assert (await api.create())[0] == 200
    assert sim.faults_injected[Fault.THROTTLE_STORM] == 4


async def test_reset_before_creates_nothing(start_sim, sim_http):
    """A reset before handling reaches the client as a connection error, and no task exists."""
    sim = await start_sim(fault_rates={Fault.RESET_BEFORE: 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_create(sim_http, sim)
    assert not sim.tasks and sim.statuses[("create", 0)] == 1


async def test_reset_after_create_leaves_a_billed_task(start_sim, sim_http, sim_api_for):
    """A reset after handling: the client sees an error, yet the task exists, runs, is listed and is billed."""
    sim = await start_sim(durations=5, fault_rates={Fault.RESET_AFTER: 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_create(sim_http, sim)
    (task_id,) = sim.tasks
    sim.set_faults("none")
    sim.advance(5)
    assert [e["task_id"] for e in (await sim_api_for(sim).list())[1]["data"]] == [task_id]
    assert [r["task_id"] for r in sim.billing] == [task_id]


async def test_hold_response_waits_in_simulated_time(start_sim, sim_http):
    """A held answer arrives only after ``hold_s`` simulated seconds; the task exists meanwhile."""
    sim = await start_sim(hold_s=30, fault_rates={Fault.HOLD_RESPONSE: 1.0})
    call = asyncio.create_task(post_create(sim_http, sim))
    await task_created(sim)
    await asyncio.sleep(0.05)
    assert not call.done()
    sim.advance(30)
    response = await asyncio.wait_for(call, 5)
    assert response.status == 200


async def test_hold_response_times_out_a_client(start_sim, sim_http):
    """A client with a short timeout gives up on a held answer although its task was created."""
    sim = await start_sim(fault_rates={Fault.HOLD_RESPONSE: 1.0})
    with pytest.raises(asyncio.TimeoutError):
        async with sim_http.post(
            sim.base_url + LEGACY, json=BODY, headers=HEADERS, timeout=aiohttp.ClientTimeout(total=0.3)
        ) as response:
            await response.read()
    assert len(sim.tasks) == 1


async def test_slow_body_arrives_whole(start_sim, sim_http):
    """A slow body trickles in pieces over ``slow_body_s`` but is complete and valid."""
    sim = await start_sim(speed=100, slow_body_s=5, fault_rates={Fault.SLOW_BODY: 1.0})
    async with sim_http.post(sim.base_url + LEGACY, json=BODY, headers=HEADERS) as response:
        chunks = [chunk async for chunk in response.content.iter_any()]
    assert json.loads(b"".join(chunks))["output"]["task_status"] == "PENDING"
    assert sim.faults_injected[Fault.SLOW_BODY] == 1


async def test_truncated_body_after_create(start_sim, sim_http):
    """A body cut short fails the client's read (Content-Length unmet) after the task was created."""
    sim = await start_sim(fault_rates={Fault.TRUNCATED_BODY: 1.0})
    with pytest.raises(aiohttp.ClientPayloadError):
        await post_create(sim_http, sim)
    assert len(sim.tasks) == 1 and sim.statuses[("create", 200)] == 1


async def test_malformed_json_after_create(start_sim, sim_http):
    """A complete 200 answer whose JSON is cut short does not parse; the task exists."""
    sim = await start_sim(fault_rates={Fault.MALFORMED_JSON: 1.0})
    async with sim_http.post(sim.base_url + LEGACY, json=BODY, headers=HEADERS) as response:
        text = await response.text()
    assert response.status == 200 and response.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert len(sim.tasks) == 1


async def test_sync_endpoint_gets_only_before_faults(start_sim, sim_api_for):
    """After-kind faults never hit the sync call (its lost answer could not be recovered)."""
    sim = await start_sim(
        durations=0, quotas=UNLIMITED, fault_rates={Fault.RESET_AFTER: 0.5, Fault.MALFORMED_JSON: 0.5}
    )
    body = {
        "model": "wan2.6-t2i",
        "input": {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
        "parameters": {"n": 1},
    }
    for _ in range(5):
        status, answer = await sim_api_for(sim).call(
            "POST", "/services/aigc/multimodal-generation/generation", json=body
        )
        assert status == 200 and answer["output"]["finished"] is True
    assert not sim.faults_injected


async def download(sim_http, url):
    async with sim_http.get(url) as response:
        return response.status, await response.read()


async def image_url(sim, sim_api) -> str:
    task_id = await sim_api.task_id(n=1)
    body = await sim_api.query_full(task_id)
    return body["output"]["results"][0]["url"]


async def test_slow_and_truncated_downloads(start_sim, sim_api_for, sim_http):
    """A slow download still yields the whole PNG; a truncated one fails the client's read."""
    sim = await start_sim(speed=100, durations=0, slow_body_s=2)
    url = await image_url(sim, sim_api_for(sim))
    whole = await download(sim_http, url)
    sim.set_faults(slow_download=1.0)
    assert await download(sim_http, url) == whole
    sim.set_faults("none", truncated_download=1.0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await download(sim_http, url)
    assert (sim.faults_injected[Fault.SLOW_DOWNLOAD], sim.faults_injected[Fault.TRUNCATED_DOWNLOAD]) == (1, 1)


async def test_early_expiry_profile(start_sim, sim_api_for, sim_http):
    """Under ``expire-early`` some tasks' URLs die ``early_expiry_s`` after the task ends."""
    sim = await start_sim(faults="expire-early", durations=0, early_expiry_s=120, quotas=UNLIMITED)
    api = sim_api_for(sim)
    ids = [await api.task_id(n=1) for _ in range(20)]
    lifetimes = {round(sim.tasks[t].url_expires_s - sim.tasks[t].end_s) for t in ids}
    assert lifetimes == {120, 86400}
    early = next(t for t in ids if sim.tasks[t].url_expires_s - sim.tasks[t].end_s == 120)
    body = await api.query_full(early)
    sim.advance(121)
    assert (await download(sim_http, body["output"]["results"][0]["url"]))[0] == 403
    assert sim.faults_injected[Fault.EARLY_EXPIRY] == sum(
        1 for t in ids if sim.tasks[t].url_expires_s - sim.tasks[t].end_s == 120
    )


def test_profiles():
    """``chaos`` holds every fault but early expiry and the lost sync answer; ``expire-early`` only early expiry;
    ``none`` nothing."""
    assert set(FAULT_PROFILES["chaos"]) == set(BEFORE_FAULTS + AFTER_FAULTS + DOWNLOAD_FAULTS + SERVICE_FAULTS) - {
        Fault.SYNC_LOST
    }
    assert set(FAULT_PROFILES["expire-early"]) == {Fault.EARLY_EXPIRY}
    assert not FAULT_PROFILES["none"]
    for name, rates in FAULT_PROFILES.items():
        for stream in (BEFORE_FAULTS + AFTER_FAULTS, DOWNLOAD_FAULTS):
            assert sum(rates.get(f, 0) for f in stream) <= 1, name


def test_injector_is_reproducible_and_switchable():
    """The same seed draws the same faults; set() switches profile or overrides single rates; bad input is refused."""

    def draws(seed: int) -> list:
        injector = FaultInjector(profile="chaos", rates={}, seed=seed)
        return [injector.draw_api(sync=False) for _ in range(300)] + [injector.draw_download() for _ in range(100)]

    assert draws(5) == draws(5) != draws(6)
    assert {f for f in draws(5) if f} >= {Fault.RESET_AFTER, Fault.TRUNCATED_DOWNLOAD}
    injector = FaultInjector(profile="none", rates={"internal_error": 1.0}, seed=0)
    assert injector.draw_api(sync=False) is Fault.INTERNAL_ERROR
    injector.set("none")
    assert injector.draw_api(sync=False) is None and dict(injector.rates) == {}
    injector.set(None, model_serving=1.0)
    assert injector.draw_api(sync=True) is Fault.MODEL_SERVING
    for bad in ({"profile": "nope"}, {"profile": None, "nope": 1.0}, {"profile": None, "reset_after": 2.0}):
        with pytest.raises(ValueError):
            injector.set(**bad)


async def test_chaos_over_http_is_reproducible(start_sim, sim_http):
    """Two simulators with the same seed answer the same request sequence with the same faults."""
    outcomes = []
    for _ in range(2):
        sim = await start_sim(seed=9, fault_rates={"internal_error": 0.3, "model_serving": 0.3, "reset_before": 0.2})
        seen = []
        for _ in range(25):
            try:
                # POST: the client retries a reset GET by itself, which would hide the fault.
                async with sim_http.post(sim.base_url + "/tasks/x/cancel", headers=HEADERS) as response:
                    seen.append(response.status)
            except aiohttp.ClientError:
                seen.append(0)
        outcomes.append((seen, dict(sim.faults_injected)))
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0][0]) == {400, 500, 503, 0}
