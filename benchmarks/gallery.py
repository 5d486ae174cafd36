"""``python -m benchmarks.gallery``: the gallery of a large run: its size, its writing, its first cards.

    python -m benchmarks.gallery                   # 20,000 and 100,000 images
    python -m benchmarks.gallery --images 20000    # one size

For each size, a run folder is made with a synthetic ledger (a matrix of 2 models × 3 styles × many
subjects, every seed its own; every image saved, a hard link to one real 1024*1024 PNG) and measured:
the bytes of ``gallery.html`` and ``gallery-data.js``; the cost of a thumbnail made as a run saves its
images (items handed to the run's :class:`~wanbatch.outputs.gallery.Thumbnailer`, as the downloader does) and at
the end of a run (on every core); the end-of-run step when every thumbnail was made while saving (the page,
and the check that each is there), and of a run that made none then, for comparison; and the time from
navigation to the first cards in headless Chromium. The results go to ``latest.json`` under ``gallery``
and to their own section of ``latest.md``, with the machine, date and commit they were measured on; the
other sections are left as they are. The benchmark asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from wanbatch.clock import ScaledClock
from wanbatch.ledger import LEDGER_FILE, Ledger, Recorded, SqliteLedger
from wanbatch.ledger.states import ItemState
from wanbatch.outputs.gallery import DATA_FILE, GALLERY_FILE, THUMBS_DIR, Thumbnailer, thumb_name, write_gallery
from wanbatch.outputs.gallery.thumbs import DEFAULT_WORKERS

from . import chromium, report

__all__ = ["SIZES", "measure", "run", "synthetic_run"]

REPO = Path(__file__).resolve().parent.parent
SIZES = (20_000, 100_000)
MODELS = ("wan2.2-t2i-flash", "wan2.6-t2i")
STYLES = ("ink wash", "oil paint", "photo")


@dataclass(frozen=True, slots=True)
class _Item:
    """What the ledger reads from a manifest item (``wanbatch.ledger.records.ItemLike``)."""

    item_id: str
    model: str
    prompt: str
    size: str
    variables: dict[str, str]
    source: str
    replica: int = 0
    region: str = "beijing"
    n: int = 1
    entry: str = "prompts[0]"
    output: str | None = None

    def request(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "size": self.size, "n": self.n}


def synthetic_run(run_dir: Path, images: int, *, size: str = "1024*1024") -> Path:
    """A run folder whose ledger holds ``images`` saved images of ``size``, each a hard link to one PNG."""
    run_dir.mkdir(parents=True, exist_ok=True)
    width, height = (int(side) for side in size.split("*"))
    # A gradient, not a flat colour: its PNG decodes and its thumbnail encodes at a plausible cost.
    picture = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    original = run_dir / "original.png"
    picture.save(original)
    items, rows = [], []
    for i in range(images):
        model, style, subject = MODELS[i % 2], STYLES[(i // 2) % 3], f"subject {i // 6}"
        item_id = hashlib.sha256(f"{i}".encode()).hexdigest()[:16]
        variables = {"style": style, "subject": subject}
        items.append(_Item(item_id, model, f"a {subject}, {style}", size, variables, f"job.yaml:{5 + i % 3}"))
        name = f"images/{i // 1000:03d}/{item_id}-0.png"
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(original, run_dir / name)
        rows.append((item_id, 1_000_000 + i, name, "0" * 64, original.stat().st_size))
    with Ledger.open(run_dir, clock=ScaledClock()) as ledger:
        ledger.add_items(items, run=ledger.begin_run())
    # Rows as a run would leave them: every item saved with its one image.
    with sqlite3.connect(run_dir / LEDGER_FILE) as conn:
        conn.execute("UPDATE items SET state = 'saved', images_generated = 1")
        conn.executemany(
            "INSERT INTO images (item_id, image_index, state, seed, file_name, sha256, size_bytes, saved_ms,"
            " updated_ms) VALUES (?, 0, 'saved', ?, ?, ?, ?, 0, 0)",
            rows,
        )
    original.unlink()
    return run_dir


def _timed(action) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def _thumbs_while_saving(run_dir: Path, ledger: Ledger, sample: int) -> float:
    """``sample`` items handed to a run's thumbnailer as if just saved; the seconds until their thumbnails are made."""
    with Thumbnailer(run_dir, max_queued=sample) as thumbs:
        started = time.perf_counter()
        for row in itertools.islice(ledger.iter_items([ItemState.saved]), sample):
            thumbs.item_done(Recorded(row=row, images=tuple(ledger.images_of(row.item_id))))
        while thumbs.made + thumbs.left < sample:
            time.sleep(0.01)
        assert thumbs.left == 0, f"{thumbs.left} thumbnail(s) not made"
        return time.perf_counter() - started


def _link_thumbnails(run_dir: Path) -> None:
    """Every image's thumbnail in place, newer than its image: one made, linked for the rest (as images are)."""
    made = sorted((run_dir / THUMBS_DIR).rglob("*.jpg"))
    for image in sorted((run_dir / "images").rglob("*.png")):
        target = run_dir / thumb_name(str(image.relative_to(run_dir)))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(made[0], target)


async def _first_cards(run_dir: Path, scratch: Path) -> float | None:
    if chromium.CHROMIUM is None:
        return None
    async with chromium.open_page(scratch) as page:
        await page.open((run_dir / GALLERY_FILE).as_uri(), timeout_s=120)
        return await chromium.first_cards_ms(page)


def measure(workdir: Path, *, images: int, thumb_sample: int = 1000, log=print) -> dict[str, Any]:
    """The gallery's figures for a synthetic run of ``images`` images in ``workdir``.

    Thumbnails are timed on ``thumb_sample`` images (a 1024*1024 PNG takes tens of milliseconds of CPU, so
    every one of 100,000 would take the benchmark an hour); the end of a run is timed at full size, with
    every thumbnail in place (made while saving) and, for comparison, with none: that figure is the page's
    time plus the images times the sample's cost per thumbnail at the end.
    """
    run_dir = synthetic_run(workdir / f"run-{images}", images)
    sample = min(thumb_sample, images)
    log(f"gallery: {images:,} images, thumbnails timed on {sample:,}")
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        while_saving_s = _thumbs_while_saving(run_dir, ledger, sample)
        _link_thumbnails(run_dir)
        _, end_s = _timed(lambda: asyncio.run(write_gallery(run_dir, SqliteLedger(ledger))))
        for thumb in itertools.islice(sorted((run_dir / THUMBS_DIR).rglob("*.jpg")), sample):
            thumb.unlink()
        _, end_sample_s = _timed(lambda: asyncio.run(write_gallery(run_dir, SqliteLedger(ledger))))
    at_end_ms = max(end_sample_s - end_s, 0.0) / sample * 1000
    first_ms = asyncio.run(_first_cards(run_dir, workdir / f"chromium-{images}"))
    return {
        "images": images,
        "page_bytes": (run_dir / GALLERY_FILE).stat().st_size,
        "data_bytes": (run_dir / DATA_FILE).stat().st_size,
        "end_of_run_s": round(end_s, 2),
        "thumb_sample": sample,
        "thumb_workers": DEFAULT_WORKERS,
        "thumb_while_saving_ms": round(while_saving_s / sample * 1000, 2),
        "thumb_at_end_ms": round(at_end_ms, 2),
        "end_of_run_all_thumbs_s": round(end_s + images * at_end_ms / 1000, 1),
        "first_cards_ms": None if first_ms is None else round(first_ms),
    }


def run(sizes: tuple[int, ...], *, workdir: Path, log=print) -> dict[str, Any]:
    """The figures of every size in ``sizes``, with when and where they were measured."""
    machine = report.machine_facts()
    results = [measure(workdir, images=images, log=log) for images in sizes]
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {"date": date, "machine": machine, "sizes": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gallery", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, action="append", help=f"images of a run (default: {SIZES})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-gallery")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    gallery = run(tuple(args.images or SIZES), workdir=args.workdir)
    print(json.dumps(gallery["sizes"], indent=1))
    latest = args.out / "latest.json"
    if latest.exists():
        # The other sections keep their figures and the header its machine and date: only this one is new.
        doc = json.loads(latest.read_text(encoding="utf-8"))
        keep = {k: doc[k] for k in ("settings", "machine", "date")}
        path = report.write(args.out, results={**doc["results"], "gallery": gallery}, **keep)
        print(f"wrote {path} and {latest}")
    else:
        print(f"{latest} not found: the figures above are written nowhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())
