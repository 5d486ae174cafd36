"""Soak: a large manifest run under chaos faults, killed with SIGKILL again and again, then resumed to the end.

    .venv/bin/python benchmarks/soak.py                  # 1,000 items, five kills, chaos faults
    .venv/bin/python benchmarks/soak.py --items 300 --kills 3 --seed 7 --keep /tmp/soak
    .venv/bin/python benchmarks/soak.py --profile unkind --items 2000 --kills 10

The simulated service runs in this process (so the faults it injected can be
counted by kind) and keeps a billing log; every run is a ``wanbatch run``
process pointed at it, killed with SIGKILL at a random moment (seeded: once a
random share of the items is saved), the last one left to finish. At the end the run folder is audited against
the billing log, and one JSON summary is printed: items, kills, faults
injected by kind, images billed, images saved, duplicates (requests billed
more than once) and lost (billed images not saved as a valid PNG listed in
metadata.jsonl). Both of the last two must be 0. Exit status 0 when they
are and every item ended saved, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the audit shared with the chaos tests

from helpers.ledger import count_items  # noqa: E402
from helpers.manifest import numbered, write_manifest  # noqa: E402
from helpers.outputs import audit  # noqa: E402
from helpers.proc import WANBATCH, cli_env  # noqa: E402
from wanbatch.sim import SimConfig, running_sim  # noqa: E402

MODELS = ("wan2.2-t2i-flash", "wanx2.1-t2i-turbo")
#: Mean task time on the simulated service (seconds of service time).
DURATION_S = 3.0
#: The last run must finish within this many wall seconds.
FINAL_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000, help="distinct requests of one image (default 1000)")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs before the last run (default 5)")
    parser.add_argument("--speed", type=float, default=100.0, help="service seconds per wall second (default 100)")
    parser.add_argument(
        "--profile", "--faults", dest="faults", default="chaos", help="the simulator's fault profile (default chaos)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the faults, durations and kill moments")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    return parser.parse_args(argv)


def kill_points(rng: random.Random, kills: int, items: int) -> list[int]:
    """How many items are saved when each kill comes: one random point in each of ``kills`` equal bands of the
    first three quarters of the work, so the kills fall at random moments however fast the engine is."""
    return [int((band + rng.random()) / kills * 0.75 * items) for band in range(kills)]


async def start_run(manifest: Path, out: Path, base_url: str, speed: float, log: Path) -> asyncio.subprocess.Process:
    env = cli_env(DASHSCOPE_API_KEY="sk-sim-beijing")
    argv = [*WANBATCH, "-q", "run", str(manifest), "--out", str(out)]
    argv += ["--base-url", base_url, "--speed", f"{speed:g}"]
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(*argv, stdout=sink, stderr=sink, env=env)


async def soak(args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(args.seed)
    manifest = write_manifest(
        work, file_name="soak.yaml", prompts=numbered(args.items, f"soak {args.seed}", models=MODELS)
    )
    out, logs = work / "run", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = SimConfig(
        speed=args.speed,
        faults=args.faults,
        seed=args.seed,
        durations={"*": DURATION_S},
        billing_log=work / "billing.jsonl",
    )
    started = time.monotonic()
    runs = []
    async with running_sim(config) as sim:
        kills = 0
        for number, saved in enumerate(kill_points(rng, args.kills, args.items)):
            proc = await start_run(manifest, out, sim.base_url, args.speed, logs / f"run-{number}.log")
            while count_items(out, "state = 'saved'") < saved and proc.returncode is None:
                await asyncio.sleep(0.02)
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # a random phase within the work, not just after a save
            open_items = count_items(out, "state IN ('submitting', 'queued', 'generated', 'unknown')")
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            code = await proc.wait()
            runs.append({"run": number, "killed_at_saved": saved, "in_flight_at_kill": open_items, "exit": code})
            print(f"run {number}: exit {code} at {saved} saved, {open_items} in flight", file=sys.stderr)
        final_codes = []
        # A run that ends with items left for later (exit 3) is followed by one more, as a user would.
        for number in range(args.kills, args.kills + 3):
            proc = await start_run(manifest, out, sim.base_url, args.speed, logs / f"run-{number}.log")
            code = await asyncio.wait_for(proc.wait(), FINAL_TIMEOUT_S)
            final_codes.append(code)
            runs.append({"run": number, "exit": code})
            print(f"run {number}: exit {code} (to the end)", file=sys.stderr)
            if code == 0:
                break
        # Tasks made by creates whose answers were lost, and never adopted, end and are billed now.
        await asyncio.sleep(5 * DURATION_S / args.speed + 0.5)
        billing = sim.billing
        faults = dict(sorted(sim.faults_injected.items()))
        requests = dict(sorted(sim.requests.items()))
    result = audit(out, billing)
    return {
        "items": args.items,
        "kills": kills,
        "speed": args.speed,
        "seed": args.seed,
        "faults_profile": args.faults,
        "faults_injected": {str(k): v for k, v in faults.items()},
        "requests": requests,
        "images_billed": result.billed,
        "images_saved": result.saved,
        "duplicates": len(result.duplicates),
        "lost": len(result.lost),
        "item_states": dict(result.items),
        "items_not_final": len(result.open_items),
        "runs": runs,
        "final_exit_codes": final_codes,
        "wall_s": round(time.monotonic() - started, 1),
        "work_dir": str(work) if args.keep else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A killed run drops its connections in mid-answer; the simulator's server would log each one as an error.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        summary = asyncio.run(soak(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="wanbatch-soak-") as work:
            summary = asyncio.run(soak(args, Path(work)))
    print(json.dumps(summary, indent=2))
    clean = summary["duplicates"] == 0 and summary["lost"] == 0
    return 0 if clean and summary["item_states"] == {"saved": args.items} else 1


if __name__ == "__main__":
    raise SystemExit(main())
