"""TFRecord shards of tf.train.Example records, written without importing TensorFlow.

The worker processes that decode images and write shards must not import TensorFlow: each import
costs ~700 MB resident and seconds of start-up per process. This module writes the same format:
tf.train.Example messages (example_proto's TF-free copy of the schema) holding spec.py's features,
serialized deterministically as TensorFlow does, in TensorFlow's TFRecord framing; for uncompressed
shards byte-identical to what tf.io.TFRecordWriter writes. Tests check both.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from types import TracebackType

import google_crc32c

from convflow.tfrecords.example_proto import Example
from convflow.tfrecords.spec import COMPRESSIONS, EXAMPLE_ID, FEATURES, IMAGE, LABEL

# data.compression "gzip" -> zlib's window bits: 31 writes a gzip stream, which TensorFlow's "GZIP"
# reader reads; zlib's gzip header has mtime 0, so the same records make the same bytes.
_GZIP_WINDOW_BITS = 31
# Whole megabytes per disk write rather than a syscall per record.
WRITE_BUFFER_BYTES = 1 << 20
# Records per part of a shard (ShardFile): a worker process's task, and one gzip member.
PART_RECORDS = 256
# spec.FEATURES' kinds -> the Feature field that holds a value of that kind.
_LISTS = {key: f"{kind}_list" for key, kind in FEATURES.items()}


def encode_example(image: bytes, label: int, example_id: str) -> bytes:
    """The serialized tf.train.Example {example_id, image, label}, as TensorFlow serializes it
    with deterministic=True (map entries in key order).

    Raises:
        ValueError: the label is not an int64.
    """
    example = Example()
    feature = example.features.feature
    for key, value in ((IMAGE, image), (LABEL, label), (EXAMPLE_ID, example_id.encode())):
        getattr(feature[key], _LISTS[key]).value.append(value)
    return example.SerializeToString(deterministic=True)


def _masked_crc32c(data: bytes) -> bytes:
    """TFRecord's checksum: crc32c rotated and offset (so a crc of crcs is not a crc), little-endian."""
    crc = google_crc32c.value(data)
    masked = ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
    return masked.to_bytes(4, "little")


class ShardFile:
    """One TFRecord shard being written: framed records, optionally gzip-compressed.

    A shard is made of parts of PART_RECORDS records, so that worker processes can write parts
    side by side and one process join them (ShardOfParts) into the same bytes this class writes
    alone: a gzip shard is one gzip member per part (TensorFlow's reader reads the members in
    turn), and the shard's `digest` is the sha256 of its parts' sha256s, each counted on the way
    out rather than read back.

    Use as a context manager; on an exception the file is closed unfinished and the exception
    propagates (callers write into a staging folder that is discarded).
    """

    def __init__(self, path: str | os.PathLike[str], compression: str) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {list(COMPRESSIONS)}")
        self.path = path
        self.records = 0
        self.digest: str | None = None
        self.part_digests: list[bytes] = []
        self._compression = compression
        self._file = open(path, "wb", buffering=WRITE_BUFFER_BYTES)
        self._new_part()

    def write(self, record: bytes) -> None:
        """Frames one record as TFRecord does: length (8 bytes, little-endian), its masked crc,
        the record, the record's masked crc."""
        length = len(record).to_bytes(8, "little")
        self._emit(length + _masked_crc32c(length))
        self._emit(record)
        self._emit(_masked_crc32c(record))
        self.records += 1
        if self.records % PART_RECORDS == 0:
            self._end_part()
            self._new_part()

    def close(self) -> None:
        """Flushes and closes the file and sets .digest; closing twice does nothing."""
        if self._file.closed:
            return
        try:
            if self.records % PART_RECORDS or not self.records:
                self._end_part()
            self._file.flush()
        finally:
            self._file.close()
        self.digest = shard_digest(self.part_digests)

    def _new_part(self) -> None:
        self._part_hash = hashlib.sha256()
        self._compressor = (
            zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _GZIP_WINDOW_BITS)
            if self._compression == "gzip"
            else None
        )

    def _end_part(self) -> None:
        if self._compressor is not None:
            self._put(self._compressor.flush())
        self.part_digests.append(self._part_hash.digest())

    def _emit(self, data: bytes) -> None:
        self._put(data if self._compressor is None else self._compressor.compress(data))

    def _put(self, data: bytes) -> None:
        """Writes bytes bound for the disk, hashing exactly those."""
        self._part_hash.update(data)
        self._file.write(data)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:  # an unfinished shard: no digest, just release the file
            self._file.close()


class ShardOfParts:
    """A shard joined from part files that ShardFile wrote (each of PART_RECORDS records, the last
    of a shard fewer), in order: the same bytes and digest as ShardFile writing the records
    itself. The kernel copies each part (copy_file_range), and the part file is removed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.records = 0
        self.digest: str | None = None
        self.part_digests: list[bytes] = []
        self._file = open(path, "wb")

    def append(self, part_path: str, part_digest: bytes, records: int) -> None:
        with open(part_path, "rb") as part:
            size = os.fstat(part.fileno()).st_size
            copied = 0
            while copied < size:
                copied += os.copy_file_range(part.fileno(), self._file.fileno(), size - copied)
        os.unlink(part_path)
        self.part_digests.append(part_digest)
        self.records += records

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self.digest = shard_digest(self.part_digests)


def shard_digest(part_digests: list[bytes]) -> str:
    """A shard's content hash: the sha256 of its parts' sha256s, in order."""
    return hashlib.sha256(b"".join(part_digests)).hexdigest()
