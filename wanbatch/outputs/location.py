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

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wanbatch.errors import ConfigError, StoreConfigError, StoreError
from wanbatch.ledger import RunLedger, read_meta
from wanbatch.outputs.stores import LocalStore, Store, StoreConfig, open_store

__all__ = [
    "HERE",
    "MARKER_KEY",
    "OUTPUTS_META",
    "STATE_META",
    "Location",
    "OtherOutputs",
    "before_sending",
    "check_outputs",
    "check_state_marker",
    "default_state_dir",
    "locate",
    "mark_state",
    "record_outputs",
]

#: The ledger's meta key for where the run's outputs are: a store's location, or HERE for the state folder itself.
OUTPUTS_META = "outputs"
HERE = "."
#: The ledger's meta key for the state folder's own id, which the bucket's marker names.
STATE_META = "state_id"
#: The object in a bucket that names the state folder (ledger) of the runs that fill it.
MARKER_KEY = ".wanbatch/state.json"


class OtherOutputs(ConfigError):
    """The state folder belongs to another ``--out``: nothing was sent."""


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

    @property
    def outputs(self) -> str:
        """Where the outputs are, as the state folder records it."""
        return HERE if self.store is None else self.store.location


def check_outputs(where: Location, *, force: bool) -> None:
    """Refuse a state folder made for another ``--out``, unless ``force``: its ledger's saved images are there,
    and this run's ``metadata.jsonl`` would list them beside images that are not."""
    known = read_meta(where.state_dir, OUTPUTS_META)
    if known is None or known == where.outputs or force:
        return
    made_for = f"--out {where.state_dir}" if known == HERE else f"--out {known}"
    raise OtherOutputs(
        f"{where.state_dir} holds the state of a run with {made_for}, not --out {where.out}: its saved images are "
        f"there. Allowed: that --out, another --state, or --force once the outputs have been moved. Nothing was sent."
    )


async def check_state_marker(where: Location, *, force: bool) -> None:
    """Refuse a bucket another state folder fills, unless ``force``: a new state folder for a bucket whose ledger
    is elsewhere (a cleared cache, another machine) knows none of its items and would make and pay for every one
    again. The bucket's marker (:func:`mark_state`) names the state folder that fills it."""
    if where.store is None or force:
        return
    try:
        with before_sending():
            marker = json.loads(await where.store.read(MARKER_KEY))
    except FileNotFoundError:
        return  # a bucket no run has filled yet, or filled before markers
    except ValueError:
        marker = {}
    if marker.get("state") == read_meta(where.state_dir, STATE_META):
        return
    raise OtherOutputs(
        f"{where.out} is filled by the runs of another state folder ({marker.get('state_dir', '?')} on "
        f"{marker.get('host', '?')}), not {where.state_dir}: a new state folder would make and pay for its items "
        f"again. Allowed: --state pointing at that folder, or --force to fill the bucket from this one. "
        f"Nothing was sent."
    )


async def mark_state(ledger: RunLedger, store: Store, state_dir: Path) -> None:
    """Name this state folder in ``store`` (:func:`check_state_marker`), its id kept in the ledger first, so that
    a stop between the two leaves a folder that the next run marks again, never a marker without its folder."""
    state_id = await ledger.meta(STATE_META)
    if state_id is None:
        state_id = uuid.uuid4().hex
        await ledger.set_meta(STATE_META, state_id)
    marker = {"state": state_id, "state_dir": str(Path(state_dir).resolve()), "host": socket.gethostname()}
    with before_sending():
        await store.put_verified(MARKER_KEY, json.dumps(marker).encode())


@contextlib.contextmanager
def before_sending() -> Iterator[None]:
    """A store's failure while a run starts, before anything is sent to the service: a usage error (exit 2) that
    says nothing was sent, a store that is down included (a run that cannot save would pay and lose)."""
    try:
        yield
    except StoreConfigError:
        raise
    except StoreError as exc:
        raise StoreConfigError(f"{exc}; nothing was sent: run again once the store answers") from None


async def record_outputs(ledger: RunLedger, outputs: str) -> None:
    """Keep in the ledger where its run's outputs are (:func:`check_outputs`), under the run's lock."""
    if await ledger.meta(OUTPUTS_META) != outputs:
        await ledger.set_meta(OUTPUTS_META, outputs)


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
