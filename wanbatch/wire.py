"""The service's JSON shapes: request bodies out, task results in.

Two protocols carry the same request (spec §2): the legacy one puts the
prompt in ``input.prompt`` and the negative prompt in ``input``; wan2.6's puts
the prompt in a single user message and the negative prompt in
``parameters``. Results come back as ``results[]`` (legacy) or
``choices[].message.content[]`` (wan2.6), and a failed image is an element
with ``code``/``message`` instead of a URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .catalog import Protocol

__all__ = ["ImageResult", "build_body", "image_results", "parse_service_time_s", "url_expires_s"]

#: The service writes task times as local time in UTC+8 (spec §3).
SERVICE_TZ = timezone(timedelta(hours=8))


def build_body(request: Mapping[str, Any], *, api_name: str, protocol: Protocol) -> dict[str, Any]:
    """The wire body for a canonical request (the manifest's ``Item.request()``)."""
    parameters: dict[str, Any] = {
        "size": request["size"],
        "n": request["n"],
        "prompt_extend": request["prompt_extend"],
        "watermark": request["watermark"],
    }
    if request.get("seed") is not None:
        parameters["seed"] = request["seed"]
    negative = request.get("negative_prompt")
    if protocol is Protocol.LEGACY:
        body_input: dict[str, Any] = {"prompt": request["prompt"]}
        if negative:
            body_input["negative_prompt"] = negative
    else:
        body_input = {"messages": [{"role": "user", "content": [{"text": request["prompt"]}]}]}
        if negative:
            parameters["negative_prompt"] = negative
    return {"model": api_name, "input": body_input, "parameters": parameters}


@dataclass(frozen=True, slots=True)
class ImageResult:
    index: int
    url: str | None  #: None when this image failed
    code: str = ""
    message: str = ""
    actual_prompt: str | None = None


def image_results(output: Mapping[str, Any]) -> list[ImageResult]:
    """Every image of a finished task's ``output``, in order, succeeded or not."""
    if "results" in output:
        elements = list(output.get("results") or [])
    else:
        elements = [
            content
            for choice in output.get("choices") or []
            for content in (choice.get("message") or {}).get("content") or []
        ]
    found = []
    for index, element in enumerate(elements):
        url = element.get("url") or element.get("image")
        found.append(
            ImageResult(
                index=index,
                url=url if isinstance(url, str) and url else None,
                code=str(element.get("code") or ""),
                message=str(element.get("message") or ""),
                actual_prompt=element.get("actual_prompt"),
            )
        )
    return found


def parse_service_time_s(text: str | None) -> float | None:
    """``"2025-01-08 16:03:59.840"`` (UTC+8) → epoch seconds; None if absent or unreadable."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=SERVICE_TZ).timestamp()
    except ValueError:
        return None


def url_expires_s(url: str) -> float | None:
    """The ``Expires`` of a signed result URL, in epoch seconds, when it has one."""
    values = parse_qs(urlsplit(url).query).get("Expires")
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None
