"""The job manifest: a YAML file that expands, streaming, into generation items.

    Manifest.from_yaml(path)   load, check keys and types (errors name file:line and field)
    manifest.count()           how many items, by arithmetic
    manifest.validate()        every item through the catalog's rules; warnings back, errors raised
    manifest.items()           the items, one at a time, never all in memory

The language is described in docs/manifest.md. The loader lives in
:mod:`wanbatch.yamlsrc`, value rules in :mod:`wanbatch.manifest_values`, prompts
files in :mod:`wanbatch.manifest_files` and the structure in
:mod:`wanbatch.manifest_parse`; this module expands the plan into items and
checks each against :mod:`wanbatch.catalog` (:mod:`wanbatch.manifest_checks`).

An item's id is the first 20 hex digits of the sha256 of its canonical request
and replica number (:func:`item_id`), so a re-run finds the same items and an
edit keeps the ids of what it did not change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wanbatch import catalog
from wanbatch.errors import ManifestInvalid
from wanbatch.manifest_checks import Checks
from wanbatch.manifest_parse import EntryPlan, Plan, parse
from wanbatch.manifest_values import PARAMS, Problems, Val
from wanbatch.yamlsrc import Origin, load_yaml

__all__ = ["DEFAULT_OUTPUT", "Item", "Manifest", "draw_seed", "item_id"]

#: The file name of an image when the manifest gives no ``output`` pattern.
DEFAULT_OUTPUT = "{item_id}-{index}.png"
#: validate() compares output file names among this many items (a set of names costs memory).
OUTPUT_CHECK_ITEMS = 100_000
_PARAM_SET = frozenset(PARAMS)
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def item_id(request: Mapping[str, object], replica: int) -> str:
    """The stable id: sha256 of ``[request, replica]`` as compact sorted JSON, first 20 hex digits."""
    payload = _CANONICAL_JSON.encode([request, replica])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def draw_seed(manifest_name: str, prompt: str, k: int) -> int:
    """The ``k``-th seed drawn for a prompt: the same on every run, under every model and size."""
    digest = hashlib.sha256(f"{manifest_name}\x00{prompt}\x00{k}".encode()).digest()
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

    def output_fields(self, image_index: int) -> dict[str, str]:
        """What an output pattern can name for image ``image_index`` (0-based) of this item."""
        fields = dict(self.variables)
        fields |= {"item_id": self.item_id, "index": str(image_index), "replica": str(self.replica)}
        fields |= {"model": self.model, "size": self.size, "n": str(self.n), "region": self.region}
        if self.seed is not None:
            # The service numbers the images of one request seed, seed+1, ...: the name says which.
            fields["seed"] = str(self.seed + image_index)
        return fields

    def output_name(self, image_index: int) -> str:
        """The image's relative file name from the pattern (or :data:`DEFAULT_OUTPUT`), not yet sanitised."""
        return (self.output or DEFAULT_OUTPUT).format_map(self.output_fields(image_index))


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A loaded, structurally valid manifest. Build it with :meth:`from_yaml`."""

    name: str
    path: Path
    region: str  #: the default region of every entry
    budget: float | None  #: CNY; the engine stops submitting before spending more
    output: str | None  #: the top-level output pattern
    max_items: int
    plan: Plan = field(repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Manifest:
        """Load and check the structure; raises :class:`ManifestInvalid` listing every error found."""
        path = Path(path)
        problems = Problems()
        root, load_errors = load_yaml(path, path.as_posix())
        problems.add(load_errors)
        plan = parse(root, path.parent, problems) if root is not None else None
        if problems.errors or plan is None:
            raise _invalid(problems, path)
        output = plan.output.value.text if plan.output is not None else None
        return cls(
            name=plan.name,
            path=path,
            region=plan.region,
            budget=plan.budget,
            output=output,
            max_items=plan.max_items,
            plan=plan,
        )

    def count(self) -> int:
        """How many items :meth:`items` yields (identical requests counted each time they appear)."""
        return sum(entry.count for entry in self.plan.entries)

    def items(self) -> Iterator[Item]:
        """The items in manifest order, streaming; raises :class:`ManifestInvalid` at the first bad one."""
        problems = Problems()
        for entry in self.plan.entries:
            for item in _entry_items(entry, self.name, problems):
                if item is None:
                    raise ManifestInvalid(problems.errors, manifest=self.path.as_posix())
                yield item

    def validate(self) -> list[str]:
        """Check every item against the catalog; returns the warnings, raises :class:`ManifestInvalid`."""
        problems = Problems()
        names: dict[str, Item] = {}
        for entry in self.plan.entries:
            for item in _entry_items(entry, self.name, problems):
                if item is not None and entry.output is not None and len(names) < OUTPUT_CHECK_ITEMS:
                    _check_collision(item, entry.output.origin, names, problems)
                if problems.full:
                    problems.truncated = True
                    break
            if problems.truncated:
                break
        if problems.errors:
            raise _invalid(problems, self.path)
        return problems.warnings


def _invalid(problems: Problems, path: Path) -> ManifestInvalid:
    """The errors in reading order: the manifest's by line, then its prompts files'."""
    manifest = path.as_posix()
    ordered = sorted(problems.errors, key=lambda error: (error.path != manifest, error.path, error.line or 0))
    return ManifestInvalid(ordered, manifest=manifest, truncated=problems.truncated)


def _check_collision(item: Item, origin: Origin, names: dict[str, Item], problems: Problems) -> None:
    name = item.output_name(0)
    other = names.setdefault(name, item)
    if other.item_id != item.item_id:
        problems.error(
            origin,
            f"found two items writing {name!r} ({other.source} and {item.source}); allowed: a pattern that tells"
            " items apart, e.g. with {item_id} or {seed}",
        )


def _entry_items(entry: EntryPlan, name: str, problems: Problems) -> Iterator[Item | None]:
    """The entry's items in order (records, axes, seeds, replicas); None for one that has errors."""
    # A seed axis (always last) is walked lazily: product() would first copy a range of a million seeds.
    seed_axis = entry.axes[-1] if entry.axes and entry.axes[-1].kind == "seed" else None
    axes = entry.axes[:-1] if seed_axis is not None else entry.axes
    axis_rows = [axis.rows for axis in axes]
    axis_keys = [axis.keys for axis in axes]
    # Keys the entry multiplies over: a .jsonl line may not set them too, or count() would be wrong.
    on_axes = {key: axis.origin for axis in entry.axes for key in axis.keys}
    if entry.seed_draws is not None:
        on_axes["seed"] = entry.seed_draws.origin
    checks = Checks(problems)
    for record in entry.source.records() if entry.source is not None else (None,):
        base = entry.fixed
        if record is not None:
            clashes = sorted(on_axes.keys() & record.values.keys())
            for origin, message in record.errors:
                problems.error(origin, message)
            for key in clashes:
                problems.error(
                    record.values[key].origin,
                    f"found {key!r}, which {on_axes[key].field} (line {on_axes[key].line}) already sets;"
                    " allowed: one source per key",
                )
            if record.errors or clashes:
                yield None
                continue
            base = entry.fixed | record.values
        for combo in itertools.product(*axis_rows):
            values = dict(base)
            for keys, row in zip(axis_keys, combo, strict=True):
                values.update(zip(keys, row, strict=True))
            prompt_origin = record.origin if record is not None else entry.template.origin
            for (seed,) in seed_axis.rows if seed_axis is not None else ((None,),):
                if seed is not None:
                    values["seed"] = seed
                yield from _items(entry, name, values, prompt_origin, checks)


def _items(entry: EntryPlan, name: str, values: dict[str, Val], prompt_origin: Origin, checks: Checks):
    """The items of one combination of values: one per seed and replica (or a single None if it is bad)."""
    variables = {key: val.value for key, val in values.items() if key not in _PARAM_SET}
    failed_before = checks.failed
    prompt = checks.render(entry.template, variables, prompt_origin)
    negative = values.get("negative_prompt")
    negative_text = checks.render(negative, variables, negative.origin) if negative and negative.value else None
    model = checks.model(values, entry.origin)
    if prompt is not None and not prompt:
        checks.error(prompt_origin, "found an empty prompt; allowed: text describing the image")
    if model is None or prompt is None or checks.failed > failed_before:
        yield None
        return
    request = {
        "region": values["region"].value,
        "model": model.name,
        "prompt": prompt,
        "negative_prompt": negative_text or None,
        "size": checks.size(model, values.get("size")),
        "n": values["n"].value if "n" in values else model.n_default,
        "prompt_extend": values["prompt_extend"].value if "prompt_extend" in values else model.prompt_extend_default,
        "watermark": values["watermark"].value if "watermark" in values else model.watermark_default,
        "sync": checks.sync(model, values.get("sync")),
    }
    checks.lengths(model, prompt, prompt_origin, negative_text, negative)
    if "seed" in values:
        seeds = [values["seed"].value]
    elif entry.seed_draws is not None:
        seeds = [draw_seed(name, prompt, k) for k in range(entry.seed_draws.value)]
    else:
        seeds = [None]
    checks.output(entry, variables, request["n"], seeds[0])
    if checks.failed > failed_before:
        yield None
        return
    output = entry.output.value.text if entry.output is not None else None
    for seed in seeds:
        request["seed"] = seed
        for replica in range(entry.repeats):
            yield Item(
                item_id=item_id(request, replica),
                replica=replica,
                variables=variables,
                source=prompt_origin.where(),
                entry=entry.field,
                output=output,
                **request,
            )
