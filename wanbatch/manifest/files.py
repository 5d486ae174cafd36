"""Prompts from files: ``.txt`` one prompt a line, ``.csv`` and ``.jsonl`` with columns as variables.

A file is read twice, never held: once when the manifest is loaded (to
count its records and read a CSV header) and once, streaming, when items are
expanded, so a million-line file costs a file handle, not a million prompts.
Each record knows its line, so an error in it names ``prompts.csv:7``.

A column named like a parameter (``model``, ``size``, ``seed``, ...) sets
that parameter for its row; an empty cell leaves it as the entry has it.
Every other column is a variable, ``prompt`` included.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wanbatch.manifest.values import PARAMS, RESERVED, Template, Val, coerce_param, did_you_mean, variable_text
from wanbatch.manifest.yamlsrc import Origin

__all__ = ["KINDS", "PromptFile", "Record"]

#: File suffix → how it is read.
KINDS = (".txt", ".csv", ".jsonl")


@dataclass(frozen=True, slots=True)
class Record:
    """One prompt's row: its values (parameters and variables) and what was wrong in it."""

    index: int  #: 0-based among the file's records
    origin: Origin  #: the file and line; field ``prompts[i].file[index]``
    values: dict[str, Val]
    errors: tuple[tuple[Origin, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptFile:
    path: Path
    display: str  #: the name errors use, relative like the manifest's
    field: str  #: ``prompts[i].file``
    kind: str
    columns: tuple[str, ...] | None  #: None for .jsonl, whose keys may vary by line; ("prompt",) for .txt
    count: int

    @classmethod
    def open(cls, path: Path, display: str, field: str) -> PromptFile | str:
        """Count the records and read the header; or say what is wrong with the file."""
        kind = path.suffix.lower()
        if kind not in KINDS:
            return f"found a {path.suffix or 'suffix-less'} file; allowed: a .txt, .csv or .jsonl file"
        if path.is_dir():
            return f"found a folder at {display}; allowed: a .txt, .csv or .jsonl file"
        if not path.is_file():
            near = sorted(p.name for p in path.parent.glob(f"*{kind}")) if path.parent.is_dir() else []
            return (
                f"no such file: found nothing at {display}; allowed: an existing {kind} file, relative to the manifest"
                f"{did_you_mean(path.name, near)}"
            )
        try:
            columns, count = _survey(path, kind)
        except UnicodeDecodeError as exc:
            return f"found bytes that are not UTF-8 in {display} (byte {exc.start}); allowed: UTF-8 text"
        except (OSError, csv.Error) as exc:
            return f"found a file that cannot be read ({exc}) at {display}; allowed: a readable {kind} file"
        if isinstance(columns, str):
            return columns
        return cls(path=path, display=display, field=field, kind=kind, columns=columns, count=count)

    def records(self) -> Iterator[Record]:
        """The records in file order, read lazily."""
        reader = {".txt": self._txt, ".csv": self._csv, ".jsonl": self._jsonl}[self.kind]
        yield from reader()

    def _origin(self, index: int, line: int) -> Origin:
        return Origin(self.display, line, f"{self.field}[{index}]")

    def lines(self) -> Iterator[tuple[int, int, str]]:
        """A .txt file's prompts as (index, line, text), read lazily: what a record holds, without its objects."""
        with self.path.open(encoding="utf-8-sig") as lines:
            index = 0
            for line_no, line in enumerate(lines, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                yield index, line_no, text
                index += 1

    def record_of(self, index: int, line_no: int, text: str) -> Record:
        """The record of one line of a .txt file."""
        origin = self._origin(index, line_no)
        return Record(index, origin, {"prompt": Val(text, origin.child("prompt"))})

    def _txt(self) -> Iterator[Record]:
        for index, line_no, text in self.lines():
            yield self.record_of(index, line_no, text)

    def _csv(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            index, line_no = 0, reader.line_num
            for row in reader:
                start, line_no = line_no + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                origin = self._origin(index, start)
                if len(row) != len(header):
                    message = f"found {len(row)} cells; allowed: {len(header)}, one per column of the header"
                    yield Record(index, origin, {}, ((origin, message),))
                else:
                    yield _record(index, origin, zip(header, row, strict=True), from_text=True)
                index += 1

    def _jsonl(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8-sig") as lines:
            index = 0
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                origin = self._origin(index, line_no)
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    found = f"not valid JSON: found {exc.msg} at column {exc.colno}; allowed: one JSON object per line"
                    yield Record(index, origin, {}, ((origin, found),))
                else:
                    if isinstance(data, dict):
                        yield _record(index, origin, data.items(), from_text=False)
                    else:
                        found = f"found a JSON {type(data).__name__}; allowed: one JSON object per line"
                        yield Record(index, origin, {}, ((origin, found),))
                index += 1


def _record(index: int, origin: Origin, cells: Iterable[tuple[object, object]], *, from_text: bool) -> Record:
    values: dict[str, Val] = {}
    errors: list[tuple[Origin, str]] = []
    for key, raw in cells:
        key = str(key).strip()
        cell = origin.child(key)
        if from_text and isinstance(raw, str) and not raw.strip() and key != "prompt":
            continue  # an empty cell leaves the parameter or variable as the entry has it
        if key in PARAMS:
            value, problem = coerce_param(key, raw, from_text=from_text)
            if key == "negative_prompt" and value is not None:
                value = Template.literal(value)
        elif key in RESERVED:
            value, problem = None, f"found a column {key!r}; allowed: any name but {', '.join(RESERVED)}"
        else:
            value = variable_text(raw)
            problem = None if value is not None else "found a nested value; allowed: text, a number or a boolean"
            if key == "prompt" and value is not None:
                value = value.strip()
        if problem:
            errors.append((cell, problem))
        else:
            values[key] = Val(value, cell)
    return Record(index, origin, values, tuple(errors))


def _survey(path: Path, kind: str) -> tuple[tuple[str, ...] | str | None, int]:
    """(columns or a problem, record count), in one streaming pass."""
    with path.open(encoding="utf-8-sig", newline="" if kind == ".csv" else None) as handle:
        if kind == ".txt":
            return ("prompt",), sum(1 for line in handle if line.strip() and not line.lstrip().startswith("#"))
        if kind == ".jsonl":
            return None, sum(1 for line in handle if line.strip())
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        count = sum(1 for row in reader if any(cell.strip() for cell in row))
    where = f"the header of {path.name} (line 1)"
    if not header or not all(header):
        return f"{where} has an empty column name; allowed: a name for every column", 0
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        return f"{where} names column {repeated[0]!r} twice; allowed: each name once", 0
    reserved = [name for name in header if name in RESERVED]
    if reserved:
        return f"{where} has a column {reserved[0]!r}; allowed: any name but {', '.join(RESERVED)}", 0
    return tuple(header), count
