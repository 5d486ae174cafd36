"""Hostile or broken answers from the service and from result URLs do no harm.

The real simulator serves the API; where it has a fault for the case (malformed
JSON, truncated bodies, truncated downloads) the test switches it on. For the
rest, a middleware wrapped around the simulator's own app damages its answers
on the way out (HTML pages instead of JSON, redirects, JSON of the wrong
shape) or rewrites a finished task's result URLs to routes of this module that
serve bad images: the wrong size, not a PNG, too large, a redirect, a
server-chosen file name with ``../`` in it, or a scheme that is not http(s).
Each is refused or retried as fits, the batch runs to its end, and nothing is
written outside the run folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import struct
import textwrap
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from PIL import Image

from helpers.manifest import numbered, write_manifest
from helpers.unkind import Intercept, serving, sim_with
from wanbatch.engine import Engine, EngineConfig
from wanbatch.ledger import Ledger
from wanbatch.ledger.states import ImageState, ItemState
from wanbatch.manifest import Manifest
from wanbatch.sim import SIM_STATE, SimHandle
from wanbatch.stages.download import DownloadConfig
from wanbatch.stages.reconcile import ReconcileConfig

SPEED = 200.0  #: simulated seconds per wall second, for service and engine alike
SIZE = (512, 512)
KEY = "sk-sim-beijing"
TASK_PATH = re.compile(r"^/api/v1/tasks/[^/]+/?$")
CREATE_PATH = re.compile(r"^/api/v1/services/aigc/text2image/image-synthesis/?$")

Middleware = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[Any]]


# --- a simulator with a hostile layer around it -------------------------------------------------------


def hostile_sim(
    *,
    middlewares: Iterable[Middleware] = (),
    routes: Iterable[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = (),
    **config: Any,
) -> contextlib.AbstractAsyncContextManager[SimHandle]:
    """The simulator's app with ``middlewares`` around it and ``routes`` beside it, on a free loopback port."""
    config.setdefault("speed", SPEED)
    config.setdefault("durations", 2.0)
    return sim_with(middlewares, routes=routes, **config)


@contextlib.asynccontextmanager
async def bystander() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """Another loopback server that records every request it gets (a redirect's target)."""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(body=png_bytes(SIZE), content_type="image/png")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    async with serving(app) as root:
        yield root, seen


def png_bytes(size: tuple[int, int], mode: str = "P", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 3).save(out, fmt)
    return out.getvalue()


def hostile_job(directory: Path, prompts: list[str]) -> Path:
    """One image of 512*512 per prompt."""
    return write_manifest(directory, prompts=prompts, name="hostile", size=f"{SIZE[0]}*{SIZE[1]}", seed=7)


async def run_engine(sim: SimHandle, manifest: Path, run_dir: Path, **download: Any) -> dict[str, Any]:
    """Run the engine in-process against ``sim`` on its clock, with ``download`` as DownloadConfig fields."""
    download.setdefault("retry_base_s", 1.0)
    config = EngineConfig(
        base_urls={"beijing": sim.base_url},
        speed=sim.clock.speed,
        request_timeout_s=20.0,
        download=DownloadConfig(**download),
    )
    engine = Engine(run_dir=run_dir, keys={"beijing": KEY}, config=config, clock=sim.clock)
    return await asyncio.wait_for(engine.run(Manifest.from_yaml(manifest)), timeout=10)


def ledger_items(run_dir: Path, clock) -> dict[str, Any]:
    """Each item's row and images, by prompt."""
    with Ledger.open(run_dir, clock=clock, create=False) as ledger:
        rows = list(ledger.iter_items(list(ItemState)))
        return {row.request["prompt"]: (row, ledger.images_of(row.item_id)) for row in rows}


def states(report: dict[str, Any]) -> dict[str, int]:
    """The item counts of this manifest that are not zero."""
    return {state: n for state, n in report["items_in_manifest"].items() if n}


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() or path.is_symlink()}


def assert_billed_once(sim: SimHandle) -> None:
    fingerprints = Counter(record["fingerprint"] for record in sim.billing)
    assert fingerprints and max(fingerprints.values()) == 1, fingerprints


def assert_saved_files_are_inside(run_dir: Path) -> None:
    """Every file metadata.jsonl names is a PNG inside run_dir/images."""
    images = (run_dir / "images").resolve()
    for line in (run_dir / "metadata.jsonl").read_text().splitlines():
        name = json.loads(line)["file_name"]
        path = (run_dir / name).resolve()
        assert path.is_relative_to(images), name
        assert path.read_bytes().startswith(b"\x89PNG"), name


# --- broken API answers -------------------------------------------------------------------------------


async def test_malformed_json_and_truncated_bodies_are_retried_or_reconciled(tmp_path: Path) -> None:
    """Half-sent bodies, cut JSON and cut downloads cost nothing: every image saved, none billed twice."""
    prompts = [f"a red fox, study {i}" for i in range(12)]
    async with hostile_sim(seed=3) as sim:  # its download draws hold no long run of cuts
        sim.set_faults(None, malformed_json=0.25, truncated_body=0.25, truncated_download=0.3)
        report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
        injected = dict(sim.faults_injected)
    for fault in ("malformed_json", "truncated_body", "truncated_download"):
        assert injected.get(fault, 0) >= 2, injected
    assert states(report) == {"saved": len(prompts)}
    assert_billed_once(sim)
    assert len(sim.billing) == len(prompts)
    assert_saved_files_are_inside(tmp_path / "run")


class Damage(Intercept):
    """A middleware that damages chosen API answers, once per task, and counts what it did.

    ``create`` and ``query`` map a word found in the item's prompt to a function that takes the
    answer's JSON and returns the damaged answer (a ``web.Response``). The create request runs first,
    so a damaged create answer hides a task that exists; a query is damaged on the first answer that
    says SUCCEEDED, so the next poll reads the task as it is.
    """

    def __init__(
        self,
        *,
        create: dict[str, Callable[[dict], web.Response]] | None = None,
        query: dict[str, Callable[[dict], web.Response]] | None = None,
    ) -> None:
        super().__init__()
        self.create, self.query = create or {}, query or {}
        self.prompt_of: dict[str, str] = {}  #: task id -> prompt, from the creates seen
        self.done: Counter[str] = Counter()
        self._damaged: set[str] = set()

    async def _handle(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method == "POST" and CREATE_PATH.match(request.path):
            prompt = (await request.json())["input"]["prompt"]  # aiohttp keeps the body for the handler
            response = await handler(request)
            body = _json_of(response)
            if body is None or "output" not in body:
                return response
            self.prompt_of[body["output"]["task_id"]] = prompt
            return self._damage(self.create, prompt, body, "create:" + prompt) or response
        response = await handler(request)
        if request.method != "GET" or not TASK_PATH.match(request.path):
            return response
        body = _json_of(response)
        if body is None or body.get("output", {}).get("task_status") != "SUCCEEDED":
            return response
        prompt = self.prompt_of.get(body["output"]["task_id"], "")
        return self._damage(self.query, prompt, body, "query:" + prompt) or response

    def _damage(self, table: dict, prompt: str, body: dict, once: str) -> web.Response | None:
        for word, damage in table.items():
            if word in prompt and once not in self._damaged:
                self._damaged.add(once)
                self.done[word] += 1
                return damage(body)
        return None


def _json_of(response: web.StreamResponse) -> dict | None:
    """The JSON of a whole answer the simulator made; None for streamed or faulted ones."""
    if type(response) is not web.Response or response.status != 200 or not response.body:
        return None
    return json.loads(response.body)


def _raw(status: int, payload: bytes, content_type: str = "application/json") -> web.Response:
    return web.Response(status=status, body=payload, headers={"Content-Type": content_type})


def _with(change: Callable[[dict], Any]) -> Callable[[dict], web.Response]:
    """Damage that edits the JSON in place and sends it back as JSON."""

    def damage(body: dict) -> web.Response:
        change(body)
        return _raw(200, json.dumps(body).encode())

    return damage


_HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


async def test_html_pages_and_wrong_content_types_are_read_as_no_answer(tmp_path: Path) -> None:
    """A proxy's HTML page instead of JSON (200 or 502, after the task was made) is reconciled or polled again."""
    damage = Damage(
        create={
            "gateway-502": lambda body: _raw(502, _HTML, "text/html"),
            "gateway-200": lambda body: _raw(200, _HTML, "text/html"),
            "json-as-text": lambda body: _raw(200, json.dumps(body).encode(), "text/plain"),
        },
        query={
            "gateway-502": lambda body: _raw(502, _HTML, "text/html"),
            "gateway-200": lambda body: _raw(200, _HTML, "text/html"),
            "json-as-text": lambda body: _raw(200, json.dumps(body).encode(), "text/html"),
        },
    )
    prompts = [f"a heron {word}" for word in ("gateway-502", "gateway-200", "json-as-text", "untouched")]
    async with hostile_sim(middlewares=[damage.middleware]) as sim:
        report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
    assert damage.done == {"gateway-502": 2, "gateway-200": 2, "json-as-text": 2}
    assert states(report) == {"saved": len(prompts)}
    assert report["reconciled_adopted"] >= 2  # the two HTML creates hid tasks that exist
    assert_billed_once(sim)
    assert_saved_files_are_inside(tmp_path / "run")


_DEEP = b"[" * 200_000 + b"]" * 200_000


def case(word: str, damage: Callable[[dict], web.Response]):
    """One kind of damage, named by the word that picks it."""
    return pytest.param(word, damage, id=word)


@pytest.mark.parametrize(
    ("word", "damage"),
    [
        case("deep-json", lambda body: _raw(200, _DEEP)),
        case("not-utf8", lambda body: _raw(200, b'{"output": "\xff\xfe"}')),
        case("body-list", lambda body: _raw(200, json.dumps([body]).encode())),
        case("output-null", _with(lambda body: body.update(output=None))),
        case("output-list", _with(lambda body: body.update(output=[body["output"]]))),
        case("output-text", _with(lambda body: body.update(output="SUCCEEDED"))),
        case("status-number", _with(lambda body: body["output"].update(task_status=7))),
        case("results-text", _with(lambda body: body["output"].update(results="http://127.0.0.1/x.png"))),
        case("results-null", _with(lambda body: body["output"].update(results=None))),
        case("result-text", _with(lambda body: body["output"].update(results=["http://127.0.0.1/x.png"]))),
        case("url-number", _with(lambda body: body["output"]["results"][0].update(url=12345))),
        case("times-garbage", _with(lambda body: body["output"].update(end_time="yesterday", scheduled_time=[]))),
        case("status-list", _with(lambda body: body["output"].update(task_status=[]))),
        case("orig-prompt-list", _with(lambda body: body["output"]["results"][0].update(orig_prompt=["x"]))),
        case("actual-prompt-object", _with(lambda body: body["output"]["results"][0].update(actual_prompt={"a": 1}))),
        case("message-object", _with(lambda body: body["output"]["results"][0].update(code=["x"], message={}))),
        case("expires-infinite", _with(lambda body: _garble_expires(body, "1e400"))),
        case("expires-huge", _with(lambda body: _garble_expires(body, "1" + "0" * 30))),
        case("request-id-object", _with(lambda body: body.update(request_id={"id": 1}))),
    ],
)
async def test_query_answer_of_the_wrong_shape_is_asked_again(tmp_path: Path, word: str, damage) -> None:
    """A SUCCEEDED answer that cannot be read as one does not crash the batch; asking again saves the images."""
    prompts = [f"an owl {word}", "an owl untouched"]
    spy = Damage(query={word: damage})
    async with hostile_sim(middlewares=[spy.middleware]) as sim:
        report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
    assert spy.done == {word: 1}
    assert states(report) == {"saved": len(prompts)}
    assert_billed_once(sim)


def _garble_expires(body: dict, value: str) -> None:
    """A result URL whose first Expires is ``value``; the real one follows, which the simulator does not read."""
    result = body["output"]["results"][0]
    path, _, query = result["url"].partition("?")
    result["url"] = f"{path}?Expires={value}&{query}"


async def test_a_garbled_orig_prompt_does_not_end_the_batch_while_an_outcome_is_reconciled(tmp_path: Path) -> None:
    """A create whose answer was lost is reconciled through the task list while the task's query answer holds an
    orig_prompt that is a list: the batch runs to its end and the task is adopted once the answer reads again."""
    garbled = Damage(
        create={"lost": lambda body: _raw(502, _HTML, "text/html")},
        query={"lost": _with(lambda body: body["output"]["results"][0].update(orig_prompt=[["lost"]]))},
    )
    prompts = ["a newt lost", "a newt kept"]
    async with hostile_sim(middlewares=[garbled.middleware]) as sim:
        report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
    assert garbled.done == {"lost": 2}
    assert states(report) == {"saved": len(prompts)}
    assert_billed_once(sim)


_LIST_DAMAGE = (
    lambda entry: entry.update(start_time=10**400),  # overflows a float
    lambda entry: entry.update(gmt_create=True),
    lambda entry: entry.update(status=[]),
    lambda entry: entry.update(start_time=float("inf")),  # sent as Infinity, which JSON readers accept
    lambda entry: entry.update(status="PENDING", start_time=None),  # a page older than what was seen
    lambda entry: entry.update(start_time=4 * 10**12, gmt_create=1),  # started a century after it was made
)


async def test_task_list_entries_of_the_wrong_shape_put_no_task_out_of_reach(tmp_path: Path) -> None:
    """Every page of the task list damaged, entry by entry: times that overflow, are infinite, booleans or a
    century off, statuses that are not text, a task shown queued again. The tracker neither crashes nor puts
    a look out of reach: the batch ends in time, every image saved, each paid once."""
    pages = Counter()

    @web.middleware
    async def damage_lists(request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        body = _json_of(response) if request.path.rstrip("/") == "/api/v1/tasks" else None
        if body is None or not body.get("data"):
            return response
        for index, entry in enumerate(body["data"]):
            _LIST_DAMAGE[(index + pages["damaged"]) % len(_LIST_DAMAGE)](entry)
        pages["damaged"] += 1
        return _raw(200, json.dumps(body).encode())

    manifest = write_manifest(
        tmp_path, prompts=numbered(10, "a kite"), name="lists", model="wan2.6-t2i", size="1280*1280"
    )
    async with hostile_sim(middlewares=[damage_lists], durations=40.0) as sim:
        report = await run_engine(sim, manifest, tmp_path / "run")
    assert pages["damaged"] >= 1
    assert states(report) == {"saved": 10}
    assert_billed_once(sim)


@pytest.mark.parametrize(
    ("word", "damage"),
    [
        case("deep-json", lambda body: _raw(200, _DEEP)),
        case("body-list", lambda body: _raw(200, json.dumps([body]).encode())),
        case("output-list", _with(lambda body: body.update(output=[body["output"]]))),
        case("task-id-list", _with(lambda body: body["output"].update(task_id=[body["output"]["task_id"]]))),
        case("task-id-number", _with(lambda body: body["output"].update(task_id=12345))),
        case("task-id-traversal", _with(lambda body: body["output"].update(task_id="../../services/x"))),
    ],
)
async def test_create_answer_of_the_wrong_shape_is_reconciled(tmp_path: Path, word: str, damage) -> None:
    """A create answer that cannot be read leaves the outcome unknown: the task that exists is adopted, paid once."""
    prompts = [f"a lynx {word}", "a lynx untouched"]
    spy = Damage(create={word: damage})
    async with hostile_sim(middlewares=[spy.middleware]) as sim:
        report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
    assert spy.done == {word: 1}
    assert states(report) == {"saved": len(prompts)}
    assert len(sim.billing) == len(prompts)
    assert_billed_once(sim)


# --- hostile result URLs --------------------------------------------------------------------------------

CAP_BYTES = 256 * 1024  #: the download cap these tests give the engine
TOKEN = secrets.token_hex(6)  #: in every name a hostile server proposes, to find such files anywhere


class BadImages:
    """Routes that serve bad images, and a middleware sending each item's result URL to one of them.

    The word in an item's prompt picks the route; ``hits`` counts the requests each route got.
    """

    def __init__(self, real_base: Callable[[], str], elsewhere: str) -> None:
        self._base, self._elsewhere = real_base, elsewhere
        self.hits: Counter[str] = Counter()
        self.flaky_left = 2

        @web.middleware
        async def middleware(request: web.Request, handler) -> web.StreamResponse:
            response = await handler(request)
            body = _json_of(response) if request.method == "GET" and TASK_PATH.match(request.path) else None
            if body is None or body["output"].get("task_status") != "SUCCEEDED":
                return response
            expires_s = int(request.app[SIM_STATE].clock.now() + SHORT_URL_LIFE_S)
            for result in body["output"]["results"]:
                result["url"] = self.url_for(result["orig_prompt"], result["url"], expires_s)
            return _raw(200, json.dumps(body).encode())

        self.middleware = middleware

    def url_for(self, prompt: str, real_url: str, expires_s: int) -> str:
        word = prompt.rsplit(" ", 1)[-1]
        origin = self._base().removesuffix("/api/v1")
        schemes = {
            "file-scheme": "file:///etc/passwd",
            "ftp-scheme": f"ftp://127.0.0.1/{TOKEN}.png",
            "data-scheme": "data:image/png;base64,iVBORw0KGgo=",
            "no-scheme": f"//127.0.0.1/{TOKEN}.png",
        }
        if word in schemes:
            return schemes[word]
        if word == "untouched":
            return real_url
        # The real URL rides along, for the routes that end up serving the real image; a short life, so that
        # the bodies retried until the URL's deadline meet it soon.
        query = f"real={quote(real_url, safe='')}&Expires={expires_s}"
        return f"{origin}/hostile/{word}/..%2F..%2F..%2F..%2Fescape-{TOKEN}.png?{query}"

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        return [("GET", "/hostile/{word}/{name}", self.serve)]

    async def serve(self, request: web.Request) -> web.StreamResponse:
        word = request.match_info["word"]
        self.hits[word] += 1
        real = request.query["real"]
        good = png_bytes(SIZE)
        if word == "wrong-size":
            return _raw(200, png_bytes((64, 64)), "image/png")
        if word == "jpeg":
            return _raw(200, png_bytes(SIZE, mode="RGB", fmt="JPEG"), "image/png")
        if word == "html":
            return _raw(200, _HTML, "text/html")
        if word == "png-cut":
            return _raw(200, good[: len(good) // 2], "image/png")
        if word == "png-bomb":
            return _raw(200, _png_header(60_000, 60_000), "image/png")
        if word == "oversized":
            return await _endless(request, declared=None)
        if word == "oversized-declared":
            return await _endless(request, declared=10 * CAP_BYTES)
        if word in ("redirect", "redirect-permanent"):
            raise (web.HTTPFound if word == "redirect" else web.HTTPPermanentRedirect)(location=real)
        if word == "redirect-elsewhere":
            raise web.HTTPTemporaryRedirect(location=f"{self._elsewhere}/{TOKEN}.png")
        if word == "redirect-file":
            raise web.HTTPFound(location="file:///etc/passwd")
        if word == "server-names-it":
            headers = {
                "Content-Type": "image/png",
                "Content-Disposition": f'attachment; filename="../../../../escape-{TOKEN}.png"',
            }
            return web.Response(body=good, headers=headers)
        if word == "flaky":
            if self.flaky_left:
                self.flaky_left -= 1
                return _raw(200, _HTML, "text/html")
            return _raw(200, good, "image/png")
        raise AssertionError(f"no hostile route {word!r}")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none: decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


async def _endless(request: web.Request, *, declared: int | None) -> web.StreamResponse:
    """A PNG signature, then zeros past the cap (stops once the client hangs up)."""
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    if declared is not None:
        response.content_length = declared
    await response.prepare(request)
    await response.write(b"\x89PNG\r\n\x1a\n")
    with contextlib.suppress(ConnectionError):
        for _ in range(4 * CAP_BYTES // 65536):
            await response.write(bytes(65536))
    return response


SHORT_URL_LIFE_S = 300.0  #: how long the URLs of the hostile routes say they live

#: How each hostile URL's image ends: saved; expired (a body that is not the image is tried again until the
#: URL's deadline); or pending (refused for good in this run: over the cap, a redirect, not http(s)).
BAD_URLS = {
    "untouched": "saved",
    "server-names-it": "saved",  # a real PNG, offered under a name with ../ in it
    "flaky": "saved",  # two HTML pages, then the image
    "wrong-size": "pending",
    "jpeg": "expired",
    "html": "expired",
    "png-cut": "expired",
    "png-bomb": "expired",
    "oversized": "pending",
    "oversized-declared": "pending",
    "redirect": "pending",
    "redirect-permanent": "pending",
    "redirect-elsewhere": "pending",
    "redirect-file": "pending",
    "file-scheme": "pending",
    "ftp-scheme": "pending",
    "data-scheme": "pending",
    "no-scheme": "pending",
}
_ITEM_ENDS = {"saved": ItemState.saved, "expired": ItemState.expired, "pending": ItemState.generated}


async def test_bad_result_urls_are_refused_and_nothing_is_written_outside_the_run(tmp_path: Path) -> None:
    """Wrong size, not a PNG, too large, redirected, odd schemes, server-chosen names: retried until the URL's
    deadline or refused for good, and contained."""
    run_dir = tmp_path / "a" / "b" / "c" / "run"  # deep enough that ../../../../ from images/ stays in tmp_path
    prompts = [f"a wolf {word}" for word in BAD_URLS]
    before = files_under(tmp_path) | {hostile_job(tmp_path, prompts)}
    handle: list[SimHandle] = []
    async with bystander() as (elsewhere, seen):
        bad = BadImages(lambda: handle[0].base_url, elsewhere)
        async with hostile_sim(middlewares=[bad.middleware], routes=bad.routes()) as sim:
            handle.append(sim)
            report = await run_engine(sim, tmp_path / "job.yaml", run_dir, max_bytes=CAP_BYTES, retry_max_s=30.0)
    items = ledger_items(run_dir, sim.clock)
    for word, end in BAD_URLS.items():
        row, images = items[f"a wolf {word}"]
        assert row.state is _ITEM_ENDS[end], (word, row.state)
        if end == "pending":  # paid for, kept pending with the reason while its URL lives, for a later run
            assert images[0].state is ImageState.pending and images[0].error_code == "DownloadFailed", word
            assert word.endswith("scheme") or bad.hits[word] == 1, (word, bad.hits)  # not asked twice
        elif end == "expired":  # tried again and again, written off only at the deadline
            assert images[0].error_code == "UrlExpired" and bad.hits[word] > 2, (word, bad.hits)
    assert report["images"]["saved"] == 3
    unsaved = {entry["item_id"]: entry["error"] for entry in report["images_not_saved_yet"]}
    assert len(unsaved) == list(BAD_URLS.values()).count("pending") and all(unsaved.values()), unsaved
    assert sim.requests["image"] == 1  # only the untouched URL reached the real images; no redirect was followed
    assert not seen
    # Nothing outside the run folder, nothing under a name the server chose, nothing over the cap.
    created = files_under(tmp_path) - before
    assert created and all(path.is_relative_to(run_dir) for path in created), sorted(created - set(run_dir.rglob("*")))
    assert not [path for path in created if TOKEN in path.name]
    assert all(path.stat().st_size <= CAP_BYTES + DownloadConfig().chunk_bytes for path in created)
    assert_saved_files_are_inside(run_dir)


async def test_names_from_prompts_and_variables_stay_inside_images(tmp_path: Path) -> None:
    """An output pattern filled with ../, absolute paths, backslashes and odd bytes still writes inside images/."""
    run_dir = tmp_path / "a" / "b" / "c" / "run"
    hostile = [
        f"../../../../escape-{TOKEN}",
        f"..\\\\..\\\\..\\\\..\\\\win-{TOKEN}",
        f"/tmp/abs-{TOKEN}",
        "..",
        "~",
        f"nul\\0byte-{TOKEN}",
        f"C:\\\\Windows\\\\drive-{TOKEN}",
        f"{'x' * 300}-{TOKEN}",
    ]
    values = ", ".join(f'"{value}"' for value in hostile)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            name: names
            defaults: {{model: wan2.2-t2i-flash, size: "{SIZE[0]}*{SIZE[1]}", n: 1, prompt_extend: false, seed: 3}}
            output: "{{place}}/{{place}}-{{index}}.png"
            prompts:
              - prompt: "a marten near {{place}}"
                matrix: {{place: [{values}]}}
            """
        ),
        encoding="utf-8",
    )
    before = files_under(tmp_path)
    async with hostile_sim() as sim:
        report = await run_engine(sim, manifest, run_dir)
    assert states(report) == {"saved": len(hostile)}
    created = files_under(tmp_path) - before
    assert all(path.is_relative_to(run_dir) for path in created), sorted(map(str, created))
    assert not Path(f"/tmp/abs-{TOKEN}").exists()
    saved = [path for path in created if path.suffix == ".png"]
    assert len(saved) == len(hostile)
    assert all(path.is_relative_to(run_dir / "images") and ".." not in path.parts for path in saved)
    assert_saved_files_are_inside(run_dir)


async def test_api_redirects_are_not_followed_and_the_key_stays_home(tmp_path: Path) -> None:
    """A create or query answered with a redirect elsewhere is not followed: the other host never sees the key."""
    redirected: Counter[str] = Counter()

    async with bystander() as (elsewhere, seen):

        @web.middleware
        async def redirect_first(request: web.Request, handler) -> web.StreamResponse:
            kind = "create" if CREATE_PATH.match(request.path) else "query" if TASK_PATH.match(request.path) else ""
            if kind and not redirected[kind]:
                redirected[kind] += 1
                raise web.HTTPTemporaryRedirect(location=f"{elsewhere}/api/v1/{kind}")
            return await handler(request)

        prompts = ["a stoat in snow", "a stoat on a wall", "a stoat in grass"]
        async with hostile_sim(middlewares=[redirect_first]) as sim:
            report = await run_engine(sim, hostile_job(tmp_path, prompts), tmp_path / "run")
        assert redirected == {"create": 1, "query": 1}
        assert not seen  # neither the request nor its Authorization header went to the other host
    items = ledger_items(tmp_path / "run", sim.clock)
    outcomes = Counter(row.state for row, _ in items.values())
    # The redirected create made no task: refused with its status (or sent again); the rest saved.
    assert outcomes[ItemState.saved] >= len(prompts) - 1 and sum(outcomes.values()) == len(prompts), outcomes
    refused = [row for row, _ in items.values() if row.state is not ItemState.saved]
    assert all(row.state is ItemState.rejected and "307" in (row.error_code or "") for row in refused), refused
    assert_billed_once(sim)
    assert states(report).get("saved", 0) == outcomes[ItemState.saved]


@web.middleware
async def in_pieces(request: web.Request, handler) -> web.StreamResponse:
    """Every API answer sent in small pieces, a pause between them, as a slow gateway may."""
    response = await handler(request)
    body = _json_of(response) if request.path.startswith("/api/v1/") else None
    if body is None:
        return response
    payload = json.dumps(body).encode()
    streamed = web.StreamResponse(status=response.status, headers={"Content-Type": "application/json"})
    await streamed.prepare(request)
    for start in range(0, len(payload), 40):
        await streamed.write(payload[start : start + 40])
        await asyncio.sleep(0.002)
    await streamed.write_eof()
    return streamed


async def test_answers_that_arrive_in_pieces_are_read_whole(tmp_path: Path) -> None:
    """Every answer of the service comes in 40-byte pieces: each is read to its end, so creates, queries and
    lists are understood and the batch saves every image, each paid once."""
    async with hostile_sim(middlewares=[in_pieces]) as sim:
        report = await run_engine(sim, hostile_job(tmp_path, ["a quill", "an inkwell"]), tmp_path / "run")
    assert states(report) == {"saved": 2} and report["reconciled_adopted"] == 0
    assert_billed_once(sim)


async def test_a_list_whose_row_for_our_task_is_unreadable_proves_nothing(tmp_path: Path) -> None:
    """A create's answer is lost after its task was made, and the task list gives that task's row a creation
    time that is not a number: the list is not read as proof that no task exists, so the item is never sent
    again; it is held for the user once its time to decide has passed."""
    lost = Damage(create={"lost": lambda body: _raw(502, _HTML, "text/html")})

    @web.middleware
    async def unreadable_rows(request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        body = _json_of(response)
        if request.path.rstrip("/").endswith("/tasks") and body is not None:
            for row in body.get("data") or ():
                row["gmt_create"] = float(row["gmt_create"])
            return _raw(200, json.dumps(body).encode())
        return response

    async with hostile_sim(middlewares=[lost.middleware, unreadable_rows]) as sim:
        config = EngineConfig(
            base_urls={"beijing": sim.base_url},
            speed=sim.clock.speed,
            reconcile=ReconcileConfig(request_window_s=20.0, list_lag_s=5.0, retry_s=2.0, undecided_max_s=60.0),
        )
        engine = Engine(run_dir=tmp_path / "run", keys={"beijing": KEY}, config=config, clock=sim.clock)
        manifest = Manifest.from_yaml(hostile_job(tmp_path, ["a lost lantern"]))
        report = await asyncio.wait_for(engine.run(manifest), timeout=20)
    assert lost.done == {"lost": 1} and sim.requests["create"] == 1
    assert report["reconciled_resent"] == 0 and report["failures"]["HeldUndecided"]["count"] == 1
