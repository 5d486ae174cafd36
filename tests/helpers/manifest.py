"""Writing a manifest for a test, whatever it starts from: YAML text as the user writes it, or a list of prompts
over defaults that keep a run small (one 512*512 flash image, the prompt sent as written).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from wanbatch.manifest import Manifest

__all__ = ["SMALL", "load_manifest", "numbered", "write_file", "write_manifest"]

FLASH = "wan2.2-t2i-flash"
#: The defaults of a manifest built from prompts: the cheapest request the catalog has.
SMALL: Mapping[str, Any] = {"model": FLASH, "size": "512*512", "n": 1, "prompt_extend": False}


def write_file(directory: Path, file_name: str, text: str) -> Path:
    """``text`` (dedented) as ``directory/file_name``, its folders made; its path."""
    path = directory / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def write_manifest(
    directory: Path,
    text: str | None = None,
    *,
    file_name: str = "job.yaml",
    prompts: Sequence[str | Mapping[str, Any]] = (),
    name: str = "job",
    output: str | None = None,
    **defaults: Any,
) -> Path:
    """A manifest at ``directory/file_name``; its path.

    Either ``text``, YAML written as it is (dedented), or a manifest called ``name`` of ``prompts`` whose
    defaults are :data:`SMALL` updated by ``defaults`` (model, size, n, seed, sync, ...),
    with ``output`` as its file-name pattern when given.
    """
    if text is None:
        manifest: dict[str, Any] = {"name": name, "defaults": {**SMALL, **defaults}}
        if output is not None:
            manifest["output"] = output
        manifest["prompts"] = list(prompts)
        text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)
    return write_file(directory, file_name, text)


def load_manifest(directory: Path, text: str | None = None, **options: Any) -> Manifest:
    """:func:`write_manifest`'s file, loaded."""
    return Manifest.from_yaml(write_manifest(directory, text, **options))


def numbered(count: int, subject: str, *, models: Sequence[str] = ()) -> list[str | dict[str, str]]:
    """``count`` distinct prompts "``subject`` number i"; given ``models``, they take turns (each number once per
    model), the model named in each entry."""
    if not models:
        return [f"{subject} number {index}" for index in range(count)]
    return [
        {"prompt": f"{subject} number {index // len(models)}", "model": models[index % len(models)]}
        for index in range(count)
    ]
