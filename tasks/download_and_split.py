"""Stage 1, download_and_split: read the source, hash every example, assign it a split."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger

from convflow import tables
from convflow.config import DataConfig
from convflow.model_zoo import get_base_spec
from convflow.sources import SPLIT_NAMES, DataError, LoadedSource, load_source
from convflow.storage import staged_output
from convflow.tasks.records import SplitSet
from convflow.tasks.stage import RunContext, hash_json, stage_task


def _example_hashes(loaded: LoadedSource) -> list[str]:
    """The sha256 of each example's bytes. Folder and TFDS sources come hashed; other sources' files
    are read and hashed in threads (hashlib lets go of the GIL on large buffers)."""
    if loaded.hashes is not None:
        return loaded.hashes
    if loaded.images is not None:
        return [hashlib.sha256(image.tobytes()).hexdigest() for image in loaded.images]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest(), loaded.files))


def _split_by_hash(sha256: str, predefined: str | None, carved: list[str], data: DataConfig) -> str:
    """The split of one example, from its content hash alone.

    The same image always lands in the same split, so a grown dataset never moves a test
    example into training, and exact duplicates never straddle splits. Splits the source
    defines are kept; `carved` (the ones it lacks, plus train) share its training examples
    by the config's fractions.
    """
    if predefined is not None and predefined not in carved:
        return predefined
    fractions = data.split.model_dump()
    position = int(sha256[:15], 16) / 16**15 * sum(fractions[name] for name in carved)
    for name in carved:
        position -= fractions[name]
        if position < 0:
            return name
    return carved[-1]


def _carved_splits(predefined: list[str | None]) -> list[str]:
    defined = {split for split in predefined if split is not None}
    return [name for name in SPLIT_NAMES if name == "train" or name not in defined]


def _check_classes_in_splits(splits: list[str], labels: np.ndarray, label_names: list[str]) -> None:
    for split in ("train", "test"):
        present = {int(label) for label, name in zip(labels, splits) if name == split}
        missing = [label_names[label] for label in range(len(label_names)) if label not in present]
        if missing:
            raise DataError(
                f"split {split!r} has no example of class(es) {missing}: add examples or change data.split"
            )


def _duplicates_across_splits(hashes: list[str], splits: list[str]) -> int:
    """Distinct images found in more than one split: only sources with predefined splits can
    have them (hash-assigned splits keep duplicates together), and they inflate test scores."""
    splits_of: dict[str, set[str]] = {}
    for sha256, split in zip(hashes, splits):
        splits_of.setdefault(sha256, set()).add(split)
    return sum(1 for found_in in splits_of.values() if len(found_in) > 1)


def split_dataset(data: DataConfig, output_dir: Path) -> SplitSet:
    """Read `data.source`, assign each example a split, write splits.parquet (+ images.npy).

    Raises:
        DataError: unusable data (missing folder, one class, a class missing from a split).
    """
    with staged_output(output_dir) as staging:
        loaded = load_source(data, staging)
        hashes = _example_hashes(loaded)
        carved = _carved_splits(loaded.predefined_split)
        splits = [_split_by_hash(h, p, carved, data) for h, p in zip(hashes, loaded.predefined_split)]
        _check_classes_in_splits(splits, loaded.labels, loaded.label_names)
        files = [path.replace(str(staging), str(output_dir)) for path in loaded.files or []]
        sizes = loaded.sizes or [loaded.images.shape[1:3]] * len(hashes)
        table = pa.table(
            {
                "example_id": loaded.example_ids,
                "label": loaded.labels,
                "label_name": [loaded.label_names[label] for label in loaded.labels],
                "split": splits,
                "sha256": hashes,
                "path": files if files else [None] * len(hashes),
                "height": [int(height) for height, _ in sizes],
                "width": [int(width) for _, width in sizes],
            },
            schema=tables.SPLITS_SCHEMA,
        )
        tables.write_parquet(table, staging / "splits.parquet")
        if loaded.images is not None:
            np.save(staging / "images.npy", loaded.images)
    return SplitSet(
        output_dir=str(output_dir),
        splits_parquet=str(output_dir / "splits.parquet"),
        images_npy=str(output_dir / "images.npy") if loaded.images is not None else None,
        label_names=loaded.label_names,
        counts={name: splits.count(name) for name in SPLIT_NAMES},
        data_fingerprint=hash_json(sorted(zip(hashes, loaded.labels.tolist(), splits)))[:24],
        skipped=loaded.skipped,
        duplicates=len(hashes) - len(set(hashes)),
        duplicates_across_splits=_duplicates_across_splits(hashes, splits),
    )


def check_image_sizes(split_set: SplitSet, data: DataConfig, base: str) -> None:
    """Refuse source images smaller than the base model's minimum input: upscaled that far, they
    would train the model on blur.

    Raises:
        DataError: naming the first such images (file paths; example ids for in-memory sources).
    """
    minimum = get_base_spec(base).min_size
    rows = pq.read_table(split_set.splits_parquet, columns=["example_id", "path", "height", "width"]).to_pylist()
    small = [row for row in rows if min(row["height"], row["width"]) < minimum]
    if not small:
        return
    shown = ", ".join(
        f"{row['path'] or f'{data.source} example ' + row['example_id']} ({row['width']}x{row['height']})"
        for row in small[:5]
    )
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    raise DataError(
        f"{len(small)} source image(s) smaller than {minimum}x{minimum}, the minimum input of model.base "
        f"{base}: {shown}{more}; remove them, or use a base with a smaller minimum"
    )


@stage_task(retries=3, retry_delay_seconds=[5, 30, 120])
def download_and_split(data: DataConfig, source_fingerprint: str, run: RunContext) -> SplitSet:
    """Prefect task over split_dataset; `source_fingerprint` keys the cache on the source's files."""
    split_set = split_dataset(data, run.stage_dir("download_and_split"))
    if split_set.skipped:  # also listed in the report; said here so a run's log shows it
        get_run_logger().warning(
            f"skipped {len(split_set.skipped)} unusable file(s) of {data.source}:\n  " + "\n  ".join(split_set.skipped)
        )
    return split_set
