"""The billing log: one line per billed image, written as simulated time passes, the same as ``sim.billing``."""

from __future__ import annotations

import asyncio
import hashlib
import json

LEGACY = "/services/aigc/text2image/image-synthesis"


def canonical_sha256(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


async def read_lines(path, count: int) -> list[dict]:
    """The log's records once it holds ``count`` lines (the ticker writes within ~50 ms)."""
    for _ in range(100):
        if path.exists() and len(path.read_text().splitlines()) >= count:
            break
        await asyncio.sleep(0.02)
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_billing_log_lines(tmp_path, start_sim, sim_api_for):
    """Each generated image gets one line with time, task, index, model, the body's fingerprint, a key id, the
    account, the endpoint and whether a neighbour made it."""
    log = tmp_path / "billing" / "log.jsonl"
    sim = await start_sim(billing_log=log, durations=20, duration_spread=0)
    api = sim_api_for(sim)
    body = {"model": "wan2.5-t2i-preview", "input": {"prompt": "一间花店"}, "parameters": {"n": 3, "seed": 5}}
    status, answer = await api.call("POST", LEGACY, json=body, headers={"X-DashScope-Async": "enable"})
    assert status == 200, answer
    task_id = answer["output"]["task_id"]
    await asyncio.sleep(0.15)
    assert not log.exists() or log.read_text() == ""  # nothing is billed before the task ends
    sim.advance(20)
    records = await read_lines(log, 3)
    assert records == sim.billing
    assert [r["image_index"] for r in records] == [0, 1, 2]
    first = records[0]
    assert set(first) == {
        *("time", "task_id", "image_index", "model", "fingerprint", "key_id"),
        *("account", "endpoint", "neighbour"),
    }
    assert (first["account"], first["endpoint"], first["neighbour"]) == ("demo", "legacy", False)
    assert (first["task_id"], first["model"]) == (task_id, "wan2.5-t2i-preview")
    assert first["fingerprint"] == canonical_sha256(body)
    assert first["time"] == round(sim.tasks[task_id].end_s, 3)
    assert "sk-sim" not in log.read_text() and first["key_id"] == sim.tasks[task_id].key_id


async def test_billing_log_is_written_by_the_clock_alone(tmp_path, start_sim, sim_api_for):
    """With a fast clock and nobody polling, lines appear as tasks end."""
    log = tmp_path / "log.jsonl"
    sim = await start_sim(billing_log=log, speed=1000, durations=10, duration_spread=0)
    await sim_api_for(sim).task_id(n=2)
    assert len(await read_lines(log, 2)) == 2


async def test_billing_log_appends_across_runs(tmp_path, start_sim, sim_api_for):
    """A second simulator on the same file appends; earlier lines stay."""
    log = tmp_path / "log.jsonl"
    for _ in range(2):
        sim = await start_sim(billing_log=log, durations=0)
        await sim_api_for(sim).task_id(n=1)
        assert len(sim.billing) == 1
    assert len(await read_lines(log, 2)) == 2


async def test_identical_requests_have_one_fingerprint(start_sim, sim_api_for):
    """Two sends of the same body are billed twice under one fingerprint: the log shows double payment."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    first = await api.task_id(n=1, seed=1)
    sim.advance(1)
    second = await api.task_id(n=1, seed=1)
    fingerprints = {r["task_id"]: r["fingerprint"] for r in sim.billing}
    assert set(fingerprints) == {first, second} and len(set(fingerprints.values())) == 1
