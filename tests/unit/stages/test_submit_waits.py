"""How the submitter's lanes wait: in the clock's time, so a fast clock does not stretch a wait meant in it."""

from __future__ import annotations

from helpers.engine import engine_for
from helpers.ledger import ledger_rows
from helpers.manifest import load_manifest, numbered
from wanbatch.stages.submit import SubmitConfig


async def test_the_second_create_goes_when_the_probe_time_is_up_not_when_the_first_is_answered(start_sim, tmp_path):
    """Every create's answer is held 50 s of the service's time: the lane's first create goes alone for probe_s
    (2 s of our clock), then the next goes without waiting for that answer, at speed 100 as at speed 1."""
    sim = await start_sim(
        speed=100.0,
        durations={"*": 3.0},
        fault_rates={"hold_response": 1.0},
        fault_endpoints=("create",),
        hold_s=50.0,
    )
    manifest = load_manifest(tmp_path, prompts=numbered(2, "a paper lantern"))
    report = await engine_for(sim, tmp_path / "run", submit=SubmitConfig(probe_s=2.0)).run(manifest)
    assert report["items"]["saved"] == 2 and sim.requests["create"] == 2
    first, second = sorted(row[0] for row in ledger_rows(tmp_path / "run", "SELECT submit_started_ms FROM items"))
    # Held to the first answer, the second would start some 50 s later; sent after the probe, some 2 s later.
    assert 1000 <= second - first < 20_000, second - first
