"""The PostgreSQL ledger against a real server: the same calls give what the SQLite ledger gives, every move
of the table is made or refused as there, paging neither repeats rows nor holds a transaction open."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_run_ledger import unlike_the_interface

from helpers.run_ledger import LEDGER_T0_S as T0_S
from helpers.run_ledger import PATHS, FakeItem, items
from wanbatch.clock import ScaledClock
from wanbatch.errors import ConfigError, IllegalTransition, LedgerError
from wanbatch.ledger import ImageRecord, RunLedger, open_ledger
from wanbatch.ledger import pgstreams as pg_streams_module
from wanbatch.ledger.postgres import PgLedger
from wanbatch.ledger.states import TRANSITIONS, ImageState, ItemState

S = ItemState
LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
ILLEGAL = [(a, b) for a in ItemState for b in ItemState if b not in TRANSITIONS[a]]


class Ticking:
    """A clock that moves 7 ms before each call of a scenario: both ledgers see the same times for the same calls,
    however often each reads its clock."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.clock = ScaledClock(start_s=T0_S, monotonic=lambda: self.now_s)

    def advance(self) -> None:
        self.now_s += 0.007


async def call(ledger: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """``ledger.name(...)``, awaited if it is a coroutine and collected if it is a stream; an error as (its
    class, its message without the ledger's address), so that two ledgers' answers compare."""
    try:
        result = getattr(ledger, name)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, AsyncIterator):
            result = [row async for row in result]
        elif isinstance(result, Iterator):
            result = list(result)
    except LedgerError as exc:
        return type(exc).__name__, str(exc).replace(str(ledger.path), "<ledger>")
    return result


async def scenario(ledger: Any, ticking: Ticking) -> list[tuple[str, Any]]:
    """A batch's life through every method of the protocol, with its errors; each answer, in order."""
    answers: list[tuple[str, Any]] = []

    async def ask(name: str, *args: Any, **kwargs: Any) -> Any:
        ticking.advance()
        answer = await call(ledger, name, *args, **kwargs)
        answers.append((name, answer))
        return answer

    run = await ask("begin_run")
    # A request asked for again in one run (its other places kept, the same place once), across chunks of 3.
    planned = [*items(8), FakeItem(item_id="item-000002", source="jobs/foxes.yaml:9", entry="prompts[9]")]
    planned += [FakeItem(item_id="item-000002"), FakeItem(item_id="item-000002", source="jobs/foxes.yaml:11")]
    planned += [FakeItem(item_id="item-000100", region="singapore", model="wan2.6-t2i", n=2, variables={"a": "b"})]
    await ask("add_items", planned, run=run, price_of=lambda item: 0.2 if item.n == 2 else 0.14, batch_size=3)
    await ask("add_items", items(3, start=20), run=run, currency="USD")
    for item_id in ("item-000000", "item-000002", "item-000100", "item-000020"):
        await ask("get", item_id)
    await ask("set_meta", "clock", "{}")
    await ask("set_meta", "clock", '{"x": 1}')
    await ask("meta", "clock")
    await ask("delete_meta", "clock")
    await ask("meta", "clock")

    await ask("transition", "item-000000", S.submitting, expect=S.planned, durable=True, endpoint="async")
    await ask("transition", "item-000000", S.submitting, expect=S.planned)  # a stale caller
    await ask("transition", "item-000000", S.queued, task_id="task-0", request_id="req-0", note="created")
    await ask("update", "item-000000", task_status="RUNNING", request_id="req-1")
    await ask("update", "item-000000", request_id="")
    await ask("update", "item-000000", state="saved")
    await ask("update", "item-000000", colour="red")
    await ask("update", "item-404", task_status="RUNNING")
    await ask("transition", "item-404", S.submitting)
    await ask("transition", "item-404", S.submitting, expect=S.planned)
    await ask("finish_task", "item-404", S.generated, images=[ImageRecord(index=0, url="https://img/404")])
    await ask("image_saved", "item-404", 0, file_name="images/x.png", sha256="xx", size_bytes=1, settle=True)
    await ask("transition", "item-000001", S.queued)
    await ask("transition", "item-000001", S.saved, expect=S.planned)
    images = [
        ImageRecord(index=0, url="https://img/0", deadline_ms=9_000, seed=1, actual_prompt="fox, snow"),
        ImageRecord(index=1, error_code="DataInspectionFailed", error_message="refused"),
        ImageRecord(index=2, url="https://img/2", seed=3, actual_prompt="fox, dusk"),
    ]
    await ask("finish_task", "item-000000", S.generated, images=images, expect=S.queued, task_status="SUCCEEDED")
    await ask("image_saved", "item-000000", 0, file_name="images/a.png", sha256="aa", size_bytes=10)
    await ask("image_saved", "item-000000", 0, file_name="images/a.png", sha256="aa", size_bytes=10)
    await ask("update_image", "item-000000", 2, error_code="Timeout", error_message="try later")
    await ask("update_image", "item-000000", 7, error_code="Timeout", error_message="try later")
    await ask("image_saved", "item-000000", 2, file_name="images/c.png", sha256="cc", size_bytes=12, settle=True)
    await ask("reopen_image", "item-000000", 2, reason="file missing")
    await ask("reopen_image", "item-000000", 1, reason="file missing")
    await ask("image_final", "item-000000", 2, ImageState.expired, code="UrlExpired", message="died", settle=True)
    await ask("image_final", "item-000000", 0, ImageState.saved)

    # An item the service lost track of, sent again; one that failed, retried: back to planned forgets.
    for step in (S.submitting, S.unknown, S.queued):
        await ask("transition", "item-000003", step)
    await ask("transition", "item-000004", S.submitting, request_id="req-4")
    await ask("transition", "item-000004", S.queued, task_id="task-4")
    await ask("finish_task", "item-000004", S.failed, images=[ImageRecord(index=0, url="https://img/x")])
    await ask("transition", "item-000004", S.planned, note="retry")
    await ask("images_of", "item-000004")
    await ask("finish_task", "item-000005", S.generated, images=[], expect=S.queued)
    await ask("finish_task", "item-000005", S.generated, images=[ImageRecord(index=0, state=ImageState.pending)])
    for step in (S.submitting, S.queued):
        await ask("transition", "item-000100", step, task_id="task-100")
    two = [ImageRecord(index=0, url="https://img/a", deadline_ms=5_000), ImageRecord(index=1, url="https://img/b")]
    await ask("finish_task", "item-000100", S.generated, images=two)
    await ask("image_saved", "item-000100", 1, file_name="images/b.png", sha256="bb", size_bytes=3, settle=True)
    await ask("settle", "item-000100")
    await ask("image_saved", "item-000100", 0, file_name="images/a.png", sha256="ab", size_bytes=4)
    await ask("settle", "item-000100")
    await ask("settle", "item-000100")
    await ask("transition", "item-000006", S.canceled)

    run = await ask("begin_run")
    await ask("add_items", items(5), run=run)
    for name, args, kwargs in READS:
        await ask(name, *args, **kwargs)
    starts = [row.submit_started_ms for row in (await call(ledger, "iter_items", [S.queued, S.saved]))]
    await ask("run_spans", [0, *starts, 2**61])
    return answers


#: Every read, once the scenario has filled the batch.
READS: list[tuple[str, tuple, dict]] = [
    ("get_many", (["item-000000", "item-000003", "item-000000"],), {}),
    ("get_many", (["item-000000", "item-404"],), {}),
    ("state_of", ("item-000003",), {}),
    ("state_of", ("item-404",), {}),
    ("known_tasks", (["task-0", "task-4", "task-100", "task-none"],), {}),
    ("times_unknown", ("item-000003",), {}),
    ("times_unknown", ("item-000000",), {}),
    ("stale_count", (2,), {}),
    ("recent_tasks", ("beijing", 5), {}),
    ("recent_tasks", ("singapore", 5), {"since_ms": 0, "until_ms": 2**61}),
    ("iter_items", (list(ItemState),), {}),
    ("iter_items", ([S.planned, S.queued],), {"run": 2, "region": "beijing", "after_seq": 2, "limit": 3}),
    ("iter_items", ([S.planned, S.saved, S.queued],), {"order_by": "updated_ms"}),
    ("iter_items", ([S.queued, S.planned],), {"order_by": "submit_started_ms", "model": "wan2.2-t2i-flash"}),
    ("iter_items", ([S.planned],), {"order_by": "priority"}),
    ("lanes", ([S.planned, S.saved],), {}),
    ("lanes", ([S.planned],), {"run": 2}),
    ("counts", (), {}),
    ("counts", (), {"run": 2}),
    ("spent_cost", (), {}),
    ("planned_images", (), {}),
    ("summary", (), {}),
    ("iter_images", (list(ImageState),), {}),
    ("iter_images", ([ImageState.saved, ImageState.failed],), {"order_by_deadline": False}),
    ("iter_saved", (), {}),
    ("images_of", ("item-000000",), {}),
    ("images_of", ("item-000100",), {}),
    ("get", ("item-000000",), {}),
    ("get", ("item-000002",), {}),
    ("get", ("item-000004",), {}),
]


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Opens batches of the test's schema (``out`` names the batch); all are closed after the test."""
    opened: list[PgLedger] = []

    async def open_batch(out: str = "/runs/a", clock: Any = None, url_options: str = "", **options: Any) -> PgLedger:
        clock = clock or ScaledClock(start_s=T0_S, monotonic=lambda: 0.0)
        opened.append(await PgLedger.open(pg_url + url_options, batch=out, clock=clock, **options))
        return opened[-1]

    yield open_batch
    for ledger in opened:
        await ledger.close()


async def test_every_call_answers_as_the_sqlite_ledger_does(tmp_path: Path, pg: Callable[..., Any]) -> None:
    """The same calls, errors included, give the same rows, images, counts, costs, streams and messages."""
    sqlite_ticks, pg_ticks = Ticking(), Ticking()
    async with open_ledger(tmp_path, clock=sqlite_ticks.clock) as sqlite:
        expected = await scenario(sqlite, sqlite_ticks)
    got = await scenario(await pg(clock=pg_ticks.clock), pg_ticks)
    assert len(got) == len(expected)
    for number, (answer, wanted) in enumerate(zip(got, expected, strict=True)):
        assert answer == wanted, f"call {number}: {answer[0]}"
    # The scenario does meet each kind of answer: rows, refusals and streams.
    kinds = {type(answer).__name__ for _, answer in expected}
    assert {"ItemRow", "Recorded", "tuple", "list", "dict", "AddResult"} <= kinds
    refusals = [answer for _, answer in expected if isinstance(answer, tuple) and answer[:1] == ("IllegalTransition",)]
    assert len(refusals) >= 5


def test_the_postgres_ledger_has_every_member_of_the_interface_alike() -> None:
    """Every method of RunLedger is on the PostgreSQL ledger with the same parameters, async as the protocol's."""
    assert unlike_the_interface(RunLedger, PgLedger) == []


async def test_every_legal_move_is_made_and_every_illegal_one_refused(pg: Callable[..., Any]) -> None:
    """Each move of the table is made and audited from every state; each other move is refused naming both."""
    ledger = await pg()
    run = await ledger.begin_run()
    pairs = [*LEGAL, *ILLEGAL]
    await ledger.add_items(items(len(pairs)), run=run)
    for number, (source, target) in enumerate(pairs):
        item_id = f"item-{number:06d}"
        for step in PATHS[source]:
            await ledger.transition(item_id, step)
        if (source, target) in LEGAL:
            row = await ledger.transition(item_id, target, expect=source, note="by the table")
            assert row.state is target
        else:
            with pytest.raises(IllegalTransition, match=f"{source} → {target}"):
                await ledger.transition(item_id, target)
            assert await ledger.state_of(item_id) is source
    async with await psycopg.AsyncConnection.connect(ledger._pool.conninfo) as conn:
        cur = await conn.execute("SELECT count(*) FROM transitions WHERE note = 'by the table'")
        assert (await cur.fetchone())[0] == len(LEGAL)


async def test_paging_repeats_no_moved_row_and_holds_no_transaction(
    pg: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items moved while a stream is read are not met again, and between pages no transaction is left open."""
    monkeypatch.setattr(pg_streams_module, "PAGE_SIZE", 7)
    name = f"paging-{uuid.uuid4().hex[:8]}"  # the ledger's connections among the server's others
    ledger = await pg(url_options=f"&application_name={name}")
    run = await ledger.begin_run()
    await ledger.add_items(items(50), run=run)
    seen: list[str] = []
    async with await psycopg.AsyncConnection.connect(ledger._pool.conninfo, autocommit=True) as watcher:
        async for row in ledger.iter_items([S.planned, S.submitting]):
            seen.append(row.item_id)
            # The caller moves what it reads (and one further on): neither comes back in the other state's stream.
            await ledger.transition(row.item_id, S.submitting, expect=S.planned)
            cur = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND state LIKE 'idle in transaction%%'",
                (name,),
            )
            assert (await cur.fetchone())[0] == 0
        cur = await watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,))
        assert (await cur.fetchone())[0] >= 2  # the watcher and the ledger's pool: the filter finds them
    assert seen == [f"item-{i:06d}" for i in range(50)]
    images = [ImageRecord(index=i, url=f"https://img/{i}", deadline_ms=1000 - i) for i in range(20)]
    for step in (S.queued,):
        await ledger.transition("item-000000", step)
    await ledger.finish_task("item-000000", S.generated, images=images)
    deadlines = [image.deadline_ms async for image in ledger.iter_images([ImageState.pending])]
    assert deadlines == sorted(deadlines) and len(deadlines) == 20


async def test_a_compare_and_set_refuses_a_stale_caller_of_another_connection(pg: Callable[..., Any]) -> None:
    """Two ledgers on one batch (two workers): the second to move an item from planned is refused, naming both
    states, and the item was moved and audited once."""
    first, second = await pg(), await pg()
    run = await first.begin_run()
    await first.add_items(items(1), run=run)
    await first.transition("item-000000", S.submitting, expect=S.planned)
    with pytest.raises(IllegalTransition, match="refused planned → submitting: it is submitting now"):
        await second.transition("item-000000", S.submitting, expect=S.planned)
    assert (await second.get("item-000000")).attempts == 1
    async with second.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT from_state, to_state FROM transitions WHERE batch_id = %s AND item_id = 'item-000000'",
            (second.batch_id,),
        )
        assert await cur.fetchall() == [("planned", "submitting")]  # moved, and audited, once


async def test_two_batches_in_one_schema_are_kept_apart(pg: Callable[..., Any], tmp_path: Path) -> None:
    """Two output locations are two batches: the same item ids in both, each its own states, runs, meta and
    manifest positions from 1; the same --out written another way finds the same batch."""
    folder = await pg(str(tmp_path / "out"))
    bucket = await pg("s3://bucket/runs/x/")
    for ledger in (folder, bucket):
        await ledger.add_items(items(3), run=await ledger.begin_run())
    await folder.set_meta("outputs", ".")
    await bucket.transition("item-000001", S.canceled)
    assert (await folder.counts())[S.planned] == 3 and (await bucket.counts())[S.canceled] == 1
    assert await bucket.meta("outputs") is None and await folder.summary() != await bucket.summary()
    assert [row.seq async for row in bucket.iter_items([S.planned, S.canceled])] == [1, 2, 3]
    again = await pg(f"{tmp_path}/x/../out/")
    assert again.path == folder.path and await again.meta("outputs") == "."
    assert (await pg("s3://bucket/runs/x")).path == bucket.path
    assert (await bucket.begin_run(), await folder.begin_run()) == (2, 2)


async def test_a_batch_is_opened_without_create_only_if_it_exists(pg: Callable[..., Any]) -> None:
    """``create=False`` finds a batch a run made and refuses, naming it, a location no run has used."""
    await pg("/runs/made")
    assert (await pg("/runs/made", create=False)).path.endswith("batch /runs/made")
    with pytest.raises(LedgerError, match="no batch /runs/other in the ledger postgresql://"):
        await pg("/runs/other", create=False)


async def test_an_unreachable_database_is_named_without_its_password() -> None:
    """A server that does not answer is a LedgerError naming where it was looked for, password left out."""
    with pytest.raises(LedgerError, match=r"cannot reach the ledger database postgresql://me@127\.0\.0\.1:1/db") as err:
        await PgLedger.open("postgresql://me:s3cret@127.0.0.1:1/db", batch="/x", clock=ScaledClock(start_s=T0_S))
    assert "s3cret" not in str(err.value)


async def test_a_search_path_naming_no_schema_is_refused_saying_so(postgres_server: str) -> None:
    """Connections whose search_path names a schema that does not exist get a message saying how to fix it."""
    url = f"{postgres_server}?options=-csearch_path%3Dno_such_schema_here"
    with pytest.raises(LedgerError, match="names no schema that exists; create it first"):
        await PgLedger.open(url, batch="/x", clock=ScaledClock(start_s=T0_S))


async def test_images_of_one_item_saved_at_once_settle_it(pg: Callable[..., Any]) -> None:
    """Two images of one item saved at the same moment on two connections (the downloader saves side by side):
    the item ends saved, not left generated with every image saved because each saw the other pending."""
    ledger = await pg()
    ids = [f"item-{i:06d}" for i in range(30)]
    await ledger.add_items(items(30, n=2), run=await ledger.begin_run())
    for item_id in ids:
        await ledger.transition(item_id, S.submitting)
        await ledger.transition(item_id, S.queued, task_id=f"task-{item_id}")
        two = [ImageRecord(index=i, url=f"https://img/{item_id}/{i}") for i in range(2)]
        await ledger.finish_task(item_id, S.generated, images=two)
    for item_id in ids:
        await asyncio.gather(
            *(
                ledger.image_saved(item_id, i, file_name=f"{item_id}-{i}.png", sha256="ab", size_bytes=1, settle=True)
                for i in range(2)
            )
        )
    assert (await ledger.counts())[S.saved] == 30


async def test_the_opener_refuses_a_ledger_url_it_does_not_know(tmp_path: Path) -> None:
    """A --ledger that is no PostgreSQL URL is refused saying what is taken, and nothing is made."""
    with pytest.raises(ConfigError, match="give a postgresql:// URL"):
        async with open_ledger(tmp_path / "run", clock=ScaledClock(start_s=T0_S), url="mysql://db/x"):
            pass
    assert not (tmp_path / "run").exists()
