"""The TFRecord feature spec: one definition, used by the writer (to_tfrecords) and every reader.

Images are stored as raw uint8 bytes at the model's size, uncompressed by default: decoding costs
a reshape, not a JPEG/PNG decode or an inflate, on every epoch. benchmarks/layout.py's table
measured it the fastest to write and to read of raw, GZIP raw, PNG and JPEG records for both
MNIST and 96/224 px photos (GZIP: 5x smaller for MNIST, but 5-25x slower to write photos).
`data.compression: gzip` trades that speed for disk space; a shard's name says its compression.

`data.record_format` stores images as raw bytes, JPEG or PNG instead; a shard's name says its
format too (`.jpeg.tfrecord`, `.png.tfrecord`; raw shards keep their plain name), so every reader
decodes what was written without being told. `auto` chooses by `choose_record_format`'s rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

# data.compression -> (TFRecord compression type, shard file suffix)
COMPRESSIONS = {"none": ("", ".tfrecord"), "gzip": ("GZIP", ".tfrecord.gz")}
RECORD_FORMATS = ("raw", "jpeg", "png")
# auto's rule (benchmarks/RESULTS.md, "Data at scale"): raw while the decoded dataset fits the
# reader's in-memory cache (only the first epoch reads the disk) or while an image is small
# enough that reading its raw bytes from disk beats decoding it; JPEG beyond (PNG for grayscale:
# lossless, and JPEG saves little on one channel).
AUTO_RAW_MAX_IMAGE_BYTES = 64 * 64 * 3
IMAGE = "image"
LABEL = "label"
EXAMPLE_ID = "example_id"


def choose_record_format(record_format: str, image_size: tuple[int, int], channels: int, examples: int) -> str:
    """`data.record_format` resolved: itself, or for `auto` the format its rule picks for
    `examples` images of `image_size` x `channels`."""
    if record_format != "auto":
        return record_format
    image_bytes = image_size[0] * image_size[1] * channels
    if image_bytes <= AUTO_RAW_MAX_IMAGE_BYTES or _fits_in_memory_budget(examples * image_bytes):
        return "raw"
    return "jpeg" if channels == 3 else "png"


def shard_name(split: str, number: int, count: int, examples: int, record_format: str, compression: str) -> str:
    """A shard's file name: its split, place, example count, record format and compression."""
    kind = "" if record_format == "raw" else f".{record_format}"
    return f"{split}-{number:05d}-of-{count:05d}.n{examples}{kind}{shard_suffix(compression)}"


def record_format_of(shards: list[str]) -> str:
    """The record format of shards written by to_tfrecords, from their file names.

    Raises:
        ValueError: the shards do not all share one format.
    """
    kinds = {next((kind for kind in RECORD_FORMATS[1:] if f".{kind}.tfrecord" in Path(shard).name), "raw")
             for shard in shards}
    if len(kinds) != 1:
        raise ValueError(f"shards must share one record format ({sorted(kinds)} found): {shards}")
    return kinds.pop()


def feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    import tensorflow as tf

    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        EXAMPLE_ID: tf.io.FixedLenFeature([], tf.string),
    }


def shard_suffix(compression: str) -> str:
    return COMPRESSIONS[compression][1]


def compression_type(shards: list[str]) -> str:
    """The TFRecord compression of shards written by to_tfrecords, from their file names.

    Raises:
        ValueError: the shards do not all share one compression.
    """
    kinds = {kind for kind, suffix in COMPRESSIONS.values() for shard in shards if shard.endswith(suffix)}
    if len(kinds) != 1:
        raise ValueError(f"shards must share one compression ({sorted(kinds)} found): {shards}")
    return kinds.pop()


def make_parser(height: int, width: int, channels: int, record_format: str = "raw"):
    """Return a batched parser: serialized Examples -> {image uint8 [B,H,W,C], label, example_id}."""
    import tensorflow as tf

    spec = feature_spec()
    shape = tf.TensorSpec([height, width, channels], tf.uint8)
    decode = {"jpeg": lambda data: tf.io.decode_jpeg(data, channels=channels),
              "png": lambda data: tf.io.decode_png(data, channels=channels)}.get(record_format)

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(serialized, spec)
        if decode is None:
            images = tf.io.decode_raw(parsed[IMAGE], tf.uint8)
        else:  # one op per batch; batches decode in parallel (read_dataset's map)
            images = tf.map_fn(decode, parsed[IMAGE], fn_output_signature=shape)
        parsed[IMAGE] = tf.reshape(images, [-1, height, width, channels])
        return parsed

    return parse


# Each shard reader's read-ahead: whole megabytes per disk read, not tf.data's 256 KB default.
READ_BUFFER_BYTES = 1 << 20
# Cache a split in memory only while it takes at most this share of the machine's memory.
CACHE_MEMORY_SHARE = 0.25


def _fits_in_memory(shards: list[str], image_size: tuple[int, int], channels: int) -> bool:
    """Whether the decoded split fits the cache budget; the record count is in each shard's name."""
    import re

    records = sum(int(match.group(1)) for shard in shards if (match := re.search(r"\.n(\d+)\.", shard)))
    return _fits_in_memory_budget(records * image_size[0] * image_size[1] * channels)


def _fits_in_memory_budget(decoded_bytes: int) -> bool:
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return decoded_bytes <= CACHE_MEMORY_SHARE * memory


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
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression,
                                             buffer_size=READ_BUFFER_BYTES),
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
    if cache and _fits_in_memory(shards, image_size, channels):
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
    epochs took twice as long with the cores idle (benchmarks/RESULTS.md, session 4). Without the autotuner each AUTOTUNE parallelism is the number of
    cores (at most 16), and prefetch still grows its buffer by itself (a tuner of its own).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options
