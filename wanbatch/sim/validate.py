"""Reading a create request as the service does (spec §2).

Request-level problems (bad JSON, no model, a model this region does not
sell, the wrong endpoint for the model, no ``input``) are always answered at
once. Parameter problems (prompt, messages, size, n, seed, flags) raise a
*deferrable* :class:`SimError`, which the simulator answers with a 400 or,
under ``param_errors="task"``, with a task that FAILED. Over-long prompts are
truncated, never refused; unknown ``parameters`` keys are ignored (the SDK
sends ``is_async``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any

from wanbatch import catalog
from wanbatch.sim import wire
from wanbatch.sim.config import SimConfig
from wanbatch.sim.tasks import Endpoint, GenerationRequest

__all__ = [
    "fingerprint",
    "input_moderation",
    "parse_json",
    "parse_request",
    "prompt_limit",
    "requested_n",
    "resolve_offer",
    "size_rule",
]


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400 BadRequest.IllegalInput."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise wire.SimError(400, "BadRequest.IllegalInput", wire.ILLEGAL_INPUT)
    return body


def fingerprint(body: dict[str, Any]) -> str:
    """sha256 of the canonical body: the billing log's proof of which request was paid."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def resolve_offer(body: dict[str, Any], region: str, endpoint: Endpoint) -> catalog.Offer:
    """The model this region sells under ``body["model"]``, checked against the endpoint."""
    name = body.get("model")
    if not name or not isinstance(name, str):
        raise wire.SimError(400, "BadRequest.EmptyModel", wire.EMPTY_MODEL)
    # Strict: a region knows only its own names (Singapore says wan2.1-..., Beijing wanx2.1-...).
    found = next((o for o in catalog.offers_in(region) if o.api_name == name), None)
    if found is None:
        raise wire.SimError(400, "InvalidParameter", wire.MODEL_NOT_EXIST)
    wants_multimodal = endpoint is not Endpoint.LEGACY
    if (found.model.protocol is catalog.Protocol.MULTIMODAL) != wants_multimodal:
        raise wire.SimError(400, "InvalidParameter", wire.URL_ERROR)
    # An empty ``input`` object is a parameter error (C3 saw "Field required: input.messages"), not EmptyInput.
    if not isinstance(body.get("input"), dict):
        raise wire.SimError(400, "BadRequest.EmptyInput", wire.EMPTY_INPUT)
    return found


def parse_request(
    body: dict[str, Any], offer: catalog.Offer, config: SimConfig, rng: random.Random, *, prompt_max: int | None = None
) -> GenerationRequest:
    """The validated, defaulted and truncated request; raises a deferrable SimError on bad parameters.

    ``prompt_max`` truncates the prompt at another limit than the configured one (an echo variant).
    """
    model = offer.model
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise wire.invalid_parameter("parameters must be a JSON object")
    if model.protocol is catalog.Protocol.MULTIMODAL:
        prompt = _message_text(body["input"])
        negative = params.get("negative_prompt", "")
    else:
        prompt = body["input"].get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise wire.invalid_parameter("Field required: input.prompt")
        negative = body["input"].get("negative_prompt", "")
    if not isinstance(negative, str):
        raise wire.invalid_parameter("negative_prompt must be a string")
    width, height = _size(params.get("size", model.default_size), model, config)
    seed = params.get("seed")
    if seed is None:
        seed = rng.randrange(model.seed_max + 1 - model.n_max)
    return GenerationRequest(
        prompt=prompt[: prompt_max or prompt_limit(model, config)],
        negative_prompt=negative[: model.negative_prompt_max],
        width=width,
        height=height,
        n=_int(params, "n", model.n_default, 1, model.n_max),
        seed=_int(params, "seed", seed, 0, model.seed_max),
        prompt_extend=_bool(params, "prompt_extend", model.prompt_extend_default),
        watermark=_bool(params, "watermark", model.watermark_default),
    )


def prompt_limit(model: catalog.Model, config: SimConfig) -> int:
    """The characters of a prompt kept for ``model`` (the catalog's limit unless configured)."""
    return config.prompt_max.get(model.name, model.prompt_max)


def requested_n(body: dict[str, Any], model: catalog.Model) -> int:
    """How many images a request asked for, as far as it can be read (for a task that FAILED on its parameters)."""
    n = (body.get("parameters") or {}).get("n") if isinstance(body.get("parameters"), dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= model.n_max else model.n_default


def input_moderation(request: GenerationRequest, config: SimConfig) -> wire.SimError | None:
    """The submit-time inspection of the prompts: a configured trigger word refuses the request."""
    text = f"{request.prompt}\n{request.negative_prompt}".lower()
    if any(word.lower() in text for word in config.ip_infringement_words):
        return wire.SimError(400, "IPInfringementSuspect", wire.IP_INFRINGEMENT)
    if any(word.lower() in text for word in config.input_inspection_words):
        return wire.SimError(400, "DataInspectionFailed", wire.INPUT_INSPECTION)
    return None


def _message_text(input_: dict[str, Any]) -> str:
    """wan2.6: exactly one user message holding exactly one ``{"text": ...}``."""
    messages = input_.get("messages")
    if not messages:
        raise wire.invalid_parameter("Field required: input.messages")
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise wire.invalid_parameter("input.messages must hold exactly one message (single turn only)")
    if messages[0].get("role") != "user":
        raise wire.invalid_parameter("input.messages[0].role must be user")
    content = messages[0].get("content")
    if not isinstance(content, list) or len(content) != 1 or not isinstance(content[0], dict):
        raise wire.invalid_parameter('input.messages[0].content must hold exactly one {"text": ...} item')
    text = content[0].get("text")
    if not isinstance(text, str) or not text:
        raise wire.invalid_parameter("Field required: input.messages[0].content[0].text")
    return text


def size_rule(model: catalog.Model, config: SimConfig) -> catalog.SizeRule:
    """The sizes this simulator accepts for ``model`` (the catalog's rule, its pixel floor as configured)."""
    rule = model.size_rule
    if rule.min_pixels and config.pixel_floor_side is not None:
        rule = dataclasses.replace(rule, min_pixels=config.pixel_floor_side**2)
    return rule


def _size(value: Any, model: catalog.Model, config: SimConfig) -> tuple[int, int]:
    if isinstance(value, str) and config.accept_x_size:
        value = value.replace("x", "*")
    parsed = catalog.parse_size(value) if isinstance(value, str) else None
    rule = size_rule(model, config)
    if parsed is None:
        raise wire.invalid_parameter(f"size must be a string W*H ({rule.describe()}), got {value!r}")
    problem = rule.violation(*parsed)
    if problem:
        raise wire.invalid_parameter(f"The size is not match the allowed size: {problem}; got {value}")
    return parsed


def _int(params: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise wire.invalid_parameter(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _bool(params: dict[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise wire.invalid_parameter(f"{name} must be true or false, got {value!r}")
    return value
