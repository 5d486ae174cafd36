"""The service's JSON shapes: request bodies out, task results in.

Two protocols carry the same request (spec §2): the legacy one puts the
prompt in ``input.prompt`` and the negative prompt in ``input``; wan2.6's puts
the prompt in a single user message and the negative prompt in
``parameters``. Results come back as ``results[]`` (legacy) or
``choices[].message.content[]`` (wan2.6), and a failed image is an element
with ``code``/``message`` instead of a URL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from wanbatch.catalog import Protocol
from wanbatch.errors import MalformedAnswer

__all__ = [
    "ImageResult",
    "MalformedAnswer",
    "build_body",
    "image_results",
    "parse_service_time_s",
    "result_prompts",
    "url_expires_s",
]


#: The service writes task times as local time in UTC+8 (spec §3).
SERVICE_TZ = timezone(timedelta(hours=8))
#: Later than any real URL's Expires (the year 5138); NaN and infinities fail the comparison too.
MAX_EXPIRES_S = 1e11
_SERVICE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{1,6}")


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
    expires_s: float | None = None  #: the URL's Expires, when it has one


def image_results(output: Mapping[str, Any]) -> list[ImageResult]:
    """Every image of a finished task's ``output``, in order, succeeded or not.

    Raises :class:`MalformedAnswer` when the results are not a list of objects each holding a URL or an
    error code: a paid image is never written off because one answer came back garbled.
    """
    if "results" in output:
        elements = output.get("results")
    else:
        choices = output.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise MalformedAnswer(f"choices is not a list of objects: {choices!r:.120}")
        elements = []
        for choice in choices:
            content = (choice.get("message") or {}).get("content") if isinstance(choice.get("message"), dict) else None
            if not isinstance(content, list):
                raise MalformedAnswer(f"a choice has no content list: {choice!r:.120}")
            elements += content
    if not isinstance(elements, list) or not elements:
        raise MalformedAnswer(f"no results to read: {elements!r:.120}")
    found = []
    for index, element in enumerate(elements):
        if not isinstance(element, dict):
            raise MalformedAnswer(f"result {index} is not an object: {element!r:.120}")
        url = element.get("url", element.get("image"))
        code = element.get("code")
        if not (isinstance(url, str) and url) and not (isinstance(code, str) and code):
            raise MalformedAnswer(f"result {index} has neither a URL nor an error code: {element!r:.120}")
        actual = element.get("actual_prompt")
        found.append(
            ImageResult(
                index=index,
                url=url if isinstance(url, str) and url else None,
                code=str(code or ""),
                message=str(element.get("message") or ""),
                actual_prompt=actual if isinstance(actual, str) else None,
                expires_s=url_expires_s(url) if isinstance(url, str) and url else None,
            )
        )
    return found


def parse_service_time_s(text: object) -> float | None:
    """``"2025-01-08 16:03:59.840"`` (UTC+8) → epoch seconds; None if absent or unreadable."""
    # Checked by shape, then read by fromisoformat: strptime costs several times more, on every task.
    if not isinstance(text, str) or not _SERVICE_TIME.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=SERVICE_TZ).timestamp()
    except ValueError:
        return None


def url_expires_s(url: str) -> float | None:
    """The ``Expires`` of a signed result URL, in epoch seconds; None when it has none.

    Raises :class:`MalformedAnswer` for one that is not a number, not finite or past any real date: the
    answer is garbled (and such a value could overflow the ledger's integers), so it is asked for again.
    """
    try:
        values = parse_qs(urlsplit(url).query).get("Expires")
    except ValueError:  # not a URL at all (an unclosed [host], say)
        raise MalformedAnswer(f"result URL {url!r:.120} cannot be read") from None
    if not values:
        return None
    try:
        value = float(values[0])
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_EXPIRES_S:
        raise MalformedAnswer(f"a result URL's Expires is not a time: {values[0]!r:.40}")
    return value


def result_prompts(output: Mapping[str, Any]) -> set[str]:
    """The ``orig_prompt`` of each legacy result that has one as text: what a task was asked, for matching it
    to a request. Anything else in ``results`` is left out, never raised on."""
    results = output.get("results")
    if not isinstance(results, list):
        return set()
    prompts = [e.get("orig_prompt") for e in results if isinstance(e, dict)]
    return {p for p in prompts if isinstance(p, str) and p}  # an empty echo tells nothing
