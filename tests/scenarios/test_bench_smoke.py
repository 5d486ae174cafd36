"""The benchmarks' smoke run (``python -m benchmarks.run --quick``) and the helpers its figures rest on.

The smoke run asserts nothing about time: only that every section runs at tiny
sizes and that the table comes out with every row filled in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.report import CONTENDER_NAMES
from benchmarks.simproc import endpoint_of
from benchmarks.utilisation import percentile
from helpers.paths import REPO

#: Rows per figure of the quick run: 1-3 for flash, wan2.6 and the slow clock (1 also the time after the last
#: request for flash and wan2.6); 4 for flash, wan2.6 and the cold start; 5 for n=4, n=1, CPU, the
#: diagnostics, and n=4 into an S3 store with and without the gallery and its CPU; 6 for plan, resume and the
#: first run; 7 and 8 once.
ROWS_PER_FIGURE = {"1": 5, "2": 3, "3": 3, "4": 3, "5": 9, "6": 3, "7": 1, "8": 1}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One ``--quick`` run into a temporary folder: (latest.json parsed, latest.md text)."""
    root = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(root / "results")]
    argv += ["--workdir", str(root / "work")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = root / "results"
    return json.loads((results / "latest.json").read_text(encoding="utf-8")), (results / "latest.md").read_text(
        encoding="utf-8"
    )


@pytest.mark.timeout(300)
def test_quick_run_has_every_row(quick_run: tuple[dict, str]) -> None:
    """The quick run's table has each figure's rows, every contender's value in 1-4 and the engine's in 5-8."""
    doc, _ = quick_run
    rows = doc["rows"]
    assert Counter(row["figure"] for row in rows) == ROWS_PER_FIGURE
    for row in rows:
        wanted = CONTENDER_NAMES if row["figure"] in "1234" else ("wanbatch",)
        missing = [name for name in wanted if row["values"].get(name, "–").startswith("–")]
        assert not missing, f"{row['measure']}: no value for {missing}"


@pytest.mark.timeout(300)
def test_quick_run_saves_every_billed_image(quick_run: tuple[dict, str]) -> None:
    """Each contender saved every image the simulator billed it for, so its makespan is a whole batch's; the
    ceiling's runs into a folder and into an S3 store saved all of theirs."""
    doc, _ = quick_run
    for section in ("utilisation", "slow_clock", "cold_start"):
        for model, runs in doc["results"][section].items():
            for name in CONTENDER_NAMES:
                run = runs[name]
                assert run["images_billed"] == run["items"], (section, model, name)
                assert run["images_saved"] == run["images_billed"], (section, model, name, run["notes"])
    for run in ("n4", "n4_store", "n4_store_no_gallery"):  # the runs into the store: every image in the bucket
        assert doc["results"]["ceiling"][run]["images_saved"] == 4 * doc["results"]["ceiling"][run]["items"], run


@pytest.mark.timeout(300)
def test_quick_run_markdown_names_the_machine_and_every_row(quick_run: tuple[dict, str]) -> None:
    """latest.md carries the date, the machine and commit, the contenders' columns and one table line per row."""
    doc, markdown = quick_run
    assert doc["date"] in markdown and doc["machine"]["commit"] in markdown
    assert f"{doc['machine']['cores']} cores" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| # |"))
    assert all(label in header for label in CONTENDER_NAMES.values())
    table = [line for line in markdown.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert len(table) == len(doc["rows"])


def test_endpoints_are_named_as_the_simulator_names_them() -> None:
    """The simulator's watch files each request line under the simulator's own endpoint names."""
    assert endpoint_of("POST", "/api/v1/services/aigc/text2image/image-synthesis") == "create"
    assert endpoint_of("POST", "/api/v1/services/aigc/image-generation/generation/") == "create"
    assert endpoint_of("POST", "/api/v1/services/aigc/multimodal-generation/generation") == "sync"
    assert endpoint_of("GET", "/api/v1/tasks/abc") == "query"
    assert endpoint_of("GET", "/api/v1/tasks/abc/") == "query"
    assert endpoint_of("GET", "/api/v1/tasks") == "list"
    assert endpoint_of("POST", "/api/v1/tasks/abc/cancel/") == "cancel"
    assert endpoint_of("GET", "/oss/dashscope-result-bj/20260101/x-1.png") == "image"


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 are values that occurred (nearest rank), and nothing is reported for no values."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


@pytest.mark.timeout(300)
def test_quick_run_measures_pools_of_one_two_and_four_accounts(quick_run: tuple[dict, str]) -> None:
    """The pools section ran 1, 2 and 4 accounts: every item saved, each account given work, its figures in the
    markdown."""
    doc, markdown = quick_run
    pools = doc["results"]["pools"]
    assert sorted(pools, key=int) == ["1", "2", "4"]
    for count, row in pools.items():
        assert row["exit_code"] == 0 and row["images_saved"] == row["items"], row
        assert len(row["tasks_per_account"]) == int(count) and min(row["tasks_per_account"]) > 0
        assert row["utilisation"] is not None
    assert "## Account pools" in markdown


def _measured_on_postgres(section: dict) -> None:
    """Skip when the section found no PostgreSQL server (fail when the suite is told one is there)."""
    if "skipped" in section:
        if os.environ.get("WANBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"WANBATCH_REQUIRE_POSTGRES=1 but {section['skipped']}")
        pytest.skip(section["skipped"])


@pytest.mark.timeout(300)
def test_quick_run_measures_workers_of_one_batch(quick_run: tuple[dict, str]) -> None:
    """The fleet section ran two worker processes on one batch: both ended well, every item saved, the two
    accounts both given work, utilisation against the pool's bound in the markdown."""
    doc, markdown = quick_run
    fleet = doc["results"]["fleet"]
    _measured_on_postgres(fleet)
    assert list(fleet) == ["2"]
    row = fleet["2"]
    assert row["exit_codes"] == [0, 0] and row["images_saved"] == row["items"], row
    assert len(row["tasks_per_account"]) == 2 and min(row["tasks_per_account"]) > 0
    assert row["utilisation"] is not None and row["images_per_s"] is not None
    assert "## Fleet: worker processes on one batch" in markdown


@pytest.mark.timeout(300)
def test_quick_run_counts_each_ledgers_statements_and_time(quick_run: tuple[dict, str]) -> None:
    """The ledgers section counted the same batch's statements on SQLite and PostgreSQL: every kind of work
    (reads, writes, transactions) seen on both, the ledger's time measured, the ratio of the two in the
    markdown."""
    doc, markdown = quick_run
    ledgers = doc["results"]["ledgers"]
    _measured_on_postgres(ledgers)
    for name in ("sqlite", "postgresql"):
        kinds = ledgers[name]["by_kind_per_task"]
        assert kinds["read"] > 0 and kinds["write"] > 0 and kinds["transaction"] > 0, (name, kinds)
        assert ledgers[name]["ledger_ms_per_task"] > 0 and ledgers[name]["ledger_calls_per_task"] > 0
        assert ledgers[name]["plan_statements"] > 0
    assert ledgers["postgresql"]["db_ms_per_task"] > 0
    assert ledgers["ratio"]["statements_per_task"] > 0
    assert "| **PostgreSQL / SQLite** |" in markdown
