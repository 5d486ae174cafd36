"""Account quotas in simulated time (§5): submit rate, bursts from idle, and the 20 QPS of query, list and cancel."""

from __future__ import annotations

import pytest

from wanbatch.sim.quotas import Admission, SubmitGate, TokenBucket

RATE = ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later.")
BURST = (
    "Throttling.BurstRate",
    "Request rate increased too quickly. To ensure system stability, please adjust your client logic"
    " to scale requests more smoothly over time.",
)


async def test_submit_rate_quota(start_sim, sim_api_for):
    """Beyond the model's submit RPS (2 for wan2.2-flash) a create gets 429 RateQuota; a second later it passes."""
    sim = await start_sim()
    api = sim_api_for(sim)
    assert [(await api.create("wan2.2-t2i-flash"))[0] for _ in range(2)] == [200, 200]
    status, body = await api.create("wan2.2-t2i-flash")
    assert (status, body["code"], body["message"]) == (429, *RATE)
    assert len(sim.tasks) == 2
    assert (await api.create("wan2.2-t2i-plus"))[0] == 200  # quotas are per model
    sim.advance(0.5)
    assert (await api.create("wan2.2-t2i-flash"))[0] == 200  # half a second refills one of two
    assert (await api.create("wan2.2-t2i-flash"))[0] == 429


async def test_wan26_beijing_allows_one_per_second(start_sim, sim_api_for):
    """wan2.6 in Beijing takes one submit per second across the sync and async endpoints."""
    sim = await start_sim()
    api = sim_api_for(sim)
    assert (await api.create("wan2.6-t2i"))[0] == 200
    sync = {"model": "wan2.6-t2i", "input": {"messages": [{"role": "user", "content": [{"text": "x"}]}]}}
    status, body = await api.call("POST", "/services/aigc/multimodal-generation/generation", json=sync)
    assert (status, body["code"]) == (429, "Throttling.RateQuota")


async def test_burst_from_idle(start_sim, sim_api_for):
    """After 60 s idle only 3 submits pass in the first second although the quota is 5; the rest get BurstRate."""
    sim = await start_sim()
    api = sim_api_for(sim)
    answers = [await api.create("wan2.5-t2i-preview") for _ in range(6)]
    assert [s for s, _ in answers] == [200, 200, 200, 429, 429, 429]
    assert (answers[3][1]["code"], answers[3][1]["message"]) == BURST
    sim.advance(1.0)
    assert [(await api.create("wan2.5-t2i-preview"))[0] for _ in range(5)] == [200] * 5  # warm now: full quota
    assert (await api.create("wan2.5-t2i-preview"))[1]["code"] == "Throttling.RateQuota"
    sim.advance(60)
    assert [(await api.create("wan2.5-t2i-preview"))[0] for _ in range(4)] == [200, 200, 200, 429]


def test_gate_rules_without_http():
    """The gate: rate first within a warm period, burst only within the first second after idle."""
    gate = SubmitGate(5, burst_idle_s=60, burst_allowance=3)
    assert [gate.admit(0.0) for _ in range(4)] == [Admission.OK] * 3 + [Admission.BURST]
    assert gate.admit(1.0) is Admission.OK
    unlimited = SubmitGate(None, burst_idle_s=60, burst_allowance=1)
    assert all(unlimited.admit(0.0) is Admission.OK for _ in range(100))
    never_burst = SubmitGate(5, burst_idle_s=None, burst_allowance=1)
    assert [never_burst.admit(0.0) for _ in range(6)] == [Admission.OK] * 5 + [Admission.RATE]
    slow = TokenBucket(0.5)
    assert [slow.take(0.0), slow.take(1.0), slow.take(2.0)] == [True, False, True]


@pytest.mark.parametrize(("kind", "call"), [("query", "query"), ("list", "list"), ("cancel", "cancel")])
async def test_read_endpoints_have_20_qps_each(start_sim, sim_api_for, kind, call):
    """Query, list and cancel each allow 20 requests per simulated second per account, then answer 429."""
    sim = await start_sim()
    api = sim_api_for(sim)
    paths = {"query": ("GET", "/tasks/x"), "list": ("GET", "/tasks"), "cancel": ("POST", "/tasks/x/cancel")}
    method, path = paths[kind]
    statuses = [(await api.call(method, path))[0] for _ in range(21)]
    assert statuses[:20] == [200 if kind != "cancel" else 400] * 20
    assert statuses[20] == 429
    other = next(k for k in paths if k != kind)
    assert (await api.call(*paths[other]))[0] != 429  # separate buckets
    sim.advance(1)
    assert (await api.call(method, path))[0] != 429


async def test_quotas_are_per_account_summed_over_keys(tmp_path, start_sim, sim_api_for):
    """Two keys of one account share its quota; another account has its own (config file accounts)."""
    config = tmp_path / "accounts.yaml"
    config.write_text(
        "accounts:\n"
        "  team:\n    keys: {sk-team-1: beijing, sk-team-2: beijing}\n"
        "  solo:\n    keys: {sk-solo: beijing}\n"
    )
    sim = await start_sim(config_file=config)
    one, two, solo = (sim_api_for(sim, key=k) for k in ("sk-team-1", "sk-team-2", "sk-solo"))
    assert (await one.create())[0] == 200
    assert (await two.create())[0] == 200
    assert (await two.create())[0] == 429
    assert (await solo.create())[0] == 200


async def test_quotas_configurable_and_unlimited(tmp_path, start_sim, sim_api_for):
    """Quotas can be overridden globally and per account, "unlimited" included."""
    config = tmp_path / "q.yaml"
    config.write_text(
        "quotas:\n  '*': {submit_rps: unlimited, concurrency: unlimited}\n"
        "accounts:\n  small:\n    keys: {sk-small: beijing}\n    quotas:\n      wan2.2-t2i-flash: {submit_rps: 1}\n"
    )
    sim = await start_sim(config_file=config, durations=10)
    api = sim_api_for(sim)
    ids = [await api.task_id("wan2.2-t2i-flash") for _ in range(30)]
    assert {sim.tasks[t].status for t in ids} == {"RUNNING"}  # no queue either
    small = sim_api_for(sim, key="sk-small")
    assert [(await small.create())[0] for _ in range(2)] == [200, 429]


async def test_retry_after_header_is_optional(start_sim, sim_api_for, sim_http):
    """429s carry no Retry-After by default (none documented); ``retry_after_s`` adds one."""
    for retry_after, expected in ((None, None), (2.0, "2")):
        sim = await start_sim(retry_after_s=retry_after)
        headers = {"Authorization": "Bearer sk-sim-beijing"}
        for _ in range(21):
            async with sim_http.get(sim.base_url + "/tasks", headers=headers) as response:
                await response.read()
        assert response.status == 429
        assert response.headers.get("Retry-After") == expected
