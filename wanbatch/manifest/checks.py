"""The per-item checks against the catalog, each answer for a (region, model) or (model, size) remembered.

Expansion builds one combination of values at a time; these checks say,
for that combination, whether the model is offered in its region, the size
obeys the model's rule, ``sync`` is possible, the output pattern fits, and
warn when a prompt is longer than the model reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from wanbatch import catalog
from wanbatch.manifest.parse import DEFAULT_REGION, OUTPUT_FIELDS, EntryPlan
from wanbatch.manifest.values import Problems, Val, did_you_mean, did_you_mean_model
from wanbatch.manifest.yamlsrc import Origin

__all__ = ["Checks"]

_SYNC_MODELS = tuple(m.name for m in catalog.MODELS.values() if m.protocol is catalog.Protocol.MULTIMODAL)


class Checks:
    """The per-item checks, with the answers for a (region, model) or (model, size) remembered."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        #: Errors reported, repeats included: an error said once already still makes its item bad.
        self.failed = 0
        self._offers: dict[tuple[str, str], catalog.Offer | None] = {}
        self._sizes: dict[tuple[str, str], str | None] = {}

    def error(self, origin: Origin, message: str) -> None:
        self.failed += 1
        self.problems.error(origin, message)

    def render(self, template: Val, variables: Mapping[str, str], origin: Origin) -> str | None:
        missing = template.value.missing(variables)
        if missing:
            shown = ", ".join(sorted(variables)) or "none"
            self.error(
                origin,
                f"found {{{missing[0]}}} with no value; allowed: the variables here ({shown})"
                f"{did_you_mean(missing[0], variables)}",
            )
            return None
        return template.value.render(variables).strip()

    def model(self, values: dict[str, Val], entry_origin: Origin) -> catalog.Model | None:
        model_val, region_val = values.get("model"), values["region"]
        if model_val is None:
            self.error(
                entry_origin,
                "found no model; allowed: model: in defaults, on the entry or in its"
                " file, one of " + ", ".join(catalog.MODELS),
            )
            return None
        key = (region_val.value, model_val.value)
        if key not in self._offers:
            self._offers[key] = self._offer(*key)
        if self._offers[key] is None:
            lacking = self._lacking(region_val.value, model_val.value)
            offered = [o.model.name for o in catalog.offers_in(lacking)]
            named = "the default" if region_val.origin.field == DEFAULT_REGION else region_val.origin.where()
            self.error(
                model_val.origin,
                f"found {model_val.value!r}, which region {lacking!r} ({named}) does not offer;"
                f" allowed there: {', '.join(offered)}{did_you_mean_model(model_val.value, offered)}",
            )
            return None
        return self._offers[key].model

    @staticmethod
    def _offer(region: str, model: str) -> catalog.Offer | None:
        """The offer that vouches for (region, model): one region's; for several, the first, once each of
        them sells the model (a region listed by name that does not is a mistake); for ``any``, one must."""
        offers = catalog.offers_for(region, model)
        listed = catalog.regions_of(region, model)
        if not offers or (region != catalog.ANY_REGION and len(offers) < len(listed)):
            return None
        return offers[0]

    @staticmethod
    def _lacking(region: str, model: str) -> str:
        """The (first) region of ``region`` that does not sell ``model``."""
        regions = catalog.regions_of(region) if region == catalog.ANY_REGION else catalog.regions_of(region, None)
        return next((r for r in regions if catalog.offer(r, model) is None), regions[0] if regions else region)

    def size(self, model: catalog.Model, size_val: Val | None) -> str | None:
        if size_val is None:
            return model.default_size
        key = (model.name, size_val.value)
        if key not in self._sizes:
            width, height = catalog.parse_size(size_val.value)
            self._sizes[key] = model.size_rule.violation(width, height)
        if self._sizes[key] is not None:
            near = _nearest_size(model, size_val.value)
            self.error(
                size_val.origin,
                f"found {size_val.value!r}, which {model.name} does not make ({self._sizes[key]}); allowed:"
                f" {model.size_rule.describe()}; did you mean {near!r}?",
            )
            return None
        return size_val.value

    def sync(self, model: catalog.Model, sync_val: Val | None) -> bool:
        sync = bool(sync_val and sync_val.value)
        if sync and model.protocol is not catalog.Protocol.MULTIMODAL:
            allowed = ", ".join(_SYNC_MODELS)
            self.error(sync_val.origin, f"found sync: true for {model.name}; allowed: sync only with {allowed}")
        return sync

    def lengths(
        self, model: catalog.Model, prompt: str, prompt_origin: Origin, negative: str | None, negative_val: Val | None
    ) -> None:
        """Over-long text is a warning, not an error: the service cuts it and goes on."""
        if len(prompt) > model.prompt_max:
            self.problems.warn(
                prompt_origin,
                f"the prompt has {len(prompt)} characters; {model.name} reads the first"
                f" {model.prompt_max} (the service cuts the rest)",
            )
        if negative and negative_val and len(negative) > model.negative_prompt_max:
            self.problems.warn(
                negative_val.origin,
                f"the negative prompt has {len(negative)} characters; the service reads the first"
                f" {model.negative_prompt_max}",
            )

    def output(self, entry: EntryPlan, variables: Mapping[str, str], n: int, seed: int | None) -> None:
        if entry.output is None:
            return
        template, origin = entry.output.value, entry.output.origin
        fields = set(variables) | set(OUTPUT_FIELDS)
        missing = template.missing(fields)
        if missing:
            self.error(
                origin,
                f"found {{{missing[0]}}}, which {entry.field} has no value for; allowed:"
                f" {', '.join(sorted(fields))}{did_you_mean(missing[0], fields)}",
            )
        if "seed" in template.names and seed is None:
            self.error(
                origin,
                f"found {{seed}}, but {entry.field} leaves the seed to the service;"
                " allowed: {seed} only where a seed is set (seed: 7, a list, a range or {count: k})",
            )
        if n > 1 and "index" not in template.names:
            self.error(
                origin,
                f"found no {{index}}, but {entry.field} makes {n} images per item, which"
                " would overwrite each other; allowed: a pattern with {index}",
            )


def _nearest_size(model: catalog.Model, size: str) -> str:
    """The allowed size closest to ``size`` in shape (the model's default if none is near)."""
    width, height = catalog.parse_size(size)
    rule = model.size_rule
    if rule.min_side:
        width, height = (min(max(side, rule.min_side), rule.max_side) for side in (width, height))
    else:
        scale = math.sqrt(min(max(width * height, rule.min_pixels), rule.max_pixels) / (width * height))
        width, height = (int(side * scale) // 16 * 16 for side in (width, height))
        if width * height < rule.min_pixels:
            width, height = width + 16, height + 16
    candidate = f"{width}*{height}"
    return candidate if rule.violation(width, height) is None else model.default_size
