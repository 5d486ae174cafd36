"""Runs whose outputs go to object storage (``--out s3://bucket/prefix``), against a real S3 server on loopback.

The bucket is the judge here as the run folder is elsewhere: every image the
simulator billed is in the bucket as a whole PNG that ``metadata.jsonl`` (in the
bucket too) lists, no request is paid twice, and the run's state (its ledger)
stays in a folder on this machine. A store that is missing or refuses us is
refused before anything is sent; a store that goes down mid-run costs time,
not images; a run killed between an upload and its commit is healed by a HEAD,
without a second upload or a second payment.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import tarfile
from asyncio.subprocess import DEVNULL, PIPE
from collections import Counter
from pathlib import Path

from helpers.ledger import ledger_rows
from helpers.manifest import numbered, write_manifest
from helpers.outputs import audit, read_jsonl
from helpers.paths import REPO
from helpers.proc import WANBATCH, cli_env, read_billing, wait_until, wanbatch_cli
from helpers.seaweed import SECRET_KEY, Proxy, SeaweedServer
from wanbatch.sim.embedded import SIM_DIR
from wanbatch.sim.persist import BILLING_FILE

#: ``datasets.load_dataset("imagefolder", data_dir=URL)`` on a bucket, as the README shows; prints what it read.
LOAD_DATASET = """
import json, sys, datasets
rows = list(datasets.load_dataset("imagefolder", data_files=sys.argv[1] + "/**", split="train", streaming=True))
print(json.dumps({"rows": len(rows), "size": list(rows[0]["image"].size), "has_prompt": "prompt" in rows[0]}))
"""
BIG = {"size": "1024*1024", "n": 2}  #: images larger than a thumbnail, so each gets one in the bucket


def billing_of(state: Path) -> list[dict]:
    return read_billing(state / SIM_DIR / "beijing" / BILLING_FILE)


def s3_run(manifest: Path, out: str, state: Path, seaweed: SeaweedServer, *extra: str, **env: str):
    """``wanbatch run MANIFEST --out OUT --state STATE --simulate`` to its end, pointed at ``seaweed``."""
    args = ["run", str(manifest), "--out", out, "--state", str(state), "--simulate", "--speed", "100", *extra]
    return wanbatch_cli(*args, env={**seaweed.env(), **env})


def test_a_run_into_a_bucket_leaves_every_output_there(s3_env: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """Every billed image is in the bucket, whole, with its thumbnail, listed in the bucket's metadata.jsonl; the
    report and gallery are there; the ledger is in the state folder, which holds no image; status and export
    take the same --out."""
    manifest = write_manifest(tmp_path, prompts=numbered(4, "a lantern"), **BIG)
    out, state = f"s3://{bucket}/runs/lanterns", tmp_path / "state"
    done = s3_run(manifest, out, state, s3_env)
    assert done.returncode == 0, done.stderr
    assert f"{out}/metadata.jsonl" in done.stdout and str(state) in done.stdout

    mirror = tmp_path / "bucket"
    heads = s3_env.download(bucket, "runs/lanterns", mirror)
    billing = billing_of(state)
    result = audit(state, billing, outputs=mirror)
    assert result.clean and result.saved == len(billing) == 8, result.summary()
    rows = read_jsonl(mirror / "metadata.jsonl")
    for row in rows:
        meta = heads[row["file_name"]]["Metadata"]
        owner = f"{row['item_id']}/{row['image_index']}/{row['task_id']}"
        assert meta["sha256"] == row["sha256"] and meta["owner"] == owner
        thumb = "thumbs/" + row["file_name"].removeprefix("images/").removesuffix(".png") + ".jpg"
        assert heads[thumb]["ContentType"] == "image/jpeg"
    assert heads["gallery.html"]["ContentType"] == "text/html"
    assert {"gallery-data.js", "report.json"} <= set(heads)
    report = json.loads((mirror / "report.json").read_text())
    assert report["outputs"] == {"location": out, "state": str(state), "gallery": True, "not_stored": []}
    assert (state / "ledger.sqlite").exists() and not (state / "images").exists()

    status = wanbatch_cli("status", out, "--state", str(state), "--json", env=s3_env.env())
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["images"]["saved"] == 8
    export = wanbatch_cli("export", out, "--state", str(state), "--format", "webdataset", env=s3_env.env())
    assert export.returncode == 0, export.stderr
    assert export.stdout.split() == [f"{out}/exports/webdataset/shard-000000.tar"]
    # As the README shows: the bucket loads as a dataset, read in place (the S3 settings from the environment).
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_DATASET, f"{out}"],
        capture_output=True,
        text=True,
        timeout=180,
        env=cli_env(**s3_env.env(), HF_HOME=str(tmp_path / "hf")),
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.splitlines()[-1]) == {"rows": 8, "size": [1024, 1024], "has_prompt": True}
    s3_env.download(bucket, "runs/lanterns/exports", tmp_path / "exports")
    with tarfile.open(tmp_path / "exports" / "webdataset" / "shard-000000.tar") as shard:
        assert sorted(name for name in shard.getnames() if name.endswith(".png")) == sorted(
            f"{row['item_id']}-{row['image_index']}.png" for row in rows
        )


def test_the_default_state_folder_is_under_the_cache_and_found_again(
    s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """Without --state, the ledger goes to a folder under the user's cache named after --out, said at start; a
    second run of the same --out finds it (nothing planned again, nothing paid again)."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a kite"))
    out, cache = f"s3://{bucket}/kites", tmp_path / "cache"
    argv = ["run", str(manifest), "--out", out, "--simulate", "--speed", "100"]
    first = wanbatch_cli(*argv, env={**s3_env.env(), "XDG_CACHE_HOME": str(cache)})
    assert first.returncode == 0, first.stderr
    (state,) = (cache / "wanbatch" / "runs").iterdir()
    assert str(state) in first.stderr and bucket in state.name
    billed = len(billing_of(state))
    again = wanbatch_cli(*argv, env={**s3_env.env(), "XDG_CACHE_HOME": str(cache)})
    assert again.returncode == 0, again.stderr
    assert "0 new item(s), 2 already in the ledger" in again.stderr
    assert len(billing_of(state)) == billed == 2


def test_a_bucket_that_does_not_exist_is_refused_before_anything_is_sent(s3_env: SeaweedServer, tmp_path: Path) -> None:
    """--out naming a bucket that does not exist: a usage error naming the bucket; the simulator never started,
    so nothing was sent or paid."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a bell"))
    state = tmp_path / "state"
    done = s3_run(manifest, "s3://no-such-bucket-here/run", state, s3_env)
    assert done.returncode == 2
    assert "bucket no-such-bucket-here does not exist" in done.stderr
    assert billing_of(state) == [] and not (state / SIM_DIR).exists()


def test_wrong_credentials_are_refused_with_no_secret_in_any_output(
    s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """A wrong secret: a usage error saying which variables to check, before anything is sent; neither the
    secret given nor the right one appears in the output or the state folder."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a drum"))
    state = tmp_path / "state"
    wrong = "wrong-secret-0123456789-abcdef"
    done = s3_run(manifest, f"s3://{bucket}/run", state, s3_env, AWS_SECRET_ACCESS_KEY=wrong)
    assert done.returncode == 2
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in done.stderr
    written = done.stdout + done.stderr
    written += "".join(p.read_text(errors="replace") for p in state.rglob("*") if p.is_file())
    assert wrong not in written and SECRET_KEY not in written
    assert billing_of(state) == []


def test_a_store_down_mid_run_costs_time_not_images(s3_env: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The S3 server stopped while images are being saved and started again later: the images wait (their bytes
    held, their URLs alive) and are saved once it is back; the audit is clean and nothing was paid twice."""
    manifest = write_manifest(tmp_path, prompts=numbered(12, "a boat"), **BIG)
    out, state = f"s3://{bucket}/boats", tmp_path / "state"
    env = cli_env(PYTHONPATH=str(REPO), **s3_env.env())
    argv = [*WANBATCH, "run", str(manifest), "--out", out, "--state", str(state), "--simulate", "--speed", "20"]
    with (tmp_path / "run.err").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            wait_until(lambda: len(billing_of(state)) >= 2, what="the first images billed")
            s3_env.stop()
            try:
                wait_until(lambda: "↻" in (tmp_path / "run.err").read_text(errors="replace"), what="a retry")
            finally:
                s3_env.start()
            assert proc.wait(timeout=240) == 0, (tmp_path / "run.err").read_text()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
    mirror = tmp_path / "bucket"
    s3_env.download(bucket, "boats", mirror)
    result = audit(state, billing_of(state), outputs=mirror)
    assert result.clean and result.saved == 24, result.summary()


async def test_a_kill_between_an_upload_and_its_commit_is_healed_without_a_second_upload(
    proxy: Proxy, s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """kill -9 of the run just after the store took an image, before the run heard it (so before the ledger's
    commit); the resumed run finds the object whole under its key by a HEAD and records it: every image is
    uploaded exactly once, the audit is clean, and nothing was paid twice."""
    manifest = write_manifest(tmp_path, prompts=numbered(6, "a vase"), **BIG)
    out, state = f"s3://{bucket}/vases", tmp_path / "state"
    env = cli_env(PYTHONPATH=str(REPO), AWS_ENDPOINT_URL=proxy.url)
    argv = [*WANBATCH, "run", str(manifest), "--out", out, "--state", str(state), "--simulate", "--speed", "100"]
    killed: list[str] = []
    first = await asyncio.create_subprocess_exec(*argv, env=env, stdout=DEVNULL, stderr=DEVNULL)

    def kill_after_the_first_image(method: str, path: str, status: int) -> None:
        if method == "PUT" and "/images/" in path and status == 200 and not killed:
            first.kill()
            killed.append(path)

    proxy.on_answer = kill_after_the_first_image
    assert await asyncio.wait_for(first.wait(), 120) == -signal.SIGKILL
    assert killed, "the run ended before it stored an image"
    saved = ledger_rows(state, "SELECT count(*) AS n FROM images WHERE state = 'saved'")[0]["n"]
    assert saved < len(image_puts(proxy)), "the killed upload was committed after all"

    proxy.on_answer = lambda method, path, status: None
    second = await asyncio.create_subprocess_exec(*argv, env=env, stdout=DEVNULL, stderr=PIPE)
    _, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    assert "stored already, whole" in err.decode()
    puts = image_puts(proxy)
    assert killed[0] in puts and set(puts.values()) == {1}, puts
    mirror = tmp_path / "bucket"
    s3_env.download(bucket, "vases", mirror)
    result = audit(state, billing_of(state), outputs=mirror)
    assert result.clean and result.saved == 12, result.summary()


def image_puts(proxy: Proxy) -> Counter:
    """How many times each image was stored (answered 200 to a PUT)."""
    return Counter(
        path for method, path, status in proxy.answered if method == "PUT" and "/images/" in path and status == 200
    )


def test_a_state_folder_is_refused_to_another_out(s3_env: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """A state folder keeps the --out it was made for: the same --state given with another prefix, or the state
    folder given as a folder --out, is a usage error naming the first --out, before anything is sent (its
    metadata.jsonl would list images that are not beside it); the first --out still resumes."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a flute"))
    out, state = f"s3://{bucket}/flutes", tmp_path / "state"
    assert s3_run(manifest, out, state, s3_env).returncode == 0
    billed = len(billing_of(state))
    other = s3_run(manifest, f"s3://{bucket}/elsewhere", state, s3_env)
    assert other.returncode == 2 and out in other.stderr, other.stderr
    as_folder = wanbatch_cli("run", str(manifest), "--out", str(state), "--simulate", env=s3_env.env())
    assert as_folder.returncode == 2 and out in as_folder.stderr, as_folder.stderr
    again = s3_run(manifest, out, state, s3_env)
    assert again.returncode == 0, again.stderr
    assert len(billing_of(state)) == billed == 2
    assert not s3_env.download(bucket, "elsewhere", tmp_path / "x")


async def test_outputs_the_store_refused_at_the_end_are_reported_and_stored_by_the_next_run(
    proxy: Proxy, s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """The store refuses metadata.jsonl and report.json at the end (503): every image is saved, but the run says
    which outputs are only in the state folder, report.json among them, and does not end as if all were there
    (exit 3); the next run, the store taking them, stores both and ends 0, paying nothing again."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a gong"))
    out, state = f"s3://{bucket}/gongs", tmp_path / "state"
    outputs = ("/metadata.jsonl", "/report.json")
    proxy.refuse = lambda method, path: 503 if method == "PUT" and path.endswith(outputs) else None
    argv = ["run", str(manifest), "--out", out, "--state", str(state), "--simulate", "--speed", "100", "--no-gallery"]
    env = {"AWS_ENDPOINT_URL": proxy.url}
    first = await asyncio.to_thread(wanbatch_cli, *argv, env=env)
    assert first.returncode == 3, first.stderr
    assert "not stored: metadata.jsonl" in first.stdout and "not stored: report.json" in first.stdout, first.stdout
    assert not s3_env.download(bucket, "gongs/metadata.jsonl", tmp_path / "none")

    proxy.refuse = lambda method, path: None
    second = await asyncio.to_thread(wanbatch_cli, *argv, env=env)
    assert second.returncode == 0, second.stderr
    mirror = tmp_path / "bucket"
    s3_env.download(bucket, "gongs", mirror)
    assert json.loads((mirror / "report.json").read_text())["outputs"]["not_stored"] == []
    result = audit(state, billing_of(state), outputs=mirror)
    assert result.clean and result.saved == len(billing_of(state)) == 2, result.summary()


async def test_ctrl_c_while_the_store_refuses_leaves_images_pending_and_resumable(
    proxy: Proxy, s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """Every image upload answered 503, then Ctrl-C: the run ends 130 with the resume line (its --out and
    --state), the images pending with the store's answer as the reason; cancel takes the same URL and --state;
    the resumed run, the store working, saves every image without paying again."""
    manifest = write_manifest(tmp_path, prompts=numbered(3, "a harp"))
    out, state = f"s3://{bucket}/harps", tmp_path / "state"
    proxy.refuse = lambda method, path: 503 if method == "PUT" and "/images/" in path else None
    env = cli_env(PYTHONPATH=str(REPO), AWS_ENDPOINT_URL=proxy.url)
    argv = [*WANBATCH, "run", str(manifest), "--out", out, "--state", str(state), "--simulate", "--speed", "100"]
    first = await asyncio.create_subprocess_exec(*argv, env=env, stdout=DEVNULL, stderr=PIPE)
    seen = b""
    while b"\xe2\x86\xbb" not in seen:  # ↻: an upload is waiting for its retry
        line = await asyncio.wait_for(first.stderr.readline(), 60)
        assert line, f"the run ended before an upload failed: {seen.decode()}"
        seen += line
    first.send_signal(signal.SIGINT)
    rest = await asyncio.wait_for(first.stderr.read(), 60)
    assert await first.wait() == 130, (seen + rest).decode()
    assert f"--out {out} --state {state}" in rest.decode()
    pending = ledger_rows(state, "SELECT state, error_code, error_message FROM images")
    assert {row["state"] for row in pending} == {"pending"} and len(pending) == 3, pending
    assert all(row["error_code"] == "DownloadFailed" and "made up" in row["error_message"] for row in pending)

    cancel = await asyncio.to_thread(
        wanbatch_cli, "cancel", out, "--state", str(state), "--simulate", env={"AWS_ENDPOINT_URL": proxy.url}
    )
    assert cancel.returncode == 0 and "canceled 0" in cancel.stdout, cancel.stderr
    proxy.refuse = lambda method, path: None
    second = await asyncio.create_subprocess_exec(*argv, env=env, stdout=DEVNULL, stderr=PIPE)
    _, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    mirror = tmp_path / "bucket"
    s3_env.download(bucket, "harps", mirror)
    result = audit(state, billing_of(state), outputs=mirror)
    assert result.clean and result.saved == len(billing_of(state)) == 3, result.summary()


def test_a_second_state_folder_for_a_filled_bucket_is_refused_before_anything_is_sent(
    s3_env: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """A bucket filled from one state folder, run again from a new one (a cleared cache, another machine): exit 2
    naming the folder that fills it, nothing sent, since the new ledger knows no item and would pay for all again;
    the first folder goes on; --force fills the bucket from the new one, and the first is then refused in turn."""
    manifest = write_manifest(tmp_path, prompts=numbered(2, "a bowl"))
    out, first, second = f"s3://{bucket}/bowls", tmp_path / "first", tmp_path / "second"
    assert s3_run(manifest, out, first, s3_env).returncode == 0
    refused = s3_run(manifest, out, second, s3_env)
    assert refused.returncode == 2, refused.stderr
    assert "another state folder" in refused.stderr and str(first.resolve()) in refused.stderr
    assert billing_of(second) == [] and not (second / SIM_DIR).exists()
    again = s3_run(manifest, out, first, s3_env)
    assert again.returncode == 0 and len(billing_of(first)) == 2, again.stderr
    forced = s3_run(manifest, out, second, s3_env, "--force")
    assert forced.returncode == 0, forced.stderr
    assert s3_run(manifest, out, first, s3_env).returncode == 2


def test_a_terminal_is_told_where_the_state_folder_is(s3_env: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """In a terminal the live display hides the log's start lines; the state folder of a run into a bucket, whose
    ledger a resume needs, is still said at start."""
    manifest = write_manifest(tmp_path, prompts=numbered(1, "a lamp"))
    main, child = pty.openpty()
    argv = [*WANBATCH, "run", str(manifest), "--out", f"s3://{bucket}/lamp", "--simulate", "--speed", "100"]
    env = cli_env(PYTHONPATH=str(REPO), COLUMNS="400", TERM="xterm", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env={**env, **s3_env.env()})
    os.close(child)
    output = b""
    while chunk := _read(main):
        output += chunk
    assert proc.wait(timeout=120) == 0
    os.close(main)
    (state,) = (tmp_path / "cache" / "wanbatch" / "runs").iterdir()
    assert f"the run's state (ledger): {state}" in output.decode("utf-8", "replace")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal's other side closed
        return b""
