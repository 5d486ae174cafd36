"""What the service offers: the seven Wan text-to-image models, per region.

The facts come from shared/reference/dashscope-wan-t2i-api.md (§2.3 model
rules, §5 quotas, §1.1 hosts) and the vendor's page. The engine validates
manifests against this table and plans cost and time with it; the simulator
enforces the same rules, so that a rule is written once.

Where the sources disagree, the choice is the one documented in
docs/simulator.md (prompt limit 500 for wan2.2/2.1, pixel floor 768*768
for wan2.5/2.6: the vendor's own recommended sizes such as 1104*1472 lie below 1280*1280).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "BASE_URL_ENV",
    "MODELS",
    "PRICE_TABLE",
    "REGIONS",
    "Model",
    "Offer",
    "Protocol",
    "Region",
    "SizeRule",
    "endpoint",
    "offer",
    "offers_for",
    "offers_in",
    "parse_size",
    "regions_of",
]

SEED_MAX = 2**31 - 1

#: Where the prices come from, said wherever a cost is shown.
PRICE_TABLE_DATE = "2026-10"
PRICE_TABLE = f"list prices per generated image, vendor model-pricing page as of {PRICE_TABLE_DATE}"


class Protocol(enum.StrEnum):
    """How a model is called on the wire."""

    #: ``POST services/aigc/text2image/image-synthesis`` with ``X-DashScope-Async: enable``.
    LEGACY = "legacy"
    #: wan2.6: ``image-generation/generation`` (async) or ``multimodal-generation/generation`` (sync).
    MULTIMODAL = "multimodal"


@dataclass(frozen=True, slots=True)
class Region:
    name: str  #: the manifest's name: beijing, singapore, virginia
    region_id: str  #: the service's name: cn-beijing, ...
    base_url: str
    key_env: str  #: this region's key; DASHSCOPE_API_KEY serves any region that has none of its own


REGIONS: dict[str, Region] = {
    "beijing": Region("beijing", "cn-beijing", "https://dashscope.aliyuncs.com/api/v1", "DASHSCOPE_API_KEY_BEIJING"),
    "singapore": Region(
        "singapore", "ap-southeast-1", "https://dashscope-intl.aliyuncs.com/api/v1", "DASHSCOPE_API_KEY_SINGAPORE"
    ),
    "virginia": Region(
        "virginia", "us-east-1", "https://dashscope-us.aliyuncs.com/api/v1", "DASHSCOPE_API_KEY_VIRGINIA"
    ),
}


#: The environment variable that points every region at one endpoint, as the vendor's SDK reads it.
BASE_URL_ENV = "DASHSCOPE_HTTP_BASE_URL"


def endpoint(region: str, *, base_url: str | None = None, base_urls: Mapping[str, str] | None = None) -> str:
    """Where ``region``'s requests go: its own entry of ``base_urls`` (an embedded simulator per region), else
    the one ``base_url`` for every region (a simulator, a proxy), else the region's own host."""
    return (base_urls or {}).get(region) or base_url or REGIONS[region].base_url


def parse_size(text: str) -> tuple[int, int] | None:
    """``"1024*1024"`` → ``(1024, 1024)``; None when it is not ``W*H`` with positive integers."""
    width, sep, height = text.partition("*")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    w, h = int(width), int(height)
    return (w, h) if w > 0 and h > 0 else None


@dataclass(frozen=True, slots=True)
class SizeRule:
    """Either each side in [min_side, max_side], or the area and aspect bounded."""

    min_side: int = 0
    max_side: int = 10**9
    min_pixels: int = 0
    max_pixels: int = 1440 * 1440
    max_ratio: float = float("inf")  #: long side over short side

    def violation(self, width: int, height: int) -> str | None:
        """None if ``width*height`` is allowed, else what is wrong and what is allowed."""
        if not (self.min_side <= width <= self.max_side and self.min_side <= height <= self.max_side):
            return f"width and height must each be in [{self.min_side}, {self.max_side}]"
        pixels = width * height
        if not self.min_pixels <= pixels <= self.max_pixels:
            return f"width*height must be in [{self.min_pixels}, {self.max_pixels}] pixels, got {pixels}"
        if max(width, height) / min(width, height) > self.max_ratio:
            return f"aspect ratio must be within 1:{self.max_ratio:g} and {self.max_ratio:g}:1"
        return None

    def describe(self) -> str:
        if self.min_side:
            return f"W*H with W and H each in [{self.min_side}, {self.max_side}]"
        return (
            f"W*H with W*H in [{self.min_pixels}, {self.max_pixels}] pixels"
            f" and aspect within 1:{self.max_ratio:g}..{self.max_ratio:g}:1"
        )


AREA_RULE = SizeRule(min_pixels=768 * 768, max_pixels=1440 * 1440, max_ratio=4.0)
SIDES_RULE = SizeRule(min_side=512, max_side=1440, max_pixels=1440 * 1440)


@dataclass(frozen=True, slots=True)
class Model:
    """A model's request rules, the same in every region that offers it."""

    name: str  #: canonical (Beijing) id
    protocol: Protocol
    size_rule: SizeRule
    default_size: str
    prompt_max: int  #: characters; longer prompts are truncated by the service
    negative_prompt_max: int = 500
    n_max: int = 4
    n_default: int = 4
    seed_max: int = SEED_MAX
    prompt_extend_default: bool = True
    watermark_default: bool = False
    typical_duration_s: float = 60.0  #: a task's usual time from start to end on the service


@dataclass(frozen=True, slots=True)
class Offer:
    """A model as one region sells it: its name there, quota and price."""

    model: Model
    region: str
    api_name: str  #: the id to send in this region (Singapore says wan2.1-..., Beijing wanx2.1-...)
    submit_rps: float
    concurrency: int
    price: float  #: per successfully generated image
    currency: str = "CNY"
    query_qps: float = 20.0  #: per account, for each of query, list and cancel


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("wan2.6-t2i", Protocol.MULTIMODAL, AREA_RULE, "1280*1280", 2100, typical_duration_s=30.0),
        Model("wan2.5-t2i-preview", Protocol.LEGACY, AREA_RULE, "1280*1280", 2000, typical_duration_s=60.0),
        Model("wan2.2-t2i-plus", Protocol.LEGACY, SIDES_RULE, "1024*1024", 500, typical_duration_s=75.0),
        Model("wan2.2-t2i-flash", Protocol.LEGACY, SIDES_RULE, "1024*1024", 500, typical_duration_s=40.0),
        Model("wanx2.1-t2i-plus", Protocol.LEGACY, SIDES_RULE, "1024*1024", 500, typical_duration_s=90.0),
        Model("wanx2.1-t2i-turbo", Protocol.LEGACY, SIDES_RULE, "1024*1024", 500, typical_duration_s=50.0),
        Model("wanx2.0-t2i-turbo", Protocol.LEGACY, SIDES_RULE, "1024*1024", 800, typical_duration_s=45.0),
    )
}


def _offers() -> dict[tuple[str, str], Offer]:
    m = MODELS
    rows = [
        # region, model, name there, submit RPS, concurrency, price
        ("beijing", m["wan2.6-t2i"], "wan2.6-t2i", 1, 5, 0.20),
        ("beijing", m["wan2.5-t2i-preview"], "wan2.5-t2i-preview", 5, 5, 0.20),
        ("beijing", m["wan2.2-t2i-plus"], "wan2.2-t2i-plus", 2, 2, 0.20),
        ("beijing", m["wan2.2-t2i-flash"], "wan2.2-t2i-flash", 2, 2, 0.14),
        ("beijing", m["wanx2.1-t2i-plus"], "wanx2.1-t2i-plus", 2, 2, 0.20),
        ("beijing", m["wanx2.1-t2i-turbo"], "wanx2.1-t2i-turbo", 2, 2, 0.14),
        ("beijing", m["wanx2.0-t2i-turbo"], "wanx2.0-t2i-turbo", 2, 2, 0.04),
        ("singapore", m["wan2.6-t2i"], "wan2.6-t2i", 5, 5, 0.220177),
        ("singapore", m["wan2.5-t2i-preview"], "wan2.5-t2i-preview", 5, 5, 0.220177),
        ("singapore", m["wan2.2-t2i-plus"], "wan2.2-t2i-plus", 2, 2, 0.366962),
        ("singapore", m["wan2.2-t2i-flash"], "wan2.2-t2i-flash", 2, 2, 0.183481),
        ("singapore", m["wanx2.1-t2i-plus"], "wan2.1-t2i-plus", 2, 2, 0.366962),
        ("singapore", m["wanx2.1-t2i-turbo"], "wan2.1-t2i-turbo", 2, 2, 0.183481),
        ("virginia", m["wan2.6-t2i"], "wan2.6-t2i", 5, 5, 0.20),
    ]
    return {
        (region, name): Offer(model, region, name, rps, conc, price) for region, model, name, rps, conc, price in rows
    }


_OFFERS = _offers()


def offers_in(region: str) -> list[Offer]:
    """The models a region sells, in catalog order."""
    return [o for (r, _), o in _OFFERS.items() if r == region]


def offer(region: str, model_name: str) -> Offer | None:
    """The offer for ``model_name`` in ``region``, by its name there or its canonical name."""
    found = _OFFERS.get((region, model_name))
    if found is None:
        found = next((o for o in offers_in(region) if o.model.name == model_name), None)
    return found


#: A manifest's region that lets an item run in any region selling its model.
ANY_REGION = "any"
#: Joins the regions an item may run in, in catalog order ("beijing|singapore"): its stored region until sent.
REGION_JOIN = "|"


def regions_of(value: str, model_name: str | None = None) -> list[str]:
    """The regions a manifest's region value allows, in catalog order: one region, several joined by ``|``, or
    ``any`` (each region that sells ``model_name``; every region when no model is given)."""
    if value == ANY_REGION:
        return [r for r in REGIONS if model_name is None or offer(r, model_name) is not None]
    return [r for r in REGIONS if r in value.split(REGION_JOIN)]


def offers_for(value: str, model_name: str) -> list[Offer]:
    """The offers of ``model_name`` in the regions ``value`` allows (see :func:`regions_of`), in catalog order."""
    return [found for r in regions_of(value, model_name) if (found := offer(r, model_name)) is not None]
