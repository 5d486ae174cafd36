"""The synchronous SQLite ledger: legal moves and their audit, compare-and-set across two connections, durability
across a kill, the schema, what its file holds, the run lock. The contract every ledger keeps is tested through the
async protocol, on each implementation, in test_run_ledger.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.paths import REPO
from helpers.run_ledger import PATHS, FakeItem, items
from wanbatch.clock import ScaledClock
from wanbatch.errors import IllegalTransition, LedgerError, RunLocked
from wanbatch.ledger import LEDGER_FILE, SCHEMA_VERSION, ImageRecord, Ledger, RunLock
from wanbatch.ledger.states import FINAL_STATES, TRANSITIONS, ImageState, ItemState

S = ItemState
T0_S = 1_800_000_000.0

LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]


@pytest.fixture
def clock() -> ScaledClock:
    """A clock that moves only when the test advances it."""
    return ScaledClock(start_s=T0_S, monotonic=lambda: 0.0)


@pytest.fixture
def ledger(tmp_path: Path, clock: ScaledClock) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "run", clock=clock) as opened:
        yield opened


def planned(ledger: Ledger, count: int = 1, **overrides: object) -> list[str]:
    run = ledger.begin_run()
    ledger.add_items(items(count, **overrides), run=run, price_of=lambda item: 0.14)
    return [f"item-{i:06d}" for i in range(count)]


def drive(ledger: Ledger, item_id: str, state: ItemState) -> None:
    for step in PATHS[state]:
        extra = {"task_id": "task-1"} if step is S.queued else {}
        ledger.transition(item_id, step, **extra)


def audit(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path / LEDGER_FILE) as conn:
        return conn.execute("SELECT from_state, to_state, note FROM transitions ORDER BY id").fetchall()


# ── states and moves ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("source", "target"), LEGAL, ids=[f"{a}-{b}" for a, b in LEGAL])
def test_every_legal_move_is_made_and_audited(ledger: Ledger, source: ItemState, target: ItemState) -> None:
    """Each move the table allows is made, with expect as compare-and-set, and leaves an audit row."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, source)
    ledger.transition(item_id, target, expect=source, note="by the test")
    assert ledger.get(item_id).state is target
    assert audit(ledger.path.parent)[-1] == (str(source), str(target), "by the test")


def test_final_states_are_exactly_those_without_moves() -> None:
    """saved and expired are final; failed, rejected and canceled can go back to planned to be made again."""
    assert {S.saved, S.expired} == FINAL_STATES
    assert TRANSITIONS[S.failed] == TRANSITIONS[S.rejected] == TRANSITIONS[S.canceled] == {S.planned}


def test_compare_and_set_refuses_a_stale_caller(tmp_path: Path, clock: ScaledClock) -> None:
    """Two connections expect planned; the second to move is refused and the item moves once."""
    with Ledger.open(tmp_path, clock=clock) as first, Ledger.open(tmp_path, clock=clock) as second:
        (item_id,) = planned(first)
        first.transition(item_id, S.submitting, expect=S.planned)
        with pytest.raises(IllegalTransition, match=r"it is submitting now, not planned"):
            second.transition(item_id, S.submitting, expect=S.planned)
        row = second.get(item_id)
    assert (row.state, row.attempts) == (S.submitting, 1)
    assert [move[:2] for move in audit(tmp_path)] == [("planned", "submitting")]


# ── opening, durability ─────────────────────────────────────────────────────────────────────────────


def test_reopening_finds_everything_committed_with_wal_and_schema_version(tmp_path: Path, clock: ScaledClock) -> None:
    """After close, a new open sees every row; the file is in WAL mode with its schema version recorded."""
    with Ledger.open(tmp_path / "deep" / "run", clock=clock) as ledger:
        first, second = planned(ledger, 2)
        drive(ledger, first, S.queued)
    with Ledger.open(tmp_path / "deep" / "run", clock=clock, create=False) as ledger:
        assert ledger.get(first).state is S.queued
        assert ledger.get(second).state is S.planned
        assert ledger.begin_run() == 2
    with sqlite3.connect(tmp_path / "deep" / "run" / LEDGER_FILE) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_open_without_create_refuses_a_folder_with_no_ledger(tmp_path: Path, clock: ScaledClock) -> None:
    """Reading a folder that is not a run folder fails clearly and creates nothing."""
    with pytest.raises(LedgerError, match="no ledger in"):
        Ledger.open(tmp_path / "nothing", clock=clock, create=False)
    assert not (tmp_path / "nothing").exists()


def test_a_ledger_of_another_schema_version_is_refused(tmp_path: Path, clock: ScaledClock) -> None:
    """A ledger written by a different schema version is not read as if it were this one."""
    Ledger.open(tmp_path, clock=clock).close()
    with sqlite3.connect(tmp_path / LEDGER_FILE) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match=f"schema version 99, this wanbatch reads version {SCHEMA_VERSION}"):
        Ledger.open(tmp_path, clock=clock)


CRASH_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    from wanbatch.clock import ScaledClock
    from wanbatch.ledger import Ledger
    from wanbatch.ledger.states import ItemState

    def item(i):
        return SimpleNamespace(item_id=f"c{i:04d}", replica=0, region="beijing", model="wan2.2-t2i-flash", n=1,
                               variables={}, source="crash.yaml:1", entry=f"prompts[{i}]", output=None,
                               request=lambda: {"prompt": f"p{i}"})

    ledger = Ledger.open(Path(sys.argv[1]), clock=ScaledClock())
    ledger.add_items((item(i) for i in range(400)), run=ledger.begin_run())
    for i in range(400):
        ledger.transition(f"c{i:04d}", ItemState.submitting, expect=ItemState.planned)
        ledger.transition(f"c{i:04d}", ItemState.queued, task_id=f"t{i}")
        print(i, flush=True)
    while True:  # keep writing, so the kill lands in the middle of something
        ledger.update("c0000", request_id="again")
    """
)


def test_committed_rows_survive_a_sigkill_mid_write(tmp_path: Path, clock: ScaledClock) -> None:
    """A writer killed with SIGKILL loses nothing it reported committed; the file stays intact."""
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        reported = [int(child.stdout.readline()) for _ in range(60)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Ledger.open(tmp_path, clock=clock) as ledger:
        for i in reported:
            row = ledger.get(f"c{i:04d}")
            assert (row.state, row.task_id, row.attempts) == (S.queued, f"t{i}", 1)
        counts = ledger.counts()
        assert counts[S.queued] >= len(reported)
        assert sum(counts.values()) == 400
    with sqlite3.connect(tmp_path / LEDGER_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ── planning ────────────────────────────────────────────────────────────────────────────────────────


# ── images ──────────────────────────────────────────────────────────────────────────────────────────


def test_a_saved_image_is_never_moved_or_overwritten(ledger: Ledger) -> None:
    """Re-recording a task's results leaves saved images alone; moving a saved image again is refused."""
    (item_id,) = planned(ledger)
    drive(ledger, item_id, S.queued)
    ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/old", deadline_ms=5)])
    ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    # As a folder of an earlier wanbatch may hold it: a queued item whose images were recorded before its move.
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("UPDATE items SET state = 'queued' WHERE item_id = ?", (item_id,))
    ledger.finish_task(item_id, S.generated, images=[ImageRecord(index=0, url="u/new", deadline_ms=9)])
    image = ledger.images_of(item_id)[0]
    assert (image.state, image.url, image.deadline_ms) == (ImageState.saved, "u/old", 5)
    with pytest.raises(IllegalTransition, match="saved → expired"):
        ledger.image_final(item_id, 0, ImageState.expired)
    with pytest.raises(LedgerError, match="image_final\\(\\) takes failed or expired"):
        ledger.image_final(item_id, 0, ImageState.saved)


def test_a_saved_image_whose_file_went_missing_is_reopened_with_its_item(ledger: Ledger) -> None:
    """reopen_image takes a saved image back to pending (its file forgotten) and its saved item back to
    generated, in one move the audit names; an image that is not saved is refused."""
    (item_id,) = planned(ledger, n=2)
    drive(ledger, item_id, S.queued)
    images = [ImageRecord(index=0, url="u/0", deadline_ms=1), ImageRecord(index=1, url="u/1", deadline_ms=2)]
    ledger.finish_task(item_id, S.generated, images=images)
    ledger.image_saved(item_id, 0, file_name="a.png", sha256="0" * 64, size_bytes=1)
    ledger.image_saved(item_id, 1, file_name="b.png", sha256="1" * 64, size_bytes=1, settle=True)
    ledger.reopen_image(item_id, 1, reason="images/b.png was missing on resume")
    image = ledger.images_of(item_id)[1]
    assert (image.state, image.file_name, image.error_code) == (ImageState.pending, None, "FileMissing")
    assert ledger.state_of(item_id) is S.generated
    assert audit(ledger.path.parent)[-1] == ("saved", "generated", "images/b.png was missing on resume")
    with pytest.raises(IllegalTransition, match="pending → pending"):
        ledger.reopen_image(item_id, 1, reason="again")


def test_a_durable_move_is_fsynced_and_the_others_are_not(ledger: Ledger) -> None:
    """The commit a POST depends on runs with synchronous=FULL (it survives a power loss); the others with
    NORMAL in WAL mode (they survive a crash), so that saving an image costs no fsync of the ledger."""
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first, second = planned(ledger, 2)
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)
    ledger.transition(first, ItemState.submitting, expect=ItemState.planned, durable=True)
    durable, statements[:] = list(statements), []
    ledger.transition(second, ItemState.submitting, expect=ItemState.planned)
    assert (
        durable.index("PRAGMA synchronous = FULL")
        < durable.index("COMMIT")
        < durable.index("PRAGMA synchronous = NORMAL")
    )
    assert not any("synchronous" in statement for statement in statements)
    assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL between durable moves


# ── counts and summary ──────────────────────────────────────────────────────────────────────────────


def test_counts_are_read_from_the_state_index(ledger: Ledger) -> None:
    """The count per state scans the (state, seq) index, not the table."""
    with sqlite3.connect(ledger.path) as conn:
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT state, count(*) FROM items GROUP BY state").fetchall()
    assert "COVERING INDEX items_state_seq" in " ".join(row[3] for row in plan)


# ── the run lock ────────────────────────────────────────────────────────────────────────────────────

LOCK_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from wanbatch.ledger import RunLock

    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_run_lock_refuses_a_second_process_and_frees_when_the_holder_is_killed(tmp_path: Path) -> None:
    """A live holder in another process blocks a run, named with its pid; after its SIGKILL the folder is free."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_CHILD, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path).acquire()
        assert f"pid {child.pid}" in str(refused.value)
        assert str(tmp_path) in str(refused.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_run_lock_is_exclusive_within_one_process_and_reusable(tmp_path: Path) -> None:
    """Two holders in one process also exclude each other; a released lock can be taken again."""
    with RunLock(tmp_path), pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


# ── the API key ─────────────────────────────────────────────────────────────────────────────────────


def test_the_api_key_is_never_written_to_the_ledger(
    tmp_path: Path, clock: ScaledClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a key in the environment, a full item life leaves no trace of it in the ledger's files."""
    sentinel = "sk-sentinel-4f1d2c9e8b7a"
    monkeypatch.setenv("DASHSCOPE_API_KEY", sentinel)
    with Ledger.open(tmp_path, clock=clock) as ledger:
        run = ledger.begin_run()
        ledger.add_items([FakeItem(item_id="k", prompt="marker-prompt-93c1")], run=run, price_of=lambda it: 0.1)
        ledger.transition("k", S.submitting, expect=S.planned)
        ledger.transition("k", S.queued, task_id="t", request_id="r")
        ledger.finish_task("k", S.generated, images=[ImageRecord(index=0, url="http://127.0.0.1/i.png", deadline_ms=1)])
        ledger.image_saved("k", 0, file_name="images/k-0.png", sha256="0" * 64, size_bytes=10)
        ledger.settle("k")
        written = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    assert b"marker-prompt-93c1" in written  # the bytes searched are the ones the ledger wrote
    assert sentinel.encode() not in written


def test_a_version_2_ledger_gains_the_account_column_and_keeps_its_items(tmp_path: Path, clock: ScaledClock) -> None:
    """A ledger made before pools (schema 2, no items.account) opens, gains the column ('' for every item: the
    environment's keys made them), and records an account with the next move to submitting."""
    with Ledger.open(tmp_path, clock=clock) as ledger:
        run = ledger.begin_run()
        ledger.add_items([FakeItem(item_id="old"), FakeItem(item_id="new")], run=run, price_of=lambda it: 0.1)
        ledger.transition("old", ItemState.submitting, expect=ItemState.planned)
    with sqlite3.connect(tmp_path / LEDGER_FILE) as conn:
        conn.execute("ALTER TABLE items DROP COLUMN account")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with Ledger.open(tmp_path, clock=clock, create=False) as ledger:
        assert ledger.meta("schema_version") == str(SCHEMA_VERSION) == "3"
        assert ledger.get("old").account == "" and ledger.get("old").state is ItemState.submitting
        assert ledger.account_lanes([ItemState.submitting]) == {("beijing", "", ledger.get("old").model)}
        moved = ledger.transition("new", ItemState.submitting, expect=ItemState.planned, account="team-a")
        assert moved.account == "team-a"
        assert ledger.account_summary()["team-a"]["items"] == {"submitting": 1}
