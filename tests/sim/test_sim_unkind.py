"""What the service, its gateway and its object storage may lawfully do: each unkind fault as a client meets it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from wanbatch.sim import FAULT_PROFILES, Fault, SimConfig
from wanbatch.sim import wire as sim_wire

LEGACY = "/services/aigc/text2image/image-synthesis"
SYNC = "/services/aigc/multimodal-generation/generation"
UNLIMITED = {"*": {"submit_rps": None}}
ERRORS_AFTER_CREATE = {
    (500, "InternalError", sim_wire.INTERNAL_ERROR),
    (500, "SystemError", "An system error has occured, please try again later."),
    (500, "RequestTimeOut", "Request timed out, please try again later."),
    (503, "ModelServingError", sim_wire.MODEL_SERVING),
}


async def settled(sim) -> None:
    """Let the simulator's ticker run once (due actions land without any request)."""
    await asyncio.sleep(0.12)
    sim.state.materialise()


async def test_error_after_create_makes_runs_and_bills_the_task(start_sim, sim_api_for):
    """A create answered 500/503 after the task was made: every answer is one of §4's four 5xx bodies, yet each
    task exists, is listed and is billed."""
    sim = await start_sim(durations=5, quotas=UNLIMITED, fault_rates={Fault.ERROR_AFTER_CREATE: 1.0})
    api = sim_api_for(sim)
    answers = [await api.create(prompt=f"cat {i}", n=1) for i in range(12)]
    seen = {(status, body["code"], body["message"]) for status, body in answers}
    assert seen <= ERRORS_AFTER_CREATE and len(seen) >= 2, seen
    assert len(sim.tasks) == 12 and sim.faults_injected[Fault.ERROR_AFTER_CREATE] == 12
    sim.set_faults("none")
    sim.advance(60)  # two run at a time
    assert (await api.list(page_size=100))[1]["total"] == 12
    assert {r["task_id"] for r in sim.billing} == set(sim.tasks)


async def test_late_create_lands_later_on_its_own(start_sim, sim_api_for):
    """A late create is reset unanswered; its task appears later, with no other request, and its submit time is
    when it landed (list gmt_create and query submit_time), not when it was sent."""
    sim = await start_sim(late_create_max_s=300, fault_rates={Fault.LATE_CREATE: 1.0})
    api = sim_api_for(sim)
    sent_s = sim.clock.now()
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.create(n=1)
    await settled(sim)
    assert not sim.tasks and sim.statuses[("create", 0)] == 1
    sim.advance(300)
    await settled(sim)
    (view,) = sim.tasks.values()
    assert sent_s < view.landed_s <= sent_s + 300 and view.sent_s == pytest.approx(sent_s)
    sim.set_faults("none")
    (entry,) = (await api.list())[1]["data"]
    assert entry["gmt_create"] == int(view.landed_s * 1000)
    assert (await api.query(view.task_id))["submit_time"] == sim_wire.format_time(view.landed_s)


async def test_late_create_meets_the_quota_when_it_lands(start_sim, sim_api_for):
    """Two late creates landing in the same second under a 1-per-second quota: only one task is made."""
    quotas = {"wan2.2-t2i-flash": {"submit_rps": 1}}
    sim = await start_sim(late_create_max_s=0, quotas=quotas, fault_rates={Fault.LATE_CREATE: 1.0})
    api = sim_api_for(sim)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.create(n=1)
    await settled(sim)
    assert len(sim.tasks) == 1 and sim.faults_injected[Fault.LATE_CREATE] == 2


async def test_list_lag_hides_a_new_task_from_the_list_only(start_sim, sim_api_for):
    """A lagging task is missing from GET /tasks (even filtered by its id) for ``list_lag_s``; GET /tasks/{id}
    finds it at once."""
    sim = await start_sim(list_lag_s=60, fault_rates={Fault.LIST_LAG: 1.0})
    api = sim_api_for(sim)
    task_id = await api.task_id(n=1)
    assert (await api.query(task_id))["task_status"] in ("PENDING", "RUNNING")
    assert (await api.list())[1]["total"] == 0
    assert (await api.list(task_id=task_id))[1]["total"] == 0
    sim.advance(60)
    assert [e["task_id"] for e in (await api.list())[1]["data"]] == [task_id]
    assert sim.tasks[task_id].listed_s == sim.tasks[task_id].landed_s + 60


async def test_query_unknown_once_for_a_young_task(start_sim, sim_api_for):
    """A young task may be answered UNKNOWN (200, task_id and status only) once; the next query answers truly. A
    task older than ``young_task_s`` is never answered so."""
    sim = await start_sim(durations=1000, young_task_s=300, fault_rates={Fault.QUERY_UNKNOWN: 1.0})
    api = sim_api_for(sim)
    old = await api.task_id(prompt="old", n=1)
    sim.advance(300)
    assert (await api.query(old))["task_status"] == "RUNNING"
    young = await api.task_id(prompt="young", n=1)
    body = await api.query_full(young)
    assert body["output"] == {"task_id": young, "task_status": "UNKNOWN"}
    assert (await api.query(young))["task_status"] == "RUNNING"
    assert sim.faults_injected[Fault.QUERY_UNKNOWN] == 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault.IMAGE_SLOWDOWN, 503, "SlowDown"),
        (Fault.IMAGE_NOT_FOUND, 404, "NoSuchKey"),
        (Fault.IMAGE_DENIED, 403, "AccessDenied"),
    ],
)
async def test_image_first_get_fails_then_the_url_works(start_sim, sim_api_for, sim_http, fault, status, code):
    """An object-storage error on an image's first GET (OSS XML body); the same URL then serves the PNG."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    url = (await api.query_full(await api.task_id(n=1)))["output"]["results"][0]["url"]
    sim.set_faults(None, **{fault: 1.0})
    async with sim_http.get(url) as response:
        text = await response.text()
    assert response.status == status and response.content_type == "application/xml"
    assert f"<Code>{code}</Code>" in text and "<Expires>" not in text
    async with sim_http.get(url) as response:
        assert response.status == 200 and (await response.read())[:8] == b"\x89PNG\r\n\x1a\n"
    assert sim.faults_injected[fault] == 1


async def test_sync_answer_lost_after_the_images_were_made(start_sim, sim_api_for):
    """A lost sync answer (a reset or 500 RequestTimeOut, drawn half and half) comes after its task ran to the end:
    every call is billed, none answered with images."""
    sim = await start_sim(durations=0, quotas=UNLIMITED, seed=3, fault_rates={Fault.SYNC_LOST: 1.0})
    body = {"model": "wan2.6-t2i", "input": {"messages": [{"role": "user", "content": [{"text": "x"}]}]}}
    seen = []
    for _ in range(8):
        try:
            status, answer = await sim_api_for(sim).call("POST", SYNC, json={**body, "parameters": {"n": 1}})
            seen.append((status, answer["code"]))
        except aiohttp.ClientConnectionError:
            seen.append((0, ""))
    assert set(seen) == {(0, ""), (500, "RequestTimeOut")}
    assert len(sim.billing) == 8 and {r["endpoint"] for r in sim.billing} == {"sync"}
    assert sim.faults_injected[Fault.SYNC_LOST] == 8


def pairs(sim) -> list[tuple]:
    """(ours, its neighbour) views, matched by prompt."""
    ours = {view.prompt: view for view in sim.our_tasks.values()}
    return [(ours[view.prompt], view) for view in sim.neighbour_tasks.values() if view.prompt in ours]


async def test_neighbour_through_our_key_sends_our_prompt_with_other_settings(start_sim, sim_api_for):
    """A neighbour through our key: same prompt and model, made within ±30 s of ours, but another size or more
    images and another seed (so another fingerprint); listed with ours and billed as a neighbour's."""
    sim = await start_sim(durations=5, quotas=UNLIMITED, neighbour_rate=1.0, neighbour_same_key_share=1.0)
    api = sim_api_for(sim)
    for i in range(8):
        await api.task_id(prompt=f"a pine {i}", n=1, size="1024*1024", seed=7)
    sim.advance(31)
    found = pairs(sim)
    assert len(found) == 8 == len(sim.neighbour_tasks)
    for ours, theirs in found:
        assert theirs.key_id == ours.key_id and theirs.model == ours.model
        assert theirs.size != ours.size or theirs.n > ours.n
        assert theirs.seed != ours.seed and theirs.fingerprint != ours.fingerprint
        assert abs(theirs.landed_s - ours.landed_s) <= 30
    assert any(t.landed_s < o.landed_s for o, t in found) and any(t.landed_s > o.landed_s for o, t in found)
    assert (await api.list(page_size=100))[1]["total"] == 16
    sim.advance(10)
    assert {r["task_id"] for r in sim.billing if r["neighbour"]} == set(sim.neighbour_tasks)
    assert {r["task_id"] for r in sim.billing if not r["neighbour"]} == set(sim.our_tasks)


async def test_neighbour_through_another_key_is_seen_by_ours(start_sim, sim_api_for):
    """A neighbour through another key of the account has its own api_key_id, yet our key lists and queries it."""
    sim = await start_sim(durations=5, neighbour_rate=1.0, neighbour_same_key_share=0.0, neighbour_window_s=0)
    api = sim_api_for(sim)
    ours = await api.task_id(prompt="a heron", n=1)
    (theirs,) = sim.neighbour_tasks.values()
    assert theirs.prompt == "a heron" and theirs.key_id != sim.tasks[ours].key_id
    listed = {e["task_id"]: e["api_key_id"] for e in (await api.list())[1]["data"]}
    assert listed == {ours: sim.tasks[ours].key_id, theirs.task_id: theirs.key_id}
    assert (await api.query(theirs.task_id))["task_status"] in ("PENDING", "RUNNING")


async def test_neighbours_take_the_accounts_concurrency(start_sim, sim_api_for):
    """With one concurrent task allowed, our task and its neighbour never run at the same time."""
    quotas = {"wan2.2-t2i-flash": {"concurrency": 1}}
    sim = await start_sim(durations=10, duration_spread=0, quotas=quotas, neighbour_rate=1.0)
    task_id = await sim_api_for(sim).task_id(n=1)
    ours = sim.tasks[task_id]
    sim.advance(30)
    (theirs,) = sim.neighbour_tasks.values()
    assert theirs.start_s >= ours.end_s or ours.start_s >= theirs.end_s


async def test_background_neighbours_use_our_models_with_other_prompts(start_sim, sim_api_for):
    """The background stream sends unrelated prompts on the models we used, at about its rate, all billed as
    neighbours'."""
    sim = await start_sim(durations=5, neighbour_background_rps=0.05)
    await sim_api_for(sim).task_id(prompt="a lone pine", n=1)
    sim.advance(3600)
    background = sim.neighbour_tasks.values()
    assert 120 <= len(background) <= 240
    assert {v.model for v in background} == {"wan2.2-t2i-flash"}
    assert sum(r["neighbour"] for r in sim.billing) == sum(v.images_ok for v in background)


async def test_echo_variants_collapse_whitespace_or_truncate_at_the_other_limit(start_sim, sim_api_for):
    """Under echo variants orig_prompt is the prompt with whitespace collapsed and/or cut at 800 instead of 500
    characters (and then the request is cut at 800 too); without them it is the prompt exactly."""
    sim = await start_sim(durations=0, quotas=UNLIMITED, fault_rates={Fault.ECHO_VARIANT: 1.0})
    api = sim_api_for(sim)
    prompt = "a  cat\n\n on a   mat " + "x" * 880

    def collapsed(text: str) -> str:
        return " ".join(text.split())

    seen = set()
    for _ in range(10):
        task_id = await api.task_id(prompt=prompt, n=1)
        echoed = (await api.query(task_id))["results"][0]["orig_prompt"]
        variant = {
            collapsed(prompt[:500]): "collapsed",
            prompt[:800]: "limit",
            collapsed(prompt[:800]): "both",
        }[echoed]
        assert sim.tasks[task_id].prompt == (prompt[:500] if variant == "collapsed" else prompt[:800])
        seen.add(variant)
    assert len(seen) >= 2
    sim.set_faults("none")
    task_id = await api.task_id(prompt=prompt, n=1)
    assert (await api.query(task_id))["results"][0]["orig_prompt"] == prompt[:500]


def test_unkind_profile_and_its_neighbours():
    """``unkind`` holds every service fault, its neighbours come with it unless the config says otherwise, and
    ``chaos`` leaves the lost sync answer out."""
    from wanbatch.sim.faults import SERVICE_FAULTS

    assert set(FAULT_PROFILES["unkind"]) == set(SERVICE_FAULTS)
    assert Fault.SYNC_LOST not in FAULT_PROFILES["chaos"]
    assert SimConfig(faults="unkind").neighbours() == (0.3, 0.05)
    assert SimConfig(faults="unkind", neighbour_rate=0.0).neighbours() == (0.0, 0.05)
    assert SimConfig().neighbours() == (0.0, 0.0)
    with pytest.raises(ValueError, match="neighbour_rate"):
        SimConfig(neighbour_rate=2.0)


async def test_unkind_runs_are_reproducible_from_the_seed(start_sim, sim_api_for):
    """Two simulators under ``unkind`` with one seed answer one request sequence alike and make the same tasks."""
    outcomes = []
    for _ in range(2):
        sim = await start_sim(faults="unkind", seed=12, durations=3, quotas=UNLIMITED)
        api, seen = sim_api_for(sim), []
        for i in range(30):
            try:
                status, body = await api.create(prompt=f"fox {i}", n=1, seed=i)
                seen.append((status, body.get("code", "")))
            except aiohttp.ClientConnectionError:
                seen.append((0, ""))
        sim.advance(400)
        await settled(sim)
        views = sorted(
            (v.prompt, v.size, v.n, v.neighbour, round(v.landed_s - sim.clock.now())) for v in sim.tasks.values()
        )
        outcomes.append((seen, dict(sim.faults_injected), views))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) >= 3 and {status for status, _ in outcomes[0][0]} > {200}
