"""Result images: real PNGs of the requested size at signed URLs that die with their lifetime (§7)."""

from __future__ import annotations

import asyncio
import io
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from wanbatch.sim.images import ImageKey, ImageStore, render_png


async def result_urls(sim_api, task_id: str) -> list[str]:
    body = await sim_api.query_full(task_id)
    output = body["output"]
    if "results" in output:
        return [r["url"] for r in output["results"] if "url" in r]
    return [c["image"] for choice in output["choices"] for c in choice["message"]["content"]]


async def download(sim_http, url: str) -> tuple[int, bytes, str]:
    async with sim_http.get(url) as response:
        return response.status, await response.read(), response.content_type


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_images_are_pngs_of_the_requested_size(start_sim, sim_api_for, sim_http):
    """Each URL serves a complete PNG of exactly the requested width and height, for both protocols."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    for model, size in (
        ("wan2.2-t2i-flash", "512*1440"),
        ("wan2.5-t2i-preview", "768*2700"),
        ("wan2.6-t2i", "1600*1280"),
    ):
        urls = await result_urls(api, await api.task_id(model, size=size, n=2))
        assert len(urls) == 2
        for url in urls:
            status, data, content_type = await download(sim_http, url)
            assert (status, content_type) == (200, "image/png")
            image = decode(data)
            assert image.format == "PNG"
            assert f"{image.width}*{image.height}" == size
    assert sim.requests["image"] == 6


async def test_images_deterministic_and_distinct(start_sim, sim_api_for, sim_http):
    """The same (prompt, seed) gives the same pixels; another prompt or seed gives visibly different ones."""
    sim = await start_sim(durations=0, quotas={"*": {"submit_rps": None}})
    api = sim_api_for(sim)

    async def pixels(prompt: str, seed: int, n: int = 1) -> list[bytes]:
        urls = await result_urls(api, await api.task_id("wan2.2-t2i-flash", prompt, seed=seed, n=n, size="512*512"))
        return [decode((await download(sim_http, u))[1]).convert("RGB").tobytes() for u in urls]

    base = (await pixels("a cat", 1))[0]
    assert (await pixels("a cat", 1))[0] == base
    assert (await pixels("a dog", 1))[0] != base
    second, third = await pixels("a cat", 1, n=2)
    assert second == base and third != base  # image i uses seed + i
    assert (await pixels("a cat", 2))[0] == third


def test_render_varies_and_marks_watermark():
    """Rendering differs across many prompts and seeds, and a watermark changes the bottom-right corner."""
    renders = {render_png(ImageKey(f"p{i}", i, 256, 256, False)) for i in range(30)}
    assert len(renders) == 30
    plain = decode(render_png(ImageKey("x", 1, 600, 400, False))).convert("RGB")
    marked = decode(render_png(ImageKey("x", 1, 600, 400, True))).convert("RGB")
    assert plain.crop((0, 0, 400, 300)).tobytes() == marked.crop((0, 0, 400, 300)).tobytes()
    assert plain.crop((550, 380, 600, 400)).tobytes() != marked.crop((550, 380, 600, 400)).tobytes()


async def test_render_cache_serves_concurrent_requests_once():
    """Concurrent requests for one image render it once; the cache keeps it and evicts the least recent."""
    store = ImageStore(cache_size=2)
    key = ImageKey("a", 1, 640, 640, False)
    results = await asyncio.gather(*(store.png(key) for _ in range(5)))
    assert len({id(r) for r in results}) == 1
    await store.png(ImageKey("b", 1, 64, 64, False))
    await store.png(ImageKey("c", 1, 64, 64, False))
    assert key not in store._cache


async def test_url_expires_after_its_lifetime(start_sim, sim_api_for, sim_http):
    """24 simulated hours after the task ends its URL answers 403 with OSS's XML "Request has expired."."""
    sim = await start_sim(durations=10, duration_spread=0)
    api = sim_api_for(sim)
    task_id = await api.task_id(n=1)
    sim.advance(10)
    (url,) = await result_urls(api, task_id)
    assert int(parse_qs(urlsplit(url).query)["Expires"][0]) == int(sim.tasks[task_id].end_s + 86400)
    sim.advance(86400 - 5)
    assert (await download(sim_http, url))[0] == 200
    sim.advance(10)
    status, data, content_type = await download(sim_http, url)
    assert (status, content_type) == (403, "application/xml")
    text = data.decode()
    assert (
        "<Error>" in text and "<Code>AccessDenied</Code>" in text and "<Message>Request has expired.</Message>" in text
    )


async def test_url_lifetime_configurable(start_sim, sim_api_for, sim_http):
    """``url_ttl_s`` sets how long URLs work (e.g. the 7 days seen for other models)."""
    sim = await start_sim(durations=0, url_ttl_s=7 * 86400)
    api = sim_api_for(sim)
    (url,) = await result_urls(api, await api.task_id(n=1))
    sim.advance(3 * 86400)
    assert (await download(sim_http, url))[0] == 200


async def test_tampered_urls_are_refused(start_sim, sim_api_for, sim_http):
    """A wrong signature, a stretched Expires or a guessed path answer 403 SignatureDoesNotMatch."""
    sim = await start_sim(durations=0)
    api = sim_api_for(sim)
    (url,) = await result_urls(api, await api.task_id(n=1))
    expires = parse_qs(urlsplit(url).query)["Expires"][0]
    tampered = [
        url[:-4] + "AAAA",
        url.replace(f"Expires={expires}", f"Expires={int(expires) + 3600}"),
        url.replace("-1.png", "-2.png"),
        url.split("?")[0],
    ]
    for bad in tampered:
        status, data, _ = await download(sim_http, bad)
        assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in data, bad
    assert sim.statuses[("image", 403)] == 4
