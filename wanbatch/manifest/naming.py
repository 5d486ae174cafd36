"""The file name of every image, from the manifest's ``output`` pattern: one function for the checks and the saving.

    file_name(pattern, variables, *, item_id, index, ...)  the name of one image relative to ``images/``
    await sharded(ledger)               whether the run folder spreads its images over subfolders (decided once)
    saved_name(item, index, sharded=...)  the path, under the run folder, the downloader writes

:func:`file_name` is the only maker of a name: the manifest's checks compare
the names it gives a planned item (:meth:`wanbatch.manifest.expand.Item.output_name`)
and the downloader writes the names it gives the same item's ledger row
(:func:`saved_name`), so two images the checks let through never meet on disk.
Names keep every letter and digit of every script (``红狐狸/0.png``); only
what a file system refuses or misreads is replaced by ``_``: path separators
inside a value, NUL and control characters, the characters Windows forbids
(``:*?"<>|``), and Windows' reserved device names; leading dots and trailing
dots or spaces are dropped, and a part longer than 255 bytes in UTF-8 is cut
(its ``.png`` kept).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from wanbatch.ledger.interface import RunLedger
from wanbatch.ledger.records import ItemRow
from wanbatch.ledger.states import ImageState

__all__ = [
    "DEFAULT_PATTERN",
    "SHARD_ABOVE",
    "SHARD_ITEMS",
    "file_name",
    "saved_name",
    "shard_folder",
    "sharded",
]

#: The file name of an image when the manifest gives no ``output`` pattern.
DEFAULT_PATTERN = "{item_id}-{index}.png"
#: A run planning more images than this spreads them over subfolders when its pattern has none: file
#: managers, ``ls`` and some file systems slow down on folders of tens of thousands of files.
SHARD_ABOVE = 5000
#: The ledger's meta key that keeps the decision, so that every later run of the folder writes alike.
LAYOUT_META = "images_layout"
#: Items per subfolder of a sharded run, in manifest order (at most 4 images each: a few thousand files).
SHARD_ITEMS = 1000
_MAX_PART_BYTES = 255
_KEPT_TAIL_BYTES = 64  #: how much of a name's end a cut keeps
#: What no portable file name may hold: control characters (NUL among them) and Windows' forbidden set.
_REFUSED = re.compile(r'[\x00-\x1f\x7f-\x9f:*?"<>|]')
_SEPARATORS = re.compile(r"[/\\]")
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
)


def file_name(
    pattern: str | None,
    variables: Mapping[str, object],
    *,
    item_id: str,
    index: int,
    replica: int,
    model: str,
    size: str,
    n: int,
    region: str,
    seed: int | None,
) -> str:
    """The safe path relative to ``images/`` that ``pattern`` (or :data:`DEFAULT_PATTERN`) names for image
    ``index`` of an item; ``seed`` is the item's (None: the service chooses, and ``{seed}`` is not allowed).

    A value's own ``/`` or ``\\`` never makes a folder: only the pattern's separators do. A field the pattern
    names but the item lacks stays as its name (the manifest's checks refuse such patterns before).
    """
    fields = {key: str(value) for key, value in variables.items()}
    fields |= {"item_id": item_id, "index": str(index), "replica": str(replica)}
    fields |= {"model": model, "size": size, "n": str(n), "region": region}
    if seed is not None:
        # The service numbers the images of one request seed, seed+1, ...: the name says which.
        fields["seed"] = str(seed + index)
    safe = _Fields({key: _SEPARATORS.sub("_", value) for key, value in fields.items()})
    text = (pattern or DEFAULT_PATTERN).format_map(safe)
    parts = [part for part in map(_safe_part, _SEPARATORS.split(text)) if part]
    if not parts:
        parts = [f"{fields.get('item_id', 'image')}-{fields.get('index', '0')}.png"]
    if not parts[-1].lower().endswith(".png"):
        parts[-1] = _safe_part(parts[-1] + ".png")
    return "/".join(parts)


async def sharded(ledger: RunLedger) -> bool:
    """Whether the run folder's images go to subfolders: decided by its first run that saves, then kept.

    A folder planning more than :data:`SHARD_ABOVE` images is sharded; one that holds saved images from
    before this decision was made stays flat, as it began.
    """
    kept = await ledger.meta(LAYOUT_META)
    if kept is None:
        saved = ledger.iter_images([ImageState.saved], order_by_deadline=False)
        began_flat = await anext(saved, None) is not None  # only whether there is one
        kept = "flat" if began_flat or await ledger.planned_images() <= SHARD_ABOVE else "sharded"
        await ledger.set_meta(LAYOUT_META, kept)
    return kept == "sharded"


def saved_name(item: ItemRow, index: int, *, sharded: bool) -> str:
    """Where image ``index`` of ``item`` (a ledger row) is saved, relative to the run folder.

    In a sharded folder an item whose pattern names no folder goes to its manifest position's subfolder
    (``images/00012/...``): the ledger's order never changes, so a resume writes to the same place.
    """
    name = file_name(
        item.output,
        item.variables,
        item_id=item.item_id,
        index=index,
        replica=item.replica,
        model=item.model,
        size=item.request["size"],
        n=item.n_images,
        region=item.region,
        seed=item.request.get("seed"),
    )
    if sharded and not _SEPARATORS.search(item.output or DEFAULT_PATTERN):
        name = f"{shard_folder(item.seq)}/{name}"
    return f"images/{name}"


def shard_folder(seq: int) -> str:
    """The subfolder of the item at manifest position ``seq`` (1, 2, ...) in a sharded run: ``00000``, ``00001``..."""
    return f"{(seq - 1) // SHARD_ITEMS:05d}"


def _safe_part(part: str) -> str:
    """One folder or file name made safe; empty when nothing is left of it."""
    part = _REFUSED.sub("_", part).lstrip(".").rstrip(". ")
    if part.split(".", 1)[0].upper().rstrip(" ") in _RESERVED:
        part = "_" + part
    if len(part.encode()) > _MAX_PART_BYTES:
        # Cut in the middle, not at the end: the end holds what tells a task's images apart ({index}) and the
        # suffix; a digest of the whole keeps two long names that differ only in what was cut apart.
        raw = part.encode()
        tail = raw[-_KEPT_TAIL_BYTES:].decode(errors="ignore")
        mark = "~" + hashlib.sha256(raw).hexdigest()[:10]
        room = _MAX_PART_BYTES - len(tail.encode()) - len(mark)
        part = raw[:room].decode(errors="ignore") + mark + tail
    return part


def other_name(name: str, item_id: str, index: int) -> str:
    """Where an image goes whose own name holds another image already: its name with the item and index added,
    made safe like any other (a long name stays within the file system's limit)."""
    folder, _, file = name.rpartition("/")
    stem = file[: -len(".png")] if file.lower().endswith(".png") else file
    other = _safe_part(f"{stem}-{item_id}-{index}.png")
    return f"{folder}/{other}" if folder else other


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return key
