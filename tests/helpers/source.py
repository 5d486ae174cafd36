"""The package's source read as syntax, for checks on how the code is written: every parameter of every function."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Parameter", "parameters"]


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter of a function (or method, nested or not) as written."""

    place: str  #: file (from the folder above ``root``) and line of its function: ``wanbatch/engine.py:12``
    function: str
    name: str
    annotation: str | None  #: its type as written, or None


def parameters(root: Path) -> Iterator[Parameter]:
    """Every parameter of every function in the Python files under ``root``, file by file."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                annotation = None if arg.annotation is None else ast.unparse(arg.annotation)
                yield Parameter(f"{path.relative_to(root.parent)}:{node.lineno}", node.name, arg.arg, annotation)
