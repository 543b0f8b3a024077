"""Stage 1, download_and_split: read the source, hash every example, assign it a split."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger

from convflow.catalog import schemas
from convflow.config.model_zoo import get_base_spec
from convflow.config.schema import DataConfig
from convflow.core.context import RunContext
from convflow.core.records import SplitSet
from convflow.core.skips import skipped_summary
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.data.sources import SPLIT_NAMES, DataError, LoadedSource, load_source
from convflow.runtime.parallel import ordered_map

# Rows of splits.parquet (and of the fingerprint's JSON) made at a time.
PART_ROWS = 8_192


def _example_digests(loaded: LoadedSource) -> np.ndarray:
    """The sha256 digest of each example's bytes (N x 32 uint8). Folder and TFDS sources come
    hashed; other sources' files are read and hashed in threads (hashlib lets go of the GIL on
    large buffers)."""
    if loaded.digests is not None:
        return loaded.digests
    if loaded.images is not None:
        digests = [hashlib.sha256(image.tobytes()).digest() for image in loaded.images]
    else:
        digests = list(ordered_map(lambda path: hashlib.sha256(Path(path).read_bytes()).digest(), loaded.files))
    return np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32)


def _assign_splits(digests: np.ndarray, predefined: list[str | None], data: DataConfig) -> np.ndarray:
    """Each example's split (an index into SPLIT_NAMES), from its content hash alone.

    The same image always lands in the same split, so a grown dataset never moves a test
    example into training, and exact duplicates never straddle splits. Splits the source
    defines are kept; `carved` (the ones it lacks, plus train) share its training examples
    by the config's fractions: the first 15 hex digits of the hash, as a fraction of 16**15,
    fall into one of them (float64 arithmetic, in the same order as it always was done one
    example at a time, so every example keeps its split).
    """
    carved = _carved_splits(predefined)
    fractions = data.split.model_dump()
    first_60_bits = digests[:, :8].copy().view(">u8")[:, 0] >> np.uint64(4)
    position = first_60_bits.astype(np.float64) / 16**15 * sum(fractions[name] for name in carved)
    codes = np.full(len(digests), SPLIT_NAMES.index(carved[-1]), np.uint8)
    unassigned = np.ones(len(digests), bool)
    for name in carved:
        position -= fractions[name]
        landed = unassigned & (position < 0)
        codes[landed] = SPLIT_NAMES.index(name)
        unassigned &= ~landed
    kept = np.array([split is not None and split not in carved for split in predefined], bool)
    codes[kept] = [SPLIT_NAMES.index(split) for split in itertools.compress(predefined, kept)]
    return codes


def _carved_splits(predefined: list[str | None]) -> list[str]:
    defined = set(predefined) - {None}
    return [name for name in SPLIT_NAMES if name == "train" or name not in defined]


def _check_classes_in_splits(split_codes: np.ndarray, labels: np.ndarray, label_names: list[str]) -> None:
    for split in ("train", "test"):
        present = set(np.unique(labels[split_codes == SPLIT_NAMES.index(split)]).tolist())
        missing = [label_names[label] for label in range(len(label_names)) if label not in present]
        if missing:
            raise DataError(f"split {split!r} has no example of class(es) {missing}: add examples or change data.split")


def _hash_words(digests: np.ndarray) -> list[np.ndarray]:
    """A digest as four big-endian 64-bit words, most significant first: sorting by them sorts
    the hex strings."""
    words = np.ascontiguousarray(digests).view(">u8")
    return [words[:, column] for column in range(4)]


def _duplicate_counts(digests: np.ndarray, split_codes: np.ndarray) -> tuple[int, int]:
    """(examples whose bytes an earlier example has, distinct images found in more than one split).
    Only sources with predefined splits can have the second (hash-assigned splits keep duplicates
    together), and they inflate test scores."""
    words = _hash_words(digests)
    order = np.lexsort((split_codes, *reversed(words)))
    same_image = np.ones(max(len(order) - 1, 0), bool)
    for word in words:
        ordered = word[order]
        same_image &= ordered[1:] == ordered[:-1]
    ordered_splits = split_codes[order]
    in_other_split = same_image & (ordered_splits[1:] != ordered_splits[:-1])
    image_of_row = np.cumsum(np.concatenate([[0], ~same_image]))
    return int(same_image.sum()), len(np.unique(image_of_row[1:][in_other_split]))


def _data_fingerprint(digests: np.ndarray, labels: np.ndarray, split_codes: np.ndarray) -> str:
    """hash_json(sorted(zip(hex hashes, labels, split names)))[:24], computed a part at a time
    from the packed arrays (the list of tuples took about 200 bytes an example)."""
    alphabetical = {name: rank for rank, name in enumerate(sorted(SPLIT_NAMES))}
    split_rank = np.array([alphabetical[name] for name in SPLIT_NAMES])[split_codes]
    order = np.lexsort((split_rank, labels, *reversed(_hash_words(digests))))
    digest = hashlib.sha256(b"[")
    for start in range(0, len(order), PART_ROWS):
        rows = order[start : start + PART_ROWS]
        hexes = digests[rows].tobytes().hex()
        items = ", ".join(
            f'["{hexes[64 * at : 64 * at + 64]}", {label}, "{SPLIT_NAMES[code]}"]'
            for at, (label, code) in enumerate(zip(labels[rows].tolist(), split_codes[rows].tolist()))
        )
        digest.update((", " if start else "").encode() + items.encode())
    digest.update(b"]")
    return digest.hexdigest()[:24]


def _image_sizes(loaded: LoadedSource, count: int) -> np.ndarray:
    if loaded.images is not None:
        return np.tile(np.asarray(loaded.images.shape[1:3], np.int32), (count, 1))
    return np.asarray(loaded.sizes, np.int32).reshape(count, 2)


def _splits_parts(
    loaded: LoadedSource,
    digests: np.ndarray,
    split_codes: np.ndarray,
    sizes: np.ndarray,
    staging: Path,
    output_dir: Path,
) -> Iterator[pa.Table]:
    """splits.parquet's rows, PART_ROWS at a time; files written under `staging` named where they
    will be once it is moved into place."""
    label_names = np.array(loaded.label_names, dtype=object)
    split_names = np.array(SPLIT_NAMES, dtype=object)
    for start in range(0, len(digests), PART_ROWS):
        rows = slice(start, start + PART_ROWS)
        hexes = digests[rows].tobytes().hex()
        files = loaded.files[rows] if loaded.files else [None] * (len(hexes) // 64)
        yield pa.table(
            {
                "example_id": loaded.example_ids[rows],
                "label": loaded.labels[rows],
                "label_name": label_names[loaded.labels[rows]],
                "split": split_names[split_codes[rows]],
                "sha256": [hexes[at : at + 64] for at in range(0, len(hexes), 64)],
                "path": [path.replace(str(staging), str(output_dir)) if path else None for path in files],
                "height": sizes[rows, 0],
                "width": sizes[rows, 1],
            },
            schema=schemas.SPLITS_SCHEMA,
        )


def split_dataset(data: DataConfig, output_dir: Path) -> SplitSet:
    """Read `data.source`, assign each example a split, write splits.parquet (+ images.npy).

    Per example it holds packed arrays (digest, label, split, size: about 50 bytes) beside the
    source's own paths and ids; splits.parquet is written a part at a time.

    Raises:
        DataError: unusable data (missing folder, one class, a class missing from a split).
    """
    with staged_output(output_dir) as staging:
        loaded = load_source(data, staging)
        digests = _example_digests(loaded)
        split_codes = _assign_splits(digests, loaded.predefined_split or [None] * len(digests), data)
        _check_classes_in_splits(split_codes, loaded.labels, loaded.label_names)
        sizes = _image_sizes(loaded, len(digests))
        schemas.write_parquet_parts(
            _splits_parts(loaded, digests, split_codes, sizes, staging, output_dir),
            schemas.SPLITS_SCHEMA,
            staging / "splits.parquet",
        )
        if loaded.images is not None:
            np.save(staging / "images.npy", loaded.images)
        duplicates, across_splits = _duplicate_counts(digests, split_codes)
    counts = np.bincount(split_codes, minlength=len(SPLIT_NAMES))
    return SplitSet(
        output_dir=str(output_dir),
        splits_parquet=str(output_dir / "splits.parquet"),
        images_npy=str(output_dir / "images.npy") if loaded.images is not None else None,
        label_names=loaded.label_names,
        counts={name: int(count) for name, count in zip(SPLIT_NAMES, counts)},
        data_fingerprint=_data_fingerprint(digests, loaded.labels, split_codes),
        skipped=loaded.skipped,
        duplicates=duplicates,
        duplicates_across_splits=across_splits,
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
            f"{data.source}: {skipped_summary(split_set.skipped)}:\n  " + "\n  ".join(split_set.skipped)
        )
    return split_set
