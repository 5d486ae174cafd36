"""The service's HTTP API, spoken through one ``aiohttp.ClientSession``.

This is the one place where aiohttp's exceptions become wanbatch's
(:mod:`wanbatch.errors`). For a create request the mapping decides money:
only the service's own refusal (a 4xx carrying its error code, or a 429)
proves no task was made, and so does a connection that failed before the
request went out. Anything else after sending (a 5xx, which a gateway may
answer after the backend made the task; a reset; a timeout; a body that does
not parse) leaves the outcome unknown, and the caller must reconcile instead
of sending again.

The key travels only in the ``Authorization`` header of requests to the
service's own base URL, never to result URLs, and only over HTTPS or to a
loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from wanbatch import catalog
from wanbatch.catalog import Protocol
from wanbatch.errors import ConfigError, OutcomeUnknown, TransportError, classify_api_error, proves_no_task

__all__ = ["CreateResult", "WanClient", "check_base_url", "is_loopback_host", "keys_from_env"]

LEGACY_CREATE = "services/aigc/text2image/image-synthesis"
ASYNC_CREATE = "services/aigc/image-generation/generation"
SYNC_GENERATE = "services/aigc/multimodal-generation/generation"
#: The largest API answer read (a list page of 100 tasks is about 60 KB); past it, the answer is no answer.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: What a task id looks like (a UUID on the real service): anything else is not used in a URL or the ledger.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash; refuses plain HTTP to anything but loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base URL {url!r} is not an http(s) URL; give e.g. https://dashscope.aliyuncs.com/api/v1")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"refusing to send the API key over plain HTTP to {parts.hostname}: use https://, "
            "or a loopback address (127.0.0.1, localhost, [::1]) for a simulator"
        )
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class CreateResult:
    task_id: str
    request_id: str
    task_status: str


class WanClient:
    """Create, query, list and cancel tasks on one region's endpoint with one key."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        request_timeout_s: float = 60.0,
        sync_timeout_s: float = 330.0,
    ) -> None:
        self._session = session
        self.base_url = check_base_url(base_url)
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._key = api_key
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._sync_timeout = aiohttp.ClientTimeout(total=sync_timeout_s)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session requests go through (result URLs are fetched through it too, without the key)."""
        return self._session

    def __repr__(self) -> str:  # never show the key
        return f"WanClient({self.base_url!r})"

    def _redact(self, text: str) -> str:
        """What a server sends back may quote our request, key included: it never reaches a log or a file."""
        return text.replace(self._key, "sk-***") if self._key else text

    async def create_task(self, body: Mapping[str, Any], *, protocol: Protocol) -> CreateResult:
        """POST a create request. Raises ApiError (no task made), TransportError (not sent) or OutcomeUnknown."""
        path = LEGACY_CREATE if protocol is Protocol.LEGACY else ASYNC_CREATE
        data = await self._send("POST", path, body=body, headers={"X-DashScope-Async": "enable"}, creates=True)
        output = data.get("output")
        task_id = output.get("task_id") if isinstance(output, dict) else None
        if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
            # A task may exist, but this answer does not say which: the list will.
            raise OutcomeUnknown(f"create answered 200 without a usable task id: {_clip(self._redact(str(data)))}")
        status = output.get("task_status")
        return CreateResult(task_id, str(data.get("request_id") or ""), status if isinstance(status, str) else "")

    async def generate_sync(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """wan2.6's synchronous endpoint: one request, held until the images exist."""
        return await self._send("POST", SYNC_GENERATE, body=body, creates=True, timeout=self._sync_timeout)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self._send("GET", f"tasks/{quote(task_id, safe='')}")

    async def list_tasks(self, **params: str | int) -> dict[str, Any]:
        """One page of the account's tasks; params as the service names them (start_time, model_name, ...)."""
        return await self._send("GET", "tasks", params={k: str(v) for k, v in params.items()})

    async def cancel_task(self, task_id: str) -> dict[str, Any]:
        return await self._send("POST", f"tasks/{quote(task_id, safe='')}/cancel")

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        creates: bool = False,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        sent_headers = {**self._auth, **(headers or {})}
        # Anything that goes wrong once the request may have left us makes a create's outcome unknown.
        after_send = OutcomeUnknown if creates else TransportError
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                headers=sent_headers,
                params=params,
                timeout=timeout or self._timeout,
                allow_redirects=False,
            ) as resp:
                raw = await _read_capped(resp.content, MAX_ANSWER_BYTES)
                if raw is None:  # no answer of the API comes near the cap: a broken or hostile server
                    raw = b""
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(f"{method} {path}: could not connect ({exc.os_error or exc})") from None
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise after_send(self._redact(f"{method} {path}: {type(exc).__name__}: {exc}")) from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than any real answer
            # A create's 5xx without the service's JSON error may come from a proxy in front of a
            # service that did act on it; a 4xx without JSON still proves nothing was made.
            if status == 200 or not creates or status != 429:
                body = _clip(self._redact(raw.decode("utf-8", "replace")), 120)
                raise after_send(f"{method} {path}: HTTP {status}, body not JSON: {body!r}") from None
            data = {}
        if creates and status != 200 and not proves_no_task(status, data.get("code")):
            # A gateway can fail after the backend made the task (a 5xx, a proxy's own answer): only the service's
            # own refusal (spec §4: a 4xx with its error code, or a 429) proves that nothing was made.
            code = self._redact(str(data.get("code") or f"HTTP{status}"))
            message = _clip(self._redact(str(data.get("message") or "")))
            raise OutcomeUnknown(f"{method} {path}: HTTP {status} {code}: {message}")
        if status != 200:
            raise classify_api_error(
                status,
                self._redact(str(data.get("code") or f"HTTP{status}")),
                _clip(self._redact(str(data.get("message") or raw.decode("utf-8", "replace")))),
                self._redact(str(data.get("request_id") or "")),
            )
        return data


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The whole body, read to its end (a body arrives in chunks); None past ``cap`` bytes."""
    chunks, size = [], 0
    while chunk := await content.read(min(cap + 1 - size, 1 << 20)):
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return None
    return b"".join(chunks)


def _clip(value: object, limit: int = 200) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def keys_from_env(regions: list[str], environ: Mapping[str, str], *, require: bool = True) -> dict[str, str]:
    """Each region's key: its own variable (DASHSCOPE_API_KEY_SINGAPORE ...) or DASHSCOPE_API_KEY."""
    keys, missing = {}, []
    for region in regions:
        key = environ.get(catalog.REGIONS[region].key_env) or environ.get("DASHSCOPE_API_KEY")
        if key:
            keys[region] = key
        else:
            missing.append(f"{region} ({catalog.REGIONS[region].key_env} or DASHSCOPE_API_KEY)")
    if missing and require:
        raise ConfigError("no API key for " + ", ".join(missing) + "; set it in the environment, or use --simulate")
    return keys
