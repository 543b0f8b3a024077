"""In-process: reading convflow's TFRecords (features.read_dataset, cache=False, one pass, batch
128) vs decoding the source every epoch (MNIST IDX gz; flowers JPEGs); the TFRecord write rate of
to_tfrecords.write_tfrecords; the input-bound ratio (training steps fed by the real TFRecord
pipeline / fed by 50 of its batches cached in memory)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import DATA, Row, images_per_second, import_code_under_test

TITLE = "input pipeline (in-process)"
STEPS, WARMUP_STEPS, IN_MEMORY_BATCHES = 150, 20, 50


def write_tfrecords_timed(data, directory: Path):
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    split_set = split_dataset(data, directory / "split")
    started = time.perf_counter()
    tfrecords = write_tfrecords(split_set, data, directory / "tfrecords")
    return split_set, tfrecords, sum(tfrecords.counts.values()) / (time.perf_counter() - started)


def idx_source_dataset(batch_size: int):
    """MNIST train images and labels, gunzipped and parsed from the IDX files on every pass."""
    import tensorflow as tf

    def parse(path, header: int, shape):
        raw = tf.io.decode_compressed(tf.io.read_file(path), "GZIP")
        return tf.reshape(tf.io.decode_raw(tf.strings.substr(raw, header, -1), tf.uint8), shape)

    files = tf.data.Dataset.from_tensors(
        (str(DATA / "mnist" / "train-images-idx3-ubyte.gz"), str(DATA / "mnist" / "train-labels-idx1-ubyte.gz"))
    )
    arrays = files.map(lambda images, labels: (parse(images, 16, [-1, 28, 28, 1]), parse(labels, 8, [-1])))
    batches = arrays.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y))).batch(batch_size)
    return batches.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def jpeg_source_dataset(paths: list[str], labels: list[int], size: tuple[int, int], batch_size: int):
    """Read, decode and resize every JPEG on every pass."""
    import tensorflow as tf

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, size), label

    examples = tf.data.Dataset.from_tensor_slices((paths, labels)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def mnist_classifier():
    """convflow's mnist_cnn classifier (build_base + freeze_and_wrap), compiled as train compiles it."""
    import keras

    from convflow.config.schema import ModelConfig
    from convflow.tasks.build_base import make_base
    from convflow.tasks.freeze_and_wrap import wrap

    model_config = ModelConfig(base="mnist_cnn")
    model = wrap(make_base(model_config, (28, 28, 1), 0), model_config, 10, 0)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def step_cost(model, dataset) -> tuple[float, float]:
    """Median wall seconds and mean CPU seconds (this process, input threads included) of one
    training step (next batch + train_on_batch) over STEPS steps, after WARMUP_STEPS (tracing,
    the first fill of the shuffle buffer). The iterator, and its prefetching, ends on return."""
    iterator = iter(dataset)
    for _ in range(WARMUP_STEPS):
        model.train_on_batch(*next(iterator))
    walls, cpu_started = [], time.process_time()
    for _ in range(STEPS):
        started = time.perf_counter()
        model.train_on_batch(*next(iterator))
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), (time.process_time() - cpu_started) / STEPS


def repeat(scratch: Path) -> dict:
    import_code_under_test()
    import pyarrow.parquet as pq

    from convflow.config.schema import DataConfig
    from convflow.tfrecords.features import read_dataset

    mnist = DataConfig(source=f"idx:{DATA / 'mnist'}", image_size=(28, 28), channels=1)
    flowers = DataConfig(source=f"folder:{DATA / 'flowers'}", image_size=(96, 96), channels=3)
    _, mnist_records, mnist_write = write_tfrecords_timed(mnist, scratch / "mnist")
    flowers_split, flowers_records, flowers_write = write_tfrecords_timed(flowers, scratch / "flowers")
    split_rows = pq.read_table(flowers_split.splits_parquet).to_pylist()
    train_rows = [row for row in split_rows if row["split"] == "train"]
    mnist_train = mnist_records.shards["train"]
    training_input = read_dataset(mnist_train, (28, 28), 1, 128, shuffle_buffer=10_000, seed=0)  # as train does
    in_memory = training_input.take(IN_MEMORY_BATCHES).cache()
    for _ in in_memory:  # fill the cache before any timing
        pass
    model = mnist_classifier()
    in_memory_wall, in_memory_cpu = step_cost(model, in_memory.repeat())
    real_wall, real_cpu = step_cost(model, training_input.repeat())
    return {
        "mnist_write_ips": mnist_write,
        "flowers_write_ips": flowers_write,
        "mnist_tfrecord_ips": images_per_second(read_dataset(mnist_train, (28, 28), 1, 128, cache=False)),
        "mnist_source_ips": images_per_second(idx_source_dataset(128)),
        "flowers_tfrecord_ips": images_per_second(
            read_dataset(flowers_records.shards["train"], (96, 96), 3, 128, cache=False)
        ),
        "flowers_source_ips": images_per_second(
            jpeg_source_dataset(
                [row["path"] for row in train_rows], [row["label"] for row in train_rows], (96, 96), 128
            )
        ),
        "real_step_s": real_wall,
        "in_memory_step_s": in_memory_wall,
        "real_step_cpu": real_cpu,
        "in_memory_step_cpu": in_memory_cpu,
    }


def rows(m: dict) -> list[Row]:
    def read(name: str, baseline: str) -> Row:
        ratio = m[f"{name}_tfrecord_ips"] / m[f"{name}_source_ips"]
        return Row(
            f"{name}: read images/s, TFRecords (baseline: {baseline})",
            m[f"{name}_tfrecord_ips"],
            m[f"{name}_source_ips"],
            f"{ratio:.2f}x",
        )

    bound = m["real_step_s"] / m["in_memory_step_s"]
    cpu_bound = m["real_step_cpu"] / m["in_memory_step_cpu"]
    return [
        read("mnist", "IDX gz parsed per epoch"),
        read("flowers", "JPEG decode+resize per epoch"),
        Row("flowers: TFRecord write images/s (write_tfrecords)", m["flowers_write_ips"]),
        Row("mnist: TFRecord write images/s (write_tfrecords)", m["mnist_write_ips"]),
        Row(
            f"mnist_cnn step, ms (median of {STEPS}), TFRecord input (baseline: in memory)",
            m["real_step_s"] * 1000,
            m["in_memory_step_s"] * 1000,
            f"{bound:.3f}x",
            "<= 1.05",
            bound <= 1.05,
        ),
        Row(
            "mnist_cnn step, CPU ms (mean), TFRecord input (baseline: in memory)",
            m["real_step_cpu"] * 1000,
            m["in_memory_step_cpu"] * 1000,
            f"{cpu_bound:.3f}x",
        ),
    ]
