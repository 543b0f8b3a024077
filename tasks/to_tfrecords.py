"""Stage 2, to_tfrecords: resize every example once and write sharded TFRecords (raw uint8 pixels)."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from convflow import imaging
from convflow.config import DataConfig
from convflow.sources import SPLIT_NAMES
from convflow.storage import staged_output
from convflow.tasks import features
from convflow.tasks.records import SplitSet, TFRecordSet
from convflow.tasks.stage import RunContext, hash_json, sha256_file, stage_task

# Below this many files, starting worker processes costs more than decoding in one.
PARALLEL_DECODE_MIN_FILES = 2_000


def _at_model_size(source: np.ndarray, data: DataConfig) -> bool:
    return source.shape[1:] == (*data.image_size, data.channels)


def _loader(split_set: SplitSet, data: DataConfig):
    """index in splits.parquet -> that example's image at the model's size (uint8)."""
    size, channels, resize = tuple(data.image_size), data.channels, data.resize
    if split_set.images_npy is not None:
        source = np.load(split_set.images_npy, mmap_mode="r")
        if _at_model_size(source, data):
            return lambda index: np.asarray(source[index])
        return lambda index: imaging.load_array(np.asarray(source[index]), size, channels, resize)
    paths = pq.read_table(split_set.splits_parquet, columns=["path"]).column("path").to_pylist()
    return lambda index: imaging.load_file(paths[index], size, channels, resize)


def _load_images(split_set: SplitSet, rows: dict, data: DataConfig) -> np.ndarray:
    """All examples at the model's size, in splits.parquet order."""
    if split_set.images_npy is not None:
        source = np.load(split_set.images_npy, mmap_mode="r")
        if _at_model_size(source, data):  # taken whole, not image by image
            return np.asarray(source)
    if split_set.images_npy is not None or len(rows["path"]) < PARALLEL_DECODE_MIN_FILES:
        load = _loader(split_set, data)
        return np.stack([load(index) for index in range(len(rows["example_id"]))])
    size, channels, resize = tuple(data.image_size), data.channels, data.resize
    load_file = functools.partial(imaging.load_file, size=size, channels=channels, resize=resize)
    # spawn, not fork: the flow process may already hold TensorFlow's threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        return np.stack(list(pool.map(load_file, rows["path"], chunksize=256)))


def _decode_and_write_shard(
    path: str, split_set: SplitSet, data: DataConfig, indices: list[int], labels: list[int], ids: list[str]
) -> str:
    """One shard, start to end, on a Dask worker: decode its examples, write the file."""
    load = _loader(split_set, data)
    _write_shard(Path(path), np.stack([load(index) for index in indices]), np.asarray(labels), ids, data.compression)
    return path


def _write_on_dask(address: str, jobs: list[tuple]) -> None:
    from distributed import Client

    with Client(address) as client:
        client.gather(client.map(lambda job: _decode_and_write_shard(*job), jobs, pure=False))


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, example_ids: list[str], compression: str) -> None:
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type=features.COMPRESSIONS[compression][0])
    encoder = features.ExampleEncoder()
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for image, label, example_id in zip(images, labels, example_ids):
            writer.write(encoder.encode(image, label, example_id))


def _shard_plan(split: str, indices: np.ndarray, data: DataConfig) -> list[tuple[str, np.ndarray]]:
    chunks = [indices[start : start + data.shard_size] for start in range(0, len(indices), data.shard_size)]
    suffix = features.shard_suffix(data.compression)
    return [
        (f"{split}-{number:05d}-of-{len(chunks):05d}.n{len(chunk)}{suffix}", chunk)
        for number, chunk in enumerate(chunks)
    ]


def write_tfrecords(split_set: SplitSet, data: DataConfig, output_dir: Path) -> TFRecordSet:
    """Resize each example of `split_set` to `data.image_size` and write TFRecord shards
    (compressed as `data.compression` says).

    Here: images are decoded in worker processes (large folders), shards written in parallel
    threads (TF's writer releases the GIL while compressing). With `data.dask_scheduler`, each
    shard is decoded and written by a worker of that Dask cluster instead.
    """
    rows = pq.read_table(split_set.splits_parquet).to_pydict()
    labels = np.asarray(rows["label"])
    splits = np.asarray(rows["split"])
    plans = {split: _shard_plan(split, np.flatnonzero(splits == split), data) for split in SPLIT_NAMES}
    shards = {split: [str(output_dir / name) for name, _ in plan] for split, plan in plans.items()}
    with staged_output(output_dir) as staging:
        chunks = [(name, chunk) for plan in plans.values() for name, chunk in plan]
        if data.dask_scheduler:
            _write_on_dask(data.dask_scheduler, [
                (str(staging / name), split_set, data, chunk.tolist(), labels[chunk].tolist(),
                 [rows["example_id"][index] for index in chunk]) for name, chunk in chunks
            ])
        else:
            images = _load_images(split_set, rows, data)
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
                jobs = [
                    pool.submit(_write_shard, staging / name, images[chunk], labels[chunk],
                                [rows["example_id"][index] for index in chunk], data.compression)
                    for name, chunk in chunks
                ]
                for job in jobs:
                    job.result()
        written = sorted(staging.iterdir())
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # hashlib runs without the GIL
            digests = dict(zip((path.name for path in written), pool.map(sha256_file, written)))
    return TFRecordSet(
        output_dir=str(output_dir),
        shards=shards,
        compression=data.compression,
        counts={split: int((splits == split).sum()) for split in SPLIT_NAMES},
        image_size=tuple(data.image_size),
        channels=data.channels,
        label_names=split_set.label_names,
        data_fingerprint=split_set.data_fingerprint,
        fingerprint=hash_json(digests)[:24],
    )


@stage_task()
def to_tfrecords(split_set: SplitSet, data: DataConfig, run: RunContext) -> TFRecordSet:
    """Prefect task over write_tfrecords."""
    return write_tfrecords(split_set, data, run.stage_dir("to_tfrecords"))
