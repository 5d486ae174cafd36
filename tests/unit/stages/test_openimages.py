"""The downloader's count of open images per item: an image queued twice is counted once, closed twice is let go
once, and the last open image of an item is known (only its commit settles the item)."""

from __future__ import annotations

from helpers.run_ledger import items
from wanbatch.ledger import ImageRecord, RunLedger
from wanbatch.ledger.states import ItemState
from wanbatch.stages.openimages import OpenImages


async def test_each_image_counts_once_and_the_last_of_an_item_is_known(run_ledger: RunLedger) -> None:
    """Two images of one item: offered twice, closed twice, the item's row is kept until its last is closed."""
    await run_ledger.add_items(items(1, n=2), run=await run_ledger.begin_run(), price_of=lambda item: 0.14)
    await run_ledger.transition("item-000000", ItemState.submitting)
    await run_ledger.transition("item-000000", ItemState.queued, task_id="t-1")
    images = [ImageRecord(index=i, url=f"u/{i}", deadline_ms=9) for i in range(2)]
    recorded = await run_ledger.finish_task("item-000000", ItemState.generated, images=images)
    first, second = recorded.images
    open_images = OpenImages()
    assert open_images.get("item-000000") is None
    assert open_images.add(first, recorded.row) and not open_images.add(first, recorded.row)
    assert open_images.add(second, recorded.row) and not open_images.last("item-000000")
    open_images.close("item-000000", 0)
    open_images.close("item-000000", 0)  # closed already: the second image stays open
    assert open_images.last("item-000000") and open_images.held("item-000000") == recorded.row
    open_images.close("item-000000", 1)
    assert open_images.get("item-000000") is None
