"""Driving ``wanbatch sim`` and ``wanbatch run`` as processes.

The chaos, signal and lock tests (and benchmarks/soak.py) use these: the
simulator and each run are real processes, so a run can be killed at any
instant, signalled, or started twice; the simulator's billing log is the
independent record of what was paid, and ``helpers.outputs.audit`` checks the
run folder against it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from helpers.outputs import read_jsonl
from helpers.paths import REPO

__all__ = [
    "WANBATCH",
    "RunProcess",
    "SimProcess",
    "cli_env",
    "read_billing",
    "start_run",
    "start_sim",
    "wait_until",
    "wanbatch_cli",
]

#: The command line under test, in this interpreter.
WANBATCH = (sys.executable, "-m", "wanbatch")
_URL = re.compile(r"wanbatch sim: (http://\S+/api/v1)")
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
    argv = [*WANBATCH, "sim", "--port", "0", "--speed", f"{speed:g}", "--faults", faults]
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
    env: Mapping[str, str] | None = None,
) -> RunProcess:
    """Start ``wanbatch run MANIFEST --out OUT`` against ``sim`` (same speed), or with only ``extra`` flags;
    ``env``: more variables (an accounts file's keys)."""
    argv = [*WANBATCH, "run", str(manifest), "--out", str(out)]
    if sim is not None:
        argv += ["--base-url", sim.base_url, "--speed", f"{sim.speed:g}"]
    argv += list(extra)
    env = cli_env(DASHSCOPE_API_KEY=key, **(env or {}))
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    number = len(list(logs.glob(f"{tag}-*.stderr")))
    stdout_path, stderr_path = logs / f"{tag}-{number}.stdout", logs / f"{tag}-{number}.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
    return RunProcess(proc=proc, stdout_path=stdout_path, stderr_path=stderr_path)


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without its DASHSCOPE settings (a developer's own key or address must never
    reach a test's run), updated by ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE")}, **extra}


def wanbatch_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path = REPO, timeout_s: float = PROCESS_TIMEOUT_S * 2
) -> subprocess.CompletedProcess:
    """``wanbatch ARGS`` run to its end from ``cwd``, its output captured as text, in :func:`cli_env` updated by
    ``env``; it runs this checkout's wanbatch wherever ``cwd`` is."""
    env = cli_env(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([*WANBATCH, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd)


def read_billing(path: Path) -> list[dict[str, Any]]:
    """The simulator's billing log, one record per billed image (none before it is written)."""
    return read_jsonl(path) if path.exists() else []


def wait_until(predicate, *, timeout_s: float = PROCESS_TIMEOUT_S, what: str = "the condition") -> None:
    """Poll ``predicate`` every 20 ms of wall time until it is true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
