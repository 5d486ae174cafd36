"""Every parameter of the engine's functions says its type: where stages meet, a reader (and a checker) knows
what passes between them. The simulator is held to it too, where it meets the engine's clock and catalog."""

from __future__ import annotations

import ast
from pathlib import Path

import wanbatch

PACKAGE = Path(wanbatch.__file__).parent


def untyped_parameters(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                if arg.annotation is None and arg.arg not in ("self", "cls"):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}({arg.arg})")
    return found


def test_every_parameter_of_the_engine_is_typed():
    """Outside the simulator, no function takes a parameter without a type."""
    found = [place for place in untyped_parameters(PACKAGE) if not place.startswith("wanbatch/sim/")]
    assert found == []


def test_the_check_finds_an_untyped_parameter(tmp_path):
    """The walk above can fail: an untyped parameter in a nested function is found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f(a: int) -> None:\n    def g(b):\n        pass\n")
    assert untyped_parameters(tmp_path / "pkg") == ["pkg/m.py:2 g(b)"]
