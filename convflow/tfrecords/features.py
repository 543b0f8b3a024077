"""The TFRecord reader's TensorFlow side: spec.py's features as a tf.io feature spec, the batched
parser, and read_dataset. The spec's keys, formats and shard names are here too, so that a reader
imports one module; they are defined in spec.py alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convflow.tfrecords.spec import (  # noqa: F401  (re-exported for readers)
    COMPRESSIONS,
    EXAMPLE_ID,
    FEATURES,
    IMAGE,
    LABEL,
    RECORD_FORMATS,
    choose_record_format,
    compression_type,
    fits_in_memory_budget,
    record_format_of,
    shard_name,
    shard_records,
    shard_suffix,
)

if TYPE_CHECKING:
    import tensorflow as tf

# Each shard reader's read-ahead: whole megabytes per disk read, not tf.data's 256 KB default.
READ_BUFFER_BYTES = 1 << 20


def feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """spec.FEATURES as tf.io.parse_example's spec: one scalar of its kind per feature."""
    import tensorflow as tf

    dtypes = {"bytes": tf.string, "int64": tf.int64}
    return {key: tf.io.FixedLenFeature([], dtypes[kind]) for key, kind in FEATURES.items()}


def make_parser(height: int, width: int, channels: int, record_format: str = "raw"):
    """Return a batched parser: serialized Examples -> {image uint8 [B,H,W,C], label, example_id}."""
    import tensorflow as tf

    spec = feature_spec()
    shape = tf.TensorSpec([height, width, channels], tf.uint8)
    decode = {
        "jpeg": lambda data: tf.io.decode_jpeg(data, channels=channels),
        "png": lambda data: tf.io.decode_png(data, channels=channels),
    }.get(record_format)

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, spec)
        if decode is None:
            images = tf.io.decode_raw(parsed[IMAGE], tf.uint8)
        else:  # one op per batch; batches decode in parallel (read_dataset's map)
            images = tf.map_fn(decode, parsed[IMAGE], fn_output_signature=shape)
        parsed[IMAGE] = tf.reshape(images, [-1, height, width, channels])
        return parsed

    return parse


def read_dataset(
    shards: list[str],
    image_size: tuple[int, int],
    channels: int,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    augment=None,
    cache: bool = True,
    with_ids: bool = False,
):
    """Batches of (float32 images 0..255, int64 labels[, example ids]) from TFRecord shards.

    Shards are interleaved and parsed in parallel; parsed batches are cached in memory
    (`cache`), shuffled per epoch, then augmented (training only) and prefetched. tf.data's
    autotuner is off (see `untuned_options`).
    """
    import tensorflow as tf

    compression = compression_type(shards)
    files = tf.data.Dataset.from_tensor_slices(shards)
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=READ_BUFFER_BYTES),
        cycle_length=min(len(shards), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    parse = make_parser(*image_size, channels, record_format_of(shards))
    fields = (IMAGE, LABEL, EXAMPLE_ID) if with_ids else (IMAGE, LABEL)

    def parse_batch(serialized):  # tuples built per batch: a per-example map costs 3-4x the read rate
        parsed = parse(serialized)
        return tuple(parsed[field] for field in fields)

    examples = records.batch(1024).map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    if cache and fits_in_memory_budget(shard_records(shards) * image_size[0] * image_size[1] * channels):
        examples = examples.cache()
    if shuffle_buffer:
        examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    batches = examples.batch(batch_size).map(
        lambda images, *rest: (tf.cast(images, tf.float32), *rest), num_parallel_calls=tf.data.AUTOTUNE
    )
    if augment is not None:
        batches = batches.map(
            lambda images, labels: (augment(images, training=True), labels), num_parallel_calls=tf.data.AUTOTUNE
        )
    return batches.prefetch(tf.data.AUTOTUNE).with_options(untuned_options())


def untuned_options() -> tf.data.Options:
    """tf.data options with the autotuner off.

    With it on, destroying an iterator can wait until the autotuner's thread
    wakes from its current sleep, and those sleeps lengthen the longer the iterator lives.
    Keras destroys the training and the validation iterator at the end of every epoch, so random
    epochs took twice as long with the cores idle (benchmarks/RESULTS.md, session 4). Without the
    autotuner each AUTOTUNE parallelism is the number of cores (at most 16), and prefetch still
    grows its buffer by itself (a tuner of its own).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options
