"""The ``wanbatch`` command: plan, run, status, and the simulator.

Exit codes (documented in the README, relied on by cron and systemd):
0 every item saved; 3 finished, but some items were rejected, failed, expired
or left unsubmitted; 2 invalid input or usage, nothing sent; 130 interrupted
(the run folder is resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import catalog
from .errors import ConfigError, LedgerError, ManifestError
from .progress import JsonFormatter, format_duration
from .track import POLICIES

__all__ = ["main"]

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 130

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
    parser.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default="plain",
        help="events as plain lines or one JSON object per line (no live display)",
    )
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
        help="the service clock's speed: only for simulators (default with --simulate: 60)",
    )
    run.add_argument(
        "--base-url",
        default=os.environ.get("DASHSCOPE_HTTP_BASE_URL"),
        help="one endpoint for every region (default: $DASHSCOPE_HTTP_BASE_URL, else each region's host)",
    )
    run.add_argument("--sync", action="store_true", help="use wan2.6's synchronous endpoint instead of tasks")
    run.add_argument(
        "--tracking",
        choices=POLICIES,
        default="prompt",
        help="prompt: see each task's end within about 2 s (a few queries per task); "
        "frugal: about one query per task, ends seen up to the spread of running times later",
    )
    run.add_argument(
        "--no-gallery",
        dest="gallery",
        action="store_false",
        help="do not write gallery.html and its thumbnails at the end of the run",
    )
    run.add_argument(
        "--budget",
        type=float,
        default=None,
        help="CNY; overrides the manifest's budget: a plan over it is refused, spending stops before it",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="send again the items whose task failed (not those moderation refused)",
    )
    run.add_argument(
        "--retry-moderated",
        action="store_true",
        help="send again the items content moderation refused too (after you changed nothing, they "
        "will most likely be refused again)",
    )
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

    export = sub.add_parser("export", help="write a run folder's images and metadata as dataset shards")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--format", dest="fmt", choices=("webdataset", "parquet"), required=True)
    export.add_argument("--out", type=Path, default=None, help="where the shards go (default: DIR/exports/FORMAT)")
    export.add_argument("--shard-size", type=int, default=200, help="images per shard")
    export.set_defaults(func=cmd_export)

    cancel = sub.add_parser("cancel", help="cancel the tasks a stopped run left waiting (PENDING) on the service")
    cancel.add_argument("run_dir", type=Path)
    cancel.add_argument(
        "--base-url",
        default=os.environ.get("DASHSCOPE_HTTP_BASE_URL"),
        help="one endpoint for every region (default: $DASHSCOPE_HTTP_BASE_URL)",
    )
    cancel.set_defaults(func=cmd_cancel)

    sim = sub.add_parser("sim", help="serve the simulated service on loopback until Ctrl-C")
    from .sim import cli as sim_cli

    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.run)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """A live display in a terminal (events under it only with -v); one line per event anywhere else."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    args.console = None
    if args.log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty() and not args.quiet and getattr(args, "func", None) is cmd_run:
        from rich.console import Console
        from rich.logging import RichHandler

        args.console = Console(stderr=True)
        handler = RichHandler(console=args.console, show_time=False, show_path=False, markup=False)
        level = logging.INFO if args.verbose else logging.WARNING
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("wanbatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


# ── plan ────────────────────────────────────────────────────────────────────────────────────────


def cmd_plan(args: argparse.Namespace) -> int:
    from .manifest import Manifest
    from .plan import make_plan

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
            f"{row['cost']:>8.2f} {row['currency']}  {format_duration(row['quota_time_s'])}"
        )
    for currency, cost in plan["cost"].items():
        print(f"total: {cost:.2f} {currency} at {catalog.PRICE_TABLE}")
    print(f"time the account's quota allows: {format_duration(plan['quota_time_s'])} (models run in parallel)")
    if manifest.budget is not None:
        print(f"budget: {manifest.budget:.2f} CNY")
    return EXIT_OK


# ── run ─────────────────────────────────────────────────────────────────────────────────────────


def cmd_run(args: argparse.Namespace) -> int:
    from .api import run

    try:
        report = asyncio.run(
            run(
                args.manifest,
                out=args.out,
                simulate=args.simulate,
                speed=args.speed,
                base_url=args.base_url,
                budget=args.budget,
                sync=args.sync,
                retry_failed=args.retry_failed,
                retry_moderated=args.retry_moderated,
                handle_signals=True,
                cancel_pending=args.cancel_pending,
                progress=args.console,
                gallery=args.gallery,
                tracking=args.tracking,
            )
        )
    except asyncio.CancelledError:
        print(f"interrupted; resume with: wanbatch run {args.manifest} --out {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_summary(report, args.out)
    if report["interrupted"]:
        return EXIT_INTERRUPTED
    items = report["items_in_manifest"]
    return EXIT_OK if items.get("saved", 0) == sum(items.values()) else EXIT_INCOMPLETE


def _print_failures(report: dict) -> None:
    for code, failure in report["failures"].items():
        first = failure["sources"][0]["source"] if failure["sources"] else ""
        print(f"  {failure['count']} {failure['state']} {code}: {failure['message']} (first at {first})")
    lost = ", ".join(f"{v:.2f} {k}" for k, v in report.get("cost_lost", {}).items())
    if lost:
        print(f"  paid and lost (URLs expired before saving): {lost}")


def _print_summary(report: dict, run_dir: Path) -> None:
    items = ", ".join(f"{n} {state}" for state, n in report["items"].items() if n)
    cost = ", ".join(f"{v:.2f} {k}" for k, v in report["cost"].items()) or "0"
    print(f"items (all runs): {items}")
    print(
        f"images saved: {report['images']['saved']} in all runs, {report['images_saved_this_run']} this run"
        f"  cost: {cost}  wall time: {report['wall_s']:.1f}s"
    )
    _print_failures(report)
    for lane, reason in report.get("blocked", {}).items():
        print(f"  submitting stopped for {lane}: {reason}")
    left = report.get("items_in_manifest", {}).get("planned", 0)
    if left:
        why = (
            "the budget was reached"
            if report.get("budget", {}).get("reached")
            else "interrupted"
            if report.get("interrupted")
            else "submitting stopped (see above)"
            if report.get("blocked")
            else "transient errors; the next run tries again"
        )
        print(f"  {left} item(s) left unsubmitted: {why}")
    print(f"images:   {run_dir / 'images'}")
    print(f"metadata: {run_dir / 'metadata.jsonl'}")
    print(f"report:   {run_dir / 'report.json'}")
    if (run_dir / "gallery.html").exists():
        print(f"gallery:  {run_dir / 'gallery.html'}")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    shards = export(args.run_dir, fmt=args.fmt, out=args.out, shard_size=args.shard_size)
    for shard in shards:
        print(shard)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from .cancel import cancel_queued
    from .engine import keys_from_env

    if not (args.run_dir / "ledger.sqlite").exists():
        raise ConfigError(f"{args.run_dir} is not a run folder (no ledger.sqlite in it)")
    keys = keys_from_env(sorted(catalog.REGIONS), {**os.environ}, require=False)
    counts = asyncio.run(cancel_queued(args.run_dir, keys=keys, base_url=args.base_url))
    print(
        f"canceled {counts['canceled']}; {counts['running']} already running (saved by the next run); "
        f"{counts['errors']} error(s)"
    )
    return EXIT_OK if not counts["errors"] else EXIT_INCOMPLETE


# ── status ──────────────────────────────────────────────────────────────────────────────────────


def cmd_status(args: argparse.Namespace) -> int:
    """Counts, cost and failures of a run folder, read from its ledger (safe while a run is going)."""
    from .clock import ScaledClock
    from .ledger import Ledger
    from .outputs import build_report

    if not (args.run_dir / "ledger.sqlite").exists():
        raise ConfigError(f"{args.run_dir} is not a run folder (no ledger.sqlite in it)")
    last = args.run_dir / "report.json"
    with Ledger.open(args.run_dir, clock=ScaledClock(), create=False) as ledger:
        runs = ledger.summary()["runs"]
        report = build_report(ledger, run=runs, extra={"last_report": str(last) if last.exists() else None})
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    print("items:  " + (", ".join(f"{n} {s}" for s, n in report["items"].items() if n) or "none"))
    print("images: " + (", ".join(f"{n} {s}" for s, n in report["images"].items() if n) or "none"))
    print("cost:   " + (", ".join(f"{v:.2f} {k}" for k, v in report["cost"].items()) or "0"))
    _print_failures(report)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
