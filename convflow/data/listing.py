"""The watch's view of a source: a fingerprint of its listing (names, sizes, modification times, and
each Parquet file's footer), read without opening a single image, so that a watch can run often."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from convflow.config.schema import DataConfig, WatchConfig
from convflow.data.parquet_source import parquet_files

LISTED_SCHEMES = WatchConfig.LISTED_SCHEMES
# How many times a watch lists a changing source, `settle` seconds apart, before it gives up until its next run.
SETTLE_ROUNDS = 10


@dataclass(frozen=True)
class SourceListing:
    """What a listing of a source found: its fingerprint, how many files and how many bytes."""

    source: str
    fingerprint: str
    files: int
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def list_source(data: DataConfig) -> SourceListing:
    """The listing of `data.source` now: every file's path, size and modification time (hidden files,
    names starting with a dot, left out), and for Parquet sources each file's row and row-group counts
    from its footer.

    Raises:
        ValueError: the source has no files to list (sklearn:, tfds:).
    """
    if data.scheme not in LISTED_SCHEMES:
        raise ValueError(f"{data.source}: only {', '.join(LISTED_SCHEMES)} sources have files to list")
    entries = _parquet_entries(data.location) if data.scheme == "parquet" else _file_entries(Path(data.location))
    digest = hashlib.sha256(data.source.encode())
    files = size = 0
    for line, file_size in entries:
        digest.update(line.encode() + b"\n")
        files, size = files + 1, size + file_size
    return SourceListing(data.source, digest.hexdigest()[:24], files, size)


def settled_listing(
    data: DataConfig, settle: float, sleep: Callable[[float], None] = time.sleep, rounds: int = SETTLE_ROUNDS
) -> SourceListing | None:
    """The source's listing once two listings `settle` seconds apart agree (a copy in progress is not
    reported half done); None when it still changed after `rounds` listings."""
    listing = list_source(data)
    for _ in range(rounds):
        sleep(settle)
        again = list_source(data)
        if again == listing:
            return listing
        listing = again
    return None


def _file_entries(root: Path) -> Iterator[tuple[str, int]]:
    """(`relative path:size:mtime_ns`, size) of every file under `root`, in name order."""
    if root.is_file():
        stat = root.stat()
        yield f"{root.name}:{stat.st_size}:{stat.st_mtime_ns}", stat.st_size
        return
    stack = [root] if root.is_dir() else []
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as found:
            entries = sorted((entry for entry in found if not entry.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=True):
                stat = entry.stat()
                yield f"{Path(entry.path).relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}", stat.st_size


def _parquet_entries(location: str) -> Iterator[tuple[str, int]]:
    """Each Parquet file's name, size, modification time and footer (rows, row groups)."""
    import pyarrow.parquet as pq

    for file in parquet_files(location):
        stat = file.stat()
        footer = pq.read_metadata(file)
        yield f"{file}:{stat.st_size}:{stat.st_mtime_ns}:{footer.num_rows}:{footer.num_row_groups}", stat.st_size
