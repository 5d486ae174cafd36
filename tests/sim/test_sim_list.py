"""``GET /tasks``: the account's tasks with §3.5's fields, filters, pages and time windows."""

from __future__ import annotations

import datetime as dt

import pytest

BEIJING_TZ = dt.timezone(dt.timedelta(hours=8))
UNLIMITED = {"*": {"submit_rps": None}}


def compact(epoch_s: float) -> str:
    """``YYYYMMDDhhmmss`` in UTC+8, the documented list time format."""
    return dt.datetime.fromtimestamp(epoch_s, BEIJING_TZ).strftime("%Y%m%d%H%M%S")


@pytest.fixture
async def busy(start_sim):
    """A simulator whose tasks run exactly 10 s, with no submit-rate limit (concurrency stays 2 for wan2.2)."""
    return await start_sim(durations=10, duration_spread=0, quotas=UNLIMITED)


async def test_list_entries_carry_the_documented_fields(busy, sim_api_for):
    """Entries have §3.5's fields, epoch-ms times, end_time only when ended, start_time only once started."""
    api = sim_api_for(busy)
    finished = await api.task_id("wan2.2-t2i-plus", n=1)
    busy.advance(10)
    ids = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(3)]
    status, body = await api.list()
    assert status == 200
    assert set(body) == {"request_id", "total", "total_page", "page_no", "page_size", "data"}
    assert (body["total"], body["total_page"], body["page_no"], body["page_size"]) == (4, 1, 1, 10)
    assert [e["task_id"] for e in body["data"]] == [*reversed(ids), finished]  # newest first
    by_id = {e["task_id"]: e for e in body["data"]}
    done = by_id[finished]
    assert set(done) == {
        "api_key_id",
        "caller_parent_id",
        "caller_uid",
        "end_time",
        "gmt_create",
        "model_name",
        "region",
        "request_id",
        "start_time",
        "status",
        "task_id",
        "user_api_unique_key",
    }
    assert done["status"] == "SUCCEEDED" and done["region"] == "cn-beijing"
    assert done["end_time"] - done["start_time"] == 10_000
    assert done["user_api_unique_key"] == "apikey:v1:aigc:text2image:image-synthesis:wan2.2-t2i-plus"
    assert done["api_key_id"] == busy.tasks[finished].key_id and "sk-" not in done["api_key_id"]
    assert "end_time" not in by_id[ids[0]] and "start_time" in by_id[ids[0]]  # RUNNING
    assert "start_time" not in by_id[ids[2]]  # PENDING


async def test_list_filters(busy, sim_api_for):
    """model_name, status, task_id and api_key_id narrow the list."""
    api = sim_api_for(busy)
    plus = await api.task_id("wan2.2-t2i-plus", n=1)
    flash = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(3)]
    assert (await api.list(model_name="wan2.2-t2i-plus"))[1]["total"] == 1
    assert [e["task_id"] for e in (await api.list(status="PENDING"))[1]["data"]] == [flash[2]]
    assert (await api.list(status="RUNNING"))[1]["total"] == 3
    assert [e["task_id"] for e in (await api.list(task_id=plus))[1]["data"]] == [plus]
    assert (await api.list(task_id="nope"))[1]["total"] == 0
    key_id = busy.tasks[plus].key_id
    assert (await api.list(api_key_id=key_id))[1]["total"] == 4
    assert (await api.list(api_key_id="1"))[1]["total"] == 0
    assert (await api.list(region="cn-beijing"))[1]["total"] == 4
    assert (await api.list(region="ap-southeast-1"))[1]["total"] == 0


async def test_list_pages(busy, sim_api_for):
    """page_no and page_size slice the newest-first list; total and total_page count everything."""
    api = sim_api_for(busy)
    ids = [await api.task_id("wan2.2-t2i-flash", n=1) for _ in range(5)]
    status, page2 = await api.list(page_no=2, page_size=2)
    assert (page2["total"], page2["total_page"], page2["page_no"], page2["page_size"]) == (5, 3, 2, 2)
    assert [e["task_id"] for e in page2["data"]] == [ids[2], ids[1]]
    assert (await api.list(page_no=9))[1]["data"] == []
    for bad in ({"page_no": 0}, {"page_size": "x"}):
        status, body = await api.list(**bad)
        assert (status, body["code"]) == (400, "InvalidParameter")


async def test_list_time_windows(busy, sim_api_for):
    """start/end accept YYYYMMDDhhmmss (UTC+8) or epoch ms; one bound means 24 h from it; none, the last 24 h."""
    api = sim_api_for(busy)
    early = await api.task_id("wan2.2-t2i-flash", n=1)
    t_early = busy.tasks[early].submit_s
    busy.advance(3600)
    late = await api.task_id("wan2.2-t2i-flash", n=1)
    t_late = busy.tasks[late].submit_s

    async def listed(**params):
        status, body = await api.list(**params)
        assert status == 200, body
        return [e["task_id"] for e in body["data"]]

    assert await listed() == [late, early]
    assert await listed(start_time=compact(t_late - 1)) == [late]
    assert await listed(end_time=int((t_early + 1) * 1000)) == [early]
    assert await listed(start_time=int((t_early - 1) * 1000), end_time=compact(t_late + 1)) == [late, early]
    busy.advance(86400 - 1800)
    assert await listed() == [late]  # the default window is the last 24 h
    for bad in (
        {"start_time": "2025-01-01"},
        {"start_time": compact(t_late), "end_time": compact(t_late - 10)},
        {"start_time": compact(t_early - 86400), "end_time": compact(t_late)},
    ):
        status, body = await api.list(**bad)
        assert (status, body["code"]) == (400, "InvalidParameter")


async def test_list_is_per_account_and_skips_sync_calls(tmp_path, start_sim, sim_api_for):
    """An account sees only its own tasks; sync wan2.6 calls are not tasks and never appear."""
    config = tmp_path / "a.json"
    config.write_text('{"accounts": {"other": {"keys": {"sk-other": "beijing"}}}, "durations": 0}')
    sim = await start_sim(config_file=config)
    await sim_api_for(sim).task_id(n=1)
    sync = {"model": "wan2.6-t2i", "input": {"messages": [{"role": "user", "content": [{"text": "x"}]}]}}
    assert (await sim_api_for(sim).call("POST", "/services/aigc/multimodal-generation/generation", json=sync))[0] == 200
    assert (await sim_api_for(sim).list())[1]["total"] == 1
    assert (await sim_api_for(sim, key="sk-other").list())[1]["total"] == 0
