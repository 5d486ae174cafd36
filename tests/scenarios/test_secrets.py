"""The API key stays secret: read from the environment, sent only to the service, written nowhere.

A full batch runs as ``wanbatch run`` against a simulator that knows one
extra account whose key is a sentinel made fresh for this module. Then every
byte the run left (each file of the run folder, the ledger's database and its
journal, metadata, report, gallery), everything it printed with ``-vv`` and
with JSON logs, ``wanbatch status``, and a traceback forced out of the engine
are searched for the sentinel. The key also may not travel where it does not
belong: never to a result URL, never over plain HTTP to a host that is not
loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import socket
import subprocess
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from helpers.proc import WANBATCH, cli_env
from helpers.unkind import serving, sim_with
from wanbatch.catalog import Protocol
from wanbatch.cli import main
from wanbatch.errors import ConfigError, WanbatchError
from wanbatch.service.client import WanClient, check_base_url
from wanbatch.sim import AccountConfig, SimHandle

TOKEN = secrets.token_hex(16)
KEY = f"sk-sentinel-{TOKEN}"
SPEED = 100.0
#: The forms the key could leak in: whole, its random part alone, a prefix past any masking, as Basic auth would.
LEAKS = (KEY, TOKEN, TOKEN[:8], base64.b64encode(KEY.encode()).decode())

MANIFEST = """\
name: secrets
defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 2, prompt_extend: true}
prompts:
  - a red fox in fresh snow
  - a grey owl on a branch
  - a heron in a marsh
  - a sim-inappropriate picture
"""


@dataclass
class Seen:
    """What a watching middleware saw of the Authorization header: API keys, and any sent for an image."""

    api_keys: set[str]
    image_auth: list[str]


@contextlib.asynccontextmanager
async def sentinel_sim(*, host: str = "127.0.0.1") -> AsyncIterator[tuple[SimHandle, Seen]]:
    """A simulator that accepts KEY, records the Authorization of every request, on ``host``."""
    seen = Seen(set(), [])

    @web.middleware
    async def watch(request: web.Request, handler) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        if request.path.startswith("/oss/"):
            seen.image_auth += [auth] if auth else []
        elif auth:
            seen.api_keys.add(auth.removeprefix("Bearer "))
        return await handler(request)

    accounts = (AccountConfig(name="sentinel", keys={KEY: "beijing"}),)
    config = {"speed": SPEED, "durations": 1.0, "seed": 11, "image_failure_rate": 0.25, "accounts": accounts}
    async with sim_with([watch], host=host, **config) as sim:
        yield sim, seen


def env_with_key(**extra: str) -> dict[str, str]:
    return cli_env(DASHSCOPE_API_KEY=KEY, **extra)


async def wanbatch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the ``wanbatch`` command as a process; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *WANBATCH,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or env_with_key(),
        cwd=cwd,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def leaks_in(data: bytes | str) -> list[str]:
    text = data if isinstance(data, str) else data.decode("latin-1")
    return [form for form in LEAKS if form in text]


def leaks_in_folder(folder: Path) -> dict[str, list[str]]:
    """Every file under ``folder``, read as raw bytes, that holds a form of the key."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and (hits := leaks_in(path.read_bytes())):
            found[str(path.relative_to(folder))] = hits
    return found


# --- a whole batch with the sentinel -------------------------------------------------------------------


async def test_a_full_batch_leaves_no_trace_of_the_key(tmp_path: Path) -> None:
    """Run, resume with JSON logs and status: the key is in no file of the run, no output, no result-URL request."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    run_dir = tmp_path / "run"
    async with sentinel_sim() as (sim, seen):
        common = ["--out", str(run_dir), "--base-url", sim.base_url, "--speed", f"{SPEED:g}"]
        first = await wanbatch("-vv", "run", str(manifest), *common, cwd=tmp_path)
        again = await wanbatch("-v", "--log-format", "json", "run", str(manifest), *common, cwd=tmp_path)
        status = await wanbatch("status", str(run_dir), "--json", cwd=tmp_path)
        billed = sim.billing
    assert first[0] == 3, first[2][-3000:]  # the moderated prompt is refused; the rest are saved
    assert again[0] == 3 and status[0] == 0, (again[2][-2000:], status[2][-2000:])
    assert seen.api_keys == {KEY}, "the run used another key than the sentinel"
    assert billed and {record["key_id"] for record in billed} == {billed[0]["key_id"]}
    assert list((run_dir / "images").glob("*.png")), "no image was saved: the search below would prove little"
    assert (run_dir / "ledger.sqlite").exists() and (run_dir / "report.json").exists()
    assert not seen.image_auth, "a result URL was sent the Authorization header"
    assert leaks_in_folder(run_dir) == {}
    for _code, stdout, stderr in (first, again, status):
        assert leaks_in(stdout) == [] and leaks_in(stderr) == []
    assert "DataInspectionFailed" in first[1]  # the refusal was reported, and without the key


async def test_a_traceback_from_the_engine_does_not_show_the_key(tmp_path: Path) -> None:
    """A run that dies with a traceback at its end (its metadata.jsonl is a folder) prints no trace of the key."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(MANIFEST.replace("  - a sim-inappropriate picture\n", ""), encoding="utf-8")
    run_dir = tmp_path / "run"
    (run_dir / "metadata.jsonl").mkdir(parents=True)  # the engine's last write fails with IsADirectoryError
    async with sentinel_sim() as (sim, seen):
        code, stdout, stderr = await wanbatch(
            "-vv", "run", str(manifest), "--out", str(run_dir), "--base-url", sim.base_url, "--speed", f"{SPEED:g}"
        )
    assert code not in (0, 2, 3) and "Traceback (most recent call last)" in stderr, (code, stderr[-2000:])
    assert seen.api_keys == {KEY} and sim.billing  # the batch did run with the key before it died
    assert leaks_in(stdout) == [] and leaks_in(stderr) == []
    assert leaks_in_folder(run_dir) == {}


async def _reset(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


async def _html(request: web.Request) -> web.Response:
    return web.Response(status=200, body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")


async def _echo(request: web.Request) -> web.Response:
    """A debugging proxy that echoes the key back, starting ``at`` characters into its answer.

    Placed across the point where an error message clips a body, only a part of the key would be quoted.
    """
    status, at = int(request.match_info["status"]), int(request.match_info["at"])
    key = request.headers["Authorization"].removeprefix("Bearer ")
    if request.match_info["shape"] == "json":  # str() of this dict has the key at 16 + len(padding)
        return web.json_response({"p": "x" * (at - 16), "h": key}, status=status)
    return web.Response(status=status, text="x" * at + key)


#: What answers each kind of failure: a base URL, or a path of the helper server.
FAILURES = {
    "refused": "",
    "reset": "/reset",
    "not-json": "/html",
    "unknown-key": "",
    "echoed-in-a-400": "/echo/400/text/16",
    "echoed-across-a-200-cut": "/echo/200/text/100",  # the body is quoted up to byte 120
    "echoed-across-a-400-cut": "/echo/400/text/180",  # the body is quoted up to character 200
    "echoed-in-json-across-the-cut": "/echo/200/json/180",  # the answer is quoted up to character 200
}


@pytest.mark.parametrize("kind", list(FAILURES))
async def test_client_errors_and_their_tracebacks_do_not_carry_the_key(kind: str) -> None:
    """Refused, reset, unreadable, unauthorised and key-echoing answers raise errors that omit the key."""
    app = web.Application()
    app.router.add_route("*", "/reset/{tail:.*}", _reset)
    app.router.add_route("*", "/html/{tail:.*}", _html)
    app.router.add_route("*", "/echo/{status}/{shape}/{at}/{tail:.*}", _echo)
    async with serving(app) as failing, sentinel_sim() as (sim, _), aiohttp.ClientSession() as session:
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))  # bound but never listening: a connection is refused
            base = {
                "refused": f"http://127.0.0.1:{spare.getsockname()[1]}/api/v1",
                "unknown-key": sim.base_url,
            }.get(kind, failing + FAILURES[kind])
            key = KEY + "-revoked" if kind == "unknown-key" else KEY
            client = WanClient(session, base_url=base, api_key=key)
            assert leaks_in(repr(client)) == []
            with pytest.raises(WanbatchError) as caught:
                await client.create_task({"model": "wan2.2-t2i-flash"}, protocol=Protocol.LEGACY)
    assert leaks_in("".join(traceback.format_exception(caught.value))) == []


def test_there_is_no_option_to_give_the_key_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The key comes from the environment only: no flag would put it in shell history or the process list."""
    for command in (["run", "--help"], ["cancel", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        assert not re.findall(r"--[\w-]*key", capsys.readouterr().out, re.I)


# --- where the key may go --------------------------------------------------------------------------------


def _own_address() -> str | None:
    """This machine's address on its default route, if it has one that is not loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # a UDP "connect" only picks a route: nothing is sent
        address = probe.getsockname()[0]
        return None if address.startswith("127.") else address
    return None


async def test_plain_http_to_a_host_that_is_not_loopback_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """`--base-url http://<this host's LAN address>` (or $DASHSCOPE_HTTP_BASE_URL) exits 2, clearly; nothing arrives."""
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback to listen on")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    async with sentinel_sim(host=address) as (sim, seen):
        by_flag, by_env = await asyncio.gather(
            wanbatch("run", str(manifest), "--out", str(tmp_path / "a"), "--base-url", sim.base_url),
            wanbatch(
                "run",
                str(manifest),
                "--out",
                str(tmp_path / "b"),
                env=env_with_key(DASHSCOPE_HTTP_BASE_URL=sim.base_url),
            ),
        )
        requests = sum(sim.requests.values())
    for code, stdout, stderr in (by_flag, by_env):
        assert code == 2, stderr
        assert "plain HTTP" in stderr and address in stderr and "https://" in stderr, stderr
        assert "Traceback" not in stderr
        assert leaks_in(stdout + stderr) == []
    assert requests == 0 and not seen.api_keys


async def test_plain_http_to_a_name_is_refused(tmp_path: Path) -> None:
    """A plain-HTTP URL naming a host (here one that cannot resolve) is refused by name, exit 2."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    code, stdout, stderr = await wanbatch(
        "run", str(manifest), "--out", str(tmp_path / "run"), "--base-url", "http://dashscope.example.invalid/api/v1"
    )
    assert code == 2 and "plain HTTP" in stderr and "dashscope.example.invalid" in stderr, stderr
    assert leaks_in(stdout + stderr) == []


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://dashscope.aliyuncs.com/api/v1", True),
        ("https://10.0.0.5:8443/api/v1", True),
        ("http://127.0.0.1:8000/api/v1", True),
        ("http://127.9.9.9:8000/api/v1", True),
        ("http://localhost:8000/api/v1", True),
        ("http://[::1]:8000/api/v1", True),
        ("http://dashscope.aliyuncs.com/api/v1", False),
        ("http://10.0.0.5:8000/api/v1", False),
        ("http://0.0.0.0:8000/api/v1", False),
        ("http://127.0.0.1.attacker.example/api/v1", False),
        ("http://localhost.attacker.example/api/v1", False),
        ("http://[::ffff:10.0.0.5]:8000/api/v1", False),
        ("ftp://127.0.0.1/api/v1", False),
        ("dashscope.aliyuncs.com/api/v1", False),
    ],
)
def test_base_urls_that_may_carry_the_key(url: str, allowed: bool) -> None:
    """Only HTTPS, or plain HTTP to a loopback address, may carry the key."""
    if allowed:
        assert check_base_url(url) == url.rstrip("/")
    else:
        with pytest.raises(ConfigError) as caught:
            check_base_url(url)
        assert "http" in str(caught.value)
