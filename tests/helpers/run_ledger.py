"""The ``run_ledger`` fixture: an opened :class:`~wanbatch.ledger.interface.RunLedger` of each implementation.

The tests of the protocol's contract (tests/unit/ledger/test_run_ledger.py) take it, and run once per
implementation named in :data:`IMPLEMENTATIONS`: a new ledger is held to the same contract by adding its
name there and its opening to :func:`run_ledger`. ``ledger_clock`` is the clock it stamps rows with, still
unless a test moves it. Registered in tests/conftest.py (``pytest_plugins``). Beside them, what those tests
and the synchronous ledger's plan and move items with: :class:`FakeItem`, :func:`items`, :data:`PATHS`; and
:class:`SuspendingLedger`, a ledger that gives the event loop away around every call, as one across a network
does, for the tests of what the stages keep in order while a ledger call is under way.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from wanbatch.clock import ScaledClock
from wanbatch.ledger import RunLedger, open_ledger
from wanbatch.ledger.states import ItemState

__all__ = [
    "IMPLEMENTATIONS",
    "LEDGER_T0_S",
    "PATHS",
    "FakeItem",
    "SuspendingLedger",
    "items",
    "ledger_clock",
    "run_ledger",
]

S = ItemState

#: The ledgers held to the protocol's contract, by name.
IMPLEMENTATIONS = ("sqlite", "postgres")
LEDGER_T0_S = 1_800_000_000.0  #: when ``ledger_clock`` reads, unless a test moves it

#: From planned, the moves that bring an item to each state.
PATHS: dict[ItemState, tuple[ItemState, ...]] = {
    S.planned: (),
    S.submitting: (S.submitting,),
    S.queued: (S.submitting, S.queued),
    S.unknown: (S.submitting, S.unknown),
    S.rejected: (S.submitting, S.rejected),
    S.generated: (S.submitting, S.queued, S.generated),
    S.failed: (S.submitting, S.queued, S.failed),
    S.saved: (S.submitting, S.queued, S.generated, S.saved),
    S.expired: (S.submitting, S.queued, S.expired),
    S.canceled: (S.canceled,),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeItem:
    """The shape of ``wanbatch.manifest.Item``, enough for the ledger."""

    item_id: str
    replica: int = 0
    region: str = "beijing"
    model: str = "wan2.2-t2i-flash"
    prompt: str = "a red fox in fresh snow"
    negative_prompt: str | None = None
    size: str = "1024*1024"
    n: int = 1
    seed: int | None = None
    prompt_extend: bool = False
    watermark: bool = False
    sync: bool = False
    variables: Mapping[str, str] = field(default_factory=dict)
    source: str = "jobs/foxes.yaml:4"
    entry: str = "prompts[0]"
    output: str | None = None

    def request(self) -> dict[str, object]:
        return {"model": self.model, "prompt": self.prompt, "size": self.size, "n": self.n, "seed": self.seed}


def items(count: int, *, start: int = 0, **overrides: object) -> Iterator[FakeItem]:
    for i in range(start, start + count):
        yield FakeItem(item_id=f"item-{i:06d}", prompt=f"prompt {i}", entry=f"prompts[{i}]", **overrides)


@pytest.fixture
def ledger_clock() -> ScaledClock:
    """A clock that moves only when the test advances it."""
    return ScaledClock(start_s=LEDGER_T0_S, monotonic=lambda: 0.0)


@pytest.fixture(params=IMPLEMENTATIONS)
async def run_ledger(
    request: pytest.FixtureRequest, tmp_path: Path, ledger_clock: ScaledClock
) -> AsyncIterator[RunLedger]:
    """A new, empty ledger of the implementation the test is run for, opened, and closed after it."""
    if request.param == "sqlite":
        async with open_ledger(tmp_path / "run", clock=ledger_clock) as ledger:
            yield ledger
    elif request.param == "postgres":  # a schema of its own on the test server (helpers.postgres), or skipped
        url = request.getfixturevalue("pg_url")
        async with open_ledger(tmp_path / "run", clock=ledger_clock, url=url) as ledger:
            yield ledger
    else:  # pragma: no cover - a name in IMPLEMENTATIONS without its opening here
        raise AssertionError(f"no opening for the ledger {request.param!r}")


class SuspendingLedger:
    """A :class:`RunLedger` around ``inner`` that suspends (gives the event loop to every other task) before and
    after each call and between the rows of an iterator, as a database across a network does; SQLite never
    does, so only this shows a caller that reads state before an ``await`` of the ledger and trusts it after."""

    def __init__(self, inner: RunLedger) -> None:
        self._inner = inner
        self.path = inner.path
        self.calls = 0  #: the calls made through it, so that a test knows it was used

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._inner, name)
        if inspect.isasyncgenfunction(method):

            async def rows(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                self.calls += 1
                async for row in method(*args, **kwargs):
                    await asyncio.sleep(0)
                    yield row

            return rows

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            await asyncio.sleep(0)
            try:
                return await method(*args, **kwargs)
            finally:
                await asyncio.sleep(0)

        return call
