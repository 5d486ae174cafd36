"""What a manifest will cost and how long the account's quota needs for it, before anything is sent."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from os import PathLike
from pathlib import Path
from typing import Any

from wanbatch import catalog
from wanbatch.manifest import Manifest
from wanbatch.manifest.survey import Survey

__all__ = ["make_plan", "repeats_line"]


def make_plan(manifest: Manifest, survey: Survey | None = None) -> dict[str, Any]:
    """Items, images and cost per (region, model), and the quota bound max(N/RPS, N·duration/concurrency).

    Items allowed several regions (``region: [beijing, singapore]`` or ``any``) are one row, their region the
    joined list: priced at the dearest of their regions (an upper bound: each is priced where it is sent), their
    bound the items over the regions' rates added up.

    ``manifest`` is a :class:`wanbatch.Manifest` or the path of one, as :func:`wanbatch.run` takes.
    Items are distinct requests: rows that ask for one already asked are counted once (the ledger keeps
    one item for them, sent and paid once) and reported under ``repeats``.

    Models run in parallel lanes, so the whole manifest needs as long as its slowest lane. ``survey`` is
    ``manifest.survey()`` when the caller has it already (the survey checks every item: it is the costly part).
    """
    if isinstance(manifest, str | PathLike):
        manifest = Manifest.from_yaml(Path(manifest))
    survey = survey if survey is not None else manifest.survey()
    rows, cost = [], defaultdict(float)
    for (region, model), (items, images) in sorted(survey.lanes.items()):
        lane = {"items": items, "images": images}
        offers = catalog.offers_for(region, model)
        offer = offers[0]
        if len(offers) == 1:
            bound_s = max(items / offer.submit_rps, items * offer.model.typical_duration_s / offer.concurrency)
        else:  # items that may run in several regions go to each at its pace: the regions' rates add up
            bound_s = items / sum(min(o.submit_rps, o.concurrency / o.model.typical_duration_s) for o in offers)
        # Where it runs is decided when it is sent: priced at the dearest of its regions, an upper bound.
        price = max(o.price for o in offers)
        rows.append(
            {
                "region": region,
                "model": model,
                **lane,
                "price": price,
                "cost": round(images * price, 6),
                "currency": offer.currency,
                "quota_time_s": bound_s,
                "regions": [o.region for o in offers],
            }
        )
        cost[offer.currency] += images * price
    return {
        "name": manifest.name,
        "items": sum(r["items"] for r in rows),
        "images": sum(r["images"] for r in rows),
        "cost": {currency: round(value, 6) for currency, value in cost.items()},
        "price_table": catalog.PRICE_TABLE,
        "quota_time_s": max((r["quota_time_s"] for r in rows), default=0.0),
        "regions": sorted({region for r in rows for region in r["regions"]}),
        "budget": manifest.budget,
        "lanes": rows,
        "repeats": dataclasses.asdict(survey.repeats),
    }


def repeats_line(plan: dict[str, Any]) -> str | None:
    """For people: how many rows repeat an earlier request, and a few of them with the row they repeat."""
    repeats = plan.get("repeats") or {}
    if not repeats.get("rows"):
        return None
    shown = ", ".join(f"{e['source']} repeats {e['repeats'] or 'an earlier row'}" for e in repeats["examples"])
    more = ", ..." if repeats["rows"] > len(repeats["examples"]) else ""
    return (
        f"{repeats['rows']} row(s) repeat an earlier request, {repeats['items']} item(s) counted, sent and paid"
        f" once: {shown}{more}"
    )
