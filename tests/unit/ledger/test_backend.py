"""The record of the service a run folder is made against: each region's endpoint, kept across runs that use
different regions, and a switch of one refused unless forced."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from wanbatch.clock import ScaledClock
from wanbatch.ledger import Ledger, SqliteLedger, backend
from wanbatch.ledger.backend import BACKEND_META, BackendMismatch

HERE, THERE = "http://127.0.0.1:8001", "http://127.0.0.1:8002"


def record(run_dir: Path) -> dict[str, str]:
    with Ledger.open(run_dir, clock=ScaledClock(), create=False) as ledger:
        return json.loads(ledger.meta(BACKEND_META))


def claim(run_dir: Path, wanted: dict[str, str], *, force: bool = False) -> None:
    with Ledger.open(run_dir, clock=ScaledClock()) as ledger:
        asyncio.run(backend.claim(SqliteLedger(ledger), run_dir, wanted, force=force))


def test_a_manifest_that_drops_a_region_keeps_its_record_and_switches_nothing(tmp_path, caplog):
    """A resume whose manifest no longer uses Singapore leaves Singapore's endpoint recorded (its tasks may wait
    there still) and logs no switch; a later run against another Singapore host is still refused."""
    run_dir = tmp_path / "run"
    claim(run_dir, {"beijing": HERE, "singapore": HERE})
    with caplog.at_level(logging.WARNING, logger="wanbatch"):
        claim(run_dir, {"beijing": HERE})
    assert record(run_dir) == {"beijing": HERE, "singapore": HERE}
    assert "switching" not in caplog.text
    with pytest.raises(BackendMismatch):
        claim(run_dir, {"singapore": THERE})


def test_a_region_added_is_recorded_without_a_switch(tmp_path, caplog):
    """A manifest that takes in a new region adds its endpoint to the record; nothing was switched."""
    run_dir = tmp_path / "run"
    claim(run_dir, {"beijing": HERE})
    with caplog.at_level(logging.WARNING, logger="wanbatch"):
        claim(run_dir, {"beijing": HERE, "singapore": HERE})
    assert record(run_dir) == {"beijing": HERE, "singapore": HERE}
    assert "switching" not in caplog.text


def test_a_forced_switch_moves_only_the_regions_the_run_uses(tmp_path, caplog):
    """Without force a changed endpoint is refused and the record stays; with it, the run's regions move (and the
    log says so), and a region it does not use keeps its endpoint."""
    run_dir = tmp_path / "run"
    claim(run_dir, {"beijing": HERE, "singapore": HERE})
    with pytest.raises(BackendMismatch):
        claim(run_dir, {"beijing": THERE})
    assert record(run_dir) == {"beijing": HERE, "singapore": HERE}
    with caplog.at_level(logging.WARNING, logger="wanbatch"):
        claim(run_dir, {"beijing": THERE}, force=True)
    assert record(run_dir) == {"beijing": THERE, "singapore": HERE}
    assert "switching" in caplog.text and THERE in caplog.text
