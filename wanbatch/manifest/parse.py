"""From a loaded YAML tree to a plan of entries, checking every key and type on the way.

The plan says, per entry of ``prompts``, what is fixed (one value per
parameter or variable), which axes multiply it (matrix keys, a zip, seed
lists), where its records come from (a prompts file) and how many items it
makes, arithmetic only. Expanding the plan into items is
:mod:`wanbatch.manifest`'s job.

Precedence, one rule: what an entry says beats what the top level says
(``defaults``, ``vars``, ``matrix``); within one level a key has one source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from wanbatch import catalog
from wanbatch.manifest.files import PromptFile
from wanbatch.manifest.layers import Axis, Layer, read_matrix, read_params, read_vars, read_zip
from wanbatch.manifest.values import (
    PARAMS,
    Problems,
    Template,
    Val,
    coerce_param,
    did_you_mean,
    parse_template,
)
from wanbatch.manifest.yamlsrc import Node, Origin

__all__ = ["DEFAULT_MAX_ITEMS", "OUTPUT_FIELDS", "Axis", "EntryPlan", "Plan", "parse"]

DEFAULT_MAX_ITEMS = 1_000_000
#: The field of the region's origin when the manifest names none.
DEFAULT_REGION = "(default region)"
#: What an output pattern may name besides the item's variables.
OUTPUT_FIELDS = ("item_id", "index", "replica", "model", "size", "n", "region", "seed")

TOP_KEYS = ("name", "region", "budget", "output", "max_items", "defaults", "vars", "matrix", "prompts")
DEFAULT_KEYS = (*(p for p in PARAMS if p != "region"), "repeats")
ENTRY_KEYS = ("prompt", "file", "vars", "matrix", "zip", "repeats", "output", *PARAMS)
_PROMPT = parse_template("{prompt}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryPlan:
    field: str  #: ``prompts[2]``
    origin: Origin
    template: Val  #: the prompt, a :class:`Template`
    fixed: dict[str, Val]  #: one value per parameter or variable, top level merged in
    axes: tuple[Axis, ...]
    source: PromptFile | None
    seed_draws: Val | None  #: ``seed: {count: k}``: k seeds drawn per request
    repeats: int
    output: Val | None  #: a :class:`Template`
    count: int
    #: it takes a top-level value that was refused: its own checks would only repeat that error
    inherits_errors: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    name: str
    region: str
    budget: float | None
    output: Val | None
    max_items: int
    entries: tuple[EntryPlan, ...]


def parse(root: Node, manifest_dir: Path, problems: Problems) -> Plan | None:
    """The plan, or None when the structure is too broken to go on (the errors are in ``problems``)."""
    if not isinstance(root.value, dict):
        problems.error(root.origin, f"found {root.kind}; allowed: a mapping with keys {', '.join(TOP_KEYS)}")
        return None
    top = root.value
    _unknown_keys(root, TOP_KEYS, problems)
    file = root.origin.file
    name = _scalar(top.get("name"), str, "a name (text)", problems) or Path(file).stem
    region_node = top.get("region")
    region, refused = "beijing", set()
    if region_node is not None:
        checked = _checked(region_node, "region", problems)
        region = checked or region
        refused = set() if checked else {"region"}
    layer = Layer()
    layer.fixed["region"] = Val(region, region_node.origin if region_node else Origin(file, 1, DEFAULT_REGION))
    if "defaults" in top:
        read_params(top["defaults"], DEFAULT_KEYS, layer, problems, strict=True)
        if isinstance(top["defaults"].value, dict) and "region" in top["defaults"].value:
            problems.error(
                top["defaults"].value["region"].origin,
                "found region in defaults; allowed: region at the top level (region: singapore) or on an entry",
            )
    read_vars(top.get("vars"), layer, problems)
    read_matrix(top.get("matrix"), layer, problems)
    output = _output(top.get("output"), problems)
    refused |= _refused(layer)
    entries_node = top.get("prompts")
    if entries_node is None or not isinstance(entries_node.value, list) or not entries_node.value:
        where = entries_node.origin if entries_node else Origin(file, 1, "prompts")
        found = entries_node.kind if entries_node else "no 'prompts'"
        problems.error(where, f"found {found}; allowed: a non-empty list of prompts (text or mappings)")
        return None
    entries = []
    for node in entries_node.value:
        entry = _entry(node, layer, output, manifest_dir, problems, refused)
        if entry is not None:
            entries.append(entry)
    max_items = _max_items(top.get("max_items"), problems)
    budget = _budget(top.get("budget"), problems)
    total = sum(entry.count for entry in entries)
    if total > max_items:
        where = top["max_items"].origin if "max_items" in top else entries_node.origin
        problems.error(
            where,
            f"found {total:,} items in the expanded manifest; allowed: at most {max_items:,}"
            f" (raise it with a top-level 'max_items: {total}')",
        )
    return Plan(name=name, region=region, budget=budget, output=output, max_items=max_items, entries=tuple(entries))


def _unknown_keys(node: Node, allowed: tuple[str, ...], problems: Problems, hint: str = "") -> None:
    for key, child in node.value.items():
        if key not in allowed:
            extra = hint if hint and " " in key else ""
            suggestion = did_you_mean(key, allowed)
            problems.error(child.origin, f"found unknown key {key!r}; allowed: {', '.join(allowed)}{suggestion}{extra}")


def _scalar(node: Node | None, kind: type, allowed: str, problems: Problems) -> Any:
    if node is None:
        return None
    if isinstance(node.value, kind) and not isinstance(node.value, bool) and node.value != "":
        return node.value
    problems.error(node.origin, f"found {node.kind}; allowed: {allowed}")
    return None


def _checked(node: Node, key: str, problems: Problems) -> Any:
    value, problem = coerce_param(key, node.value)
    if problem:
        problems.error(node.origin, problem)
    return value


def _max_items(node: Node | None, problems: Problems) -> int:
    if node is None:
        return DEFAULT_MAX_ITEMS
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.error(node.origin, f"found {node.kind}; allowed: a whole number of items, at least 1")
        return DEFAULT_MAX_ITEMS
    return value


def _budget(node: Node | None, problems: Problems) -> float | None:
    if node is None or node.value is None:
        return None
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        problems.error(node.origin, f"found {node.kind}; allowed: an amount in CNY greater than 0, like 25 or 12.5")
        return None
    return float(value)


def _output(node: Node | None, problems: Problems) -> Val | None:
    """An output pattern: a relative ``.png`` path with ``{field}`` holes."""
    if node is None or node.value is None:
        return None
    example = '"{model}/{item_id}-{index}.png"'
    if not isinstance(node.value, str) or not node.value.strip():
        problems.error(node.origin, f"found {node.kind}; allowed: a file-name pattern like {example}")
        return None
    template = parse_template(node.value)
    if isinstance(template, str):
        problems.error(node.origin, template)
        return None
    path = PurePosixPath(node.value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        problems.error(node.origin, f"found {node.value!r}; allowed: a path inside the run's images/ folder")
    elif path.suffix.lower() != ".png":
        problems.error(node.origin, f"found {node.value!r}; allowed: a name ending in .png (the service makes PNGs)")
    return Val(template, node.origin)


def _refused(layer: Layer) -> set[str]:
    """The keys a level names whose value was refused: claimed, yet with no value, axis or seeds to draw."""
    on_axes = {key for axis in layer.axes for key in axis.keys}
    drawn = {"seed"} if layer.seed_draws is not None else set()
    return {key for key in layer.owner if key not in layer.fixed and key not in on_axes | drawn}


def _entry(
    node: Node, top: Layer, output: Val | None, manifest_dir: Path, problems: Problems, refused: set[str]
) -> EntryPlan | None:
    """One entry of ``prompts``, merged with the top level."""
    origin = node.origin
    if isinstance(node.value, str):
        spec: dict[str, Node] = {"prompt": node}
    elif isinstance(node.value, dict):
        spec = node.value
        _unknown_keys(node, ENTRY_KEYS, problems, hint=" (a prompt containing ': ' must be quoted)")
    else:
        problems.error(origin, f"found {node.kind}; allowed: a prompt (text) or a mapping with 'prompt' or 'file'")
        return None
    layer = Layer()
    errors_before = len(problems.errors)
    if isinstance(node.value, dict):
        read_params(node, (*PARAMS, "repeats"), layer, problems, strict=False)
    read_vars(spec.get("vars"), layer, problems)
    read_zip(spec.get("zip"), layer, problems)
    read_matrix(spec.get("matrix"), layer, problems)
    source = _source(spec.get("file"), layer, manifest_dir, problems)
    template = _template(spec.get("prompt"), origin, problems)
    entry_output = _output(spec.get("output"), problems) or output
    if template is None:
        return None
    sets = set(layer.owner)
    # A file's empty cell falls back to the top level's value, so file columns do not drop it.
    fixed = {key: val for key, val in top.fixed.items() if key not in sets - layer.columns} | layer.fixed
    axes = tuple(a for a in top.axes if not sets & set(a.keys)) + tuple(layer.axes)
    # Seeds vary fastest, so the images of one prompt and size sit together in the run.
    axes = tuple(sorted(axes, key=lambda axis: axis.kind == "seed"))
    draws = layer.seed_draws if "seed" in sets else top.seed_draws
    repeats = (layer.repeats or top.repeats or Val(1, origin)).value
    entry = EntryPlan(
        field=origin.field,
        origin=origin,
        template=template,
        fixed=fixed,
        axes=axes,
        source=source,
        seed_draws=draws,
        repeats=repeats,
        output=entry_output,
        count=(source.count if source else 1)
        * math.prod(len(a.rows) for a in axes)
        * (draws.value if draws else 1)
        * repeats,
        inherits_errors=bool(refused - sets),
    )
    # Names claimed count as given even when their values were wrong, so one mistake is reported once.
    claimed = set(top.owner) | sets
    unknown = isinstance(node.value, dict) and any(key not in ENTRY_KEYS for key in spec)
    unreadable = "file" in spec and source is None
    _static_checks(entry, claimed, problems, complete=not (unknown or unreadable), file_read=not unreadable)
    return entry if len(problems.errors) == errors_before else None


def _template(node: Node | None, origin: Origin, problems: Problems) -> Val | None:
    if node is None:
        return Val(_PROMPT, origin)
    if not isinstance(node.value, str):
        problems.error(node.origin, f"found {node.kind}; allowed: the prompt as text (quote it)")
        return None
    template = parse_template(node.value.strip())
    if isinstance(template, str):
        problems.error(node.origin, template)
        return None
    return Val(template, node.origin)


def _source(node: Node | None, layer: Layer, manifest_dir: Path, problems: Problems) -> PromptFile | None:
    if node is None:
        return None
    if not isinstance(node.value, str) or not node.value.strip():
        problems.error(node.origin, f"found {node.kind}; allowed: a path to a .txt, .csv or .jsonl file")
        return None
    relative = node.value.strip()
    display = str(PurePosixPath(Path(node.origin.file).parent.as_posix()) / relative)
    opened = PromptFile.open(manifest_dir / relative, display, node.origin.field)
    if isinstance(opened, str):
        problems.error(node.origin, opened)
        return None
    if opened.count == 0:
        problems.error(
            node.origin,
            f"found no prompts in {display}, so the entry expands to nothing; allowed: a file with at least one",
        )
        return None
    for column in opened.columns if opened.columns is not None else ():
        layer.claim(column, node.origin.child(column), problems)
        layer.columns.add(column)
    return opened


def _available(entry: EntryPlan, claimed: set[str]) -> set[str] | None:
    """The variable names every item of the entry has, or None when a .jsonl decides per line."""
    if entry.source is not None and entry.source.columns is None:
        return None
    names = {key for key in entry.fixed if key not in PARAMS} | {key for key in claimed if key not in PARAMS}
    names |= {key for axis in entry.axes for key in axis.keys if key not in PARAMS}
    names |= {key for key in (entry.source.columns or ()) if key not in PARAMS} if entry.source else set()
    return names


def _negative_templates(entry: EntryPlan) -> list[Val]:
    vals = [entry.fixed["negative_prompt"]] if "negative_prompt" in entry.fixed else []
    vals += [
        row[axis.keys.index("negative_prompt")]
        for axis in entry.axes
        if "negative_prompt" in axis.keys
        for row in axis.rows
    ]
    return [val for val in vals if isinstance(val.value, Template)]


def _static_checks(entry: EntryPlan, claimed: set[str], problems: Problems, *, complete: bool, file_read: bool) -> None:
    """What can be known before expanding: missing variables, unused axes, no model.

    ``complete`` is false when the entry has an unknown key (probably meant as
    its prompt or model) or an unreadable file: a missing prompt or model is
    then not reported too. Without its file (``file_read`` false) the
    entry's variables are unknown, so they are not checked.
    """
    available = _available(entry, claimed) if file_read else None
    templates = [entry.template, *_negative_templates(entry)]
    used = set().union(*(val.value.names for val in templates))
    any_missing = False
    if available is not None:
        for val in templates:
            missing = val.value.missing(available)
            any_missing = any_missing or bool(missing)
            if missing and val is entry.template and val.value is _PROMPT:
                if complete:
                    problems.error(
                        val.origin,
                        "found no prompt; allowed: a 'prompt:' text, a 'file:' of prompts, or a variable 'prompt'"
                        + did_you_mean("prompt", available),
                    )
            elif missing:
                shown = ", ".join(sorted(available)) or "none"
                problems.error(
                    val.origin,
                    f"found {{{missing[0]}}} with no value; allowed: the variables here"
                    f" ({shown}){did_you_mean(missing[0], available)}",
                )
        if entry.output is not None:
            fields = available | set(OUTPUT_FIELDS)
            for name in entry.output.value.missing(fields):
                problems.error(
                    entry.output.origin,
                    f"found {{{name}}}, which {entry.field} has no value for;"
                    f" allowed: {', '.join(sorted(fields))}{did_you_mean(name, fields)}",
                )
    for axis in entry.axes if not any_missing else ():  # a misspelt {name} was probably meant for the axis
        names = [key for key in axis.keys if key not in PARAMS]
        if names and len(names) == len(axis.keys) and not used & set(names):
            close = did_you_mean(names[0], PARAMS)
            problems.error(
                axis.origin,
                f"found {{{names[0]}}} unused by {entry.field}'s prompt, so its {len(axis.rows)} values make"
                f" identical requests; allowed: a variable the prompt or negative_prompt uses{close}",
            )
    jsonl = entry.source is not None and entry.source.columns is None
    if complete and "model" not in entry.fixed and "model" not in claimed and not jsonl:
        problems.error(
            entry.origin,
            "found no model; allowed: model: in defaults or on the entry, one of " + ", ".join(catalog.MODELS),
        )
