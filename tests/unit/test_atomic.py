"""Atomic writes: a file is replaced whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanbatch.atomic import atomic_path, write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    """Text and bytes land under the file's own name; the folder holds nothing else afterwards."""
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")
    write_atomic(path, "néw\n")
    assert path.read_text(encoding="utf-8") == "néw\n"
    write_atomic(path, b"\x89PNG", durable=True)
    assert path.read_bytes() == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    """A writer that fails half-way leaves the earlier file as it was, and its half-written file is gone."""
    path = tmp_path / "metadata.jsonl"
    path.write_text("whole\n", encoding="utf-8")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text("ha", encoding="utf-8")
        raise OSError("disk full")
    assert path.read_text(encoding="utf-8") == "whole\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.jsonl"]


def test_a_durable_write_goes_through_the_temporary_path_it_is_given(tmp_path: Path) -> None:
    """The downloader's partial file, in a folder of its own, becomes the image: a stale partial an earlier crash
    left there is written over and renamed away, and nothing is written beside the image; nothing stays in the
    partial folder. A failed write removes the partial it was given."""
    partial = tmp_path / ".partial"
    partial.mkdir()
    (partial / "a-0.part").write_bytes(b"stale half")
    final = tmp_path / "images" / "a-0.png"
    final.parent.mkdir()
    write_atomic(final, b"image", durable=True, temporary=partial / "a-0.part")
    assert final.read_bytes() == b"image" and not any(partial.iterdir())
    assert [p.name for p in final.parent.iterdir()] == ["a-0.png"]
    with pytest.raises(OSError, match="reset"), atomic_path(final, temporary=partial / "a-0.part") as tmp:
        assert tmp == partial / "a-0.part"
        tmp.write_bytes(b"ha")
        raise OSError("reset")
    assert final.read_bytes() == b"image" and not any(partial.iterdir())
