"""Run folders as datasets: imagefolder as they are, and WebDataset and Parquet exports read back by their readers."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from helpers.engine import run_batch
from helpers.outputs import metadata
from wanbatch.errors import ConfigError
from wanbatch.outputs.export import export

#: Entries with different variables (and one with none), a negative prompt on some items only, two sizes.
MIXED = """\
name: export-mix
defaults: {model: wan2.2-t2i-flash, size: "1024*1024", n: 2, seed: 5, prompt_extend: false}
prompts:
  - prompt: "a {animal} in fresh snow"
    matrix: {animal: [fox, snowy owl]}
  - prompt: "a lighthouse, {style}"
    matrix: {style: [ink, "oil & \\"glaze\\""]}
    size: "1280*720"
    negative_prompt: text, watermark
  - a plain prompt with no variable
"""
MIXED_SAVED = 2 * 2 + 2 * 2 + 2
PLAIN = """\
name: plain
defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1, prompt_extend: false}
prompts:
  - a red fox in fresh snow
  - a red fox at dawn
"""


def size_of(row: dict) -> tuple[int, int]:
    width, height = row["size"].split("*")
    return int(width), int(height)


def with_every_variable(row: dict, names: set[str]) -> dict:
    """The row as a columnar reader gives it back: every variable of the run, None where the item has none."""
    return {**row, "variables": {name: row["variables"].get(name) for name in names}}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run whose items have differing variables; tests copy it before changing anything in it."""
    run_dir = run_batch(tmp_path_factory.mktemp("export"), MIXED)
    assert len(metadata(run_dir)) == MIXED_SAVED
    return run_dir


def test_run_folder_loads_as_imagefolder_as_it_is(mixed_run, tmp_path):
    """datasets' imagefolder loads the run folder (gallery and exports in it) as one row per saved image."""
    run_dir = Path(shutil.copytree(mixed_run, tmp_path / "run"))
    export(run_dir, fmt="webdataset")
    export(run_dir, fmt="parquet")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(run_dir), cache_dir=str(tmp_path / "hf-cache"))
    rows = metadata(run_dir)
    table = loaded["train"]
    assert table.num_rows == len(rows) == MIXED_SAVED
    assert set(table.column_names) == {"image"} | set(rows[0]) - {"file_name"}
    names = {name for row in rows for name in row["variables"]}
    assert names == {"animal", "style"}
    expected = {(row["item_id"], row["image_index"]): row for row in rows}
    for got in table:
        row = expected.pop((got["item_id"], got["image_index"]))
        assert got.pop("image").size == size_of(row)
        assert got == {k: v for k, v in with_every_variable(row, names).items() if k != "file_name"}
    assert expected == {}


def test_webdataset_shards_read_back_with_webdataset(mixed_run, tmp_path):
    """WebDataset shards hold each saved image's PNG byte for byte and its metadata row, under a safe key."""
    shards = export(mixed_run, fmt="webdataset", out=tmp_path / "wds", shard_size=4)
    assert [path.name for path in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(webdataset.WebDataset([str(path) for path in shards], shardshuffle=False))
    rows = {(row["item_id"], row["image_index"]): row for row in metadata(mixed_run)}
    assert len(samples) == len(rows) == MIXED_SAVED
    for sample in samples:
        row = json.loads(sample["json"])
        assert row == rows.pop((row["item_id"], row["image_index"]))
        assert sample["__key__"] == f"{row['item_id']}-{row['image_index']}"
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(sample["png"])) as img:
            assert (img.format, img.size) == ("PNG", size_of(row))
    assert rows == {}
    # Decoded by webdataset itself, as a training pipeline would.
    decoded = list(webdataset.WebDataset([str(shards[0])], shardshuffle=False).decode("pil").to_tuple("png", "json"))
    assert [img.size for img, meta in decoded] == [size_of(meta) for img, meta in decoded] and len(decoded) == 4


def test_parquet_shards_read_back_with_pyarrow(mixed_run, tmp_path):
    """Parquet shards share one schema; every row has its image bytes (right size) and every metadata column."""
    shards = export(mixed_run, fmt="parquet", out=tmp_path / "pq", shard_size=4)
    assert len(shards) == 3
    tables = [pq.read_table(path) for path in shards]
    assert all(table.schema == tables[0].schema for table in tables)
    rows = metadata(mixed_run)
    names = {name for row in rows for name in row["variables"]}
    variables = tables[0].schema.field("variables").type
    assert {field.name: field.type for field in variables} == {"animal": pa.string(), "style": pa.string()}
    got = pa.concat_tables(tables).to_pylist()
    assert [row["file_name"] for row in got] == [row["file_name"] for row in rows]  # metadata.jsonl's order
    for exported, row in zip(got, rows, strict=True):
        image = exported.pop("image")
        assert exported == with_every_variable(row, names)
        assert image["path"] == row["file_name"] and hashlib.sha256(image["bytes"]).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(image["bytes"])) as img:
            assert img.size == size_of(row)
    # datasets reads the image column's tag and decodes it.
    loaded = datasets.load_dataset(
        "parquet", data_files=[str(path) for path in shards], cache_dir=str(tmp_path / "hf-cache")
    )["train"]
    assert loaded.num_rows == MIXED_SAVED and loaded[0]["image"].size == size_of(rows[0])


def test_run_without_variables_exports_to_parquet(tmp_path):
    """A run with no variable at all exports (Parquet cannot hold an empty struct), its null columns as text."""
    run_dir = run_batch(tmp_path, PLAIN)
    (shard,) = export(run_dir, fmt="parquet")
    assert shard == run_dir / "exports" / "parquet" / "shard-000000.parquet"
    table = pq.read_table(shard)
    assert "variables" not in table.column_names and table.num_rows == 2
    assert table.schema.field("negative_prompt").type == pa.string()
    assert sorted(table.column("prompt").to_pylist()) == ["a red fox at dawn", "a red fox in fresh snow"]


def test_a_new_export_replaces_the_old_and_a_changed_image_is_refused(mixed_run, tmp_path):
    """Re-exporting leaves only the new shards; an image changed on disk fails the export and keeps the last one."""
    run_dir = Path(shutil.copytree(mixed_run, tmp_path / "run"))
    out = tmp_path / "wds"
    assert len(export(run_dir, fmt="webdataset", out=out, shard_size=2)) == 5
    shards = export(run_dir, fmt="webdataset", out=out, shard_size=4)
    assert sorted(out.iterdir()) == shards
    before = {path: path.read_bytes() for path in shards}
    changed = run_dir / metadata(run_dir)[-1]["file_name"]
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="changed since the run saved it"):
        export(run_dir, fmt="webdataset", out=out, shard_size=1)
    assert {path: path.read_bytes() for path in sorted(out.iterdir())} == before
    changed.unlink()
    with pytest.raises(ConfigError, match="but not there; restore it"):
        export(run_dir, fmt="parquet", out=out)
    assert sorted(out.iterdir()) == shards


def test_export_refuses_what_it_cannot_do(mixed_run, tmp_path):
    """Not a run folder, an unknown format and an empty shard size are refused before anything is written."""
    with pytest.raises(ConfigError, match=r"no metadata\.jsonl"):
        export(tmp_path, fmt="parquet")
    with pytest.raises(ConfigError, match="allowed: webdataset, parquet"):
        export(mixed_run, fmt="zip", out=tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 1"):
        export(mixed_run, fmt="webdataset", out=tmp_path / "x", shard_size=0)
    assert not (tmp_path / "x").exists()


def test_same_run_exports_to_the_same_bytes(mixed_run, tmp_path):
    """Two exports of one run are identical, byte for byte: shards can be checksummed and cached."""
    first = export(mixed_run, fmt="webdataset", out=tmp_path / "a")
    second = export(mixed_run, fmt="webdataset", out=tmp_path / "b")
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]


def test_webdataset_samples_carry_their_caption_as_txt(mixed_run, tmp_path):
    """Each WebDataset sample has a ``.txt`` caption, the prompt its image was made from, as image-text readers
    expect (``to_tuple("png", "txt")``)."""
    shards = export(mixed_run, fmt="webdataset", out=tmp_path / "wds")
    pairs = list(webdataset.WebDataset([str(path) for path in shards], shardshuffle=False).to_tuple("txt", "json"))
    assert len(pairs) == MIXED_SAVED
    for caption, meta in pairs:
        row = json.loads(meta)
        assert caption.decode() == (row["actual_prompt"] or row["prompt"]) and caption
