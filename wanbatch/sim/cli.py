"""``wanbatch sim``: serve the simulated service until Ctrl-C or SIGTERM.

The main CLI wires :func:`add_arguments` and :func:`run` (or :func:`serve`);
``python -m wanbatch.sim`` does the same on its own. The first lines printed
(and flushed) are the base URL and the demo keys, so a script can read them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from wanbatch import catalog
from wanbatch.aio import stop_on_signals
from wanbatch.sim.config import SimConfig
from wanbatch.sim.faults import FAULT_PROFILES
from wanbatch.sim.handle import running_sim

__all__ = ["add_arguments", "config_from_args", "main", "run", "serve"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    parser.add_argument("--region", default="beijing", choices=list(catalog.REGIONS), help="region served")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second (default: 1)")
    parser.add_argument("--faults", default="none", choices=list(FAULT_PROFILES), help="fault profile")
    parser.add_argument("--seed", type=int, default=0, help="makes durations, failures and faults reproducible")
    parser.add_argument("--billing-log", type=Path, help="append one JSON line per billed image to this file")
    parser.add_argument("--config", type=Path, help="YAML or JSON file: accounts, keys, quotas, other settings")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The SimConfig the arguments describe; a --config file fills what the flags leave at their defaults."""
    return SimConfig(
        region=args.region,
        speed=args.speed,
        faults=args.faults,
        seed=args.seed,
        billing_log=args.billing_log,
        config_file=args.config,
    ).resolved()


async def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 2 on a bad configuration."""
    try:
        config = config_from_args(args)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"wanbatch sim: bad configuration: {exc}", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    try:
        async with running_sim(config, host=args.host, port=args.port) as sim:
            print(f"wanbatch sim: {sim.base_url}", flush=True)
            keys = sim.state.accounts.keys_by_region()
            for region in catalog.REGIONS:
                note = "this region" if region == config.region else "other region: 401 here"
                for key in keys.get(region, []):
                    print(f"  key {key}  ({region}, {note})", flush=True)
            print(
                f"  region {config.region}, speed {config.speed:g}x, faults {config.faults}, seed {config.seed}"
                + (f", billing log {config.billing_log}" if config.billing_log else "")
                + "; Ctrl-C to stop",
                flush=True,
            )
            await stop.wait()
    except OSError as exc:
        print(f"wanbatch sim: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print("wanbatch sim: stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanbatch sim", description="Serve the simulated Wan text-to-image API.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
