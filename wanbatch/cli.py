"""The ``wanbatch`` command: plan, run, status, and the simulator.

Exit codes (documented in the README, relied on by cron and systemd):
0 every item saved; 3 finished, but some items were rejected, failed, expired
or left unsubmitted; 2 invalid input or usage, nothing sent; 130 interrupted
(the run folder is resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from . import catalog
from .errors import ConfigError, LedgerError, ManifestError

__all__ = ["main"]

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 130
SIM_SPEED = 60.0  #: --simulate's default clock: a simulated minute per second

log = logging.getLogger("wanbatch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was sent.", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanbatch", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv for debugging)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="show items, images, cost and quota time of a manifest; sends nothing")
    plan.add_argument("manifest", type=Path)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", help="run or resume a manifest into a run folder")
    run.add_argument("manifest", type=Path)
    run.add_argument("--out", type=Path, required=True, help="the run folder (ledger, images, metadata, report)")
    run.add_argument(
        "--simulate",
        action="store_true",
        help="run against the embedded simulator (demo keys, fast clock): no key, no network",
    )
    run.add_argument(
        "--speed",
        type=float,
        default=None,
        help=f"the service clock's speed: only for simulators (default with --simulate: {SIM_SPEED:g})",
    )
    run.add_argument(
        "--base-url",
        default=os.environ.get("DASHSCOPE_HTTP_BASE_URL"),
        help="one endpoint for every region (default: $DASHSCOPE_HTTP_BASE_URL, else each region's host)",
    )
    run.add_argument("--sync", action="store_true", help="use wan2.6's synchronous endpoint instead of tasks")
    run.add_argument(
        "--cancel-pending",
        action="store_true",
        help="on Ctrl-C/SIGTERM also cancel the tasks still waiting (PENDING) on the service",
    )
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="counts per state of a run folder, also while it runs")
    status.add_argument("run_dir", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    sim = sub.add_parser("sim", help="serve the simulated service on loopback until Ctrl-C")
    from .sim import cli as sim_cli

    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.run)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


# ── plan ────────────────────────────────────────────────────────────────────────────────────────


def cmd_plan(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    manifest = Manifest.from_yaml(args.manifest)
    plan = make_plan(manifest)
    if args.json:
        print(json.dumps(plan, indent=2))
        return EXIT_OK
    print(f"{manifest.name}: {plan['items']} item(s), {plan['images']} image(s)")
    print(f"{'region':<10} {'model':<20} {'items':>8} {'images':>8} {'cost':>12}  quota time")
    for row in plan["lanes"]:
        print(
            f"{row['region']:<10} {row['model']:<20} {row['items']:>8} {row['images']:>8} "
            f"{row['cost']:>8.2f} {row['currency']}  {_duration(row['quota_time_s'])}"
        )
    for currency, cost in plan["cost"].items():
        print(f"total: {cost:.2f} {currency} at {catalog.PRICE_TABLE}")
    print(f"time the account's quota allows: {_duration(plan['quota_time_s'])} (models run in parallel)")
    if manifest.budget is not None:
        print(f"budget: {manifest.budget:.2f} CNY")
    return EXIT_OK


def make_plan(manifest) -> dict:
    """Items, images and cost per (region, model), and the quota bound max(N/RPS, N·duration/concurrency)."""
    lanes: dict[tuple[str, str], dict] = defaultdict(lambda: {"items": 0, "images": 0})
    for item in manifest.items():
        lane = lanes[(item.region, item.model)]
        lane["items"] += 1
        lane["images"] += item.n
    rows, cost = [], defaultdict(float)
    for (region, model), lane in sorted(lanes.items()):
        offer = catalog.offer(region, model)
        bound = max(
            lane["items"] / offer.submit_rps, lane["items"] * offer.model.typical_duration_s / offer.concurrency
        )
        rows.append(
            {
                "region": region,
                "model": model,
                **lane,
                "cost": round(lane["images"] * offer.price, 6),
                "currency": offer.currency,
                "quota_time_s": bound,
            }
        )
        cost[offer.currency] += lane["images"] * offer.price
    return {
        "items": sum(r["items"] for r in rows),
        "images": sum(r["images"] for r in rows),
        "cost": {k: round(v, 6) for k, v in cost.items()},
        "price_table": catalog.PRICE_TABLE,
        "quota_time_s": max((r["quota_time_s"] for r in rows), default=0.0),
        "lanes": rows,
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ── run ─────────────────────────────────────────────────────────────────────────────────────────


def cmd_run(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    manifest = Manifest.from_yaml(args.manifest)
    for warning in manifest.validate():
        log.warning("warning: %s", warning)
    return asyncio.run(_run(args, manifest))


async def _run(args: argparse.Namespace, manifest) -> int:
    from .engine import Engine, EngineConfig, keys_from_env
    from .submit import SubmitConfig

    regions = sorted({item.region for item in manifest.items()})
    async with contextlib.AsyncExitStack() as stack:
        if args.simulate:
            from .sim import SimConfig, running_sim

            speed = args.speed or SIM_SPEED
            sims = {
                region: await stack.enter_async_context(running_sim(SimConfig(region=region, speed=speed)))
                for region in regions
            }
            keys = {region: f"sk-sim-{region}" for region in regions}
            config = EngineConfig(
                base_urls={r: s.base_url for r, s in sims.items()},
                speed=speed,
                submit=SubmitConfig(sync_wan26=args.sync),
            )
            clock = next(iter(sims.values())).clock
            log.info("simulating %s at %gx speed", ", ".join(regions), speed)
        else:
            keys = keys_from_env(regions, os.environ)
            config = EngineConfig(
                base_url=args.base_url, speed=args.speed or 1.0, submit=SubmitConfig(sync_wan26=args.sync)
            )
            clock = None
        engine = Engine(run_dir=args.out, keys=keys, config=config, clock=clock)
        task = asyncio.current_task()
        presses = 0

        def on_signal() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                log.warning(
                    "■ stopping: nothing new is submitted; finishing what is paid for. "
                    "Press Ctrl-C again to quit at once (the run folder stays resumable)."
                )
                engine.interrupt(cancel_pending=args.cancel_pending)
            elif task is not None:
                task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            report = await engine.run(manifest)
        except asyncio.CancelledError:
            print(f"interrupted; resume with: wanbatch run {args.manifest} --out {args.out}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    _print_summary(report, args.out)
    if engine.interrupted:
        return EXIT_INTERRUPTED
    items = report["items_in_manifest"]
    return EXIT_OK if items.get("saved", 0) == sum(items.values()) else EXIT_INCOMPLETE


def _print_summary(report: dict, run_dir: Path) -> None:
    items = ", ".join(f"{n} {state}" for state, n in report["items"].items() if n)
    cost = ", ".join(f"{v:.2f} {k}" for k, v in report["cost"].items()) or "0"
    print(f"items: {items}")
    print(f"images saved: {report['images']['saved']}  cost: {cost}  wall time: {report['wall_s']:.1f}s")
    for code, failure in report["failures"].items():
        first = failure["sources"][0]["source"] if failure["sources"] else ""
        print(f"  {failure['count']} {failure['state']} {code}: {failure['message']} (first at {first})")
    for lane, reason in report.get("blocked", {}).items():
        print(f"  submitting stopped for {lane}: {reason}")
    print(f"images:   {run_dir / 'images'}")
    print(f"metadata: {run_dir / 'metadata.jsonl'}")
    print(f"report:   {run_dir / 'report.json'}")


# ── status ──────────────────────────────────────────────────────────────────────────────────────


def cmd_status(args: argparse.Namespace) -> int:
    from .clock import ScaledClock
    from .ledger import Ledger

    if not (args.run_dir / "ledger.sqlite").exists():
        raise ConfigError(f"{args.run_dir} is not a run folder (no ledger.sqlite in it)")
    with Ledger.open(args.run_dir, clock=ScaledClock(), create=False) as ledger:
        summary = ledger.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    print("items:  " + ", ".join(f"{n} {s}" for s, n in summary["items"].items() if n))
    print("images: " + ", ".join(f"{n} {s}" for s, n in summary["images"].items() if n))
    print("cost:   " + (", ".join(f"{v:.2f} {k}" for k, v in summary["cost"].items()) or "0"))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
