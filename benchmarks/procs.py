"""Processes the benchmarks start: the observed simulator and the programs measured against it.

Each measured program runs as a child process and is reaped with ``os.wait4``,
which hands back that child's own resource usage (CPU seconds, peak RSS):
the simulator's work and the benchmark's never count as the engine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Child", "SimServer", "child_env", "reap", "spawn"]

_URL = re.compile(r"wanbatch sim: (http://\S+/api/v1)")
START_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Child:
    """A measured child process; ``wall_s`` and ``rusage`` are filled in by :func:`reap`."""

    proc: subprocess.Popen
    started_mono: float
    log_path: Path
    wall_s: float = 0.0
    returncode: int | None = None
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]


def child_env(key: str | None = None) -> dict[str, str]:
    """The environment for a child: no DASHSCOPE_* of the caller's, ``key`` as the API key if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASHSCOPE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if key:
        env["DASHSCOPE_API_KEY"] = key
    return env


def spawn(argv: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> Child:
    """Start ``argv`` with stdout and stderr into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=REPO)
    return Child(proc=proc, started_mono=started, log_path=log_path)


def reap(child: Child, timeout_s: float | None = None) -> Child:
    """Wait for ``child`` (killing it after ``timeout_s``) and record its exit, wall time, CPU and peak RSS."""
    if child.proc.returncode is not None:  # already reaped by Popen: no usage to read
        child.returncode = child.proc.returncode
        return child
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(child.proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            child.proc.kill()
            pid, status, usage = os.wait4(child.proc.pid, 0)
            break
        time.sleep(0.005)
    child.wall_s = time.monotonic() - child.started_mono
    child.returncode = os.waitstatus_to_exitcode(status)
    child.proc.returncode = child.returncode  # so Popen does not try to reap it again
    child.cpu_s = usage.ru_utime + usage.ru_stime
    child.max_rss_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    return child


class SimServer:
    """``python -m benchmarks.simproc`` on a free loopback port, with its statistics."""

    def __init__(self, workdir: Path, *, speed: float, config: dict[str, Any], seed: int = 0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "sim.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.speed = speed
        self.workdir = workdir
        self._log = workdir / "sim.log"
        argv = [sys.executable, "-m", "benchmarks.simproc", "--port", "0", "--speed", f"{speed:g}"]
        argv += ["--seed", str(seed), "--config", str(config_file)]
        self.child = spawn(argv, log_path=self._log)
        self.base_url = self._wait_for_url()
        self.origin = self.base_url[: -len("/api/v1")]

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (found := _URL.search(self._log.read_text(encoding="utf-8", errors="replace"))):
            if self.child.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not start: {self.child.log_tail()}")
            time.sleep(0.02)
        return found.group(1)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.origin + "/bench/stats", timeout=60) as response:
            return json.loads(response.read())

    def account(self, name: str) -> dict[str, Any]:
        """One account's statistics (empty figures if it sent nothing)."""
        return self.stats()["accounts"].get(name) or {}

    def stop(self) -> None:
        if self.child.returncode is None and self.child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.proc.send_signal(signal.SIGTERM)
        if self.child.returncode is None:
            reap(self.child, timeout_s=10.0)

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
