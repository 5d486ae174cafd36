"""Which manifest a run folder was filled from: its items planned into the ledger once, the record that says so
(digest, run, counts, plan), and the refusal of another manifest mixed into the folder by mistake."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanbatch import catalog
from wanbatch.errors import ConfigError
from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import AddResult
from wanbatch.ledger.sqlite import read_meta

if TYPE_CHECKING:
    from wanbatch.manifest import Item, Manifest

__all__ = [
    "MANIFEST_META",
    "Held",
    "OtherManifest",
    "check_manifest_record",
    "plan_into",
    "refuse_other_manifest",
    "stored_plan",
]

log = logging.getLogger("wanbatch")

#: The ledger's meta key for the manifest whose items it holds in full: its digest, the run that marked its
#: items seen, how many it made, and its plan. Written only once every item is in.
MANIFEST_META = "manifest"
_RECORD_KEYS = frozenset({"digest", "run", "items", "stale", "plan"})


class OtherManifest(ConfigError):
    """The run folder holds the items of another manifest: nothing was sent."""


def refuse_other_manifest(run_dir: Path, manifest: Manifest) -> None:
    """Raise :class:`OtherManifest` when ``run_dir`` was last planned from another manifest.

    The same manifest edited (the same file, or the same ``name:``) is welcome: a run folder follows its
    manifest. Another one would add its images to the same ``metadata.jsonl`` and call the first one's items
    "no longer in the manifest", so it takes ``--force``.
    """
    check_manifest_record(read_meta(run_dir, MANIFEST_META), run_dir, manifest)


def check_manifest_record(value: str | None, where: str | Path, manifest: Manifest) -> None:
    """:func:`refuse_other_manifest` given the ledger's manifest record ``value`` (read from a database by a fleet's
    worker, under no folder's lock) and ``where`` it is, for the message."""
    if not value:
        return
    known = json.loads(value)
    path = known.get("path")
    name = known.get("name") or (known.get("plan") or {}).get("name")
    same_path = path is not None and path == str(Path(manifest.path).resolve())
    if same_path or name == manifest.name or (path is None and name is None):
        return
    raise OtherManifest(
        f"{where}: found the items of another manifest ({path or 'a file'} named {name!r}), not of"
        f" {manifest.path} named {manifest.name!r}; their images would mix in one metadata.jsonl."
        " Allowed: a new --out folder, the same manifest (edited or not), or --force to add to this folder."
        " Nothing was sent."
    )


def stored_plan(run_dir: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The plan kept in ``run_dir``'s ledger when it holds every item of this very manifest, else None.

    A look before the run takes the folder's lock; :meth:`Engine.run` checks the digest again under it.
    """
    known = known_manifest(read_meta(run_dir, MANIFEST_META), manifest)
    return known.get("plan") if known is not None else None


def known_manifest(value: str | None, manifest: Manifest) -> dict[str, Any] | None:
    """The ledger's record of the manifest it holds, if its digest is this manifest's."""
    digest = getattr(manifest, "digest", "")
    if not value or not digest:
        return None
    known = json.loads(value)
    return known if known.get("digest") == digest and known.keys() >= _RECORD_KEYS else None


@dataclass(frozen=True, slots=True)
class Held:
    """What the ledger holds of the manifest once it is planned in."""

    run: int  #: the run whose marks (``last_seen_run``) say which items the manifest has
    added: AddResult
    stale: int  #: items of earlier manifests that this one no longer has
    lanes: frozenset[tuple[str, str]] | None  #: the manifest's (region, model) pairs, when its plan is known


async def plan_into(ledger: RunLedger, manifest: Manifest, run: int, plan: Mapping[str, Any] | None) -> Held:
    """Put the manifest's items into the ledger, unless it holds them all already.

    An unchanged manifest (same digest: same text, same prompts files, same wanbatch) makes the same items,
    so a resume skips expanding it, and its items keep the marks of the run that planned them (only
    planning moves the marks, so the count of stale items kept with them holds too).
    """
    known = known_manifest(await ledger.meta(MANIFEST_META), manifest)
    if known is not None:
        log.info("manifest unchanged since run %d: its %d item(s) are in the ledger", known["run"], known["items"])
        added = AddResult(added=0, existing=known["items"])
        return Held(known["run"], added, known["stale"], lanes_of(known["plan"]))
    # Forgotten first: a plan stopped halfway leaves no record, so the next run plans again.
    await ledger.delete_meta(MANIFEST_META)
    added = await ledger.add_items(manifest.items(), run=run, price_of=price_of)
    stale = await ledger.stale_count(run)
    record = {"digest": getattr(manifest, "digest", ""), "run": run, "items": added.added + added.existing}
    record |= {"path": str(Path(manifest.path).resolve()), "name": manifest.name}  # see refuse_other_manifest
    record |= {"stale": stale, "plan": dict(plan) if plan is not None else None}
    await ledger.set_meta(MANIFEST_META, json.dumps(record))
    return Held(run, added, stale, lanes_of(plan))


def lanes_of(plan: Mapping[str, Any] | None) -> frozenset[tuple[str, str]] | None:
    return None if plan is None else frozenset((lane["region"], lane["model"]) for lane in plan["lanes"])


def price_of(item: Item) -> float:
    """The item's price per image: its region's; for an item allowed several, the dearest (what the budget
    holds for it until it is sent, when its region's price is recorded)."""
    offers = catalog.offers_for(item.region, item.model)
    return max((offer.price for offer in offers), default=0.0)
