"""Dataset exports of a run folder: WebDataset tar shards, or Parquet files.

The run folder already loads as it is (``datasets.load_dataset("imagefolder",
data_dir=...)``); an export packs it for training pipelines that stream shards.
Both formats carry every saved image with every column of ``metadata.jsonl``,
which is the run's dataset view: the same rows, in the same order.

- ``webdataset``: ``shard-000000.tar`` ...; each sample is ``{key}.png`` (the
  file as saved), ``{key}.txt`` (its caption, the prompt the image was made
  from, as image-text readers expect) and ``{key}.json`` (its metadata row). The key is
  ``{item_id}-{image_index}``: unique, stable across exports, and free of the
  dots and slashes that WebDataset would read as an extension or a folder.
- ``parquet``: ``shard-000000.parquet`` ...; an ``image`` column
  ``{bytes, path}`` (tagged so that ``datasets`` decodes it as an image) and one
  column per metadata field. Every shard has the same schema, taken from all
  rows: a variable that only some items have is a null elsewhere.

Parquet cannot hold a struct without fields, so ``variables`` is left out of a
Parquet export when no item has a variable.

Each image is checked against the sha256 recorded when it was saved, so an
export never packs a file that changed on disk. Every shard is written under a
temporary name and renamed only when all are written, so an export that fails
leaves the previous one as it was; shards of an earlier, larger export are
removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from wanbatch.atomic import atomic_path
from wanbatch.errors import ConfigError
from wanbatch.outputs.metadata import METADATA_FILE

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["DEFAULT_SHARD_SIZE", "FORMATS", "export"]

Format = Literal["webdataset", "parquet"]
FORMATS: tuple[Format, ...] = ("webdataset", "parquet")
_SUFFIX = {"webdataset": "tar", "parquet": "parquet"}
#: Images per shard: 0.2 to 0.6 GB of the service's PNGs, within what shard readers stream comfortably.
DEFAULT_SHARD_SIZE = 200
#: Rows per Parquet row group: a reader holds one group of images in memory at a time.
PARQUET_ROW_GROUP = 64
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One saved image: its metadata row and the file's bytes, verified."""

    key: str
    row: dict[str, Any]
    data: bytes
    extension: str  #: of the saved file, without the dot: "png"


def export(
    run_dir: Path,
    *,
    fmt: Format,
    out: Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    read: Callable[[str], bytes] | None = None,
    where: str | None = None,
) -> list[Path]:
    """Write the run's saved images as ``fmt`` shards into ``out`` (default ``run_dir/exports/FMT``); their paths.

    ``shard_size`` is the number of images per shard. A run with nothing saved writes no shard. ``read`` gives
    an image's bytes by its ``file_name`` when the images are not under ``run_dir`` (they are in a store, at
    ``where``); FileNotFoundError from it means the image is gone.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ConfigError(f"shard size {shard_size}: give at least 1 image per shard")
    metadata = run_dir / METADATA_FILE
    if not metadata.is_file():
        raise ConfigError(f"{run_dir} has no {METADATA_FILE}: is it a run folder? (a run writes it as it saves)")
    out = Path(out) if out is not None else run_dir / "exports" / fmt
    out.mkdir(parents=True, exist_ok=True)
    # One open file read twice (schema, then rows): a run that rewrites metadata.jsonl meanwhile replaces the
    # name, not what this handle reads.
    with metadata.open(encoding="utf-8") as source, contextlib.ExitStack() as shards:
        write = _write_tar if fmt == "webdataset" else _ParquetShard(_parquet_schema(_rows(source))).write
        read = read or (lambda name: (run_dir / name).read_bytes())
        samples = _samples(where or str(run_dir), _rows(source), read)
        paths = _write_shards(shards, out, _SUFFIX[fmt], samples, shard_size, write)
    for stale in set(out.glob(f"shard-*.{_SUFFIX[fmt]}")) - set(paths):
        stale.unlink()
    return paths


def _write_shards(
    shards: contextlib.ExitStack,
    out: Path,
    suffix: str,
    samples: Iterator[Sample],
    shard_size: int,
    write: Callable[[Path, Iterable[Sample]], None],
) -> list[Path]:
    """Write every shard under a temporary name, which ``shards`` renames into place as it closes (or removes, when
    any shard failed: then none is left behind); the shards' paths."""
    paths: list[Path] = []
    # A shard streams its samples from disk: memory holds one image (one row group for Parquet) at a time.
    while (first := next(samples, None)) is not None:
        paths.append(out / f"shard-{len(paths):06d}.{suffix}")
        tmp = shards.enter_context(atomic_path(paths[-1]))
        write(tmp, itertools.chain([first], itertools.islice(samples, shard_size - 1)))
    return paths


def _rows(source: TextIO) -> Iterator[dict[str, Any]]:
    source.seek(0)
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source.name}:{number}: not a JSON object ({exc.msg})") from exc


def _samples(where: str, rows: Iterable[dict[str, Any]], read: Callable[[str], bytes]) -> Iterator[Sample]:
    for row in rows:
        name = row["file_name"]
        path = f"{where.rstrip('/')}/{name}"
        try:
            data = read(name)
        except FileNotFoundError:
            raise ConfigError(f"{path} is in {METADATA_FILE} but not there; restore it to export") from None
        if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise ConfigError(f"{path} changed since the run saved it (its sha256 differs); restore it to export")
        key = _UNSAFE_KEY.sub("_", f"{row['item_id']}-{row['image_index']}")
        suffix = name.rpartition(".")[2].lower() if "." in name.rpartition("/")[2] else ""
        yield Sample(key=key, row=row, data=data, extension=suffix or "png")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# ── WebDataset ────────────────────────────────────────────────────────────────────────────────────


def _write_tar(path: Path, samples: Iterable[Sample]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            meta = json.dumps(sample.row, ensure_ascii=False, sort_keys=True).encode()
            _add(tar, f"{sample.key}.{sample.extension}", sample.data)
            _add(tar, f"{sample.key}.txt", _caption(sample.row).encode())
            _add(tar, f"{sample.key}.json", meta)


def _caption(row: dict[str, Any]) -> str:
    """The text the image was made from: the service's rewrite of the prompt when it made one."""
    return row.get("actual_prompt") or row.get("prompt") or ""


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # A fixed time and owner: the same run exports to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


# ── Parquet ───────────────────────────────────────────────────────────────────────────────────────


def _parquet_schema(rows: Iterable[dict[str, Any]]) -> pa.Schema:
    """One schema for every shard: each chunk's inferred schema, unified (structs merge, nulls give way)."""
    import pyarrow as pa  # only an export needs it; a run starts faster without it

    schemas = [pa.Table.from_pylist(chunk).schema for chunk in _chunks(rows, 10_000)]
    metadata = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)]
    fields += [field for field in map(_storable, metadata) if field is not None and field.name != "image"]
    # The tag ``datasets`` reads to decode the column as an image; other readers see a plain struct.
    features = {"info": {"features": {"image": {"_type": "Image"}}}}
    return pa.schema(fields, metadata={"huggingface": json.dumps(features)})


def _storable(field: pa.Field) -> pa.Field | None:
    """The field as Parquet can hold it, or None when it holds nothing.

    A field null in every row has no type of its own: the metadata's nullable fields are text, so it is a
    string. A struct with no fields (``variables`` when no item has one) cannot be written at all.
    """
    import pyarrow as pa

    if pa.types.is_null(field.type):
        return field.with_type(pa.string())
    if pa.types.is_struct(field.type):
        children = [child for child in map(_storable, field.type) if child is not None]
        return field.with_type(pa.struct(children)) if children else None
    return field


class _ParquetShard:
    """Writes shards of one schema, a row group at a time."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema

    def write(self, path: Path, samples: Iterable[Sample]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, self.schema) as writer:
            for group in _chunks(samples, PARQUET_ROW_GROUP):
                rows = [
                    {**sample.row, "image": {"bytes": sample.data, "path": sample.row["file_name"]}} for sample in group
                ]
                writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
