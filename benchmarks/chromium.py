"""A headless Chromium of our own, one tab driven over the DevTools protocol with aiohttp's websocket client.

Shared by the gallery's browser tests and its benchmark. Debian's ``chromium`` (``make test`` installs it);
a fresh profile, no network but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["CHROMIUM", "CHROMIUM_FLAGS", "Page", "first_cards_ms", "open_page"]

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class Page:
    """One tab of a headless Chromium."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws, self._ids = ws, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        async for message in self._ws:
            answer = json.loads(message.data)
            if answer.get("id") == call_id:
                assert "error" not in answer, answer["error"]
                return answer["result"]
        raise AssertionError("the browser closed the DevTools connection")

    async def eval(self, expression: str) -> Any:
        """The value of a script expression (promises awaited), as JSON."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def open(self, url: str, *, timeout_s: float = 10.0) -> None:
        """Load ``url`` afresh (its fragment applied on load, not as a change) and wait for the load event."""
        await self.call("Page.navigate", url="about:blank")
        await self.call("Page.navigate", url=url)
        for _ in range(int(timeout_s / 0.025)):
            if await self.eval(f"document.readyState === 'complete' && location.href === {json.dumps(url)}"):
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{url} did not load")


async def first_cards_ms(page: Page) -> float | None:
    """Milliseconds from navigation to the gallery's first cards in the page (its script marks the moment)."""
    return await page.eval("(performance.getEntriesByName('wanbatch:first-cards')[0] || {startTime: null}).startTime")


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process, log: Path) -> int:
    # With port 0 Chromium picks a free port and writes it to this file in its profile.
    port_file = profile / "DevToolsActivePort"
    for _ in range(600):
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"chromium did not start its DevTools server; its log:\n{log.read_text()[-2000:]}")


@contextlib.asynccontextmanager
async def open_page(scratch: Path) -> AsyncIterator[Page]:
    """A Chromium with its profile and log under ``scratch``, stopped (helpers included) on the way out."""
    assert CHROMIUM is not None, "chromium is not installed (Debian package `chromium`)"
    profile, log = scratch / "chromium-profile", scratch / "chromium.log"
    scratch.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # its own process group, so its helper processes stop with it
        )
    try:
        port = await _devtools_port(profile, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            ws_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()
