"""Which manifest a run folder was filled from, so that another one is not mixed into it by mistake."""

from __future__ import annotations

import json
from pathlib import Path

from wanbatch.engine import MANIFEST_META
from wanbatch.errors import ConfigError
from wanbatch.ledger import read_meta

__all__ = ["OtherManifest", "refuse_other_manifest"]


class OtherManifest(ConfigError):
    """The run folder holds the items of another manifest: nothing was sent."""


def refuse_other_manifest(run_dir: Path, manifest) -> None:
    """Raise :class:`OtherManifest` when ``run_dir`` was last planned from another manifest.

    The same manifest edited (the same file, or the same ``name:``) is welcome: a run folder follows its
    manifest. Another one would add its images to the same ``metadata.jsonl`` and call the first one's items
    "no longer in the manifest", so it takes ``--force``.
    """
    value = read_meta(run_dir, MANIFEST_META)
    if not value:
        return
    known = json.loads(value)
    path = known.get("path")
    name = known.get("name") or (known.get("plan") or {}).get("name")
    same_path = path is not None and path == str(Path(manifest.path).resolve())
    if same_path or name == manifest.name or (path is None and name is None):
        return
    raise OtherManifest(
        f"{run_dir}: found the items of another manifest ({path or 'a file'} named {name!r}), not of"
        f" {manifest.path} named {manifest.name!r}; their images would mix in one metadata.jsonl."
        " Allowed: a new --out folder, the same manifest (edited or not), or --force to add to this folder."
        " Nothing was sent."
    )
