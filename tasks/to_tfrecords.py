"""Stage 2, to_tfrecords: resize every example once and write sharded TFRecords, shard by shard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convflow import imaging
from convflow.config import DataConfig
from convflow.parallel import ordered_map
from convflow.progress import StageProgress
from convflow.sources import SPLIT_NAMES, DataError, iter_tfds_examples
from convflow.storage import staged_output
from convflow.tasks import features
from convflow.tasks.records import SplitSet, TFRecordSet
from convflow.tasks.stage import RunContext, hash_json, sha256_file, stage_task

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


def _at_model_size(source: np.ndarray, data: DataConfig) -> bool:
    return source.shape[1:] == (*data.image_size, data.channels)


def _loader(images_npy: str | None, data: DataConfig) -> Callable:
    """An example's source -> that image at the model's size (uint8)."""
    size, channels, resize = tuple(data.image_size), data.channels, data.resize
    if data.scheme == "tfds":
        return lambda image: imaging.load_array(image, size, channels, resize)
    if images_npy is not None:
        source = np.load(images_npy, mmap_mode="r")
        if _at_model_size(source, data):
            return lambda index: np.asarray(source[index])
        return lambda index: imaging.load_array(np.asarray(source[index]), size, channels, resize)
    return lambda path: _load_file(path, size, channels, resize)


def _load_file(path: str, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """Raises DataError naming the file when it does not decode (download_and_split read only a
    JPEG's header and end marker)."""
    try:
        return imaging.load_file(path, size, channels, resize)
    except Exception as error:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot decode: {error}") from error


def _writer(path: str, compression: str):
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type=features.COMPRESSIONS[compression][0])
    return tf.io.TFRecordWriter(path, options)


def _shard_plan(counts: dict[str, int], data: DataConfig, record_format: str, directory: Path
                ) -> dict[str, list[tuple[Path, int]]]:
    """Each split's shards (file, examples), `data.shard_size` examples each, in splits.parquet order."""
    plan = {}
    for split in SPLIT_NAMES:
        sizes = [min(data.shard_size, counts.get(split, 0) - start)
                 for start in range(0, counts.get(split, 0), data.shard_size)]
        plan[split] = [(directory / features.shard_name(split, number, len(sizes), size, record_format,
                                                        data.compression), size) for number, size in enumerate(sizes)]
    return plan


class _ShardWriters:
    """Writes records, arriving in splits.parquet order, into their split's shards: each shard is
    filled in turn and its file closed once full, so at most one file a split is open."""

    def __init__(self, plan: dict[str, list[tuple[Path, int]]], compression: str) -> None:
        self._next = {split: iter(shards) for split, shards in plan.items()}
        self._compression = compression
        self._open: dict[str, list] = {}  # split -> [writer, records still to come]

    def write(self, split: str, record: bytes) -> None:
        if split not in self._open:
            path, size = next(self._next[split])
            self._open[split] = [_writer(str(path), self._compression), size]
        shard = self._open[split]
        shard[0].write(record)
        shard[1] -= 1
        if shard[1] == 0:
            self._open.pop(split)[0].close()

    def close(self) -> None:
        for writer, _ in self._open.values():
            writer.close()


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
            raise DataError(f"{data.source}: example {index} is {example.example_id}, split as "
                            f"{row.example_id}: the dataset changed since download_and_split")
        yield Example(row.split, row.label, row.example_id, example.image)


def _write_here(examples: Iterator[Example], load: Callable, writers: _ShardWriters, record_format: str,
                progress: StageProgress) -> None:
    """Decode and encode in threads on every core, a few chunks ahead; serialize and write here, in
    order, so shards are the same bytes whatever the number of threads."""
    encoder = features.ExampleEncoder()

    def encoded(example: Example) -> tuple[Example, bytes]:
        return example, features.encode_image(load(example.source), record_format)

    for done, (example, image) in enumerate(ordered_map(encoded, examples), 1):
        writers.write(example.split, encoder.encode_bytes(image, example.label, example.example_id))
        progress.update(done)


def _decode_and_write_shard(job: ShardJob, images_npy: str | None, data: DataConfig, record_format: str) -> str:
    """One shard, start to end, on a Dask worker."""
    load = _loader(images_npy, data)
    sources = job.files if job.files is not None else job.indices
    writers = _ShardWriters({"shard": [(Path(job.path), len(sources))]}, data.compression)
    examples = (Example("shard", *row) for row in zip(job.labels, job.example_ids, sources))
    unseen = StageProgress(Path(job.path).name, len(sources), every=float("inf"))  # a worker has no run log
    _write_here(examples, load, writers, record_format, unseen)
    return job.path


def _write_on_dask(address: str, jobs: list[ShardJob], images_npy: str | None, data: DataConfig, record_format: str) -> None:
    from distributed import Client

    with Client(address) as client:
        client.gather(client.map(_decode_and_write_shard, jobs, images_npy=images_npy, data=data,
                                 record_format=record_format, pure=False))


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
    return ShardJob(path=str(path), indices=rows.tolist(), labels=part["label"].to_pylist(),
                    example_ids=part["example_id"].to_pylist(), files=None if files and files[0] is None else files)


def write_tfrecords(split_set: SplitSet, data: DataConfig, output_dir: Path) -> TFRecordSet:
    """Resize each example of `split_set` to `data.image_size` and write TFRecord shards in
    `data.record_format` (auto: features.choose_record_format), compressed as `data.compression` says.

    Examples stream from splits.parquet (and TFDS examples from their dataset) through threads that
    decode them, into each split's shards in turn, so memory holds a few chunks of images, never the
    dataset; or each shard is written by a worker of the Dask cluster at `data.dask_scheduler`.

    Raises:
        DataError: an image file does not decode, naming it; nothing is written.
    """
    examples = sum(split_set.counts.values())
    record_format = features.choose_record_format(data.record_format, tuple(data.image_size), data.channels, examples)
    with staged_output(output_dir) as staging:
        plan = _shard_plan(split_set.counts, data, record_format, staging)
        if data.dask_scheduler and data.scheme != "tfds":
            _write_on_dask(data.dask_scheduler, _shard_jobs(split_set, plan), split_set.images_npy, data, record_format)
        else:
            _write_locally(split_set, data, plan, record_format)
        written = sorted(staging.iterdir())
        digests = dict(zip((path.name for path in written), ordered_map(sha256_file, written, chunk=1)))
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
    )


def _write_locally(split_set: SplitSet, data: DataConfig, plan: dict[str, list[tuple[Path, int]]],
                   record_format: str) -> None:
    examples = _tfds_examples(split_set, data) if data.scheme == "tfds" else _examples(split_set)
    writers = _ShardWriters(plan, data.compression)
    progress = StageProgress("to_tfrecords", sum(split_set.counts.values()))
    try:
        _write_here(examples, _loader(split_set.images_npy, data), writers, record_format, progress)
    finally:
        writers.close()
    progress.finish()


@stage_task()
def to_tfrecords(split_set: SplitSet, data: DataConfig, run: RunContext) -> TFRecordSet:
    """Prefect task over write_tfrecords."""
    return write_tfrecords(split_set, data, run.stage_dir("to_tfrecords"))
