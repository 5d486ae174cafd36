"""``python -m benchmarks.store``: put_verified of PNG-sized blobs, SeaweedFS over loopback against a local folder.

    python -m benchmarks.store                      # 300 objects of 1.5 MB, 16 at once, each store
    python -m benchmarks.store --objects 60 --concurrency 4

For each store: objects per second, and CPU milliseconds per object of this
process (hashing, signing, HTTP) and, for SeaweedFS, of the server too (its
whole process, from /proc), so that the figure says what a saved image costs
the machine. Blobs are random bytes (a PNG does not compress either), made
before the clock starts. SeaweedFS is started the way the tests start it, on
free loopback ports with its data under a temporary folder on the same disk
as the local store's. The benchmark asserts nothing: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanbatch.outputs.stores import Store, StoreConfig, open_store

__all__ = ["measure", "process_cpu_s", "seaweed"]

REPO = Path(__file__).resolve().parent.parent
BLOB_BYTES = 1_500_000
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    store: str
    objects: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float | None

    def row(self) -> str:
        server = "" if self.server_cpu_s is None else f"{self.server_cpu_s / self.objects * 1000:.1f}"
        return (
            f"| {self.store} | {self.objects} | {self.objects / self.wall_s:.1f} | "
            f"{self.objects * BLOB_BYTES / self.wall_s / 1e6:.0f} | "
            f"{self.client_cpu_s / self.objects * 1000:.1f} | {server or '-'} |"
        )


async def _put_all(store: Store, blobs: list[bytes], objects: int) -> None:
    async with store:
        await store.check()
        await asyncio.gather(
            *(store.put_verified(f"images/{n:06d}.png", blobs[n % len(blobs)]) for n in range(objects))
        )


def measure(name: str, target: str, blobs: list[bytes], objects: int, config: StoreConfig, pid: int | None) -> Figure:
    """Put ``objects`` blobs into ``target``; wall and CPU seconds (this process's, and ``pid``'s when given)."""
    server_before = process_cpu_s(pid) if pid else None
    cpu_before, began = _own_cpu(), time.perf_counter()
    asyncio.run(_put_all(open_store(target, config=config), blobs, objects))
    wall_s, client_cpu_s = time.perf_counter() - began, _own_cpu() - cpu_before
    server_cpu_s = process_cpu_s(pid) - server_before if pid and server_before is not None else None
    return Figure(store=name, objects=objects, wall_s=wall_s, client_cpu_s=client_cpu_s, server_cpu_s=server_cpu_s)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread's: LocalStore writes in worker threads
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    """User + system seconds of the running process ``pid`` so far (every thread's), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime and stime, in clock ticks


@contextlib.contextmanager
def seaweed(data_dir: Path) -> Iterator[Any]:
    """A SeaweedFS S3 server started as the tests start theirs (``tests/helpers/seaweed.py``): free loopback
    ports, its data in ``data_dir`` (its log beside it); stopped on the way out. Yields the ``SeaweedServer``
    (``env()`` for a client's environment, ``make_bucket()``, ``process.pid``, ``start_s``)."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from helpers.seaweed import _PORT_FLAGS, SeaweedServer, free_ports

    data_dir.mkdir(parents=True, exist_ok=True)
    server = SeaweedServer(data_dir=data_dir, ports=dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True)))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    blobs = [os.urandom(BLOB_BYTES) for _ in range(8)]
    config = StoreConfig(max_concurrency=args.concurrency)
    with (
        tempfile.TemporaryDirectory(prefix="wanbatch-bench-store-") as scratch,
        seaweed(Path(scratch) / "seaweed") as server,
    ):
        os.environ.update(server.env())
        bucket = server.make_bucket()
        figures = [
            measure("local folder", str(Path(scratch) / "local"), blobs, args.objects, config, None),
            measure(
                "SeaweedFS (S3, loopback)", f"s3://{bucket}/bench", blobs, args.objects, config, server.process.pid
            ),
        ]
    print(
        f"put_verified of {args.objects} objects of {BLOB_BYTES / 1e6:.1f} MB, {args.concurrency} at once, "
        f"{os.cpu_count()} cores; SeaweedFS started in {server.start_s:.1f} s"
    )
    print("| store | objects | objects/s | MB/s | client CPU ms/object | server CPU ms/object |")
    print("|---|---|---|---|---|---|")
    for figure in figures:
        print(figure.row())


if __name__ == "__main__":
    main()
