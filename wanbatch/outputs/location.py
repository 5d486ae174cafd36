"""Where a run lives: its outputs (a folder, or a bucket) and its state (always a folder on this machine).

    locate("runs/x")                           outputs and state in the folder runs/x, as always
    locate("s3://bucket/runs/x")               outputs in the bucket; state in ~/.cache/wanbatch/runs/<name>
    locate("s3://bucket/runs/x", state="st")   outputs in the bucket; state in the folder st

The state is what a run needs to stop and resume: the ledger, the run lock,
the records of the service and manifest it was made with, the embedded
simulator's state. It never goes into a bucket (a ledger wants a file system
that locks and syncs); with a remote ``--out`` it lives in ``--state DIR`` or,
by default, in a folder under the user's cache named after the output
location, so that the same ``--out`` finds the same state again on resume.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from wanbatch.errors import ConfigError
from wanbatch.outputs.stores import LocalStore, Store, StoreConfig, open_store

__all__ = ["Location", "default_state_dir", "locate"]

#: Where default state folders go, under the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``).
STATE_HOME = Path("wanbatch") / "runs"


@dataclass(frozen=True, slots=True)
class Location:
    """A run's two places. ``store`` is None when the outputs are the state folder itself (a local ``--out``)."""

    out: str  #: as the user gave it, for messages and the resume command
    state_dir: Path
    store: Store | None

    @property
    def remote(self) -> bool:
        return self.store is not None


def locate(out: str | Path, *, state: str | Path | None = None, config: StoreConfig | None = None) -> Location:
    """Where ``--out`` (a folder or a bucket URL) and ``--state`` put a run. Nothing is sent yet: a remote store
    is proved with ``store.check()`` before the run sends anything."""
    store = open_store(out, config=config)
    if isinstance(store, LocalStore):
        if state is not None and Path(state).resolve() != store.root.resolve():
            raise ConfigError(
                f"--state {state}: a run with a folder as --out keeps its state in that folder ({out}); "
                f"--state is for an --out in object storage"
            )
        return Location(out=str(out), state_dir=store.root, store=None)
    return Location(
        out=str(out), state_dir=Path(state) if state is not None else default_state_dir(store.location), store=store
    )


def default_state_dir(location: str) -> Path:
    """The state folder of a remote output ``location`` under the user's cache: readable, and unique to it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", location).strip("-")[:80]
    digest = hashlib.sha256(location.encode()).hexdigest()[:10]
    return cache / STATE_HOME / f"{readable}-{digest}"
