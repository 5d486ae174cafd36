"""``python -m wanbatch.sim`` as a process, and the configuration it reads."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from wanbatch.sim import SIM_STATE, AccountConfig, SimConfig, create_app
from wanbatch.sim.cli import add_arguments, config_from_args

URL = re.compile(r"(http://127\.0\.0\.1:\d+/api/v1)")


async def test_cli_serves_prints_url_and_keys_and_stops_on_sigterm(tmp_path):
    """The process prints its base URL and the demo keys first, serves there, logs billing, exits 0 on SIGTERM."""
    config = tmp_path / "sim.yaml"
    config.write_text("durations: 0\naccounts:\n  team:\n    keys: {sk-team: beijing}\n")
    log = tmp_path / "billing.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wanbatch.sim",
        "--port",
        "0",
        "--speed",
        "60",
        "--seed",
        "3",
        "--billing-log",
        str(log),
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 20)).decode() for _ in range(6)]
        base_url = URL.search(lines[0]).group(1)
        banner = "".join(lines)
        for key in ("sk-sim-beijing", "sk-sim-singapore", "sk-sim-virginia", "sk-team"):
            assert key in banner
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": "Bearer sk-team", "X-DashScope-Async": "enable"}
            body = {"model": "wan2.2-t2i-flash", "input": {"prompt": "a cat"}, "parameters": {"n": 1}}
            async with http.post(
                base_url + "/services/aigc/text2image/image-synthesis", json=body, headers=headers
            ) as response:
                assert response.status == 200
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            await asyncio.sleep(0.05)
        assert '"image_index": 0' in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert "stopped" in out.decode()


def test_cli_refuses_a_bad_config(tmp_path):
    """A config file with an unknown setting stops the process with exit code 2 and says which setting."""
    config = tmp_path / "bad.yaml"
    config.write_text("sped: 60\n")
    done = subprocess.run(
        [sys.executable, "-m", "wanbatch.sim", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "sped" in done.stderr


def test_arguments_map_to_config(tmp_path):
    """The flags fill a SimConfig; the config file fills what the flags leave at their defaults."""
    config = tmp_path / "c.json"
    config.write_text(
        '{"speed": 5, "region": "singapore", "input_inspection_words": ["bad"],'
        ' "quotas": {"*": {"concurrency": "unlimited"}}, "billing_log": "x.jsonl"}'
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--speed", "60", "--faults", "chaos", "--config", str(config)])
    resolved = config_from_args(args)
    assert (resolved.speed, resolved.faults, resolved.region) == (60, "chaos", "singapore")
    assert resolved.input_inspection_words == ("bad",)
    assert resolved.quotas == {"*": {"concurrency": None}}
    assert resolved.billing_log == Path("x.jsonl")
    assert parser.parse_args([]).host == "127.0.0.1"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"region": "mars"}, "region"),
        ({"speed": 0}, "speed"),
        ({"param_errors": "later"}, "param_errors"),
        ({"pixel_floor_side": 1000}, "pixel_floor_side"),
        ({"image_failure_rate": 2}, "image_failure_rate"),
        ({"quotas": {"wan9": {"submit_rps": 1}}}, "unknown model"),
        ({"quotas": {"*": {"rps": 1}}}, "unknown quota"),
        ({"quotas": {"*": {"concurrency": 0}}}, "> 0"),
        ({"durations": -1}, "durations"),
        ({"faults": "mayhem"}, "faults"),
        ({"fault_rates": {"gremlins": 0.5}}, "gremlins"),
    ],
)
def test_config_validation(kwargs, fragment):
    """A config that cannot run is refused when built, with a message naming the field."""
    with pytest.raises(ValueError, match=fragment):
        SimConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown region"):
        AccountConfig(name="x", keys={"sk-x": "mars"})


def test_explicit_settings_win_over_the_file(tmp_path):
    """A field set in the SimConfig keeps its value; the file only fills defaults; create_app reads the file."""
    config = tmp_path / "c.yaml"
    config.write_text("seed: 4\nspeed: 9\naccounts:\n  a:\n    keys: {sk-a: beijing}\n    uid: '77'\n")
    resolved = SimConfig(seed=1, config_file=config).resolved()
    assert (resolved.seed, resolved.speed) == (1, 9)
    assert resolved.accounts[0].uid == "77"
    assert resolved.resolved() == resolved
    app = create_app(SimConfig(config_file=config))
    assert app[SIM_STATE].accounts.authenticate("Bearer sk-a").account_uid == "77"
