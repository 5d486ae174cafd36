"""Expanding a manifest's plan into items: by combination, then seeds and replicas.

A combination is a record of a prompts file with one row of each axis: the
catalog checks (:mod:`wanbatch.manifest.checks`) run once per combination,
and its seeds and replicas are multiplied out after them. An item's id is
the first 20 hex digits of the sha256 of its canonical request and replica
number (:func:`item_id`), so a re-run finds the same items and an edit keeps
the ids of what it did not change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from wanbatch import catalog
from wanbatch.manifest import naming
from wanbatch.manifest.checks import Checks
from wanbatch.manifest.files import Record
from wanbatch.manifest.layers import Axis, SeedRange
from wanbatch.manifest.parse import EntryPlan
from wanbatch.manifest.values import PARAMS, Problems, Val
from wanbatch.manifest.yamlsrc import Origin

__all__ = ["DEFAULT_OUTPUT", "Combo", "Item", "combo_items", "draw_seed", "entry_combos", "entry_items", "item_id"]

#: The file name of an image when the manifest gives no ``output`` pattern.
DEFAULT_OUTPUT = naming.DEFAULT_PATTERN
_PARAM_SET = frozenset(PARAMS)
#: The parameters whose values decide a request's fields besides its prompt and seed.
_REQUEST_PARAMS = ("region", "model", "size", "n", "prompt_extend", "watermark", "sync")
#: How many passing sets of parameter values an entry remembers (each a handful of small objects).
_PASSED_KEPT = 4096
#: A .txt entry is surveyed line by line only for at most this many combinations of its axes.
_SHAPES_KEPT = 1000
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def item_id(request: Mapping[str, object], replica: int) -> str:
    """The stable id: sha256 of ``[request, replica]`` as compact sorted JSON, first 20 hex digits."""
    return _id_of(_CANONICAL_JSON.encode(request), replica)


def _id_of(request_json: str, replica: int) -> str:
    """:func:`item_id` from the request's canonical JSON, made once for all its replicas."""
    return hashlib.sha256(f"[{request_json},{replica}]".encode()).hexdigest()[:20]


def draw_seed(prompt: str, k: int) -> int:
    """The ``k``-th seed drawn for a prompt: the same on every run, under every model and size, and whatever
    the manifest is called (a renamed manifest must not make new items, which would be paid again)."""
    digest = hashlib.sha256(f"{prompt}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (catalog.SEED_MAX + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One generation request, ready to send, and where in the manifest it came from."""

    item_id: str
    replica: int  #: 0-based repeat number
    region: str
    model: str  #: canonical catalog name (a ``catalog.MODELS`` key)
    prompt: str
    negative_prompt: str | None
    size: str  #: ``"W*H"``
    n: int
    seed: int | None  #: None lets the service choose
    prompt_extend: bool
    watermark: bool
    sync: bool
    variables: Mapping[str, str]  #: template, matrix, zip and file-column values
    source: str  #: ``jobs/x.yaml:12`` or ``jobs/prompts.txt:7``
    entry: str  #: the entry's field path, ``prompts[2]``
    output: str | None  #: the output pattern that applies, if the manifest gives one
    #: :meth:`request` as canonical JSON, when the expansion has made it already (the ledger stores it)
    request_json: str = field(default="", repr=False, compare=False)

    def request(self) -> dict[str, object]:
        """The canonical request fields, hashed into the id and stored by the ledger."""
        return {
            "region": self.region,
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "size": self.size,
            "n": self.n,
            "seed": self.seed,
            "prompt_extend": self.prompt_extend,
            "watermark": self.watermark,
            "sync": self.sync,
        }

    def output_name(self, image_index: int) -> str:
        """The file name of image ``image_index`` (0-based) relative to ``images/``, as the downloader writes it
        (before any shard): :func:`wanbatch.manifest.naming.file_name`, the one maker of names."""
        return naming.file_name(
            self.output,
            self.variables,
            item_id=self.item_id,
            index=image_index,
            replica=self.replica,
            model=self.model,
            size=self.size,
            n=self.n,
            region=self.region,
            seed=self.seed,
        )


def _line_combos(entry: EntryPlan, problems: Problems) -> Iterator[Combo | None] | None:
    """A .txt entry's combinations without a record object per line; None when it needs the general way.

    A line of a .txt file sets only the variable ``prompt``, so every line shares the checks of the
    parameters and variables: the first line goes the general way for each combination of the axes (a
    "shape"), and each later line only renders its prompt into a copy of its shape (a line whose prompt is
    empty or too long goes the general way too, to report it).
    """
    source = entry.source
    if source is None or source.kind != ".txt":
        return None
    maker = _ComboMaker(entry, Checks(problems), _axis_seeds(_seed_axis(entry)))
    lines = source.lines()
    first = next(lines, None)
    if first is None:
        return iter(())
    record = source.record_of(*first)
    shapes = []
    for values in _axis_values(entry):
        combo = maker.combo(values | record.values, record.origin)
        if combo is None or len(shapes) >= _SHAPES_KEPT:
            return None
        # Each shape renders into a variables dict of its own: the combination's stays its first line's.
        shapes.append((values, combo, catalog.MODELS[combo.request["model"]], dict(combo.variables)))
    return _later_lines(entry, maker, shapes, lines)


def _later_lines(
    entry: EntryPlan, maker: _ComboMaker, shapes: list, lines: Iterable[tuple[int, int, str]]
) -> Iterator[Combo | None]:
    source, template = entry.source, entry.template.value
    yield from (combo for _, combo, _, _ in shapes)
    for index, line_no, text in lines:
        for values, shape, model, variables in shapes:
            variables["prompt"] = text
            prompt = template.render(variables).strip()
            neg = values.get("negative_prompt")
            negative = neg.value.render(variables).strip() if neg is not None and neg.value else ""
            if not prompt or len(prompt) > model.prompt_max or len(negative) > model.negative_prompt_max:
                line = source.record_of(index, line_no, text)
                yield maker.combo(values | line.values, line.origin)
            else:
                request = {**shape.request, "prompt": prompt, "negative_prompt": negative or None}
                yield Combo(request, dict(variables), f"{source.display}:{line_no}", shape.seeds)


def _seed_axis(entry: EntryPlan) -> Axis | None:
    return entry.axes[-1] if entry.axes and entry.axes[-1].kind == "seed" else None


def _axis_values(entry: EntryPlan) -> Iterator[dict[str, Val]]:
    """The entry's fixed values with each combination of its axes but the seeds, in order."""
    axes = entry.axes[:-1] if _seed_axis(entry) is not None else entry.axes
    for rows in itertools.product(*(axis.rows for axis in axes)):
        values = dict(entry.fixed)
        for axis, row in zip(axes, rows, strict=True):
            values.update(zip(axis.keys, row, strict=True))
        yield values


class Combo(NamedTuple):
    """One combination of an entry's values: a request less its seed, made once per seed and replica."""

    request: dict[str, Any]  #: every request field but ``seed``
    variables: dict[str, str]
    source: str  #: where its prompt was written, ``file:line``
    seeds: Sequence[int | None] | None  #: None when ``seed: {count: k}`` draws them from the prompt


def entry_items(entry: EntryPlan, problems: Problems) -> Iterator[Item | None]:
    """The entry's items in order (records, axes, seeds, replicas); None for a combination that has errors."""
    for combo in entry_combos(entry, problems):
        if combo is None:
            yield None
        else:
            yield from combo_items(entry, combo)


def combo_items(entry: EntryPlan, combo: Combo) -> Iterator[Item]:
    """The combination's items, one per seed and replica; the request's JSON is made once per seed."""
    request = dict(combo.request)
    seeds = combo.seeds
    if seeds is None:
        seeds = [draw_seed(request["prompt"], k) for k in range(entry.seed_draws.value)]
    source = combo.source
    output = entry.output.value.text if entry.output is not None else None
    for seed in seeds:
        request["seed"] = seed
        payload = _CANONICAL_JSON.encode(request)
        for replica in range(entry.repeats):
            yield Item(
                item_id=_id_of(payload, replica),
                replica=replica,
                variables=combo.variables,
                source=source,
                entry=entry.field,
                output=output,
                request_json=payload,
                **request,
            )


def entry_combos(entry: EntryPlan, problems: Problems) -> Iterator[Combo | None]:
    """The entry's combinations in order (records, then axes); None for one that has errors."""
    lines = _line_combos(entry, problems)
    if lines is not None:
        yield from lines
        return
    # A seed axis (always last) is not multiplied out here: its seeds ride along with each combination.
    seed_axis = entry.axes[-1] if entry.axes and entry.axes[-1].kind == "seed" else None
    axes = entry.axes[:-1] if seed_axis is not None else entry.axes
    axis_rows = [axis.rows for axis in axes]
    axis_keys = [axis.keys for axis in axes]
    # Keys the entry multiplies over: a .jsonl line may not set them too, or count() would be wrong.
    on_axes = {key: axis.origin for axis in entry.axes for key in axis.keys}
    if entry.seed_draws is not None:
        on_axes["seed"] = entry.seed_draws.origin
    maker = _ComboMaker(entry, Checks(problems), _axis_seeds(seed_axis))
    for record in entry.source.records() if entry.source is not None else (None,):
        base, prompt_origin = entry.fixed, entry.template.origin
        if record is not None:
            if record.errors or not on_axes.keys().isdisjoint(record.values):
                _record_errors(record, on_axes, problems)
                yield None
                continue
            base, prompt_origin = entry.fixed | record.values, record.origin
        if not axes:
            yield maker.combo(base, prompt_origin)
            continue
        for rows in itertools.product(*axis_rows):
            values = dict(base)
            for keys, row in zip(axis_keys, rows, strict=True):
                values.update(zip(keys, row, strict=True))
            yield maker.combo(values, prompt_origin)


def _axis_seeds(seed_axis: Axis | None) -> Sequence[int] | None:
    """The seeds of a seed axis as numbers; a range stays a range (a million seeds cost nothing)."""
    if seed_axis is None:
        return None
    if isinstance(seed_axis.rows, SeedRange):
        return seed_axis.rows.span
    return [row[0].value for row in seed_axis.rows]


def _record_errors(record: Record, on_axes: Mapping[str, Origin], problems: Problems) -> None:
    for origin, message in record.errors:
        problems.error(origin, message)
    for key in sorted(on_axes.keys() & record.values.keys()):
        problems.error(
            record.values[key].origin,
            f"found {key!r}, which {on_axes[key].field} (line {on_axes[key].line}) already sets;"
            " allowed: one source per key",
        )


class _ComboMaker:
    """Checks one combination of values and builds its request.

    The parameter checks (model in region, size, sync) depend only on the parameters' values, which most
    combinations share (a prompts file's lines usually set none): a combination whose parameter values are
    the very ones that passed before reuses that answer instead of checking again.
    """

    def __init__(self, entry: EntryPlan, checks: Checks, axis_seeds: Sequence[int] | None) -> None:
        self.entry, self.checks, self.axis_seeds = entry, checks, axis_seeds
        #: ids of the parameter values → (model, request fields, the values, kept alive so the ids stay theirs)
        self._passed: dict[tuple[int, ...], tuple[catalog.Model, dict[str, Any], tuple]] = {}

    def combo(self, values: dict[str, Val], prompt_origin: Origin) -> Combo | None:
        entry, checks = self.entry, self.checks
        variables = {key: val.value for key, val in values.items() if key not in _PARAM_SET}
        failed_before = checks.failed
        prompt = checks.render(entry.template, variables, prompt_origin)
        negative = values.get("negative_prompt")
        negative_text = checks.render(negative, variables, negative.origin) if negative and negative.value else None
        params = tuple(map(values.get, _REQUEST_PARAMS))
        key = tuple(map(id, params))
        passed = self._passed.get(key)
        model = passed[0] if passed is not None else checks.model(values, entry.origin)
        if prompt is not None and not prompt:
            checks.error(prompt_origin, "found an empty prompt; allowed: text describing the image")
        if model is None or prompt is None or checks.failed > failed_before:
            return None
        fields = passed[1] if passed is not None else self._fields(model, values, key, params)
        request = {"prompt": prompt, "negative_prompt": negative_text or None, **fields}
        checks.lengths(model, prompt, prompt_origin, negative_text, negative)
        seeds = self._seeds(values)
        if entry.output is not None:
            checks.output(entry, variables, fields["n"], seeds[0] if seeds is not None else 0)
        if checks.failed > failed_before:
            return None
        return Combo(request, variables, prompt_origin.where(), seeds)

    def _fields(self, model: catalog.Model, values: dict[str, Val], key: tuple[int, ...], params: tuple) -> dict:
        """The request fields the parameters decide, checked; remembered when they pass."""
        failed_before = self.checks.failed
        fields = {
            "region": values["region"].value,
            "model": model.name,
            "size": self.checks.size(model, values.get("size")),
            "n": values["n"].value if "n" in values else model.n_default,
            "prompt_extend": values["prompt_extend"].value
            if "prompt_extend" in values
            else model.prompt_extend_default,
            "watermark": values["watermark"].value if "watermark" in values else model.watermark_default,
            "sync": self.checks.sync(model, values.get("sync")),
        }
        if self.checks.failed == failed_before and len(self._passed) < _PASSED_KEPT:
            self._passed[key] = (model, fields, params)
        return fields

    def _seeds(self, values: dict[str, Val]) -> Sequence[int | None] | None:
        if self.axis_seeds is not None:
            return self.axis_seeds
        if "seed" in values:
            return [values["seed"].value]
        return None if self.entry.seed_draws is not None else [None]
