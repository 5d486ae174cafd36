"""Every parameter of the engine's functions says its type: where stages meet, a reader (and a checker) knows
what passes between them. The simulator is held to it too, where it meets the engine's clock and catalog."""

from __future__ import annotations

from pathlib import Path

import wanbatch
from helpers.source import parameters

PACKAGE = Path(wanbatch.__file__).parent


def untyped_parameters(root: Path) -> list[str]:
    return [
        f"{found.place} {found.function}({found.name})"
        for found in parameters(root)
        if found.annotation is None and found.name not in ("self", "cls")
    ]


def test_every_parameter_of_the_engine_is_typed():
    """Outside the simulator, no function takes a parameter without a type."""
    found = [place for place in untyped_parameters(PACKAGE) if not place.startswith("wanbatch/sim/")]
    assert found == []


def test_the_check_finds_an_untyped_parameter(tmp_path):
    """The walk above can fail: an untyped parameter in a nested function is found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f(a: int) -> None:\n    def g(b):\n        pass\n")
    assert untyped_parameters(tmp_path / "pkg") == ["pkg/m.py:2 g(b)"]
