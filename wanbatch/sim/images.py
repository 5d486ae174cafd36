"""The simulated result images and the signed URLs they are served at.

An image is a real PNG of exactly the requested size, drawn from a digest of
(prompt, image seed, size): flat colour bands and shapes, so that different
prompts and seeds look different at a glance. Flat colours in an 8-bit
palette image make encoding cheap (about 10 ms for 1440*1440); encoded images
are kept in an LRU cache and rendered off the event loop, so serving them is
never what limits a benchmark.

URLs look like the OSS ones the service returns,
``/oss/<bucket>/<yyyymmdd>/<uuid>-<i>.png?Expires=<epoch s>&Signature=<hmac>``,
and the signature covers path and expiry, so a URL cannot be guessed or
have its lifetime extended.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = ["ImageKey", "ImageStore", "render_png"]

WATERMARK_SIZE = (96, 28)


@dataclass(frozen=True, slots=True)
class ImageKey:
    """What an image's pixels depend on."""

    prompt: str
    seed: int
    width: int
    height: int
    watermark: bool


def render_png(key: ImageKey) -> bytes:
    """The PNG for ``key``: deterministic, exactly ``width`` x ``height``."""
    digest = hashlib.sha256(f"{key.prompt}\0{key.seed}\0{key.width}*{key.height}".encode()).digest()
    palette = [channel for i in range(8) for channel in _colour(digest, i)]
    img = Image.new("P", (key.width, key.height), 0)
    img.putpalette([*palette, 255, 255, 255, 20, 20, 20])  # 8: watermark box, 9: its text
    draw = ImageDraw.Draw(img)
    w, h = key.width, key.height
    bands = 2 + digest[24] % 5
    for i in range(bands):  # horizontal bands of varying height
        top = h * i // bands + (digest[25 + i] % max(1, h // (4 * bands)))
        draw.rectangle((0, top, w, top + h // (2 * bands)), fill=1 + (i % 3))
    for i in range(1 + digest[30] % 3):  # a few shapes placed by the digest
        x0, y0 = w * digest[8 + 2 * i] // 256, h * digest[9 + 2 * i] // 256
        x1, y1 = x0 + w * (32 + digest[16 + i] % 96) // 256, y0 + h * (32 + digest[20 + i] % 96) // 256
        shape = draw.ellipse if digest[31] >> i & 1 else draw.rectangle
        shape((x0, y0, x1, y1), fill=4 + i)
    if key.watermark:  # the service's "AI生成" mark, bottom-right
        box_w, box_h = min(WATERMARK_SIZE[0], w), min(WATERMARK_SIZE[1], h)
        draw.rectangle((w - box_w, h - box_h, w - 1, h - 1), fill=8)
        draw.text((w - box_w + 6, h - box_h + 6), "AI", fill=9)
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _colour(digest: bytes, i: int) -> tuple[int, int, int]:
    return digest[i], digest[(i + 11) % 32], digest[(i + 22) % 32]


class ImageStore:
    """Signs and checks result URLs, and renders images through an LRU cache."""

    def __init__(self, *, secret: bytes | None = None, cache_size: int = 512) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._cache: OrderedDict[ImageKey, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._rendering: dict[ImageKey, asyncio.Future[bytes]] = {}

    @property
    def secret(self) -> bytes:
        """The key URLs are signed with (a simulator started again in its state folder signs with the same)."""
        return self._secret

    def signature(self, path: str, expires_s: int) -> str:
        mac = hmac.new(self._secret, f"{path}\n{expires_s}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def url(self, origin: str, path: str, expires_s: int) -> str:
        return f"{origin}{path}?Expires={expires_s}&Signature={self.signature(path, expires_s)}"

    def signature_ok(self, path: str, expires: str, signature: str) -> bool:
        if not expires.isdigit():
            return False
        return hmac.compare_digest(self.signature(path, int(expires)), signature)

    async def png(self, key: ImageKey) -> bytes:
        """The encoded image, rendered once in a worker thread however many ask at the same time."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        pending = self._rendering.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(None, render_png, key)
            self._rendering[key] = pending
            pending.add_done_callback(lambda done: self._finish(key, done))
        # Shielded: a client that hangs up must not cancel a render others wait for.
        return await asyncio.shield(pending)

    def _finish(self, key: ImageKey, done: asyncio.Future[bytes]) -> None:
        del self._rendering[key]
        if done.cancelled() or done.exception() is not None:
            return
        self._cache[key] = done.result()
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
