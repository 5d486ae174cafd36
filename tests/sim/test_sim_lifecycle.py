"""Task lifecycle in simulated time: statuses, query bodies (§3.2), queueing, cancel, expiry, sync calls."""

from __future__ import annotations

import asyncio
import re

import pytest

from helpers.sim import task_created
from wanbatch.sim import SimConfig, running_sim

SYNC26 = "/services/aigc/multimodal-generation/generation"
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")
DAY_S = 86400


def sync_body(text: str = "a dog", **params) -> dict:
    return {
        "model": "wan2.6-t2i",
        "input": {"messages": [{"role": "user", "content": [{"text": text}]}]},
        "parameters": params,
    }


async def test_pending_running_succeeded_by_advancing(start_sim, sim_api_for):
    """A task is RUNNING from its start and SUCCEEDED at its end, each with §3.2's fields, by clock steps alone."""
    sim = await start_sim(durations=60, duration_spread=0)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.5-t2i-preview", "a flower shop", n=2, seed=7)
    running = await api.query(task_id)
    assert running["task_status"] == "RUNNING"  # a free slot: it starts at once
    assert set(running) == {"task_id", "task_status", "submit_time", "scheduled_time", "task_metrics"}
    assert running["task_metrics"] == {"TOTAL": 2, "SUCCEEDED": 0, "FAILED": 0}
    sim.advance(59.9)
    assert (await api.query(task_id))["task_status"] == "RUNNING"
    sim.advance(0.2)
    done = await api.query(task_id)
    assert done["task_status"] == "SUCCEEDED"
    assert all(TIME.match(done[k]) for k in ("submit_time", "scheduled_time", "end_time"))
    assert done["task_metrics"] == {"TOTAL": 2, "SUCCEEDED": 2, "FAILED": 0}
    first = done["results"][0]
    assert first["orig_prompt"] == "a flower shop"
    assert first["actual_prompt"] != first["orig_prompt"]  # prompt_extend defaults to true
    assert first["url"].startswith(sim.base_url.removesuffix("/api/v1") + "/oss/")
    body = await api.query_full(task_id)
    assert body["usage"] == {"image_count": 2}


async def test_prompt_extend_off_has_no_actual_prompt(start_sim, sim_api_for):
    """With prompt_extend false, results carry orig_prompt but no actual_prompt."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.2-t2i-plus", prompt_extend=False, n=1)
    result = (await api.query(task_id))["results"][0]
    assert "actual_prompt" not in result and result["orig_prompt"] == "a cat"


async def test_concurrency_queue_is_fifo(start_sim, sim_api_for):
    """Over the concurrency quota (2 for wan2.2-flash) tasks wait PENDING and start in submit order as slots free."""
    sim = await start_sim(durations=10, duration_spread=0, quotas={"*": {"submit_rps": None}})
    api = sim_api_for(sim)
    ids = [await api.task_id("wan2.2-t2i-flash", f"p{i}", n=1) for i in range(5)]
    statuses = [(await api.query(t))["task_status"] for t in ids]
    assert statuses == ["RUNNING", "RUNNING", "PENDING", "PENDING", "PENDING"]
    pending = await api.query(ids[2])
    assert set(pending) == {"task_id", "task_status", "submit_time"}
    sim.advance(10)
    assert [(await api.query(t))["task_status"] for t in ids] == ["SUCCEEDED"] * 2 + ["RUNNING"] * 2 + ["PENDING"]
    sim.advance(10)
    assert [(await api.query(t))["task_status"] for t in ids][4] == "RUNNING"
    sim.advance(10)
    assert [sim.tasks[t].status for t in ids] == ["SUCCEEDED"] * 5


async def test_cancel_pending_frees_its_place(start_sim, sim_api_for):
    """Canceling a PENDING task answers 200 with only a request_id, and the task queued behind it moves up."""
    sim = await start_sim(durations=10, duration_spread=0, quotas={"*": {"submit_rps": None, "concurrency": 1}})
    api = sim_api_for(sim)
    first, second, third = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(3)]
    assert sim.tasks[third].start_s == pytest.approx(sim.tasks[first].start_s + 20)
    status, body = await api.cancel(second)
    assert status == 200 and set(body) == {"request_id"}
    assert (await api.query(second)) == {
        "task_id": second,
        "task_status": "CANCELED",
        "submit_time": (await api.query(second))["submit_time"],
    }
    assert sim.tasks[third].start_s == pytest.approx(sim.tasks[first].start_s + 10)
    sim.advance(20)
    assert [sim.tasks[t].status for t in (first, second, third)] == ["SUCCEEDED", "CANCELED", "SUCCEEDED"]
    assert {r["task_id"] for r in sim.billing} == {first, third}  # a canceled task is never billed


async def test_cancel_refused_unless_pending(start_sim, sim_api_for):
    """Cancel of a RUNNING, a finished or an unknown task gets 400 UnsupportedOperation with §3.4's message."""
    sim = await start_sim(durations=10, duration_spread=0)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.2-t2i-flash", n=1)
    expected = (
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task is in PENDING status.",
    )
    status, body = await api.cancel(task_id)
    assert (status, body["code"], body["message"]) == expected
    sim.advance(10)
    for target in (task_id, "no-such-task"):
        status, body = await api.call(
            "POST", f"/tasks/{target}/cancel/", json={"model": "", "parameters": {}, "input": ""}
        )
        assert (status, body["code"], body["message"]) == expected


async def test_unknown_after_task_lifetime(start_sim, sim_api_for):
    """A task is UNKNOWN 24 simulated hours after it ends, as is an id that never existed."""
    sim = await start_sim(durations=5, duration_spread=0)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.2-t2i-flash", n=1)
    sim.advance(5 + DAY_S - 1)
    assert (await api.query(task_id))["task_status"] == "SUCCEEDED"
    sim.advance(1)
    assert await api.query(task_id) == {"task_id": task_id, "task_status": "UNKNOWN"}
    assert await api.query("1111") == {"task_id": "1111", "task_status": "UNKNOWN"}
    assert task_id not in sim.tasks  # forgotten, not just hidden


async def test_other_accounts_tasks_are_unknown(tmp_path, start_sim, sim_api_for):
    """Another account's task id reads as UNKNOWN and cannot be canceled."""
    config = tmp_path / "sim.yaml"
    config.write_text("accounts:\n  team:\n    keys:\n      sk-team: beijing\n")
    sim = await start_sim(config_file=config, durations=0)
    task_id = await sim_api_for(sim).task_id(n=1)
    other = sim_api_for(sim, key="sk-team")
    assert (await other.query(task_id))["task_status"] == "UNKNOWN"
    assert (await other.cancel(task_id))[0] == 400


async def test_partial_failure(start_sim, sim_api_for):
    """Some images failing leaves the task SUCCEEDED with failed results; usage and billing count successes."""
    sim = await start_sim(durations=0, image_failure_rate=0.5, seed=3)
    api = sim_api_for(sim)
    outputs = []
    for _ in range(3):
        task_id = await api.task_id("wan2.5-t2i-preview", n=4)
        body = await api.query_full(task_id)
        outputs.append(body)
    mixed = next(b for b in outputs if 0 < b["usage"]["image_count"] < 4)
    output = mixed["output"]
    failed = [r for r in output["results"] if "url" not in r]
    assert failed and all(set(r) == {"code", "message"} for r in failed)
    assert {r["code"] for r in failed} <= {"InternalError.Timeout", "DataInspectionFailed"}
    assert output["task_status"] == "SUCCEEDED"
    assert output["task_metrics"]["SUCCEEDED"] == mixed["usage"]["image_count"] == 4 - len(failed)
    billed = [r for r in sim.billing if r["task_id"] == output["task_id"]]
    assert sorted(r["image_index"] for r in billed) == [i for i, r in enumerate(output["results"]) if "url" in r]


async def test_every_image_failing_fails_the_task(start_sim, sim_api_for):
    """When no image succeeds the task is FAILED with the failure's code and message, and nothing is billed."""
    sim = await start_sim(durations=0, image_failure_rate=1.0)
    api = sim_api_for(sim)
    output = await api.query(await api.task_id("wan2.2-t2i-flash", n=2))
    assert output["task_status"] == "FAILED"
    assert output["code"] in ("InternalError.Timeout", "DataInspectionFailed") and output["message"]
    assert output["task_metrics"] == {"TOTAL": 2, "SUCCEEDED": 0, "FAILED": 2}
    assert not sim.billing


async def test_output_moderation_fails_the_task(start_sim, sim_api_for):
    """An output-side trigger word is accepted at submit and the task then FAILED DataInspectionFailed."""
    sim = await start_sim(durations=10)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.6-t2i", "a sim-unsafe-output scene", n=1)
    sim.advance(60)
    output = await api.query(task_id)
    assert (output["task_status"], output["code"]) == ("FAILED", "DataInspectionFailed")
    assert output["message"] == "Output data may contain inappropriate content."
    assert "choices" not in output and "end_time" in output
    assert not sim.billing


async def test_wan26_async_result_shape(start_sim, sim_api_for):
    """A wan2.6 async task ends with §3.2's choices shape: one choice holding n images, usage with size."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.6-t2i", n=2, size="1440*1440")
    body = await api.query_full(task_id)
    output = body["output"]
    assert output["finished"] is True and len(output["choices"]) == 1
    contents = output["choices"][0]["message"]["content"]
    assert [c["type"] for c in contents] == ["image", "image"]
    assert output["choices"][0]["finish_reason"] == "stop" and output["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"] == {
        "size": "1440*1440",
        "total_tokens": 0,
        "image_count": 2,
        "output_tokens": 0,
        "input_tokens": 0,
    }


async def test_wan26_shape_switches(start_sim, sim_api_for):
    """``wan26_choices="per_image"`` gives one choice per image; ``wan26_usage="width_height"`` splits the size."""
    sim = await start_sim(durations=0, wan26_choices="per_image", wan26_usage="width_height")
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.6-t2i", n=3)
    body = await api.query_full(task_id)
    assert [len(c["message"]["content"]) for c in body["output"]["choices"]] == [1, 1, 1]
    assert body["usage"] == {"image_count": 3, "width": 1280, "height": 1280}


async def test_sync_call_holds_until_done_and_is_billed(start_sim, sim_api_for):
    """The wan2.6 sync call answers §3.3's body once the task ends in simulated time; it is billed, not listed."""
    sim = await start_sim(durations=30, duration_spread=0)
    api = sim_api_for(sim)
    call = asyncio.create_task(api.call("POST", SYNC26 + "/", json=sync_body(n=2)))
    await task_created(sim)
    await asyncio.sleep(0.05)
    assert not call.done()
    sim.advance(30)
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200
    assert set(body) == {"output", "usage", "request_id"} and set(body["output"]) == {"choices", "finished"}
    assert len(body["output"]["choices"][0]["message"]["content"]) == 2
    assert body["usage"]["image_count"] == 2 and len(sim.billing) == 2
    assert (await api.list())[1]["total"] == 0


async def test_sync_call_takes_a_concurrency_slot(start_sim, sim_api_for):
    """A sync call occupies one of the account's wan2.6 slots, so async tasks queue behind it."""
    sim = await start_sim(
        durations=30, duration_spread=0, quotas={"wan2.6-t2i": {"concurrency": 1, "submit_rps": None}}
    )
    api = sim_api_for(sim)
    call = asyncio.create_task(api.call("POST", SYNC26, json=sync_body(n=1)))
    await task_created(sim)
    task_id = await api.task_id("wan2.6-t2i", n=1)
    assert (await api.query(task_id))["task_status"] == "PENDING"
    sim.advance(30)
    assert (await asyncio.wait_for(call, 5))[0] == 200
    assert (await api.query(task_id))["task_status"] == "RUNNING"


async def test_sync_call_failures(start_sim, sim_api_for):
    """A sync call whose images all fail answers the failure's code; past the 300 s limit it answers RequestTimeOut."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    status, body = await api.call("POST", SYNC26, json=sync_body("sim-unsafe-output", n=1))
    assert (status, body["code"]) == (400, "DataInspectionFailed")
    slow = await start_sim(durations=1000, duration_spread=0)
    call = asyncio.create_task(sim_api_for(slow).call("POST", SYNC26, json=sync_body(n=1)))
    await task_created(slow)
    slow.advance(300)
    status, body = await asyncio.wait_for(call, 5)
    assert (status, body["code"], body["message"]) == (
        500,
        "RequestTimeOut",
        "Request timed out, please try again later.",
    )
    slow.advance(700)
    assert len(slow.billing) == 1  # the work went on and was paid for


async def test_durations_reproducible_under_seed(start_sim, sim_api_for):
    """The same seed and requests give the same durations; they spread around the model's mean."""
    plans = []
    for _ in range(2):
        sim = await start_sim(seed=11, quotas={"*": {"submit_rps": None, "concurrency": None}})
        api = sim_api_for(sim)
        ids = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(5)]
        plans.append([round(sim.tasks[t].end_s - sim.tasks[t].start_s, 6) for t in ids])
    assert plans[0] == plans[1]
    assert all(40 * 0.7 <= d <= 40 * 1.3 for d in plans[0]) and len(set(plans[0])) > 1


@pytest.mark.parametrize("distribution", ["uniform", "lognormal", "fixed"])
async def test_duration_distributions(start_sim, sim_api_for, distribution):
    """Each distribution draws positive durations whose mean is near the configured one."""
    sim = await start_sim(
        durations={"wan2.2-t2i-flash": 20},
        duration_distribution=distribution,
        quotas={"*": {"submit_rps": None, "concurrency": None}},
    )
    api = sim_api_for(sim)
    ids = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(40)]
    durations = [sim.tasks[t].end_s - sim.tasks[t].start_s for t in ids]
    assert all(d > 0 for d in durations)
    assert 16 <= sum(durations) / len(durations) <= 24


async def test_a_simulator_started_again_in_its_state_dir_goes_on(sim_api_for, sim_http, tmp_path):
    """Started again in its state_dir, a simulator knows the tasks made before (results, queue, clock), serves
    their result URLs on its old port, and bills each task once, one that ended while it was down included."""
    folder = tmp_path / "sim"
    quotas = {"*": {"concurrency": 1, "submit_rps": None}}
    settings = {"durations": 60, "duration_spread": 0, "quotas": quotas, "burst_idle_s": None, "speed": 1e-6}
    config = SimConfig(**settings, state_dir=folder, billing_log=folder / "billing.jsonl")
    async with running_sim(config) as first:
        api = sim_api_for(first)
        done, running, waiting = [await api.task_id(prompt=prompt, n=1) for prompt in ("one", "two", "three")]
        first.advance(90)  # "one" ended, "two" half done, "three" waits for its slot
        url = (await api.query(done))["results"][0]["url"]
        base_url, clock_s = first.base_url, first.clock.now()
    async with running_sim(config) as again:
        api = sim_api_for(again)
        assert again.base_url == base_url and again.clock.now() == pytest.approx(clock_s, abs=1)
        assert [(await api.query(t))["task_status"] for t in (done, running, waiting)] == [
            "SUCCEEDED",
            "RUNNING",
            "PENDING",
        ]
        async with sim_http.get(url) as response:
            assert response.status == 200 and response.content_type == "image/png"
        again.advance(120)
        assert (await api.query(waiting))["task_status"] == "SUCCEEDED"
        assert sorted(record["task_id"] for record in again.billing) == sorted([done, running, waiting])


async def test_a_state_dir_serves_one_simulator_at_a_time(sim_api_for, tmp_path):
    """A second simulator on a folder whose simulator runs is refused before it reads or rewrites anything: two
    processes on one folder would bill its tasks twice and lose the first one's records."""
    from wanbatch.sim.persist import STATE_FILE, SimInUse

    config = SimConfig(speed=1e-6, state_dir=tmp_path / "sim")
    async with running_sim(config) as first:
        status, _ = await sim_api_for(first).create(size="512*512", n=1)
        assert status == 200
        before = (tmp_path / "sim" / STATE_FILE).read_bytes()
        with pytest.raises(SimInUse):
            async with running_sim(config):
                pass
        assert (tmp_path / "sim" / STATE_FILE).read_bytes() == before
    async with running_sim(config) as again:  # free once the first has stopped
        assert len(again.tasks) == 1


def test_a_line_torn_inside_a_character_is_skipped_and_cut_off(tmp_path):
    """A process killed while writing a record leaves half a line, cut inside a multi-byte character: the next
    load skips it, cuts it off the file, and keeps every whole record."""
    from wanbatch.sim.persist import STATE_FILE, SimStore

    path = tmp_path / STATE_FILE
    whole = '{"kind": "meta", "secret": "00", "port": 1, "speed": 1.0}\n'
    path.write_bytes(whole.encode() + '{"kind": "task", "prompt": "红狐'.encode()[:-1])
    store = SimStore(tmp_path)
    store.lock()
    saved = store.load()
    store.close()
    assert saved.meta["port"] == 1 and saved.tasks == []
    assert path.read_text(encoding="utf-8") == whole
