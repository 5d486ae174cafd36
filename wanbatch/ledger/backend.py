"""Which service a run folder is made against, so that a resume cannot mix two of them.

A folder's ledger records, when it is made, the endpoint of every region: the
embedded simulator (``--simulate``), one ``--base-url`` for all, or each
region's own host. A resume pointed elsewhere would bill a real account for a
simulated batch, or mix a simulator's placeholder images with real ones, so
it is refused before anything is sent unless asked for (``force``); then the
new endpoints are recorded. A folder made before this record existed takes
the first one it is run with. No key is ever part of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from wanbatch import catalog
from wanbatch.errors import ConfigError
from wanbatch.ledger import RunLedger, read_meta

__all__ = ["BACKEND_META", "SIMULATED", "BackendMismatch", "base_url_of", "check", "claim", "describe", "recorded"]

log = logging.getLogger("wanbatch")

BACKEND_META = "backend"  #: the ledger's meta key: JSON {region: endpoint URL or SIMULATED}
SIMULATED = "simulated"  #: the endpoint of every region under ``--simulate`` (its ports change per process)


class BackendMismatch(ConfigError):
    """A run folder resumed against another service than the one it was made against."""


def describe(*, simulate: bool, base_url: str | None = None) -> dict[str, str]:
    """Every region's endpoint for these options, as the ledger records it."""
    if simulate:
        return {region: SIMULATED for region in catalog.REGIONS}
    return {region: catalog.endpoint(region, base_url=base_url) for region in catalog.REGIONS}


def recorded(run_dir: Path) -> dict[str, str] | None:
    """The endpoints ``run_dir`` was made against; None for a folder without a record (or no folder)."""
    value = read_meta(run_dir, BACKEND_META)
    return json.loads(value) if value else None


def check(
    run_dir: Path, known: Mapping[str, str] | None, wanted: Mapping[str, str], *, force: bool, command: str = "run"
) -> None:
    """Refuse ``wanted`` when ``known`` (the folder's record) names other endpoints, unless ``force``."""
    if known is None or force:
        return
    changed = sorted(region for region, url in wanted.items() if known.get(region, url) != url)
    if not changed:
        return
    message = (
        f"{run_dir} was made against {_phrase(known)}; this {command} would use {_phrase(wanted)}. Nothing was "
        f"sent. Point it at the same service ({_flags(known)})"
    )
    if command == "run":
        message += ", or pass --force-backend to go on against the new one (its images then sit beside the earlier)"
    raise BackendMismatch(message)


async def claim(ledger: RunLedger, run_dir: Path, wanted: Mapping[str, str], *, force: bool) -> None:
    """Check ``wanted`` (the endpoints of the regions this run uses) against the ledger's record (read under the
    run's lock) and merge it in.

    A region the run does not use keeps its record: the folder may hold its tasks and images still, and a later
    run or ``wanbatch cancel`` that reaches it must meet the same service. So a manifest that drops a region
    neither forgets where its tasks are nor counts as a switch; only a region whose endpoint changes does."""
    value = await ledger.meta(BACKEND_META)
    known = json.loads(value) if value else None
    check(run_dir, known, wanted, force=force)
    merged = {**(known or {}), **wanted}
    if merged == known:
        return
    switched = {region: url for region, url in wanted.items() if known and known.get(region, url) != url}
    if switched:
        before = {region: known[region] for region in switched}
        log.warning("%s: switching from %s to %s (--force-backend)", run_dir, _phrase(before), _phrase(switched))
    await ledger.set_meta(BACKEND_META, json.dumps(merged, sort_keys=True))


def base_url_of(endpoints: Mapping[str, str]) -> str | None:
    """The one ``--base-url`` these endpoints were made with, if any (not for simulated ones)."""
    urls = set(endpoints.values())
    if len(urls) != 1 or urls == {SIMULATED}:
        return None
    url = urls.pop()
    return None if all(url == catalog.endpoint(region) for region in endpoints) else url


def _phrase(endpoints: Mapping[str, str]) -> str:
    """The endpoints in words, for a message."""
    if set(endpoints.values()) == {SIMULATED}:
        return "the embedded simulator (--simulate)"
    if (url := base_url_of(endpoints)) is not None:
        return f"the endpoint {url} (--base-url)"
    if all(url == catalog.endpoint(region) for region, url in endpoints.items()):
        return "the service's own hosts (no --simulate, no --base-url)"
    return ", ".join(f"{region}: {url}" for region, url in sorted(endpoints.items()))


def _flags(endpoints: Mapping[str, str]) -> str:
    """The ``run`` options that select these endpoints."""
    if set(endpoints.values()) == {SIMULATED}:
        return "--simulate"
    if (url := base_url_of(endpoints)) is not None:
        return f"--base-url {url}"
    return "without --simulate and --base-url"
