"""The TFRecord feature spec, without TensorFlow: the features of an Example, record formats,
compressions and shard names. The one definition that the writer (writer.py, in worker processes
that never import TensorFlow) and every reader (features.py) take them from.

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

import os
import re
from pathlib import Path

IMAGE = "image"
LABEL = "label"
EXAMPLE_ID = "example_id"
# Each feature's kind: the list of a tf.train.Feature that holds its one value (bytes_list, int64_list).
FEATURES = {IMAGE: "bytes", LABEL: "int64", EXAMPLE_ID: "bytes"}

# data.compression -> (TFRecord compression type, shard file suffix)
COMPRESSIONS = {"none": ("", ".tfrecord"), "gzip": ("GZIP", ".tfrecord.gz")}
RECORD_FORMATS = ("raw", "jpeg", "png")
# auto's rule (benchmarks/RESULTS.md, "Data at scale"): raw while the decoded dataset fits the
# reader's in-memory cache (only the first epoch reads the disk) or while an image is small
# enough that reading its raw bytes from disk beats decoding it; JPEG beyond (PNG for grayscale:
# lossless, and JPEG saves little on one channel).
AUTO_RAW_MAX_IMAGE_BYTES = 64 * 64 * 3
# Readers cache a split in memory only while it takes at most this share of the machine's memory.
CACHE_MEMORY_SHARE = 0.25


def choose_record_format(record_format: str, image_size: tuple[int, int], channels: int, examples: int) -> str:
    """`data.record_format` resolved: itself, or for `auto` the format its rule picks for
    `examples` images of `image_size` x `channels`."""
    if record_format != "auto":
        return record_format
    image_bytes = image_size[0] * image_size[1] * channels
    if image_bytes <= AUTO_RAW_MAX_IMAGE_BYTES or fits_in_memory_budget(examples * image_bytes):
        return "raw"
    return "jpeg" if channels == 3 else "png"


def fits_in_memory_budget(decoded_bytes: int) -> bool:
    """Whether `decoded_bytes` of images fit the readers' cache: CACHE_MEMORY_SHARE of memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return decoded_bytes <= CACHE_MEMORY_SHARE * memory


def shard_name(split: str, number: int, count: int, examples: int, record_format: str, compression: str) -> str:
    """A shard's file name: its split, place, example count, record format and compression."""
    kind = "" if record_format == "raw" else f".{record_format}"
    return f"{split}-{number:05d}-of-{count:05d}.n{examples}{kind}{shard_suffix(compression)}"


def shard_suffix(compression: str) -> str:
    return COMPRESSIONS[compression][1]


def shard_records(shards: list[str]) -> int:
    """The number of records in shards written by to_tfrecords, from their file names."""
    return sum(int(match.group(1)) for shard in shards if (match := re.search(r"\.n(\d+)\.", Path(shard).name)))


def record_format_of(shards: list[str]) -> str:
    """The record format of shards written by to_tfrecords, from their file names.

    Raises:
        ValueError: the shards do not all share one format.
    """
    kinds = {
        next((kind for kind in RECORD_FORMATS[1:] if f".{kind}.tfrecord" in Path(shard).name), "raw")
        for shard in shards
    }
    if len(kinds) != 1:
        raise ValueError(f"shards must share one record format ({sorted(kinds)} found): {shards}")
    return kinds.pop()


def compression_type(shards: list[str]) -> str:
    """The TFRecord compression of shards written by to_tfrecords, from their file names.

    Raises:
        ValueError: the shards do not all share one compression.
    """
    kinds = {kind for kind, suffix in COMPRESSIONS.values() for shard in shards if shard.endswith(suffix)}
    if len(kinds) != 1:
        raise ValueError(f"shards must share one compression ({sorted(kinds)} found): {shards}")
    return kinds.pop()
