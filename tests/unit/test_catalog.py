"""The catalog's one answer to where a region's requests go."""

from __future__ import annotations

from wanbatch import catalog


def test_a_region_goes_to_its_own_endpoint_then_the_shared_one_then_its_host() -> None:
    """A per-region URL (an embedded simulator) wins over one base URL for all, which wins over the region's host."""
    sims = {"beijing": "http://127.0.0.1:1/api/v1"}
    assert catalog.endpoint("beijing", base_url="https://proxy/api/v1", base_urls=sims) == sims["beijing"]
    assert catalog.endpoint("singapore", base_url="https://proxy/api/v1", base_urls=sims) == "https://proxy/api/v1"
    assert catalog.endpoint("virginia", base_urls=sims) == "https://dashscope-us.aliyuncs.com/api/v1"
