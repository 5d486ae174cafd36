"""Driving ``wanbatch sim`` and ``wanbatch run`` as processes, and auditing a run folder against the billing log.

The chaos, signal and lock tests (and benchmarks/soak.py) use these: the
simulator and each run are real processes, so a run can be killed at any
instant, signalled, or started twice; the simulator's billing log is the
independent record of what was paid, and :func:`audit` checks the run folder
against it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from wanbatch.errors import HELD_CODES

__all__ = [
    "FINAL_STATES",
    "Audit",
    "RunProcess",
    "SimProcess",
    "audit",
    "count_items",
    "ledger_rows",
    "read_billing",
    "start_run",
    "start_sim",
    "wait_until",
    "write_manifest",
]

_URL = re.compile(r"wanbatch sim: (http://\S+/api/v1)")
#: Item states a run leaves an item in for good (a later run may make a canceled or failed one again).
FINAL_STATES = frozenset({"saved", "rejected", "failed", "expired", "canceled"})
#: How long a process gets to start or stop before the test gives up on it (wall seconds).
PROCESS_TIMEOUT_S = 60.0


@dataclass
class SimProcess:
    """A ``wanbatch sim`` process on a free loopback port, logging billing to ``billing_log``."""

    proc: subprocess.Popen
    base_url: str
    billing_log: Path
    speed: float

    def stop(self) -> int:
        """SIGTERM and wait; the simulator flushes its billing log as it goes, so nothing is lost."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def settle(self, service_s: float) -> None:
        """Let ``service_s`` simulated seconds pass, so tasks still running on the service end and are billed."""
        time.sleep(service_s / self.speed)

    def billing(self) -> list[dict[str, Any]]:
        return read_billing(self.billing_log)


def start_sim(
    workdir: Path, *, speed: float, faults: str = "none", seed: int = 0, config: dict[str, Any] | None = None
) -> SimProcess:
    """Start ``wanbatch sim --port 0`` and read its base URL from the first line it prints."""
    workdir.mkdir(parents=True, exist_ok=True)
    billing_log = workdir / "billing.jsonl"
    argv = [sys.executable, "-m", "wanbatch", "sim", "--port", "0", "--speed", f"{speed:g}", "--faults", faults]
    argv += ["--seed", str(seed), "--billing-log", str(billing_log)]
    if config:
        config_file = workdir / "sim.yaml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        argv += ["--config", str(config_file)]
    stdout_path, stderr_path = workdir / "sim.stdout", workdir / "sim.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not (found := _URL.search(stdout_path.read_text(encoding="utf-8"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"wanbatch sim did not print its URL: {stderr_path.read_text(encoding='utf-8')}")
        time.sleep(0.02)
    return SimProcess(proc=proc, base_url=found.group(1), billing_log=billing_log, speed=speed)


@dataclass
class RunProcess:
    """One ``wanbatch run`` process; its output goes to files next to the run folder."""

    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float = PROCESS_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"wanbatch run did not end in {timeout_s} s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def kill(self) -> int:
        """SIGKILL: the run gets no chance to clean up, as in a power cut or the OOM killer."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(PROCESS_TIMEOUT_S)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def start_run(
    manifest: Path,
    out: Path,
    *,
    sim: SimProcess | None = None,
    extra: tuple[str, ...] = (),
    key: str = "sk-sim-beijing",
    tag: str = "run",
) -> RunProcess:
    """Start ``wanbatch run MANIFEST --out OUT`` against ``sim`` (same speed), or with only ``extra`` flags."""
    argv = [sys.executable, "-m", "wanbatch", "run", str(manifest), "--out", str(out)]
    if sim is not None:
        argv += ["--base-url", sim.base_url, "--speed", f"{sim.speed:g}"]
    argv += list(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE_")}
    env["DASHSCOPE_API_KEY"] = key
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    number = len(list(logs.glob(f"{tag}-*.stderr")))
    stdout_path, stderr_path = logs / f"{tag}-{number}.stdout", logs / f"{tag}-{number}.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
    return RunProcess(proc=proc, stdout_path=stdout_path, stderr_path=stderr_path)


def write_manifest(
    path: Path,
    *,
    count: int,
    models: tuple[str, ...],
    tag: str,
    size: str = "512*512",
    n: int = 1,
    output: str | None = None,
) -> Path:
    """A manifest of ``count`` items of ``n`` images, each a distinct request: the prompt carries its number."""
    per_model = -(-count // len(models))
    prompts = []
    for index in range(count):
        model = models[index % len(models)]
        prompts.append({"prompt": f"{tag} subject {index // len(models)} of {per_model}", "model": model})
    manifest: dict[str, Any] = {"name": tag, "defaults": {"size": size, "n": n, "prompt_extend": False}}
    if output:
        manifest["output"] = output
    manifest["prompts"] = prompts
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def read_billing(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ledger_rows(run_dir: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    """Read the run's ledger directly (read-only), as an outside observer would."""
    conn = sqlite3.connect(f"file:{run_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count_items(run_dir: Path, where: str = "1") -> int:
    """Items of the run folder matching the SQL condition ``where`` (0 before the ledger exists)."""
    if not (run_dir / "ledger.sqlite").exists():
        return 0
    try:
        return ledger_rows(run_dir, f"SELECT count(*) FROM items WHERE {where}")[0][0]
    except sqlite3.OperationalError:  # the run is still creating its tables
        return 0


def wait_until(predicate, *, timeout_s: float = PROCESS_TIMEOUT_S, what: str = "the condition") -> None:
    """Poll ``predicate`` every 20 ms of wall time until it is true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Audit:
    """What the billing log and the run folder say together. Every list empty means nothing lost or paid twice."""

    billed: int = 0
    saved: int = 0
    items: Counter = field(default_factory=Counter)
    duplicates: list[str] = field(default_factory=list)  #: fingerprints billed more than once
    lost: list[str] = field(default_factory=list)  #: billed images not on disk as a valid PNG in metadata.jsonl
    open_items: list[str] = field(default_factory=list)  #: items not in a final state
    unexplained: list[str] = field(default_factory=list)  #: final but not saved, with no reason recorded

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.lost or self.open_items or self.unexplained)

    def summary(self) -> dict[str, Any]:
        return {
            "items": dict(self.items),
            "images_billed": self.billed,
            "images_saved": self.saved,
            "duplicates": len(self.duplicates),
            "lost": len(self.lost),
            "open_items": len(self.open_items),
            "unexplained": len(self.unexplained),
        }


def audit(run_dir: Path, billing: list[dict[str, Any]]) -> Audit:
    """Check every billed image of ours against metadata.jsonl and the disk, and every item against the ledger.

    The simulator's neighbours (other users of the account) are billed too; their records are not ours.
    """
    billing = [record for record in billing if not record.get("neighbour")]
    result = Audit(billed=len(billing))
    tasks = Counter((r["fingerprint"], r["task_id"]) for r in billing)
    per_fingerprint = Counter(fingerprint for fingerprint, _ in tasks)
    result.duplicates = sorted(f for f, count in per_fingerprint.items() if count > 1)
    metadata_file = run_dir / "metadata.jsonl"
    metadata = [json.loads(line) for line in metadata_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    listed = {(m["task_id"], m["image_index"]): m for m in metadata}
    for record in billing:
        key = (record["task_id"], record["image_index"])
        entry = listed.get(key)
        problem = None if entry else "not in metadata.jsonl"
        if entry:
            problem = _png_problem(run_dir / entry["file_name"], entry["size"])
        if problem:
            result.lost.append(f"task {key[0]} image {key[1]}: {problem}")
        else:
            result.saved += 1
    rows = ledger_rows(run_dir, "SELECT item_id, state, error_code, error_message FROM items")
    for row in rows:
        result.items[row["state"]] += 1
        held = row["state"] == "unknown" and row["error_code"] in HELD_CODES  # left for the user, with the evidence
        if row["state"] not in FINAL_STATES and not held:
            result.open_items.append(f"{row['item_id']} {row['state']}")
        elif row["state"] != "saved" and not (row["error_code"] or row["error_message"]):
            result.unexplained.append(f"{row['item_id']} {row['state']}")
    return result


def _png_problem(path: Path, size: str) -> str | None:
    """None when ``path`` is a whole PNG of ``size`` ("W*H"), else what is wrong."""
    if not path.is_file():
        return f"no file {path}"
    width, _, height = size.partition("*")
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.size != (int(width), int(height)):
                return f"{path}: {image.format} {image.size}, expected a PNG of {size}"
            image.verify()
    except Exception as exc:  # Pillow raises many kinds for a broken file
        return f"{path}: not a valid PNG ({exc})"
    return None
