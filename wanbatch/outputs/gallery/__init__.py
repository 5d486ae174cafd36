"""The gallery: ``gallery.html`` in the run folder, to compare a run's images by eye.

The page (:mod:`.page`) is small and fixed; the run's cards are in ``gallery-data.js`` beside it
(:mod:`.data`), and each card's thumbnail in ``thumbs/`` (:mod:`.thumbs`), made while the run saves its
images. Every path in them is relative to the run folder, so the folder can be opened from disk or served
as it is from object storage.
"""

from __future__ import annotations

import json
from pathlib import Path

from wanbatch.atomic import write_atomic
from wanbatch.ledger.interface import RunLedger
from wanbatch.outputs.gallery.data import cards_of, gallery_data
from wanbatch.outputs.gallery.page import DATA_FILE, DATA_GLOBAL, GALLERY_FILE, page
from wanbatch.outputs.gallery.thumbs import THUMB_SIDE_PX, THUMBS_DIR, Thumbnailer, thumb_name

__all__ = ["DATA_FILE", "GALLERY_FILE", "THUMBS_DIR", "THUMB_SIDE_PX", "Thumbnailer", "thumb_name", "write_gallery"]


async def write_gallery(
    run_dir: Path, ledger: RunLedger, *, images_here: bool = True, title: str | None = None
) -> Path:
    """Write ``gallery.html`` and ``gallery-data.js`` for every saved image (missing thumbnails made); the page.

    ``images_here`` False: the images are in a store, not in ``run_dir``; the page names each image's thumbnail
    (stored beside it as it was saved) and is written to ``run_dir`` to be stored with them."""
    run_dir = Path(run_dir)
    cards = await cards_of(run_dir, ledger, images_here=images_here)
    title = title or run_dir.name
    data = gallery_data(title, cards)
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # The data first: a page never names data that is not there yet.
    write_atomic(run_dir / DATA_FILE, f"window.{DATA_GLOBAL} = {text};\n")
    path = run_dir / GALLERY_FILE
    write_atomic(path, page(title, images=len(cards), requests=data["requests"]))
    return path
