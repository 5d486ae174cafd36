"""The survey of a manifest: every combination checked, its items counted per lane, named and told apart.

One pass over the plan's combinations (:mod:`wanbatch.manifest.expand`) that

- runs the catalog's checks (the errors go to the caller's ``Problems``);
- counts the distinct requests and their images per (region, model): two rows
  that ask for the very same request and replica make one item, as in the
  ledger, so the plan and the budget count it once;
- says which rows repeat another (how many, and a few with both places);
- compares the output names of the first :data:`OUTPUT_CHECK_ITEMS` items,
  as :func:`wanbatch.manifest.naming.file_name` makes them.

A request is told apart by a 64-bit hash of its fields, seed and replica,
kept in memory (about 70 bytes an item): two different requests share one
about once in 3·10⁷ surveys of a million items, and then the plan counts one
item too few (the ledger, keyed by the full id, still makes both).
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

from wanbatch.manifest.expand import Combo, Item, combo_items, draw_seed, entry_combos
from wanbatch.manifest.parse import EntryPlan, Plan
from wanbatch.manifest.values import Problems
from wanbatch.manifest.yamlsrc import Origin

__all__ = ["OUTPUT_CHECK_ITEMS", "Repeats", "Survey", "survey_plan"]

#: The survey compares output file names among this many items (a set of names costs memory).
OUTPUT_CHECK_ITEMS = 100_000
#: The first place of this many distinct requests is kept, to name it when a later row repeats one.
SOURCES_KEPT = 100_000
#: How many repeating rows the plan names.
EXAMPLES_KEPT = 5
#: The fields of a request but its seed: what tells requests apart, with the seed and the replica.
_request_values = itemgetter(
    "prompt", "negative_prompt", "region", "model", "size", "n", "prompt_extend", "watermark", "sync"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Repeats:
    """Rows of the manifest that ask for a request an earlier row asks for already."""

    items: int  #: items merged into an earlier identical one (not sent, not paid for again)
    rows: int  #: manifest rows (lines, records, entries) that made at least one of them
    #: a few of them: ``{"source": "x.csv:42", "repeats": "x.csv:2"}`` (``repeats`` None if not kept)
    examples: list[dict[str, str | None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Survey:
    """What a survey found: the warnings, per (region, model) how many distinct items and images, the repeats."""

    warnings: list[str]
    lanes: dict[tuple[str, str], tuple[int, int]]
    repeats: Repeats


def survey_plan(plan: Plan, problems: Problems, entries: Sequence[EntryPlan] | None = None) -> Survey:
    """Survey ``entries`` (by default all of the plan's); the errors found are left in ``problems``."""
    surveyor = _Surveyor(problems)
    for entry in plan.entries if entries is None else entries:
        surveyor.entry(entry)
        if problems.full:
            problems.truncated = True
            break
    return surveyor.result()


class _Surveyor:
    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.lanes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.names: dict[str, Item] = {}
        #: hash of (request, seed, replica) → where it was first asked for (None past SOURCES_KEPT)
        self.seen: dict[int, str | None] = {}
        self.repeated_items = self.repeated_rows = 0
        self.last_repeating = ""
        self.examples: list[dict[str, str | None]] = []

    def entry(self, entry: EntryPlan) -> None:
        for combo in entry_combos(entry, self.problems):
            if combo is not None:
                self.combo(entry, combo)
            if self.problems.full:
                return

    def combo(self, entry: EntryPlan, combo: Combo) -> None:
        request = combo.request
        new = self._distinct(entry, combo)
        lane = self.lanes[(request["region"], request["model"])]
        lane[0] += new
        lane[1] += new * request["n"]
        if entry.output is not None and len(self.names) < OUTPUT_CHECK_ITEMS:
            for item in combo_items(entry, combo):
                if len(self.names) >= OUTPUT_CHECK_ITEMS:
                    return
                _check_collision(item, entry.output.origin, self.names, self.problems)

    def _distinct(self, entry: EntryPlan, combo: Combo) -> int:
        """How many of the combination's items no earlier combination made; the others are counted repeats."""
        base = hash(_request_values(combo.request))
        seeds = combo.seeds
        if seeds is None:
            seeds = [draw_seed(combo.request["prompt"], k) for k in range(entry.seed_draws.value)]
        seen, source, new = self.seen, combo.source, 0
        for seed in seeds:
            for replica in range(entry.repeats):
                before = len(seen)
                first = seen.setdefault(hash((base, seed, replica)), source if before < SOURCES_KEPT else None)
                if len(seen) > before:
                    new += 1
                else:
                    self._repeat(source, first)
        return new

    def _repeat(self, source: str, first: str | None) -> None:
        self.repeated_items += 1
        # A row's combinations come one after another, so a row is counted once however many items it repeats.
        if source != self.last_repeating:
            self.repeated_rows += 1
            self.last_repeating = source
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append({"source": source, "repeats": first})

    def result(self) -> Survey:
        return Survey(
            warnings=self.problems.warnings,
            lanes={key: (items, images) for key, (items, images) in self.lanes.items()},
            repeats=Repeats(items=self.repeated_items, rows=self.repeated_rows, examples=self.examples),
        )


def _check_collision(item: Item, origin: Origin, names: dict[str, Item], problems: Problems) -> None:
    """Two items' images whose names would be one file: the same text, or the same to a file system that folds
    case or composes accents (macOS, Windows). Every image is looked at: with {seed} in the pattern, one item's
    second image can be named as another's first."""
    for index in range(item.n):
        name = item.output_name(index)
        other = names.setdefault(unicodedata.normalize("NFC", name).casefold(), item)
        # Two images of one item share no name: without {index} a pattern is refused before (Checks.output).
        if other.item_id != item.item_id:
            problems.error(
                origin,
                f"found two items writing {name!r} ({other.source} and {item.source}); allowed: a pattern that"
                " tells them apart, e.g. with {item_id}, {seed} or {index}",
            )
            return
