"""The ``wanbatch`` command's arguments: every subcommand's parser, the flags they share and the checks of values.

:func:`build_parser` is what ``wanbatch --help`` shows; what each subcommand does with its arguments is
:mod:`wanbatch.cli`'s (the handlers, given to the parser by name). ``-v``, ``-q`` and ``--log-format`` are taken
before the subcommand and after it (cron and systemd lines put them last).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from wanbatch import __version__, catalog
from wanbatch.stages.track import POLICIES

__all__ = ["LEDGER_ENV", "RESUMED_SWITCHES", "build_parser"]

LEDGER_ENV = "WANBATCH_LEDGER"  #: the shared ledger every worker's command takes when --ledger is not given
#: The switches of ``run`` that its resume line repeats (what is sent, and how), with their help.
RESUMED_SWITCHES = {
    "--sync": "use wan2.6's synchronous endpoint instead of tasks",
    "--retry-failed": "send again the items whose task failed (not those moderation refused)",
    "--retry-moderated": "send again the items content moderation refused too (after you changed nothing, they "
    "will most likely be refused again)",
    "--retry-held": "send once more the items held after two creates whose outcome was unknown and made no task "
    "(HeldUnknownTwice in report.json)",
    "--cancel-pending": "on Ctrl-C/SIGTERM also cancel the tasks still waiting (PENDING) on the service",
}


def build_parser(
    handlers: Mapping[str, Callable[[argparse.Namespace], int]], *, description: str
) -> argparse.ArgumentParser:
    """The parser of ``wanbatch`` and its subcommands: each one's ``func`` is ``handlers[its name]`` (``ledger``'s
    and ``sim``'s are their own modules'); ``description`` is what ``--help`` says first."""
    parser = argparse.ArgumentParser(prog="wanbatch", description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_flags(parser, defaults=True)
    # The same flags after the subcommand (cron and systemd lines put them last); SUPPRESS keeps a value given
    # before the subcommand when the subcommand's parser does not see the flag again.
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, defaults=False)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    plan = sub.add_parser(
        "plan", parents=[common], help="show items, images, cost and quota time of a manifest; sends nothing"
    )
    plan.add_argument("manifest", type=Path)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _accounts_flag(plan, "show the split of items and cost over the pool's accounts (an estimate)")
    plan.set_defaults(func=handlers["plan"])

    run = sub.add_parser("run", parents=[common], help="run or resume a manifest into a run folder")
    run.add_argument("manifest", type=Path)
    run.add_argument(
        "--out",
        required=True,
        metavar="DIR|URL",
        help="the run folder (ledger, images, metadata, report), or object storage: s3://bucket/prefix, "
        "oss://bucket/prefix (images, metadata, report there; the ledger in --state)",
    )
    _state_flag(run)
    _service_flags(
        run,
        simulate="run against the embedded simulator (demo keys, fast clock): no key, no network",
        otherwise="each region's host",
    )
    run.add_argument(
        "--speed",
        type=_above_zero,
        default=None,
        help="the service clock's speed: only for simulators (default with --simulate: the folder's last, else 60)",
    )
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
        type=_not_negative,
        default=None,
        help="CNY; overrides the manifest's budget: a plan over it is refused, spending stops before it",
    )
    for flag, text in RESUMED_SWITCHES.items():
        run.add_argument(flag, action="store_true", help=text)
    run.add_argument(
        "--quotas",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML of the account's raised quotas, {model: {submit_rps: X, concurrency: N}}; default: the catalog's",
    )
    _accounts_flag(run, "run over a pool of accounts: YAML naming each account, its region and key_env (README)")
    run.add_argument(
        "--sim-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --simulate: the simulator's config, as `wanbatch sim --config` takes (docs/simulator.md)",
    )
    run.add_argument(
        "--force-backend",
        action="store_true",
        help="resume a run folder against another service than the one it was made against (see --simulate, "
        "--base-url); its new images then sit beside the earlier ones",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="run even if the folder holds another manifest's items (their images then share metadata.jsonl), or "
        "the state of another --out (moved outputs)",
    )
    _ledger_flag(run)
    run.add_argument(
        "--lease",
        dest="lease_s",
        type=_above_zero,
        default=None,
        metavar="SECONDS",
        help="with --ledger: how long a worker may be silent before another takes over its items (default 90)",
    )
    run.set_defaults(func=handlers["run"])

    status = sub.add_parser("status", parents=[common], help="counts per state of a run folder, also while it runs")
    status.add_argument("run", metavar="DIR|URL", help="the run's --out")
    _state_flag(status)
    status.add_argument("--json", action="store_true")
    _ledger_flag(status)
    _accounts_flag(status, "the pool the folder runs with: its accounts are listed even before they sent anything")
    status.set_defaults(func=handlers["status"])

    export = sub.add_parser(
        "export", parents=[common], help="write a run folder's images and metadata as dataset shards"
    )
    export.add_argument("run", metavar="DIR|URL", help="the run's --out")
    _state_flag(export)
    export.add_argument("--format", dest="fmt", choices=("webdataset", "parquet"), required=True)
    export.add_argument(
        "--out", type=Path, default=None, help="a folder for the shards (default: exports/FORMAT beside the images)"
    )
    export.add_argument("--shard-size", type=int, default=200, help="images per shard")
    export.set_defaults(func=handlers["export"])

    cancel = sub.add_parser(
        "cancel", parents=[common], help="cancel the tasks a stopped run left waiting (PENDING) on the service"
    )
    cancel.add_argument("run", metavar="DIR|URL", help="the run's --out")
    _state_flag(cancel)
    _service_flags(
        cancel,
        simulate="cancel on the folder's embedded simulator (the default for a folder made with --simulate)",
        otherwise="the folder's own service",
    )
    _accounts_flag(cancel, "the pool the folder ran with: each task is canceled with its own account's key")
    cancel.set_defaults(func=handlers["cancel"])

    ledger = sub.add_parser("ledger", parents=[common], help="make or upgrade the tables of a PostgreSQL ledger")
    from wanbatch.ledger import pgcli

    pgcli.add_arguments(ledger)
    ledger.set_defaults(func=pgcli.run)

    sim = sub.add_parser("sim", parents=[common], help="serve the simulated service on loopback until Ctrl-C")
    from wanbatch.sim import cli as sim_cli

    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.run)
    return parser


def _state_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="DIR",
        help="with an --out in object storage: the folder of the run's ledger "
        "(default: one under ~/.cache/wanbatch/runs named after the --out)",
    )


def _accounts_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--accounts", type=Path, default=None, metavar="FILE", help=text)


def _ledger_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        default=os.environ.get(LEDGER_ENV) or None,
        metavar="URL",
        help=f"a PostgreSQL ledger (postgresql://USER@HOST/DB) that the workers of the batch named by --out share, "
        f"instead of the folder's own (default: ${LEDGER_ENV}; see docs/fleet.md)",
    )


def _service_flags(parser: argparse.ArgumentParser, *, simulate: str, otherwise: str) -> None:
    """``--simulate`` and ``--base-url``, which say what service a command talks to."""
    parser.add_argument("--simulate", action="store_true", help=simulate)
    parser.add_argument(
        "--base-url",
        default=os.environ.get(catalog.BASE_URL_ENV),
        help=f"one endpoint for every region (default: ${catalog.BASE_URL_ENV}, else {otherwise})",
    )


def _above_zero(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"found {text}; allowed: a number above 0 (1 is real time)")
    return value


def _not_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"found {text}; allowed: an amount of CNY, 0 or more")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"found {text!r}; allowed: a number")
    return value


def _global_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """-v, -q and --log-format: on the main parser with their defaults, on each subcommand's without."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("-v", "--verbose", action="count", default=default(0), help="more detail (-vv for debugging)")
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default(False), help="only warnings and the final summary"
    )
    parser.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=default("plain"),
        help="events as plain lines or one JSON object per line (no live display)",
    )
