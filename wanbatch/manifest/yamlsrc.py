"""YAML that remembers where each value was written, and refuses duplicate keys.

PyYAML's safe loader returns plain dicts and lists: the line a value came
from is gone, and a key given twice silently keeps the last value. A
manifest error must name file:line and the field, and a duplicated key is
almost always a mistake, so this module composes the document with the
safe loader (which keeps each node's mark), checks for duplicate keys, and
converts the node tree into :class:`Node` objects carrying an
:class:`Origin`. Scalars are still typed by the safe loader's resolver, so
``n: 4`` is an int and ``watermark: false`` a bool, as with ``safe_load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wanbatch.errors import ManifestError

__all__ = ["Node", "Origin", "kind_of", "load_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value was written: a file, a 1-based line, and its field path in the manifest."""

    file: str
    line: int
    field: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def child(self, name: str, line: int | None = None) -> Origin:
        """The origin of ``name`` (a key, or ``[i]`` for a list index) inside this value."""
        field = f"{self.field}{name}" if name.startswith("[") or not self.field else f"{self.field}.{name}"
        return Origin(self.file, self.line if line is None else line, field)


@dataclass(frozen=True, slots=True)
class Node:
    """A loaded value: ``dict[str, Node]``, ``list[Node]`` or a scalar, with its origin."""

    value: Any
    origin: Origin

    @property
    def kind(self) -> str:
        """A reader's word for the value's type, for messages ("found a list")."""
        return kind_of(self.value)


def kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if value is None:
        return "nothing (null)"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"text ({value!r})"
    return f"{type(value).__name__} ({value})"


def load_yaml(path: Path, display: str) -> tuple[Node | None, list[ManifestError]]:
    """Load ``path`` into a :class:`Node` tree; ``display`` is the file name used in origins.

    Returns the tree (None if it could not be read at all) and the errors found:
    a syntax error stops loading, duplicate keys are all reported.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, [
            ManifestError("no such file: found nothing at this path; allowed: an existing YAML manifest", path=display)
        ]
    except OSError as exc:
        return None, [
            ManifestError(f"found a file that cannot be read ({exc}); allowed: a readable file", path=display)
        ]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"found bytes that are not UTF-8 (byte {exc.start}); allowed: UTF-8 text"
        return None, [ManifestError(message, path=display, line=line)]
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        message = f"not valid YAML: found {problem}; allowed: one YAML mapping (see docs/manifest.md)"
        return None, [ManifestError(message, path=display, line=line)]
    except yaml.YAMLError as exc:
        return None, [ManifestError(f"not valid YAML: found {exc}; allowed: one YAML mapping", path=display)]
    except RecursionError:
        return None, [ManifestError(_TOO_DEEP, path=display, line=loader.line + 1)]
    finally:
        loader.dispose()
    if root is None:
        message = "the manifest is empty: found nothing; allowed: a mapping with at least 'prompts' (docs/manifest.md)"
        return None, [ManifestError(message, path=display, line=1)]
    errors: list[ManifestError] = []
    budget = [MAX_NODES]
    try:
        tree = _convert(loader, root, Origin(display, root.start_mark.line + 1, ""), errors, budget)
    except RecursionError:
        return None, [ManifestError(_TOO_DEEP, path=display, line=1)]
    except _TooLarge as exc:
        return None, [ManifestError(str(exc), path=display, line=exc.line)]
    return tree, errors


#: Values a manifest may hold once its aliases are expanded: far beyond any real one, far below a memory bomb.
MAX_NODES = 200_000
_TOO_DEEP = "found values nested too deep to read; allowed: the few levels a manifest uses (see docs/manifest.md)"


class _TooLarge(Exception):
    def __init__(self, line: int) -> None:
        self.line = line
        super().__init__(
            f"found more than {MAX_NODES:,} values once aliases are expanded; allowed: at most {MAX_NODES:,}"
            " (put long lists of prompts in a .txt, .csv or .jsonl file)"
        )


def _convert(
    loader: yaml.SafeLoader, node: yaml.Node, origin: Origin, errors: list[ManifestError], budget: list[int]
) -> Node:
    budget[0] -= 1
    if budget[0] < 0:  # an alias repeats its whole subtree: count what the expansion would hold
        raise _TooLarge(origin.line)
    if isinstance(node, yaml.MappingNode):
        return Node(_mapping(loader, node, origin, errors, budget), origin)
    if isinstance(node, yaml.SequenceNode):
        items = [
            _convert(loader, item, origin.child(f"[{i}]", item.start_mark.line + 1), errors, budget)
            for i, item in enumerate(node.value)
        ]
        return Node(items, origin)
    try:
        return Node(loader.construct_object(node, deep=True), origin)
    except yaml.YAMLError as exc:
        errors.append(
            ManifestError(f"not a valid value: {exc}", path=origin.file, line=origin.line, field=origin.field)
        )
        return Node(None, origin)


def _mapping(
    loader: yaml.SafeLoader, node: yaml.MappingNode, origin: Origin, errors: list[ManifestError], budget: list[int]
) -> dict:
    first_line: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in first_line:
            field = origin.child(key_node.value).field
            message = f"found key {key_node.value!r} twice (first on line {first_line[key_node.value]}); allowed: once"
            errors.append(ManifestError(message, path=origin.file, line=line, field=field))
        else:
            first_line[key_node.value] = line
    # ``<<: *anchor`` merges: the safe loader's own flattening puts merged keys
    # first, so keys written in the mapping itself win, as YAML specifies.
    try:
        loader.flatten_mapping(node)
    except yaml.MarkedYAMLError as exc:
        errors.append(ManifestError(f"bad merge (<<): {exc.problem}", path=origin.file, line=origin.line))
        return {}
    result: dict[str, Node] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            field = origin.field or "(top level)"
            errors.append(
                ManifestError(
                    "found a key that is not text; allowed: text keys", path=origin.file, line=line, field=field
                )
            )
            continue
        # The key's own text, not its YAML type: ``on:`` or ``1:`` stay the keys a person wrote.
        key = key_node.value
        result[key] = _convert(loader, value_node, origin.child(key, line), errors, budget)
    return result
