"""Reading one level of a manifest (the top level, or one entry) into a :class:`Layer`.

A layer holds what a level sets: parameters and variables with one value,
axes that multiply (matrix keys, a zip, seed lists and ranges), seeds to
draw, repeats, and which field set each key, so that a key set twice at
one level is reported with both places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from wanbatch import catalog
from wanbatch.manifest.values import (
    PARAMS,
    RESERVED,
    Problems,
    Template,
    Val,
    coerce_param,
    did_you_mean,
    parse_template,
    variable_text,
)
from wanbatch.manifest.yamlsrc import Node, Origin

__all__ = ["Axis", "Layer", "SeedRange", "read_matrix", "read_params", "read_vars", "read_zip"]


@dataclass(frozen=True, slots=True)
class Axis:
    """Values that multiply an entry: row ``i`` sets ``keys[j]`` to ``rows[i][j]``."""

    keys: tuple[str, ...]
    rows: Sequence[tuple[Val, ...]]
    origin: Origin
    kind: str  #: "matrix", "zip" or "seed"


class SeedRange(Sequence):
    """The rows of ``seed: {range: [...]}``, made when asked: a range of a million seeds costs nothing."""

    __slots__ = ("origin", "span")

    def __init__(self, span: range, origin: Origin) -> None:
        self.span, self.origin = span, origin

    def __len__(self) -> int:
        return len(self.span)

    def __getitem__(self, index: int | slice) -> tuple[Val, ...] | SeedRange:
        if isinstance(index, slice):
            return SeedRange(self.span[index], self.origin)
        return (Val(self.span[index], self.origin),)


@dataclass(slots=True)
class Layer:
    """What one level (the top, or an entry) sets, and where each key was set."""

    fixed: dict[str, Val] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    seed_draws: Val | None = None
    repeats: Val | None = None
    owner: dict[str, Origin] = field(default_factory=dict)
    columns: set[str] = field(default_factory=set)  #: keys a prompts file's header sets

    def claim(self, key: str, origin: Origin, problems: Problems) -> bool:
        first = self.owner.setdefault(key, origin)
        if first is not origin:
            where = f"{first.field} (line {first.line})"
            problems.error(origin, f"found {key!r} again, already set by {where}; allowed: one source per key here")
            return False
        return True


def _param_value(key: str, node: Node, problems: Problems) -> Val | None:
    """One value of a parameter (not a seed list): coerced, a template for negative_prompt."""
    value, problem = coerce_param(key, node.value)
    if problem:
        problems.error(node.origin, problem)
        return None
    if key == "negative_prompt" and value is not None:
        value = parse_template(value.strip())
        if isinstance(value, str):
            problems.error(node.origin, value)
            return None
    return Val(value, node.origin)


def read_params(node: Node, allowed: tuple[str, ...], layer: Layer, problems: Problems, *, strict: bool) -> None:
    """The parameters (and ``repeats``) of a mapping; ``strict`` reports keys that are neither."""
    if not isinstance(node.value, dict):
        problems.error(node.origin, f"found {node.kind}; allowed: a mapping of parameters ({', '.join(allowed)})")
        return
    for key, child in node.value.items():
        if key not in allowed:
            if strict and key != "region":
                suggestion = did_you_mean(key, allowed)
                problems.error(child.origin, f"found unknown key {key!r}; allowed: {', '.join(allowed)}{suggestion}")
            continue
        if key == "repeats":
            layer.repeats = _count(child, "repeats", problems)
        elif not layer.claim(key, child.origin, problems):
            continue
        elif key == "seed":
            _read_seed(child, layer, problems)
        elif isinstance(child.value, list) and key != "region":  # a list of regions: any one of them
            hint = f"to try several, write matrix: {{{key}: [...]}}"
            problems.error(child.origin, f"found a list; allowed: one value ({hint})")
        elif (val := _param_value(key, child, problems)) is not None:
            layer.fixed[key] = val


def _count(node: Node, what: str, problems: Problems) -> Val | None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.error(node.origin, f"found {node.kind}; allowed: a whole number of {what}, at least 1")
        return None
    return Val(value, node.origin)


def _read_seed(node: Node, layer: Layer, problems: Problems) -> None:
    """``seed`` is one seed, a list, ``{range: [start, stop]}``, or ``{count: k}`` seeds drawn for you."""
    if isinstance(node.value, dict) and set(node.value) == {"count"}:
        layer.seed_draws = _count(node.value["count"], "seeds", problems)
    elif isinstance(node.value, dict | list):
        rows = _seed_rows(node, problems)
        if rows:
            layer.axes.append(Axis(("seed",), rows, node.origin, "seed"))
    elif (val := _param_value("seed", node, problems)) is not None:
        layer.fixed["seed"] = val


def _seed_rows(node: Node, problems: Problems) -> Sequence[tuple[Val, ...]]:
    """Explicit seeds from a list or a ``{range: [start, stop, step]}`` (stop excluded, as in Python)."""
    allowed = "a seed, a list of seeds, {range: [start, stop]} or {count: k}"
    if isinstance(node.value, list):
        return tuple((val,) for val in _values("seed", node, problems))
    spec = node.value
    if not isinstance(spec, dict):
        problems.error(node.origin, f"found {node.kind}; allowed: a list of seeds or {{range: [start, stop]}}")
        return ()
    if set(spec) != {"range"} or not isinstance(spec["range"].value, list):
        problems.error(node.origin, f"found a mapping with keys {', '.join(spec) or 'none'}; allowed: {allowed}")
        return ()
    bounds = [item.value for item in spec["range"].value]
    if not 2 <= len(bounds) <= 3 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        problems.error(
            spec["range"].origin, f"found {bounds}; allowed: [start, stop] or [start, stop, step], whole numbers"
        )
        return ()
    span = range(0) if len(bounds) == 3 and bounds[2] == 0 else range(*bounds)
    if not span or span[0] < 0 or span[-1] > catalog.SEED_MAX:
        problems.error(
            spec["range"].origin,
            f"found range{tuple(bounds)}, {len(span)} seeds; allowed: seeds from 0 to {catalog.SEED_MAX}, at least one",
        )
        return ()
    return SeedRange(span, spec["range"].origin)


def _values(key: str, node: Node, problems: Problems, *, once: bool = True) -> list[Val]:
    """The values of one matrix key or zip column: each checked, at least one; ``once``: no repeats.

    A matrix value given twice makes the same requests twice, so it is refused; a zip pairs positions, so a
    value may well come again in another row.
    """
    if not isinstance(node.value, list):
        problems.error(node.origin, f"found {node.kind}; allowed: a list of values")
        return []
    if not node.value:
        problems.error(node.origin, "found an empty list, so the entry expands to nothing; allowed: at least one value")
        return []
    values, seen = [], {}
    for item in node.value:
        if key in PARAMS and isinstance(item.value, list | dict):
            problems.error(item.origin, f"found {item.kind}; allowed: one value of {key}")
            val = None
        elif key in PARAMS:
            val = _param_value(key, item, problems)
        else:
            text = variable_text(item.value)
            val = Val(text, item.origin) if text is not None else None
            if val is None:
                problems.error(item.origin, f"found {item.kind}; allowed: text, a number or a boolean")
        if val is None:
            continue
        marker = val.value.text if isinstance(val.value, Template) else val.value
        if once and marker in seen:
            problems.error(item.origin, f"found {marker!r} again (first at {seen[marker]}); allowed: each value once")
        seen.setdefault(marker, item.origin.field)
        values.append(val)
    return values


def _check_key(key: str, origin: Origin, problems: Problems) -> bool:
    if key in RESERVED:
        problems.error(origin, f"found {key!r}; allowed: any name but {', '.join(RESERVED)}, which are taken")
        return False
    return True


def read_vars(node: Node | None, layer: Layer, problems: Problems) -> None:
    if node is None:
        return
    if not isinstance(node.value, dict):
        problems.error(node.origin, f"found {node.kind}; allowed: a mapping of variable names to values")
        return
    for key, child in node.value.items():
        # Claimed even when refused, so that the entries do not also report it missing.
        if not layer.claim(key, child.origin, problems):
            continue
        if key in PARAMS:
            problems.error(
                child.origin, f"found parameter {key!r}; allowed here: variables (set {key} in defaults or on an entry)"
            )
        elif _check_key(key, child.origin, problems):
            text = variable_text(child.value)
            if text is None:
                problems.error(child.origin, f"found {child.kind}; allowed: text, a number or a boolean")
            else:
                layer.fixed[key] = Val(text, child.origin)


def read_matrix(node: Node | None, layer: Layer, problems: Problems) -> None:
    if node is None:
        return
    if not isinstance(node.value, dict) or not node.value:
        problems.error(node.origin, f"found {node.kind}; allowed: a mapping of names to lists, like {{size: [...]}}")
        return
    for key, child in node.value.items():
        if not layer.claim(key, child.origin, problems) or not _check_key(key, child.origin, problems):
            continue
        if key == "seed":
            rows = _seed_rows(child, problems)
            if rows:
                layer.axes.append(Axis((key,), rows, child.origin, "seed"))
            continue
        values = _values(key, child, problems)
        if values:
            layer.axes.append(Axis((key,), tuple((v,) for v in values), child.origin, "matrix"))


def read_zip(node: Node | None, layer: Layer, problems: Problems) -> None:
    if node is None:
        return
    if not isinstance(node.value, dict) or not node.value:
        problems.error(node.origin, f"found {node.kind}; allowed: a mapping of names to lists of equal length")
        return
    columns: dict[str, list[Val]] = {}
    for key, child in node.value.items():
        if layer.claim(key, child.origin, problems) and _check_key(key, child.origin, problems):
            columns[key] = _values(key, child, problems, once=False)
    lengths = {key: len(values) for key, values in columns.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        for key, length in lengths.items():
            if length != lengths[first]:
                problems.error(
                    node.value[key].origin,
                    f"found {length} values; allowed: {lengths[first]}, as many as {node.origin.field}.{first}",
                )
        return
    if columns and all(columns.values()):
        rows = tuple(zip(*columns.values(), strict=True))
        layer.axes.append(Axis(tuple(columns), rows, node.origin, "zip"))
