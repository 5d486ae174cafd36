"""A simulator's memory kept in a folder, so that one started again there continues where the last stopped.

The embedded simulator of ``wanbatch run --simulate`` keeps its state in the
run folder (``DIR/.sim/<region>/``): a resumed simulated batch then finds its
tasks, their results and URLs, the clock and the billing as a resumed real
batch finds the service's, instead of a service that forgot everything.

``state.jsonl`` holds one JSON object per line, appended and flushed before
the answer that depends on it is sent (so a process killed at any instant
leaves no task that a client knows of unrecorded):

- ``{"kind": "meta", ...}``: the URL-signing secret, the port served, the
  clock's speed and an anchor (reading, wall time); the last one counts;
- ``{"kind": "task", ...}``: a task as made, and again whenever a cancel
  moves it; the last line of a task id counts.

The billing log beside it (``billing.jsonl``) says which tasks were billed.
A truncated last line (a kill in the middle of a write) is ignored. Loading
rewrites the file with one line per task, so it does not grow across runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wanbatch import catalog
from wanbatch.atomic import write_atomic
from wanbatch.sim.tasks import Endpoint, GenerationRequest, ImageResult, Task

__all__ = ["BILLING_FILE", "STATE_FILE", "Saved", "SimInUse", "SimStore", "read_lines", "task_from", "task_record"]

STATE_FILE = "state.jsonl"
LOCK_FILE = "lock"  #: held (flock) by the process whose simulator serves the folder
BILLING_FILE = "billing.jsonl"  #: where the embedded simulator's billing log goes, beside its state


@dataclass(slots=True)
class Saved:
    """What a folder held when the simulator started."""

    meta: dict[str, Any] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)  #: in the order they were made


class SimStore:
    """The state file of one simulator in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self._file: IO[str] | None = None
        self._lock: IO[str] | None = None

    def lock(self) -> None:
        """Hold the folder's simulator for this process: a second one would rewrite its file under the first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = (self.directory / LOCK_FILE).open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SimInUse(f"{self.directory}: another process runs this folder's simulator") from None

    def load(self) -> Saved:
        """What the folder holds (nothing for a new one), and the file rewritten to one line per task."""
        saved = Saved()
        records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in read_lines(self.path):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a process killed while writing it
                    continue
                if record.get("kind") == "meta":
                    saved.meta = record
                elif record.get("kind") == "task":
                    records[record["task_id"]] = record
        saved.tasks = [task_from(record) for record in records.values()]
        self._rewrite([saved.meta, *records.values()] if saved.meta else list(records.values()))
        return saved

    def last_meta(self) -> dict[str, Any]:
        """The folder's last meta record (secret, port, speed, clock anchor), without loading its tasks."""
        meta: dict[str, Any] = {}
        if self.path.is_file():
            for line in read_lines(self.path, repair=False):  # read before the lock: another may be writing
                if line.startswith('{"kind": "meta"'):
                    with contextlib.suppress(json.JSONDecodeError):
                        meta = json.loads(line)
        return meta

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; flushed, so it survives the process being killed (not a power cut)."""
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()  # and with it the lock
            self._lock = None

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class SimInUse(RuntimeError):
    """Another process runs the simulator of this folder."""


def read_lines(path: Path, *, repair: bool = True) -> list[str]:
    """The whole lines of a JSON-lines file that a killed process may have left torn: bytes that do not decode
    are replaced (their line then fails to parse and is skipped), and with ``repair`` (only under the folder's
    lock) a last line without its newline is cut off the file, so that the next line starts on a line of its own."""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if repair and len(whole) < len(data):
        with path.open("r+b") as file:
            file.truncate(len(whole))
    return whole.decode("utf-8", "replace").splitlines()


def task_record(task: Task) -> dict[str, Any]:
    """A task as one JSON object."""
    request = task.request
    return {
        "kind": "task",
        "task_id": task.task_id,
        "request_id": task.request_id,
        "account": task.account,
        "key_id": task.key_id,
        "region": task.offer.region,
        "model": task.offer.model.name,
        "endpoint": str(task.endpoint),
        "fingerprint": task.fingerprint,
        "request": None if request is None else {name: getattr(request, name) for name in _REQUEST_FIELDS},
        "submit_s": task.submit_s,
        "duration_s": task.duration_s,
        "images": [[i.index, i.seed, i.ok, i.code, i.message] for i in task.images],
        "url_ttl_s": task.url_ttl_s,
        "start_s": task.start_s,
        "end_s": task.end_s,
        "canceled_s": task.canceled_s,
        "version": task.version,
        "object_keys": list(task.object_keys),
        "neighbour": task.neighbour,
        "sent_s": task.sent_s,
        "listed_s": task.listed_s,
        "echo": task.echo,
    }


def task_from(record: dict[str, Any]) -> Task:
    """The task a :func:`task_record` describes."""
    offer = catalog.offer(record["region"], record["model"])
    if offer is None:
        raise ValueError(f"{record['model']} is not offered in {record['region']} (task {record['task_id']})")
    request = record["request"]
    return Task(
        task_id=record["task_id"],
        request_id=record["request_id"],
        account=record["account"],
        key_id=record["key_id"],
        offer=offer,
        endpoint=Endpoint(record["endpoint"]),
        fingerprint=record["fingerprint"],
        request=None if request is None else GenerationRequest(**request),
        submit_s=record["submit_s"],
        duration_s=record["duration_s"],
        images=tuple(ImageResult(*image) for image in record["images"]),
        url_ttl_s=record["url_ttl_s"],
        start_s=record["start_s"],
        end_s=record["end_s"],
        canceled_s=record["canceled_s"],
        version=record["version"],
        object_keys=tuple(record["object_keys"]),
        neighbour=record.get("neighbour", False),
        sent_s=record.get("sent_s", record["submit_s"]),
        listed_s=record.get("listed_s", record["submit_s"]),
        echo=record.get("echo"),
    )


_REQUEST_FIELDS = ("prompt", "negative_prompt", "width", "height", "n", "seed", "prompt_extend", "watermark")
