"""The `parquet:PATH` source: a labelled table of images, as data engineers hand them over.

PATH is one Parquet file, a folder of them (hive-partitioned folders included, e.g.
`split=train/part-0.parquet`) or a glob. Columns (renamable with `data.columns`):
- image: encoded image bytes, a struct of `bytes` and `path` (Hugging Face `datasets`' Image
  feature), or a path string relative to the Parquet file's folder;
- label: string or integer (integers take their names from `data.label_names`, else "0", "1", ...);
- split (optional): train / validation / test, kept as predefined splits.

The table is read in record batches, and image bytes go to files under the stage's folder as they
come, so memory holds one batch of images, not the table. A row whose image is unusable is skipped
and named by its file and row number.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convflow.config.schema import DataConfig
from convflow.core.errors import DataError
from convflow.data.loaded import SPLIT_NAMES, LoadedSource

BATCH_ROWS = 64  # rows of encoded images held at a time
STREAM_BUFFER_BYTES = 1 << 20
DEFAULT_COLUMNS = {"image": "image", "label": "label", "split": "split"}
# The first bytes of the formats Pillow reads, for a file name a person recognises.
MAGIC_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"RIFF", ".webp"))


def parquet_files(location: str) -> list[Path]:
    """The Parquet files of a `parquet:` source: the file, every *.parquet under the folder, or the
    glob's matches; sorted, so example ids and splits do not depend on the file system's order."""
    path = Path(location)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(file for file in path.rglob("*.parquet") if file.is_file())
    return sorted(Path(match) for match in glob.glob(location, recursive=True) if Path(match).is_file())


def open_streaming(file: Path):
    """A ParquetFile that reads through a small buffer: with pyarrow's defaults (whole column chunks,
    read-ahead on threads) reading a table of images held most of it in memory (benchmarks/
    parquet_memory.py: 907 MB of RSS for a 0.57 GB table, 197 MB streamed)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file, pre_buffer=False, buffer_size=STREAM_BUFFER_BYTES)


@dataclass
class _Rows:
    """What the rows read so far contribute to a LoadedSource."""

    labels: list[Any] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_parquet(data: DataConfig, scratch_dir: Path):
    """Read a `parquet:` source into a LoadedSource whose images are files.

    Raises:
        DataError: no Parquet file, a column missing (naming those found), or an unusable label.
    """

    files = parquet_files(data.location)
    if not files:
        raise DataError(f"{data.source}: no Parquet file found")
    columns = {**DEFAULT_COLUMNS, **(data.columns or {})}
    images_dir = scratch_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = _Rows()
    for index, file in enumerate(files):
        _read_file(file, index, columns, images_dir, rows)
    labels, names = _label_indices(rows.labels, data)
    return LoadedSource(
        labels=labels,
        label_names=names,
        example_ids=rows.example_ids,
        files=rows.files,
        sizes=rows.sizes,
        predefined_split=rows.splits,
        skipped=rows.skipped,
    )


def _read_file(file: Path, index: int, columns: dict[str, str], images_dir: Path, rows: _Rows) -> None:

    table = open_streaming(file)
    found = table.schema_arrow.names
    missing = [f"{role} column {columns[role]!r}" for role in ("image", "label") if columns[role] not in found]
    if missing:
        raise DataError(
            f"{file}: no {' and no '.join(missing)}; its columns are {found} "
            "(name yours with data.columns: {image: ..., label: ...})"
        )
    wanted = [columns[role] for role in ("image", "label", "split") if columns[role] in found]
    partition_split = _partition_value(file, columns["split"])
    row = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=wanted, use_threads=False):
        for values in batch.to_pylist():
            split = values.get(columns["split"], partition_split)
            _add_row(file, index, row, values[columns["image"]], values[columns["label"]], split, images_dir, rows)
            row += 1


def _partition_value(file: Path, key: str) -> str | None:
    """The value of a hive partition `key=value` in the file's folders, if any."""
    for part in file.parent.parts:
        name, sep, value = part.partition("=")
        if sep and name == key:
            return value
    return None


def _add_row(
    file: Path, index: int, row: int, image: Any, label: Any, split: Any, images_dir: Path, rows: _Rows
) -> None:
    from convflow.data.imaging import check_image_file

    where = f"{file} row {row}"
    path, problem = _image_path(image, file, images_dir / f"{index:04d}-{row:08d}")
    if problem is None and label is None:
        problem = "no label"
    if problem is None and split is not None and split not in SPLIT_NAMES:
        problem = f"split {split!r} is not one of {list(SPLIT_NAMES)}"
    size = (0, 0)
    if problem is None:
        problem, size = check_image_file(path)
    if problem:
        rows.skipped.append(f"{where}: {problem}")
        return
    rows.files.append(str(path))
    rows.sizes.append(size)
    rows.example_ids.append(f"{file.name}#{row}")
    rows.splits.append(split)
    rows.labels.append(label)


def image_cell(value: Any, table: Path) -> tuple[bytes | None, Path | None, str | None]:
    """A table's image value as its encoded bytes, or the file a path names (relative to the table's
    folder), or why there is neither; also `convflow predict`'s reading of a table."""
    if isinstance(value, dict):  # Hugging Face's Image feature: bytes, or a path when bytes is null
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value), None, None
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else table.parent / value
        return (None, path, None) if path.is_file() else (None, None, f"image file {path} does not exist")
    return None, None, "no image"


def _image_path(image: Any, file: Path, stem: Path) -> tuple[Path | None, str | None]:
    """The file holding the row's image (bytes are written to `stem` + a suffix), or why there is none."""
    content, path, problem = image_cell(image, file)
    if content is None:
        return path, problem
    suffix = next((suffix for magic, suffix in MAGIC_SUFFIXES if content.startswith(magic)), ".img")
    path = stem.with_suffix(suffix)
    path.write_bytes(content)
    return path, None


def _label_indices(values: list[Any], data: DataConfig) -> tuple[np.ndarray, list[str]]:
    """Integer labels and their names: string labels sorted by name; integer labels as they are,
    named by data.label_names (else "0", "1", ...)."""

    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        top = max(values, default=-1)
        names = list(data.label_names) if data.label_names else [str(label) for label in range(top + 1)]
        return np.asarray(values, np.int64), names
    if all(isinstance(value, str) for value in values):
        names = sorted(set(values))
        index = {name: label for label, name in enumerate(names)}
        return np.asarray([index[value] for value in values], np.int64), names
    kinds = sorted({type(value).__name__ for value in values})
    raise DataError(f"{data.source}: labels must be all strings or all integers, found {kinds}")


def fingerprint_files(location: str) -> list[str]:
    """Name, size and modification time of each Parquet file, for the source's fingerprint."""
    return [f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in parquet_files(location)]
