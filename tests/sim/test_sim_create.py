"""The simulator's create endpoints: requests read as spec §2 says, errors as §4 quotes them."""

from __future__ import annotations

import pytest

from wanbatch.sim import AccountConfig
from wanbatch.sim.config import ACCOUNT_REFUSALS

LEGACY = "/services/aigc/text2image/image-synthesis"
ASYNC26 = "/services/aigc/image-generation/generation"
SYNC26 = "/services/aigc/multimodal-generation/generation"
ASYNC = {"X-DashScope-Async": "enable"}


def messages(text: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"text": text}]}]}


@pytest.mark.parametrize("path", [LEGACY, LEGACY + "/"])
async def test_legacy_create_answers_pending_task(sim_api, sim, path):
    """A legacy async create (with or without trailing slash) answers §3.1's shape and the task exists."""
    status, body = await sim_api.call(
        "POST", path, json={"model": "wan2.5-t2i-preview", "input": {"prompt": "a cat"}}, headers=ASYNC
    )
    assert status == 200
    assert set(body) == {"output", "request_id"}
    assert body["output"]["task_status"] == "PENDING"
    assert sim.tasks[body["output"]["task_id"]].model == "wan2.5-t2i-preview"


async def test_wan26_async_create_with_stray_is_async_parameter(sim_api, sim):
    """wan2.6 async create works and ignores unknown parameters such as the SDK's ``is_async``."""
    body = {"model": "wan2.6-t2i", "input": messages("a dog"), "parameters": {"n": 1, "is_async": True}}
    status, answer = await sim_api.call("POST", ASYNC26 + "/", json=body, headers=ASYNC)
    assert status == 200, answer
    assert sim.tasks[answer["output"]["task_id"]].n == 1


async def test_missing_async_header_is_access_denied(sim_api, sim):
    """Both async endpoints refuse a call without X-DashScope-Async with 403 and the documented message."""
    for path, model, input_ in ((LEGACY, "wan2.2-t2i-flash", {"prompt": "x"}), (ASYNC26, "wan2.6-t2i", messages("x"))):
        status, body = await sim_api.call("POST", path, json={"model": model, "input": input_})
        assert (status, body["code"]) == (403, "AccessDenied")
        assert body["message"] == "current user api does not support synchronous calls."
    assert not sim.tasks


async def test_async_header_on_sync_endpoint_is_refused(sim_api):
    """The sync endpoint refuses ``X-DashScope-Async: enable`` (open question 13, default)."""
    body = {"model": "wan2.6-t2i", "input": messages("x")}
    status, answer = await sim_api.call("POST", SYNC26, json=body, headers=ASYNC)
    assert (status, answer["code"]) == (403, "AccessDenied")
    assert answer["message"] == "Current user api does not support asynchronous calls."


async def test_async_header_on_sync_endpoint_can_create_a_task(start_sim, sim_api_for):
    """With ``multimodal_async_header="async"`` the sync endpoint given the header creates a task instead."""
    sim = await start_sim(multimodal_async_header="async")
    status, answer = await sim_api_for(sim).call(
        "POST", SYNC26, json={"model": "wan2.6-t2i", "input": messages("x")}, headers=ASYNC
    )
    assert status == 200 and answer["output"]["task_status"] == "PENDING"


@pytest.mark.parametrize(
    ("path", "model", "input_"),
    [
        (LEGACY, "wan2.6-t2i", {"prompt": "x"}),
        (ASYNC26, "wan2.5-t2i-preview", messages("x")),
        (SYNC26, "wan2.2-t2i-flash", messages("x")),
    ],
)
async def test_model_on_the_wrong_endpoint_is_url_error(sim_api, path, model, input_):
    """A model sent to an endpoint of the other protocol gets 400 "url error, please check url!"."""
    status, body = await sim_api.call(
        "POST", path, json={"model": model, "input": input_}, headers={} if path == SYNC26 else ASYNC
    )
    assert (status, body["code"], body["message"]) == (400, "InvalidParameter", "url error, please check url!")


async def test_unknown_service_path_is_url_error(sim_api):
    """A path under services/ that does not exist gets the same 400 url error."""
    status, body = await sim_api.call("POST", "/services/aigc/text2image/nope", json={}, headers=ASYNC)
    assert (status, body["message"]) == (400, "url error, please check url!")


@pytest.mark.parametrize("model", ["wan9-t2i", "wan2.1-t2i-turbo", "wanx2.1-t2i"])
async def test_unknown_model_does_not_exist(sim_api, model):
    """A model this region does not sell (Singapore's wan2.1 name in Beijing too) gets "Model not exist."."""
    status, body = await sim_api.create(model)
    assert (status, body["code"], body["message"]) == (400, "InvalidParameter", "Model not exist.")


async def test_singapore_names_and_virginia_list(start_sim, sim_api_for):
    """Singapore sells wan2.1-t2i-* (not wanx2.1-*); Virginia sells only wan2.6."""
    singapore = await start_sim(region="singapore")
    sg = sim_api_for(singapore, key="sk-sim-singapore")
    assert (await sg.create("wan2.1-t2i-turbo"))[0] == 200
    assert (await sg.create("wanx2.1-t2i-turbo"))[1]["message"] == "Model not exist."
    virginia = await start_sim(region="virginia")
    us = sim_api_for(virginia, key="sk-sim-virginia")
    assert (await us.create("wan2.6-t2i"))[0] == 200
    assert (await us.create("wan2.5-t2i-preview"))[1]["message"] == "Model not exist."


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{not json", "BadRequest.IllegalInput", "The input parameter requires json format."),
        (b"[1, 2]", "BadRequest.IllegalInput", "The input parameter requires json format."),
        (b'{"input": {"prompt": "x"}}', "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'),
        (b'{"model": "wan2.2-t2i-flash"}', "BadRequest.EmptyInput", "Required input parameter missing from request."),
        (b'{"model": "wan2.2-t2i-flash", "input": {}}', "InvalidParameter", "Field required: input.prompt"),
        (b'{"model": "wan2.2-t2i-flash", "input": {"prompt": ""}}', "InvalidParameter", "Field required: input.prompt"),
    ],
)
async def test_malformed_requests(sim_api, sim, body, code, message):
    """Bad JSON and missing fields get 400 with the documented code and message, and create nothing."""
    headers = {**ASYNC, "Content-Type": "application/json"}
    status, answer = await sim_api.call("POST", LEGACY, data=body, headers=headers)
    assert (status, answer["code"], answer["message"]) == (400, code, message)
    assert set(answer) == {"request_id", "code", "message"}
    assert not sim.tasks


@pytest.mark.parametrize(
    ("input_", "fragment"),
    [
        ({}, "Field required: input.messages"),
        ({"messages": [{"role": "user", "content": [{"text": "a"}]}] * 2}, "exactly one message"),
        ({"messages": [{"role": "assistant", "content": [{"text": "a"}]}]}, "role must be user"),
        ({"messages": [{"role": "user", "content": [{"text": "a"}, {"text": "b"}]}]}, "exactly one"),
        ({"messages": [{"role": "user", "content": []}]}, "exactly one"),
    ],
)
async def test_wan26_message_rules(sim_api, input_, fragment):
    """wan2.6 takes exactly one user message with exactly one text item (§2.2)."""
    status, body = await sim_api.call("POST", ASYNC26, json={"model": "wan2.6-t2i", "input": input_}, headers=ASYNC)
    assert (status, body["code"]) == (400, "InvalidParameter")
    assert fragment in body["message"]


@pytest.mark.parametrize(
    ("model", "size", "ok"),
    [
        ("wan2.2-t2i-flash", "512*1440", True),
        ("wan2.2-t2i-flash", "511*1024", False),
        ("wan2.2-t2i-flash", "768*2700", False),
        ("wan2.5-t2i-preview", "768*2700", True),
        ("wan2.5-t2i-preview", "1024*1024", True),
        ("wan2.5-t2i-preview", "700*700", False),
        ("wan2.6-t2i", "1104*1472", True),
        ("wan2.6-t2i", "1696*960", True),
        ("wan2.6-t2i", "1441*1441", False),
        ("wan2.6-t2i", "1440*1440", True),
        ("wan2.6-t2i", "1280*1280", True),
        ("wan2.6-t2i", "640*2800", False),  # ratio 4.375 > 4
        ("wan2.6-t2i", "1024x1024", False),
        ("wan2.2-t2i-flash", "1024x1024", False),
        ("wan2.2-t2i-flash", 1024, False),
    ],
)
async def test_size_rules(sim_api, model, size, ok):
    """Sizes follow each model's rule: per side for wan2.2 and older, area and aspect for wan2.5/2.6."""
    status, body = await sim_api.create(model, size=size)
    if ok:
        assert status == 200, body
    else:
        assert (status, body["code"]) == (400, "InvalidParameter")
        assert "size" in body["message"]


async def test_pixel_floor_and_x_sizes_are_switchable(start_sim, sim_api_for):
    """The catalog's 768² floor admits the docs' 1104*1472; ``pixel_floor_side=1280`` refuses it; x sizes optional."""
    assert (await sim_api_for(await start_sim()).create("wan2.6-t2i", size="1104*1472"))[0] == 200
    strict = sim_api_for(await start_sim(pixel_floor_side=1280))
    status, body = await strict.create("wan2.6-t2i", size="1104*1472")  # 1,625,088 px < 1280²
    assert (status, body["code"]) == (400, "InvalidParameter")
    sim = await start_sim(accept_x_size=True)
    task_id = await sim_api_for(sim).task_id("wan2.5-t2i-preview", size="1024x1024")
    assert sim.tasks[task_id].size == "1024*1024"


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({"n": 1}, True),
        ({"n": 4}, True),
        ({"n": 0}, False),
        ({"n": 5}, False),
        ({"n": "2"}, False),
        ({"n": True}, False),
        ({"seed": 0}, True),
        ({"seed": 2147483647}, True),
        ({"seed": -1}, False),
        ({"seed": 2147483648}, False),
        ({"prompt_extend": "yes"}, False),
        ({"watermark": 1}, False),
    ],
)
async def test_parameter_ranges(sim_api, params, ok):
    """n is 1–4, seed in [0, 2³¹−1], flags are booleans; anything else is 400 InvalidParameter."""
    status, body = await sim_api.create("wan2.5-t2i-preview", **params)
    assert status == (200 if ok else 400), body


async def test_defaults_and_seed_per_image(sim_api, sim):
    """n defaults to 4, size to the model's default; image i uses seed + i."""
    task_id = await sim_api.task_id("wan2.2-t2i-flash", seed=100)
    task = sim.tasks[task_id]
    assert (task.n, task.size, task.seed) == (4, "1024*1024", 100)
    image_seeds = [image.seed for image in sim.state.tasks[task_id].images]
    assert image_seeds == [100, 101, 102, 103]


async def test_prompts_are_truncated_not_refused(sim_api, sim):
    """Over-long prompts are cut to the model's limit (500 for wan2.2, 2100 for wan2.6), negative prompts to 500."""
    legacy = await sim_api.task_id("wan2.2-t2i-flash", "猫" * 900)
    assert sim.tasks[legacy].prompt == "猫" * 500
    wan26 = await sim_api.task_id("wan2.6-t2i", "a" * 3000, negative_prompt="b" * 900)
    assert len(sim.tasks[wan26].prompt) == 2100
    assert len(sim.state.tasks[wan26].request.negative_prompt) == 500


async def test_prompt_limit_is_configurable(start_sim, sim_api_for):
    """``prompt_max`` overrides a model's limit (the 500-vs-800 question for wan2.2/2.1)."""
    sim = await start_sim(prompt_max={"wan2.2-t2i-plus": 800})
    task_id = await sim_api_for(sim).task_id("wan2.2-t2i-plus", "x" * 900)
    assert len(sim.tasks[task_id].prompt) == 800


@pytest.mark.parametrize(
    ("prompt", "code", "message"),
    [
        ("a sim-inappropriate cat", "DataInspectionFailed", "Input data may contain inappropriate content."),
        (
            "a SIM-TRADEMARK mouse",
            "IPInfringementSuspect",
            "Input data is suspected of being involved in IP infringement.",
        ),
    ],
)
async def test_input_moderation_refuses_at_submit(sim_api, sim, prompt, code, message):
    """A prompt with a trigger word gets 400 with the moderation code, and no task is created."""
    status, body = await sim_api.create("wan2.5-t2i-preview", prompt)
    assert (status, body["code"], body["message"]) == (400, code, message)
    assert not sim.tasks


async def test_parameter_errors_can_become_failed_tasks(start_sim, sim_api_for):
    """With ``param_errors="task"`` a bad size is accepted and the task reports FAILED InvalidParameter."""
    sim = await start_sim(param_errors="task")
    api = sim_api_for(sim)
    task_id = await api.task_id("wan2.2-t2i-flash", size="99*99", n=2)
    output = await api.query(task_id)
    assert output["task_status"] == "FAILED"
    assert output["code"] == "InvalidParameter" and "size" in output["message"]
    assert output["task_metrics"] == {"TOTAL": 2, "SUCCEEDED": 0, "FAILED": 2}
    assert (await api.create("wan2.6-t2i", model_unused=1))[0] == 200  # unknown keys still ignored
    assert (await api.create("nope"))[0] == 400  # request-level errors are never deferred


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "No API-key provided."),
        ({"Authorization": "Bearer "}, "No API-key provided."),
        ({"Authorization": "Bearer sk-wrong"}, "Invalid API-key provided."),
        ({"Authorization": "Bearer sk-sim-singapore"}, "Invalid API-key provided."),
        ({"Authorization": "sk-sim-beijing"}, "Invalid API-key provided."),
    ],
)
async def test_keys_and_regions(sim, sim_http, headers, message):
    """Missing, unknown and other-region keys all get 401 InvalidApiKey, on every endpoint."""
    for method, path in (("POST", LEGACY), ("GET", "/tasks/x"), ("GET", "/tasks"), ("POST", "/tasks/x/cancel")):
        async with sim_http.request(method, sim.base_url + path, headers={**ASYNC, **headers}, json={}) as response:
            body = await response.json()
        assert (response.status, body["code"], body["message"]) == (401, "InvalidApiKey", message)


async def test_legacy_sync_call_is_refused_or_served(start_sim, sim_api_for):
    """Without the async header text2image is 403 by default; ``legacy_sync`` serves wan2.2 synchronously."""
    body = {"model": "wan2.2-t2i-flash", "input": {"prompt": "a cat"}, "parameters": {"n": 1}}
    default = await start_sim()
    status, answer = await sim_api_for(default).call("POST", LEGACY, json=body)
    assert (status, answer["code"]) == (403, "AccessDenied")
    served = await start_sim(legacy_sync=True, durations=0)
    status, answer = await sim_api_for(served).call("POST", LEGACY, json=body)
    assert status == 200 and answer["output"]["task_status"] == "SUCCEEDED"
    assert len(answer["output"]["results"]) == 1
    wan25 = {**body, "model": "wan2.5-t2i-preview"}
    assert (await sim_api_for(served).call("POST", LEGACY, json=wan25))[0] == 403


async def test_gateway_headers(sim_api, sim, sim_http):
    """Answers carry JSON content type, a request id header equal to the body's, and the gateway's marks."""
    async with sim_http.post(
        sim.base_url + LEGACY,
        json={"model": "nope", "input": {"prompt": "x"}},
        headers={**ASYNC, "Authorization": "Bearer sk-sim-beijing"},
    ) as response:
        body = await response.json()
        assert response.content_type == "application/json"
        assert response.headers["x-request-id"] == body["request_id"]
        assert response.headers["Server"] == "istio-envoy"


@pytest.mark.parametrize("code", list(ACCOUNT_REFUSALS))
async def test_account_refusals(start_sim, sim_api_for, code):
    """An account in arrears (or out of free tier, unpurchased, ...) gets its §4 error on every create; reads work."""
    broke = AccountConfig(name="broke", keys={"sk-broke": "beijing"}, refusal=code)
    sim = await start_sim(accounts=(broke,))
    api = sim_api_for(sim, key="sk-broke")
    expected_status, message = ACCOUNT_REFUSALS[code]
    status, body = await api.create()
    assert (status, body["code"], body["message"]) == (expected_status, code, message)
    assert not sim.tasks
    assert (await api.list())[0] == 200
