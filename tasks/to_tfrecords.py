"""Stage 2, to_tfrecords: resize every example once and write sharded TFRecords, shard by shard,
and each image's properties for check_data (image_properties.parquet), measured as it is decoded."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convflow.catalog.schemas import write_parquet
from convflow.checks.image_properties import batch_properties
from convflow.checks.schemas import IMAGE_PROPERTIES, image_properties_table
from convflow.config.schema import DataConfig
from convflow.core.context import RunContext
from convflow.core.hashing import hash_json
from convflow.core.object_store import ObjectStore, is_remote, local_copy, store_for, upload_file
from convflow.core.records import SplitSet, TFRecordSet
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.data import imaging
from convflow.data.sources import SPLIT_NAMES, DataError, iter_tfds_examples
from convflow.runtime.parallel import PROCESSES_FROM, ordered_map
from convflow.runtime.progress import StageProgress
from convflow.tfrecords import spec
from convflow.tfrecords.parts import PartJob, write_part
from convflow.tfrecords.writer import PART_RECORDS, ShardFile, ShardOfParts, encode_example

# Rows of images.npy measured at a time: 4,096 MNIST digits are 13 MB of float32 pixels.
ARRAY_CHUNK = 4096


@dataclass(frozen=True)
class ShardJob:
    """One shard for a Dask worker to write: its file and its examples (rows of splits.parquet, and
    their image files for sources of files)."""

    path: str
    indices: list[int]
    labels: list[int]
    example_ids: list[str]
    files: list[str] | None = None


@dataclass(frozen=True)
class Example:
    """One example on its way into a shard: `source` is its image file, its row of images.npy, or
    its TFDS image."""

    split: str
    label: int
    example_id: str
    source: object


def _record_images(images_npy: str | None, data: DataConfig, record_format: str) -> imaging.RecordImages:
    return imaging.RecordImages(tuple(data.image_size), data.channels, data.resize, record_format, images_npy)


def _shard_plan(
    counts: dict[str, int], data: DataConfig, record_format: str, directory: Path
) -> dict[str, list[tuple[Path, int]]]:
    """Each split's shards (file, examples), `data.shard_size` examples each, in splits.parquet order."""
    plan = {}
    for split in SPLIT_NAMES:
        sizes = [
            min(data.shard_size, counts.get(split, 0) - start)
            for start in range(0, counts.get(split, 0), data.shard_size)
        ]
        plan[split] = [
            (directory / spec.shard_name(split, number, len(sizes), size, record_format, data.compression), size)
            for number, size in enumerate(sizes)
        ]
    return plan


class _ShardWriters:
    """Writes records, arriving in splits.parquet order, into their split's shards: each shard is
    filled in turn and its file closed once full, so at most one file a split is open. `digests`
    holds each closed shard's digest (writer.ShardFile), counted as it was written."""

    def __init__(self, plan: dict[str, list[tuple[Path, int]]], compression: str) -> None:
        self._next = {split: iter(shards) for split, shards in plan.items()}
        self._compression = compression
        self._open: dict[str, list] = {}  # split -> [shard file, records still to come]
        self.digests: dict[str, str] = {}

    def write(self, split: str, record: bytes) -> None:
        if split not in self._open:
            path, size = next(self._next[split])
            self._open[split] = [ShardFile(path, self._compression), size]
        shard = self._open[split]
        shard[0].write(record)
        shard[1] -= 1
        if shard[1] == 0:
            self._close(self._open.pop(split)[0])

    def _close(self, shard: ShardFile) -> None:
        shard.close()
        self.digests[Path(shard.path).name] = shard.digest

    def close(self) -> None:
        for shard, _ in self._open.values():
            self._close(shard)


def _examples(split_set: SplitSet) -> Iterator[Example]:
    """Every example, in splits.parquet order, read a batch of rows at a time."""
    batches = pq.ParquetFile(split_set.splits_parquet).iter_batches(columns=["example_id", "label", "split", "path"])
    rows = (row for batch in batches for row in batch.to_pylist())
    for number, row in enumerate(rows):  # a row's number is its image's row of images.npy
        source = row["path"] if row["path"] is not None else number
        yield Example(row["split"], row["label"], row["example_id"], source)


def _tfds_examples(split_set: SplitSet, data: DataConfig) -> Iterator[Example]:
    """The examples of splits.parquet with their images streamed from the TFDS dataset again."""
    for index, (row, example) in enumerate(zip(_examples(split_set), iter_tfds_examples(data))):
        if row.example_id != example.example_id:
            raise DataError(
                f"{data.source}: example {index} is {example.example_id}, split as "
                f"{row.example_id}: the dataset changed since download_and_split"
            )
        yield Example(row.split, row.label, row.example_id, example.image)


def _write_here(
    examples: Iterator[Example],
    images: imaging.RecordImages,
    writers: _ShardWriters,
    progress: StageProgress,
    measured: list[dict] | None = None,
) -> None:
    """Decode and encode in threads on every core, a few chunks ahead; frame and write here, in
    order, so shards are the same bytes whatever the number of threads. Each image's properties
    are appended to `measured`, unless it is None."""
    examples, of_sources = itertools.tee(examples)
    decode = functools.partial(images.measured, measure=measured is not None)
    encoded = ordered_map(decode, (example.source for example in of_sources))
    for done, (example, (image, properties)) in enumerate(zip(examples, encoded), 1):
        writers.write(example.split, encode_example(image, example.label, example.example_id))
        if measured is not None:
            measured.append(properties)
        progress.update(done)


def _write_in_workers(
    examples: Iterator[Example],
    images: imaging.RecordImages,
    plan: dict[str, list[tuple[Path, int]]],
    compression: str,
    progress: StageProgress,
    measured: dict[str, dict],
) -> dict[str, str]:
    """Each shard of `plan` written a part at a time by worker processes, the parts joined here in
    order: the same bytes as _write_here writes. Their names and digests; the images' properties
    go into `measured` by example id (parts of different splits finish out of splits.parquet order)."""
    jobs, of_jobs = itertools.tee(_part_jobs(examples, plan))
    write = functools.partial(write_part, images=images, compression=compression)
    shards: dict[str, ShardOfParts] = {}
    digests, done = {}, 0
    try:
        for job, (part_digest, records, properties) in zip(of_jobs, ordered_map(write, jobs, chunk=1, processes=True)):
            measured.update(zip(job.example_ids, properties))
            if job.shard not in shards:
                shards[job.shard] = ShardOfParts(job.shard)
            shard = shards[job.shard]
            shard.append(job.path, part_digest, records)
            if job.last:
                shards.pop(job.shard).close()
                digests[Path(job.shard).name] = shard.digest
            done += records
            progress.update(done)
    finally:
        for shard in shards.values():
            shard.close()
    return digests


@dataclass
class _FillingShard:
    """A shard whose parts are being made: the examples of its next part, and how many of its
    examples are still to come."""

    path: str
    left: int
    parts: int = 0
    part: list[Example] = field(default_factory=list)


def _part_jobs(examples: Iterator[Example], plan: dict[str, list[tuple[Path, int]]]) -> Iterator[PartJob]:
    """The examples, in order, as parts of their split's shards: PART_RECORDS examples each, a
    shard's last part what is left of it."""
    shards = {split: iter(planned) for split, planned in plan.items()}
    filling: dict[str, _FillingShard] = {}
    for example in examples:
        if example.split not in filling:
            path, size = next(shards[example.split])
            filling[example.split] = _FillingShard(str(path), size)
        shard = filling[example.split]
        shard.part.append(example)
        shard.left -= 1
        if len(shard.part) == PART_RECORDS or shard.left == 0:
            yield PartJob(
                shard.path,
                f"{shard.path}.part{shard.parts:05d}",
                [e.label for e in shard.part],
                [e.example_id for e in shard.part],
                [e.source for e in shard.part],
                last=shard.left == 0,
            )
            shard.parts, shard.part = shard.parts + 1, []
            if shard.left == 0:
                del filling[example.split]


def _decode_and_write_shard(
    job: ShardJob, images_npy: str | None, data: DataConfig, record_format: str
) -> tuple[str, str, list[dict]]:
    """One shard, start to end, on a Dask worker: its file name, digest and images' properties."""
    if is_remote(job.path):  # an object store's root: written here, then uploaded to its place
        with tempfile.TemporaryDirectory(prefix="convflow-shard-") as folder:
            local = Path(folder) / job.path.rsplit("/", 1)[-1]
            name, digest, measured = _decode_and_write_shard(
                dataclasses.replace(job, path=str(local)), images_npy, data, record_format
            )
            upload_file(local, job.path)
        return job.path, digest, measured
    if images_npy is not None and is_remote(images_npy):
        images_npy = str(local_copy(images_npy))
    images = _record_images(images_npy, data, record_format)
    sources = job.files if job.files is not None else job.indices
    writers = _ShardWriters({"shard": [(Path(job.path), len(sources))]}, data.compression)
    examples = (Example("shard", *row) for row in zip(job.labels, job.example_ids, sources))
    unseen = StageProgress(Path(job.path).name, len(sources), every=float("inf"))  # a worker has no run log
    measured: list[dict] = []
    try:
        _write_here(examples, images, writers, unseen, measured)
    finally:
        writers.close()
    return (*next(iter(writers.digests.items())), measured)


def _write_on_dask(
    address: str, jobs: list[ShardJob], images_npy: str | None, data: DataConfig, record_format: str
) -> tuple[dict[str, str], dict[str, dict]]:
    """Each shard written by a worker of the Dask cluster; their names and digests, and the images'
    properties by example id."""
    from distributed import Client

    with Client(address) as client:
        shards = client.gather(
            client.map(
                _decode_and_write_shard, jobs, images_npy=images_npy, data=data, record_format=record_format, pure=False
            )
        )
    by_example = {
        example_id: properties
        for job, (_, _, measured) in zip(jobs, shards)
        for example_id, properties in zip(job.example_ids, measured)
    }
    return {name: digest for name, digest, _ in shards}, by_example


def _shard_jobs(split_set: SplitSet, plan: dict[str, list[tuple[Path, int]]]) -> list[ShardJob]:
    """The shards of `plan` as jobs for Dask workers, with their examples' rows of splits.parquet."""
    table = pq.read_table(split_set.splits_parquet, columns=["example_id", "label", "split", "path"])
    jobs = []
    for split, shards in plan.items():
        rows = np.flatnonzero(pc.equal(table["split"], split).to_numpy(zero_copy_only=False))
        starts = np.cumsum([0] + [size for _, size in shards])
        jobs += [_job(table, rows[start:stop], path) for (path, _), start, stop in zip(shards, starts, starts[1:])]
    return jobs


def _job(table, rows: np.ndarray, path: Path) -> ShardJob:
    part = table.take(rows)
    files = part["path"].to_pylist()
    return ShardJob(
        path=str(path),
        indices=rows.tolist(),
        labels=part["label"].to_pylist(),
        example_ids=part["example_id"].to_pylist(),
        files=None if files and files[0] is None else files,
    )


def write_tfrecords(
    split_set: SplitSet, data: DataConfig, output_dir: Path, store: ObjectStore | None = None
) -> TFRecordSet:
    """Resize each example of `split_set` to `data.image_size` and write TFRecord shards in
    `data.record_format` (auto: spec.choose_record_format), compressed as `data.compression` says.

    Examples stream from splits.parquet (and TFDS examples from their dataset) into each split's
    shards in turn, so memory holds a few chunks of images, never the dataset. Image files are
    decoded by worker processes from PROCESSES_FROM of them on (each writes parts of shards, joined
    here), else in threads; or each shard is written by a worker of the Dask cluster at
    `data.dask_scheduler` (with an object `store` as the root, each worker uploads its shard to
    its place in the store: the workers need its URL and credentials, no shared folder). Each
    image's properties (checks.image_properties, for check_data) are measured where it is decoded
    and written as image_properties.parquet, in splits.parquet order.

    Raises:
        DataError: an image file does not decode, naming it; nothing is written.
    """
    examples = sum(split_set.counts.values())
    record_format = spec.choose_record_format(data.record_format, tuple(data.image_size), data.channels, examples)
    with staged_output(output_dir) as staging:
        plan = _shard_plan(split_set.counts, data, record_format, staging)
        if data.dask_scheduler and data.scheme != "tfds":
            jobs, images_npy = _shard_jobs(split_set, plan), split_set.images_npy
            if store is not None:  # Dask workers reach the store, not this machine's folders
                jobs = [dataclasses.replace(job, path=store.to_url(output_dir / Path(job.path).name)) for job in jobs]
                images_npy = store.to_url(images_npy) if images_npy else None
            digests, by_example = _write_on_dask(data.dask_scheduler, jobs, images_npy, data, record_format)
            if store is not None:  # the shards the workers uploaded, linked in from the cache
                for job in jobs:
                    store.link(job.path, staging / job.path.rsplit("/", 1)[-1])
            measured = [by_example[example.example_id] for example in _examples(split_set)]
        else:
            digests, measured = _write_locally(split_set, data, plan, record_format)
        _write_image_properties(split_set, measured, staging / IMAGE_PROPERTIES)
    return TFRecordSet(
        output_dir=str(output_dir),
        shards={split: [str(output_dir / path.name) for path, _ in shards] for split, shards in plan.items()},
        compression=data.compression,
        record_format=record_format,
        counts={split: sum(size for _, size in shards) for split, shards in plan.items()},
        image_size=tuple(data.image_size),
        channels=data.channels,
        label_names=split_set.label_names,
        data_fingerprint=split_set.data_fingerprint,
        fingerprint=hash_json(digests)[:24],
        image_properties=str(output_dir / IMAGE_PROPERTIES),
    )


def _write_locally(
    split_set: SplitSet, data: DataConfig, plan: dict[str, list[tuple[Path, int]]], record_format: str
) -> tuple[dict[str, str], list[dict] | pa.Table]:
    """Every shard of `plan` written from this machine; their names and digests, and the images'
    properties in splits.parquet order."""
    total = sum(split_set.counts.values())
    examples = _tfds_examples(split_set, data) if data.scheme == "tfds" else _examples(split_set)
    images = _record_images(split_set.images_npy, data, record_format)
    progress = StageProgress("to_tfrecords", total)
    measured: list[dict] = []
    # Worker processes pay off where each image is a file to decode. Rows of images.npy are
    # written by threads (MNIST's 70,000: 0.8 s, against 1.2 s with workers to start and feed),
    # and TFDS images, read here from the dataset, would cross to workers as pickles.
    if total >= PROCESSES_FROM and split_set.images_npy is None and data.scheme != "tfds":
        by_example: dict[str, dict] = {}
        digests = _write_in_workers(examples, images, plan, data.compression, progress, by_example)
        measured = [by_example[example.example_id] for example in _examples(split_set)]
    else:
        writers = _ShardWriters(plan, data.compression)
        try:
            # Rows of images.npy are measured afterwards, many at a time (no decode to share).
            _write_here(examples, images, writers, progress, None if split_set.images_npy else measured)
        finally:
            writers.close()
        digests = writers.digests
    progress.finish()
    if split_set.images_npy is not None:
        return digests, _array_properties(images, total)
    return digests, measured


def _array_properties(images: imaging.RecordImages, total: int) -> pa.Table:
    """The properties of every row of images.npy at the model's size, ARRAY_CHUNK rows at a time."""
    source = imaging.images_array(images.images_npy)
    mode = imaging.MODES[1 if source.ndim == 3 or source.shape[-1] == 1 else 3]
    parts = []
    for start in range(0, total, ARRAY_CHUNK):
        pixels = np.stack([images.pixels(row) for row in range(start, min(start + ARRAY_CHUNK, total))])
        columns = batch_properties(pixels, mode)
        columns["width"][:], columns["height"][:] = source.shape[2], source.shape[1]
        columns["channels"][:] = 1 if source.ndim == 3 else source.shape[3]
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def _write_image_properties(split_set: SplitSet, measured: list[dict] | pa.Table, path: Path) -> None:
    """The per-image table of the data checks (checks.schemas.IMAGE_PROPERTIES_SCHEMA), in
    splits.parquet order."""
    rows = pq.read_table(split_set.splits_parquet, columns=["example_id", "split", "label", "sha256"])
    labels = [split_set.label_names[label] for label in rows["label"].to_pylist()]
    digests = [digest or "" for digest in rows["sha256"].to_pylist()]
    if isinstance(measured, pa.Table):
        measured = measured.to_pylist()
    table = image_properties_table(rows["example_id"].to_pylist(), rows["split"].to_pylist(), labels, digests, measured)
    write_parquet(table, path)


@stage_task()
def to_tfrecords(split_set: SplitSet, data: DataConfig, run: RunContext) -> TFRecordSet:
    """Prefect task over write_tfrecords."""
    store = store_for(run.artifacts_root) if is_remote(run.artifacts_root) else None
    return write_tfrecords(split_set, data, run.stage_dir("to_tfrecords"), store)
