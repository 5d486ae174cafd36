"""The JSON bodies the simulated service answers with (spec §3), built from a task.

Shapes follow the spec's literal examples; where it has none (PENDING,
CANCELED, a wan2.6 FAILED task, wan2.6 with n > 1) the choice is documented in
docs/simulator.md. ``urls`` holds one signed URL per image of the task (None
for a failed image), made by the caller for the host the client called.
"""

from __future__ import annotations

import math
from typing import Any

from wanbatch import catalog
from wanbatch.sim import wire
from wanbatch.sim.config import SimConfig
from wanbatch.sim.tasks import Endpoint, Task, TaskStatus

__all__ = ["error_body", "list_body", "list_entry", "query_body", "sync_body"]

#: What the prompt rewriter adds when ``prompt_extend`` is on: enough to make ``actual_prompt`` differ.
EXTENSION = "，画面细节丰富，光线柔和自然，构图均衡，高清摄影质感。"


def error_body(request_id: str, error: wire.SimError) -> dict[str, Any]:
    return {"request_id": request_id, "code": error.code, "message": error.message}


def query_body(
    request_id: str, task_id: str, task: Task | None, status: TaskStatus, urls: list[str | None], config: SimConfig
) -> dict[str, Any]:
    """``GET /tasks/{id}`` for ``task`` (None: unknown or forgotten) as it stands in ``status``."""
    if task is None or status is TaskStatus.UNKNOWN:
        return {"request_id": request_id, "output": {"task_id": task_id, "task_status": "UNKNOWN"}}
    output: dict[str, Any] = {"task_id": task.task_id, "task_status": str(status)}
    output["submit_time"] = wire.format_time(task.submit_s)
    body: dict[str, Any] = {"request_id": request_id, "output": output}
    if status in (TaskStatus.PENDING, TaskStatus.CANCELED):
        return body
    output["scheduled_time"] = wire.format_time(task.start_s)
    if status is TaskStatus.RUNNING:
        output["task_metrics"] = {"TOTAL": task.n, "SUCCEEDED": 0, "FAILED": 0}
        return body
    output["end_time"] = wire.format_time(task.end_s)
    multimodal = task.offer.model.protocol is catalog.Protocol.MULTIMODAL
    if status is TaskStatus.FAILED:
        output["code"], output["message"] = task.failure
        if not multimodal:
            output["task_metrics"] = {"TOTAL": task.n, "SUCCEEDED": 0, "FAILED": task.n}
        return body
    if multimodal:
        output["finished"] = True
        output["choices"] = _choices(urls, config)
        body["usage"] = _multimodal_usage(task, config)
    else:
        output["results"] = [_legacy_result(task, i, url) for i, url in enumerate(urls)]
        ok = len(task.succeeded_images)
        output["task_metrics"] = {"TOTAL": task.n, "SUCCEEDED": ok, "FAILED": task.n - ok}
        body["usage"] = {"image_count": ok}
    return body


def sync_body(request_id: str, task: Task, urls: list[str | None], config: SimConfig) -> dict[str, Any]:
    """The sync wan2.6 answer (§3.3): choices and usage, no task id."""
    return {
        "output": {"choices": _choices(urls, config), "finished": True},
        "usage": _multimodal_usage(task, config),
        "request_id": request_id,
    }


def list_entry(task: Task, status: TaskStatus, caller_uid: str, region_id: str) -> dict[str, Any]:
    """One ``data[]`` entry of ``GET /tasks`` (§3.5): times in epoch milliseconds."""
    group = "text2image:image-synthesis" if task.endpoint is Endpoint.LEGACY else "image-generation:generation"
    entry: dict[str, Any] = {
        "api_key_id": task.key_id,
        "caller_parent_id": caller_uid,
        "caller_uid": caller_uid,
        "gmt_create": int(task.submit_s * 1000),
        "model_name": task.model,
        "region": region_id,
        "request_id": task.request_id,
        "status": str(status),
        "task_id": task.task_id,
        "user_api_unique_key": f"apikey:v1:aigc:{group}:{task.model}",
    }
    if status not in (TaskStatus.PENDING, TaskStatus.CANCELED):
        entry["start_time"] = int(task.start_s * 1000)
    if status not in (TaskStatus.PENDING, TaskStatus.RUNNING):
        entry["end_time"] = int(task.end_s * 1000)
    return dict(sorted(entry.items()))


def list_body(request_id: str, entries: list[dict[str, Any]], total: int, page_no: int, page_size: int) -> dict:
    return {
        "request_id": request_id,
        "total": total,
        "total_page": math.ceil(total / page_size),
        "page_no": page_no,
        "page_size": page_size,
        "data": entries,
    }


def _legacy_result(task: Task, index: int, url: str | None) -> dict[str, Any]:
    image = task.images[index]
    if url is None:
        return {"code": image.code, "message": image.message}
    assert task.request is not None  # a task with a generated image had valid parameters
    result = {"orig_prompt": task.orig_prompt}
    if task.request.prompt_extend:
        result["actual_prompt"] = task.request.prompt + EXTENSION
    result["url"] = url
    return result


def _choices(urls: list[str | None], config: SimConfig) -> list[dict[str, Any]]:
    contents = [{"image": url, "type": "image"} for url in urls if url is not None]
    groups = [contents] if config.wan26_choices == "one" else [[c] for c in contents]
    return [{"finish_reason": "stop", "message": {"role": "assistant", "content": group}} for group in groups]


def _multimodal_usage(task: Task, config: SimConfig) -> dict[str, Any]:
    count = len(task.succeeded_images)
    assert task.request is not None
    if config.wan26_usage == "width_height":
        return {"image_count": count, "width": task.request.width, "height": task.request.height}
    return {"size": task.request.size, "total_tokens": 0, "image_count": count, "output_tokens": 0, "input_tokens": 0}
