"""The three ways of running a batch that the benchmark compares, on the same simulator and quota.

- ``wanbatch``: the engine, as a user runs it: ``wanbatch run MANIFEST --out DIR --base-url URL --speed X``
  in a process of its own; ``wanbatch_frugal`` the same with ``--tracking frugal``.
- ``sdk``: the official ``dashscope`` SDK (2.0.2) used as the vendor's page shows: ``ImageSynthesis.call``
  (``async_call`` then ``wait``), or ``ImageGeneration.async_call`` then ``wait`` for wan2.6, in a thread pool
  sized to the model's concurrency; each image saved with ``requests.get``.
- ``loop``: a plain asyncio loop as the vendor's page suggests: create, then poll each task every 10 s,
  at most ``concurrency`` tasks at a time; each image saved as it comes.

A create answered 429 (or 5xx) is tried again one (simulated) second later by both alternatives: the
vendor's page says to retry later, and a batch that dropped such items would finish early by doing less.
The simulator's clock runs ``speed`` times faster than the wall clock, so every wait an alternative
makes (the SDK's ``wait()`` sleeps among them) is divided by ``speed``, as the engine's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import aiohttp
import yaml

from wanbatch import catalog

from .procs import child_env, reap, spawn

__all__ = ["CONTENDERS", "Job", "Outcome", "run_engine", "run_loop", "run_sdk"]

LOOP_POLL_S = 10.0  #: the vendor page's suggested query interval
RETRY_S = 1.0  #: how long the alternatives wait before sending a refused create again


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A batch: ``count`` one-request items of ``model``, each prompt distinct."""

    model: str  #: canonical name
    count: int
    size: str
    n: int = 1
    tag: str = "bench"
    region: str = "beijing"

    @property
    def offer(self) -> catalog.Offer:
        found = catalog.offer(self.region, self.model)
        if found is None:
            raise ValueError(f"{self.model} is not offered in {self.region}")
        return found

    def prompts(self) -> Iterator[str]:
        for index in range(self.count):
            yield f"{self.tag} {self.model} subject {index}"

    def write_manifest(self, folder: Path) -> Path:
        """The job as a wanbatch manifest: a prompts file of ``count`` lines and the defaults."""
        folder.mkdir(parents=True, exist_ok=True)
        prompts = folder / "prompts.txt"
        prompts.write_text("".join(p + "\n" for p in self.prompts()), encoding="utf-8")
        manifest = {
            "name": self.tag,
            "region": self.region,
            "defaults": {"model": self.model, "size": self.size, "n": self.n, "prompt_extend": False},
            "prompts": [{"file": prompts.name}],
        }
        path = folder / "manifest.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        return path


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What a contender reports of itself; the simulator's statistics say the rest."""

    name: str
    started_mono: float = 0.0  #: time.monotonic() at the start (system-wide: the simulator's watch uses it too)
    wall_s: float = 0.0
    cpu_s: float | None = None
    exit_code: int | None = None
    images_saved: int = 0
    failed: int = 0
    notes: list[str] = field(default_factory=list)


# ── wanbatch ────────────────────────────────────────────────────────────────────────────────────────


def run_engine(job: Job, *, base_url: str, key: str, speed: float, workdir: Path, tracking: str = "prompt") -> Outcome:
    """``wanbatch run`` in a child process; its CPU is read from the child's own resource usage."""
    manifest = job.write_manifest(workdir / "job")
    out = workdir / "run"
    argv = [sys.executable, "-m", "wanbatch", "run", str(manifest), "--out", str(out)]
    argv += ["--base-url", base_url, "--speed", f"{speed:g}", "--tracking", tracking]
    child = reap(spawn(argv, log_path=workdir / "wanbatch.log", env=child_env(key)))
    outcome = Outcome(
        name="wanbatch" if tracking == "prompt" else f"wanbatch_{tracking}",
        started_mono=child.started_mono,
        wall_s=child.wall_s,
        cpu_s=child.cpu_s,
        exit_code=child.returncode,
    )
    outcome.images_saved = sum(1 for _ in (out / "images").rglob("*.png")) if (out / "images").exists() else 0
    if child.returncode != 0:
        outcome.notes.append(f"exit {child.returncode}: {child.log_tail(400)}")
    return outcome


# ── the dashscope SDK ───────────────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def _sdk_on(base_url: str, speed: float) -> Iterator[None]:
    """Point the SDK at the simulator and run its ``wait()`` sleeps on the simulator's clock."""
    import dashscope
    from dashscope.client import base_api

    saved_url, saved_time = dashscope.base_http_api_url, base_api.time
    dashscope.base_http_api_url = base_url
    base_api.time = types.SimpleNamespace(sleep=lambda s: time.sleep(s / speed), time=time.time)
    try:
        yield
    finally:
        dashscope.base_http_api_url, base_api.time = saved_url, saved_time


def _sdk_item(job: Job, prompt: str, *, key: str, speed: float, folder: Path) -> int:
    """One item the way the vendor's sample does it; the number of images saved."""
    import requests
    from dashscope import ImageSynthesis
    from dashscope.aigc.image_generation import ImageGeneration
    from dashscope.common.error import InvalidTask

    params = {"n": job.n, "size": job.size, "prompt_extend": False}
    while True:
        try:
            if job.offer.model.protocol is catalog.Protocol.MULTIMODAL:
                messages = [{"role": "user", "content": [{"text": prompt}]}]
                created = ImageGeneration.async_call(model=job.offer.api_name, messages=messages, api_key=key, **params)
                rsp = ImageGeneration.wait(task=created, api_key=key)
                urls = [part["image"] for c in rsp.output.choices for part in c["message"]["content"]]
            else:
                rsp = ImageSynthesis.call(api_key=key, model=job.offer.api_name, prompt=prompt, **params)
                urls = [result.url for result in rsp.output.results if result.url]
            break
        except InvalidTask:  # the create was refused (429, 5xx): the sample's user tries again later
            time.sleep(RETRY_S / speed)
    saved = 0
    for url in urls:
        name = PurePosixPath(unquote(urlparse(url).path)).parts[-1]
        (folder / name).write_bytes(requests.get(url, timeout=60).content)
        saved += 1
    return saved


def run_sdk(job: Job, *, base_url: str, key: str, speed: float, workdir: Path) -> Outcome:
    """``job`` through the SDK in a pool of ``concurrency`` threads."""
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(name="sdk", started_mono=time.monotonic())
    started, cpu0 = outcome.started_mono, time.process_time()
    with _sdk_on(base_url, speed), ThreadPoolExecutor(max_workers=job.offer.concurrency) as pool:
        futures = [pool.submit(_sdk_item, job, p, key=key, speed=speed, folder=folder) for p in job.prompts()]
        for future in futures:
            try:
                outcome.images_saved += future.result()
            except Exception as exc:  # the sample has no answer for a broken result; count it
                outcome.failed += 1
                if len(outcome.notes) < 3:
                    outcome.notes.append(f"{type(exc).__name__}: {exc}"[:200])
    outcome.wall_s, outcome.cpu_s = time.monotonic() - started, time.process_time() - cpu0
    return outcome


# ── a plain asyncio loop ────────────────────────────────────────────────────────────────────────────


def _body(job: Job, prompt: str) -> tuple[str, dict]:
    parameters = {"n": job.n, "size": job.size, "prompt_extend": False}
    if job.offer.model.protocol is catalog.Protocol.MULTIMODAL:
        body = {"input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]}}
        return "services/aigc/image-generation/generation", {
            "model": job.offer.api_name,
            **body,
            "parameters": parameters,
        }
    body = {"model": job.offer.api_name, "input": {"prompt": prompt}, "parameters": parameters}
    return "services/aigc/text2image/image-synthesis", body


def _urls(output: dict) -> list[str]:
    urls = [r["url"] for r in output.get("results") or [] if r.get("url")]
    for choice in output.get("choices") or []:
        urls += [part["image"] for part in choice["message"]["content"] if part.get("image")]
    return urls


async def _loop_item(
    session: aiohttp.ClientSession, job: Job, prompt: str, *, base_url: str, speed: float, folder: Path
) -> int:
    path, body = _body(job, prompt)
    while True:
        async with session.post(f"{base_url}/{path}", json=body, headers={"X-DashScope-Async": "enable"}) as resp:
            created = await resp.json()
        if resp.status == 200:
            break
        await asyncio.sleep(RETRY_S / speed)
    task_id = created["output"]["task_id"]
    while True:
        await asyncio.sleep(LOOP_POLL_S / speed)
        async with session.get(f"{base_url}/tasks/{task_id}") as resp:
            if resp.status != 200:
                continue
            output = (await resp.json())["output"]
        if output["task_status"] in ("SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"):
            break
    saved = 0
    for url in _urls(output):
        async with session.get(url) as resp:
            data = await resp.read()
        name = PurePosixPath(unquote(urlparse(url).path)).parts[-1]
        await asyncio.to_thread((folder / name).write_bytes, data)
        saved += 1
    return saved


async def _loop(job: Job, *, base_url: str, key: str, speed: float, folder: Path, outcome: Outcome) -> None:
    gate = asyncio.Semaphore(job.offer.concurrency)

    async def one(prompt: str) -> int:
        async with gate:
            return await _loop_item(session, job, prompt, base_url=base_url, speed=speed, folder=folder)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        results = await asyncio.gather(*(one(p) for p in job.prompts()), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            outcome.failed += 1
            if len(outcome.notes) < 3:
                outcome.notes.append(f"{type(result).__name__}: {result}"[:200])
        else:
            outcome.images_saved += result


def run_loop(job: Job, *, base_url: str, key: str, speed: float, workdir: Path) -> Outcome:
    """``job`` through the plain loop."""
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(name="loop", started_mono=time.monotonic())
    started, cpu0 = outcome.started_mono, time.process_time()
    asyncio.run(_loop(job, base_url=base_url, key=key, speed=speed, folder=folder, outcome=outcome))
    outcome.wall_s, outcome.cpu_s = time.monotonic() - started, time.process_time() - cpu0
    return outcome


#: name -> (runner, what the table calls it)
CONTENDERS = {
    "wanbatch": (run_engine, "wanbatch"),
    "wanbatch_frugal": (functools.partial(run_engine, tracking="frugal"), "wanbatch --tracking frugal"),
    "sdk": (run_sdk, "dashscope SDK (a)"),
    "loop": (run_loop, "plain loop (b)"),
}
