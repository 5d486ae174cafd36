"""Fetching a result image: one GET of its URL, with no ``Authorization`` header, no redirect followed, and a cap
on the body's size. Object storage is unkind: a URL that works may first answer 403, 404 or 503; every such
answer is a retryable :class:`DownloadError` (only the deadline says a URL is dead), a redirect or a body over
the cap is not."""

from __future__ import annotations

import re

import aiohttp

from wanbatch.errors import DownloadError

__all__ = ["fetch_body"]


async def fetch_body(
    session: aiohttp.ClientSession, url: str, *, timeout_s: float, max_bytes: int, chunk_bytes: int
) -> bytes:
    """The body at ``url``, up to the size cap; no Wan PNG comes near it, so it is held in memory."""
    chunks, size_bytes = [], 0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                # Object storage answers a URL that works with 403, 404 or 503 now and then: only the
                # deadline says the URL is dead. A redirect is never followed, so trying again is no use.
                body = (await resp.content.read(2048)).decode("utf-8", "replace")
                raise DownloadError(
                    f"HTTP {resp.status} {_oss_message(body)}".rstrip(), retryable=not 300 <= resp.status < 400
                )
            if (resp.content_length or 0) > max_bytes:
                raise DownloadError(f"body of {resp.content_length} bytes is over the cap", retryable=False)
            async for chunk in resp.content.iter_chunked(chunk_bytes):
                size_bytes += len(chunk)
                if size_bytes > max_bytes:
                    raise DownloadError("body is over the size cap", retryable=False)
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        raise DownloadError(f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # a URL that cannot be asked for at all (a host IDNA refuses, say)
        raise DownloadError(f"result URL cannot be fetched: {exc}", retryable=False) from None
    return b"".join(chunks)


def _oss_message(body: str) -> str:
    code = re.search(r"<Code>(.*?)</Code>", body)
    message = re.search(r"<Message>(.*?)</Message>", body)
    return " ".join(m.group(1) for m in (code, message) if m) or body[:120]
