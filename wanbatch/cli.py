"""The ``wanbatch`` command: plan, run, status, and the simulator.

Here: what each subcommand does with its arguments (the handlers) and the exit codes; the parsers of the
subcommands and their flags are :mod:`wanbatch.cliparser`'s.

Exit codes (documented in the README, relied on by cron and systemd):
0 every item saved; 3 finished, but some items were rejected, failed, expired
or left unsubmitted, or an output was not stored in the bucket; 4 halted: the account (key, billing, access) or an
unreachable service stopped submitting on every lane with items left;
2 invalid input or usage, nothing sent; 130 interrupted (the run folder is
resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanbatch.cliparser import LEDGER_ENV, RESUMED_SWITCHES, build_parser
from wanbatch.errors import ConfigError, LedgerError, ManifestError
from wanbatch.outputs.progress import setup_logging

if TYPE_CHECKING:
    from wanbatch.outputs.location import Location
from wanbatch.outputs.summary import plan_summary, run_summary, status_summary

__all__ = ["main"]

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
#: The output's reader went away (``| head``): what a shell reports for any command a closed pipe stops.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

log = logging.getLogger("wanbatch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        {"plan": cmd_plan, "run": cmd_run, "status": cmd_status, "export": cmd_export, "cancel": cmd_cancel},
        description=__doc__.split("\n")[0],
    )
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, where it can be handled, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except (ManifestError, ConfigError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.advice:
            print(exc.advice, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _reader_gone() -> int:
    """The output's reader closed it (``wanbatch status DIR | head``): stop quietly, as ``cat`` would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # what is still buffered must not fail again at exit
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _pool(args: argparse.Namespace):
    """The accounts file of ``--accounts``, checked (None without one)."""
    from wanbatch.service.accounts import load_accounts

    return None if args.accounts is None else load_accounts(args.accounts)


def _run_folder(args: argparse.Namespace) -> Path:
    """The folder holding the ledger of the run ``args.run`` names (with ``args.state``)."""
    return _located(args, out=args.run).state_dir


def _located(args: argparse.Namespace, *, out: str | None = None) -> Location:
    """Where the run of ``out`` (default ``args.out``) and ``args.state`` lives."""
    from wanbatch.outputs.location import locate

    return locate(out or args.out, state=args.state)


def _setup_logging(args: argparse.Namespace) -> None:
    """A live display in a terminal for ``run`` (events under it only with -v); one line per event elsewhere."""
    live = sys.stderr.isatty() and getattr(args, "func", None) is cmd_run
    args.console = setup_logging(verbose=args.verbose, quiet=args.quiet, log_format=args.log_format, live=live)


# ── plan ────────────────────────────────────────────────────────────────────────────────────────


def cmd_plan(args: argparse.Namespace) -> int:
    from wanbatch.manifest import Manifest
    from wanbatch.manifest.plan import make_plan

    pool = _pool(args)  # its errors before the manifest's work
    manifest = Manifest.from_yaml(args.manifest)
    plan = make_plan(manifest)
    if pool is not None:
        from wanbatch.service.accounts import check_pool_serves, split_plan

        check_pool_serves(pool, plan)
        plan = split_plan(plan, pool)
    print(json.dumps(plan, indent=2) if args.json else plan_summary(manifest.name, plan, budget=manifest.budget))
    return EXIT_OK


# ── run ─────────────────────────────────────────────────────────────────────────────────────────


def cmd_run(args: argparse.Namespace) -> int:
    from wanbatch.api import run

    if args.console is not None:  # the live display hides the log's start lines: where the state is, said here
        where = _located(args)
        if where.store is not None:
            args.console.print(
                f"outputs: {where.store.location}; the run's state (ledger): {where.state_dir}",
                markup=False,
                highlight=False,
            )
    try:
        report = asyncio.run(
            run(
                args.manifest,
                out=args.out,
                state=args.state,
                simulate=args.simulate,
                speed=args.speed,
                base_url=args.base_url,
                budget=args.budget,
                sync=args.sync,
                retry_failed=args.retry_failed,
                retry_moderated=args.retry_moderated,
                retry_held=args.retry_held,
                handle_signals=True,
                cancel_pending=args.cancel_pending,
                progress=args.console,
                gallery=args.gallery,
                tracking=args.tracking,
                quotas=args.quotas,
                accounts=args.accounts,
                sim_config=args.sim_config,
                force_backend=args.force_backend,
                force=args.force,
                ledger_url=args.ledger,
                lease_s=args.lease_s,
            )
        )
    except asyncio.CancelledError:
        print(f"interrupted; resume with: {resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(run_summary(report, args.out))
    if report["interrupted"]:
        print(f"interrupted; resume with: {resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report.get("halted"):
        return EXIT_HALTED
    items = report["items_in_manifest"]
    if (report.get("outputs") or {}).get("not_stored"):
        return EXIT_INCOMPLETE  # the images are saved; metadata.jsonl or the report is only in the state folder
    return EXIT_OK if items.get("saved", 0) == sum(items.values()) else EXIT_INCOMPLETE


def resume_command(args: argparse.Namespace) -> str:
    """The ``wanbatch run`` line that resumes this run as it was started: same folder, same service, same options."""
    argv = ["wanbatch", "run", str(args.manifest), "--out", str(args.out)]
    if args.state is not None:
        argv += ["--state", str(args.state)]
    if args.simulate:
        argv.append("--simulate")
    elif args.base_url:
        argv += ["--base-url", args.base_url]
    if args.speed is not None:
        argv += ["--speed", _exact(args.speed)]
    if args.budget is not None:
        argv += ["--budget", _exact(args.budget)]
    if args.tracking != "prompt":
        argv += ["--tracking", args.tracking]
    ledger, lease_s = getattr(args, "ledger", None), getattr(args, "lease_s", None)
    if ledger and ledger != os.environ.get(LEDGER_ENV):  # given by the variable, it is there again
        argv += ["--ledger", _without_password(ledger)]
    if lease_s is not None:
        argv += ["--lease", _exact(lease_s)]
    for option in ("quotas", "accounts", "sim_config"):
        if getattr(args, option, None) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    argv += [flag for flag in RESUMED_SWITCHES if getattr(args, flag[2:].replace("-", "_"))]
    if not args.gallery:
        argv.append("--no-gallery")
    return shlex.join(argv)


def _without_password(url: str) -> str:
    """``url`` with its password (if it has one) replaced by PASSWORD: a command line is printed, a secret never."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":PASSWORD@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _exact(value: float) -> str:
    """A number as short as it prints, but never rounded (a budget of 1234567 is not 1.23457e+06)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def cmd_export(args: argparse.Namespace) -> int:
    from wanbatch.outputs.finish import export_run

    for shard in export_run(args.run, state=args.state, fmt=args.fmt, out=args.out, shard_size=args.shard_size):
        print(shard)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from wanbatch.stages.cancel import cancel_in_folder

    counts = asyncio.run(
        cancel_in_folder(
            _run_folder(args), environ=os.environ, simulate=args.simulate, base_url=args.base_url, pool=_pool(args)
        )
    )
    print(
        f"canceled {counts['canceled']}; {counts['running']} already running (saved by the next run); "
        f"{counts['failed']} error(s)"
    )
    return EXIT_OK if not counts["failed"] else EXIT_INCOMPLETE


# ── status ──────────────────────────────────────────────────────────────────────────────────────


def cmd_status(args: argparse.Namespace) -> int:
    """Counts, cost and failures of a run folder, read from its ledger (safe while a run is going)."""
    from wanbatch.clock import ScaledClock
    from wanbatch.ledger import open_ledger
    from wanbatch.outputs.metadata import build_report

    pool = _pool(args)
    folder = _run_folder(args)
    last = folder / "report.json"
    shared = {"url": args.ledger, "batch": args.run} if args.ledger else {}

    async def read() -> dict[str, Any]:
        async with open_ledger(folder, clock=ScaledClock(), create=False, **shared) as ledger:
            runs = (await ledger.summary())["runs"]
            report = await build_report(ledger, run=runs, extra={"last_report": str(last) if last.exists() else None})
            if args.ledger:  # every worker the batch has had, with what each holds
                from wanbatch.fleet.members import workers_of

                rows = await workers_of(ledger.pool, ledger.batch_id)
                report["workers"] = [dataclasses.asdict(row) for row in rows]
            return report

    report = asyncio.run(read())
    if pool is not None:  # the file's accounts first, in its order, those that sent nothing yet too
        empty = {"items": {}, "images_generated": 0, "images_saved": 0, "cost": {}, "items_submitted": 0}
        known = report.get("accounts") or {}
        report["accounts"] = {**{name: known.get(name, empty) for name in pool.names}, **known}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(status_summary(report))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
