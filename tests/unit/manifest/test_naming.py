"""Image file names: Unicode kept, what file systems refuse replaced, one function for checks and saving, shards."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import wanbatch
from helpers.manifest import load_manifest
from wanbatch.clock import ScaledClock
from wanbatch.errors import ManifestInvalid
from wanbatch.ledger import Ledger, SqliteLedger
from wanbatch.manifest import Manifest, naming


def name_of(pattern: str, *, index: int = 0, **variables: str) -> str:
    return naming.file_name(
        pattern,
        variables,
        item_id="abc",
        index=index,
        replica=0,
        model="wan2.2-t2i-flash",
        size="512*512",
        n=1,
        region="beijing",
        seed=None,
    )


@pytest.mark.parametrize(
    ("pattern", "fields", "expected"),
    [
        ("{subject}/{index}.png", {"subject": "红狐狸"}, "红狐狸/0.png"),
        ("{subject}-{index}.png", {"subject": "Schneeeule à l'aube"}, "Schneeeule à l'aube-0.png"),
        ("{subject}/{index}.png", {"subject": "a/b\\c"}, "a_b_c/0.png"),
        ("{subject}-{index}.png", {"subject": 'a:b*c?"d<e>f|g\x00h\x1fi'}, "a_b_c__d_e_f_g_h_i-0.png"),
        ("{subject}/{index}.png", {"subject": "..hidden. "}, "hidden/0.png"),
        ("{subject}/{index}.png", {"subject": "CON"}, "_CON/0.png"),
        ("{subject}.png", {"subject": "lpt1"}, "_lpt1.png"),
        ("{subject}/{index}.png", {"subject": ""}, "0.png"),
    ],
)
def test_names_keep_every_script_and_replace_only_what_file_systems_refuse(pattern, fields, expected) -> None:
    """Letters of any script stay; separators inside a value, control and Windows-forbidden characters go."""
    assert name_of(pattern, **fields) == expected


def test_a_name_past_255_bytes_is_cut_at_a_character_and_keeps_its_suffix() -> None:
    """A part longer than 255 bytes of UTF-8 is cut in the middle on character boundaries: its end ({index} and
    .png) is kept, and a digest of the whole tells apart two long names that differ only where it was cut."""
    first, second = (name_of("{subject}-{index}.png", subject="雪" * 200, index=i) for i in (0, 1))
    other = name_of("{subject}-{index}.png", subject="雪" * 150 + "霜" + "雪" * 49)
    assert first.endswith("-0.png") and second.endswith("-1.png") and len(first.encode()) <= 255
    assert first.split("~")[0].strip("雪") == "" and len({first, second, other}) == 3


def test_the_collision_check_compares_the_names_that_will_be_written(tmp_path: Path) -> None:
    """Two subjects that differ only in characters the saving replaces collide at plan time, before any cost."""
    job = load_manifest(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash, n: 1}
        prompts:
          - prompt: "a {subject}"
            matrix: {subject: ["fox:red", "fox?red"]}
            output: "{subject}.png"
        """,
    )
    with pytest.raises(ManifestInvalid, match=r"found two items writing 'fox_red\.png'"):
        job.validate()


async def test_a_run_writes_unicode_names_where_the_pattern_says(tmp_path: Path) -> None:
    """`output: "{subject}/{index}.png"` with Chinese subjects saves images/红狐狸/0.png and images/雪鸮/0.png."""
    job = load_manifest(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts:
          - prompt: "a {subject}"
            matrix: {subject: [红狐狸, 雪鸮]}
            output: "{subject}/{index}.png"
        """,
    )
    report = await wanbatch.run(job, out=tmp_path / "run", simulate=True, speed=600, gallery=False)
    assert report["images"]["saved"] == 2
    saved = sorted(p.relative_to(tmp_path / "run" / "images").as_posix() for p in (tmp_path / "run").rglob("*.png"))
    assert saved == ["红狐狸/0.png", "雪鸮/0.png"]


async def test_the_names_the_checks_compare_are_the_names_the_run_writes(tmp_path: Path) -> None:
    """Every field a pattern can name, the seed of each image among them: the plan's names are the saved files."""
    job = load_manifest(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 2, seed: [7, 40], repeats: 2}
        prompts:
          - prompt: "a {subject}"
            matrix: {subject: ["fox:red"]}
            output: "{region}/{model}/{size}-{n}/{subject}-{seed}-r{replica}-{index}.png"
        """,
    )
    planned = sorted(f"images/{item.output_name(i)}" for item in job.items() for i in range(item.n))
    report = await wanbatch.run(job, out=tmp_path / "run", simulate=True, speed=600, gallery=False)
    assert report["images"]["saved"] == len(planned) == 8
    saved = sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run" / "images").rglob("*.png"))
    assert saved == planned
    assert "images/beijing/wan2.2-t2i-flash/512_512-2/fox_red-41-r1-1.png" in saved


def _ledger_with(run_dir: Path, items: int) -> Ledger:
    ledger = Ledger.open(run_dir, clock=ScaledClock())
    rows = (
        SimpleNamespace(
            item_id=f"{i:020x}",
            replica=0,
            region="beijing",
            model="wan2.2-t2i-flash",
            n=1,
            variables={},
            source=f"job.yaml:{i}",
            entry="prompts[0]",
            output=None,
            request=lambda: {"size": "512*512"},
        )
        for i in range(items)
    )
    ledger.add_items(rows, run=ledger.begin_run())
    return ledger


async def test_a_large_run_spreads_its_images_over_subfolders_in_manifest_order(tmp_path: Path) -> None:
    """Past SHARD_ABOVE images a flat pattern saves to images/00000/, images/00001/... by item order, and stays so."""
    with _ledger_with(tmp_path / "big", naming.SHARD_ABOVE + 1) as ledger:
        assert await naming.sharded(SqliteLedger(ledger))
        first, later = ledger.get(f"{0:020x}"), ledger.get(f"{naming.SHARD_ITEMS + 5:020x}")
        assert naming.saved_name(first, 0, sharded=True) == f"images/00000/{first.item_id}-0.png"
        assert naming.saved_name(later, 0, sharded=True) == f"images/00001/{later.item_id}-0.png"
    with Ledger.open(tmp_path / "big", clock=ScaledClock()) as ledger:
        assert await naming.sharded(SqliteLedger(ledger))  # a resume writes where the first run did
    with _ledger_with(tmp_path / "small", naming.SHARD_ABOVE) as ledger:
        assert not await naming.sharded(SqliteLedger(ledger))


def test_names_that_differ_only_in_case_or_accent_form_collide_at_plan_time(tmp_path: Path) -> None:
    """`Fox` and `fox`, and `Café` written composed and decomposed, are one file on macOS and Windows: the plan
    refuses such a pattern, naming both lines."""
    for subjects in (["Fox", "fox"], ["Caf\u00e9", "Cafe\u0301"]):
        path = tmp_path / "job.yaml"
        path.write_text(
            "name: case\n"
            "defaults: {model: wan2.2-t2i-flash, size: '512*512', n: 1, prompt_extend: false}\n"
            'output: "{subject}.png"\n'
            "prompts:\n"
            "  - prompt: a {subject}\n"
            f"    matrix: {{subject: {json.dumps(subjects, ensure_ascii=False)}}}\n",
            encoding="utf-8",
        )
        with pytest.raises(ManifestInvalid, match="found two items writing"):
            Manifest.from_yaml(path).survey()
