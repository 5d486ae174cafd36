"""Figure 5: the engine's own ceiling, with the service out of the way.

The simulator is given unlimited quotas (submit rate, concurrency, queries)
and tasks that take no time, and the engine is told the same
(:mod:`benchmarks.engine_proc` ``--lift-quotas``). Every item asks for the
smallest image wan2.2-t2i-flash makes (512*512), each with a prompt of its
own: what is measured is the engine creating, tracking, downloading,
hashing, verifying, renaming and recording images.

- images/s: saved, verified images over the engine process's wall time (start
  to exit, planning and report included), and over the steady part (first to
  last image the simulator served);
- CPU s per 1,000 images: the engine process's user + system time;
- the same without the gallery the engine writes at the end of a run (its
  thumbnails), then also without the pacer's per-request guard: what limits
  the engine once each is gone;
- one prompt repeated (``repeats``) instead of distinct prompts, for a tenth
  of the items: the submitter keeps one create per prompt in flight;
- the n=4 run with and without the gallery again with ``--out s3://BUCKET/bench``
  (the ledger in a folder of ``--state``) into a SeaweedFS server started for
  them on loopback, its data in the workdir: images/s beside the disk's, the
  engine's CPU per image, and the server's (its process, from /proc). At
  512*512 an image is its own thumbnail, so the gallery stores no thumbnail,
  only its page at the end;
- the run without gallery and guard again under cProfile says where the CPU
  goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pstats
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .engine_proc import CPU_MARK
from .procs import SimServer, child_env, reap, spawn
from .store import process_cpu_s, seaweed
from .utilisation import account_name, key_of, sim_accounts

__all__ = ["RUNS", "UNLIMITED", "Variant", "measure", "profile_summary", "write_manifest"]

#: The simulator's config: nothing throttles, nothing waits.
UNLIMITED: dict[str, Any] = {
    "quotas": {"*": {"submit_rps": "unlimited", "concurrency": "unlimited"}},
    "query_qps": None,
    "durations": 0,
    "burst_idle_s": None,
}
SPEED = 100.0  #: only shortens the tracker's first wait (0.9 × the catalog's 40 s) before it learns
SIZE = "512*512"
STORE_PREFIX = "bench"  #: the runs into object storage: ``--out s3://BUCKET/bench``, a bucket per run


def write_manifest(folder: Path, *, items: int, n: int, one_prompt: bool = False) -> Path:
    """``items`` requests of ``n`` images: distinct prompts, or with ``one_prompt`` one prompt repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    if one_prompt:
        prompts: list[Any] = [{"prompt": "a ceiling test card", "repeats": items}]
    else:
        lines = "".join(f"a ceiling test card number {index}\n" for index in range(items))
        (folder / "prompts.txt").write_text(lines, encoding="utf-8")
        prompts = [{"file": "prompts.txt"}]
    manifest = {
        "name": "ceiling",
        "defaults": {"model": "wan2.2-t2i-flash", "size": SIZE, "n": n, "prompt_extend": False, "seed": 7},
        "prompts": prompts,
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def _run_once(
    sim: SimServer,
    workdir: Path,
    *,
    name: str,
    items: int,
    n: int,
    guard_s: float | None,
    gallery: bool,
    one_prompt: bool,
    profile: Path | None,
    s3: Any = None,
) -> dict[str, Any]:
    """One engine process through ``items`` items of ``n`` images, as the account ``name`` of ``sim``; with
    ``s3`` (a running SeaweedFS server) into a bucket of its own there, the ledger in ``workdir/state``."""
    manifest = write_manifest(workdir / "job", items=items, n=n, one_prompt=one_prompt)
    cpu0 = sim.stats()["cpu_s"]
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    env = child_env(key_of(name))
    if s3 is None:
        out = [str(workdir / "run")]
    else:
        bucket = s3.make_bucket()
        out = [f"s3://{bucket}/{STORE_PREFIX}", "--state", str(workdir / "state")]
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # nothing of the caller's own accounts
        env.update(s3.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        server_cpu0 = process_cpu_s(s3.process.pid)
    argv += ["-m", "benchmarks.engine_proc", str(manifest), "--out", *out]
    argv += ["--base-url", sim.base_url, "--speed", f"{SPEED:g}", "--lift-quotas"]
    if guard_s is not None:
        argv += ["--guard-s", f"{guard_s:g}"]
    if not gallery:
        argv.append("--no-gallery")
    child = reap(spawn(argv, log_path=workdir / "engine.log", env=env))
    stats = sim.account(account_name(name))
    sim_cpu_s = sim.stats()["cpu_s"] - cpu0
    if s3 is None:
        saved, server_cpu_s = sum(1 for _ in (workdir / "run" / "images").rglob("*.png")), None
    else:
        server_cpu_s = process_cpu_s(s3.process.pid) - server_cpu0
        saved = _stored_images(s3, bucket)
    log_text = child.log_path.read_text(encoding="utf-8", errors="replace")
    cpu_line = next((line for line in log_text.splitlines() if line.startswith(CPU_MARK)), None)
    threads = json.loads(cpu_line[len(CPU_MARK) :]) if cpu_line else {}
    first, last = stats.get("first_image_s"), stats.get("last_image_s")
    steady_wall_s = (last - first) / SPEED if first is not None and last is not None else 0.0
    requests = stats.get("requests", {})
    return {
        "items": items,
        "n": n,
        "guard_s": guard_s,
        "gallery": gallery,
        "one_prompt": one_prompt,
        "images_saved": saved,
        "exit_code": child.returncode,
        "wall_s": child.wall_s,
        "cpu_s": child.cpu_s,
        "max_rss_mb": child.max_rss_mb,
        "main_thread_cpu_s": threads.get("main_thread_cpu_s"),
        "images_per_s": saved / child.wall_s if child.wall_s else None,
        "images_per_s_steady": (saved - 1) / steady_wall_s if steady_wall_s > 0 else None,
        "cpu_s_per_1000_images": 1000 * child.cpu_s / saved if saved else None,
        "requests": requests,
        "sim_cpu_s": sim_cpu_s,
        "sim_load_rps": sum(requests.values()) / steady_wall_s if steady_wall_s > 0 else None,
        **(
            {}
            if s3 is None
            else {
                "store": "s3 (SeaweedFS, loopback)",
                "server_cpu_s": server_cpu_s,
                "server_cpu_s_per_1000_images": 1000 * server_cpu_s / saved if saved else None,
            }
        ),
        "log_tail": child.log_tail(300) if child.returncode else "",
    }


def _stored_images(s3: Any, bucket: str) -> int:
    """The PNGs under the run's ``images/`` in ``bucket``, as the server lists them."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{STORE_PREFIX}/images/")
    return sum(1 for page in pages for entry in page.get("Contents", []) if entry["Key"].endswith(".png"))


#: Where a function's own time is counted, by the file or built-in it belongs to; first match wins.
_AREAS = (
    ("waiting for the network (epoll)", ("select.epoll", "method 'poll' of 'select")),
    ("ledger: SQLite", ("sqlite3", "wanbatch/ledger.py", "wanbatch/records.py")),
    ("ledger rows: dataclasses, enums", ("dataclasses.py", "enum.py")),
    ("file system (stat, mkdir, paths)", ("posix.stat", "posix.mkdir", "pathlib.py", "posixpath.py")),
    ("PNG verify (Pillow)", ("PIL/",)),
    ("sha256", ("_hashlib", "hashlib")),
    (
        "files (worker threads, write, rename)",
        ("concurrent/futures", "threading.py", "posix.replace", "posix.fsync", "wanbatch/atomic.py", "imagefiles.py"),
    ),
    ("HTTP client (aiohttp, yarl, multidict)", ("aiohttp", "yarl", "multidict", "http/")),
    ("logging", ("logging/",)),
    ("JSON", ("json/", "_json")),
    ("event loop (asyncio)", ("asyncio/", "_asyncio", "selectors.py", "socket")),
    ("wanbatch stages", ("wanbatch/",)),
)


def _area(filename: str, name: str) -> str:
    where = f"{filename} {name}"
    for area, marks in _AREAS:
        if any(mark in where for mark in marks):
            return area
    return "other (imports, aiolimiter, enum, dataclasses, ...)"


def profile_summary(path: Path, *, top: int = 12) -> dict[str, Any]:
    """Own time per area and the functions with the most own time, from a cProfile file."""
    stats = pstats.Stats(str(path))
    areas: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_, calls, own_s, cumulative_s, _) in stats.stats.items():
        areas[_area(filename, name)] = areas.get(_area(filename, name), 0.0) + own_s
        rows.append((own_s, cumulative_s, calls, _short(filename, line, name)))
    total = sum(areas.values()) or 1.0
    rows.sort(reverse=True)
    return {
        "total_s": total,
        "areas": {k: {"s": v, "share": v / total} for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
        "top": [{"own_s": o, "cumulative_s": c, "calls": n, "function": f} for o, c, n, f in rows[:top]],
    }


def _short(filename: str, line: int, name: str) -> str:
    for root in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if root in filename:
            filename = filename.split(root, 1)[1]
    return f"{filename}:{line}({name})" if line else name


@dataclass(frozen=True, slots=True)
class Variant:
    n: int
    guard_s: float | None = None  #: None: the pacer as shipped
    gallery: bool = True
    one_prompt: bool = False
    items_share: float = 1.0
    profiled: bool = False
    store: bool = False  #: into a bucket of a SeaweedFS server rather than a folder


#: The engine as shipped at n=4 and n=1; without its end-of-run gallery; without gallery and pacing guard;
#: one prompt repeated; the run without gallery and guard again under cProfile; and n=4 with and without the
#: gallery into object storage.
RUNS = {
    "n4": Variant(4),
    "n1": Variant(1),
    "n4_no_gallery": Variant(4, gallery=False),
    "n4_no_guard": Variant(4, guard_s=0.0, gallery=False),
    "n4_one_prompt": Variant(4, gallery=False, one_prompt=True, items_share=0.1),
    "profile": Variant(4, guard_s=0.0, gallery=False, profiled=True),
    "n4_store": Variant(4, store=True),
    "n4_store_no_gallery": Variant(4, gallery=False, store=True),
}


def measure(workdir: Path, *, items: int, log=print, profile: bool = True, store: bool = True) -> dict[str, Any]:
    """Every run of :data:`RUNS` (the profiled one only with ``profile``, those into object storage only with
    ``store``) against one simulator; figures by name. SeaweedFS starts only for the runs into it, after the
    others, so that its process idles beside none of them."""
    config = {"accounts": sim_accounts([f"ceiling-{name}" for name in RUNS]), **UNLIMITED}
    results: dict[str, Any] = {}
    with SimServer(workdir / "sim", speed=SPEED, config=config) as sim, contextlib.ExitStack() as stack:
        s3 = None
        for name, variant in RUNS.items():
            if (variant.profiled and not profile) or (variant.store and not store):
                continue
            if variant.store and s3 is None:
                s3 = stack.enter_context(seaweed(workdir / "seaweed" / "data"))
                log(f"  SeaweedFS started in {s3.start_s:.1f} s")
            prof = workdir / name / "engine.prof" if variant.profiled else None
            if prof is not None:
                prof.parent.mkdir(parents=True, exist_ok=True)
            row = _run_once(
                sim,
                workdir / name,
                name=f"ceiling-{name}",
                items=max(1, round(items * variant.items_share)),
                n=variant.n,
                guard_s=variant.guard_s,
                gallery=variant.gallery,
                one_prompt=variant.one_prompt,
                profile=prof,
                s3=s3 if variant.store else None,
            )
            results[name] = {"run": row, **profile_summary(prof)} if prof is not None else row
            log(
                f"  ceiling {name}: {row['images_saved']} images, {_f(row['images_per_s'])}/s overall, "
                f"{_f(row['images_per_s_steady'])}/s steady, {_f(row['cpu_s_per_1000_images'])} CPU s/1000 images"
                + (f", server {_f(row['server_cpu_s_per_1000_images'])}" if variant.store else "")
            )
    return results


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
