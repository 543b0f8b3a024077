"""TFRecord shards of tf.train.Example records, written without importing TensorFlow.

The worker processes that decode images and write shards must not import TensorFlow: each import
costs ~700 MB resident and seconds of start-up per process. This module writes the same format by
hand: TensorFlow's TFRecord framing of tf.train.Example messages with the features of
convflow/tfrecords/features.py (image, label, example_id), encoded byte-for-byte as tf.train.Example serializes
them (deterministically), and for uncompressed shards byte-identical to what tf.io.TFRecordWriter
writes; tests check both.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from types import TracebackType

import google_crc32c

# Protobuf wire format of the Example written (deterministic serialization: map entries by key):
#   Example     { features = 1 (length-delimited) }
#   Features    { feature = 1: one map entry per feature, {key = 1 (string), value = 2 (Feature)} }
#   Feature     { bytes_list = 1 | int64_list = 3 }
#   BytesList   { value = 1 (repeated bytes) }     Int64List { value = 1 (packed varints) }
# Each length-delimited field is a tag byte (field << 3 | 2) followed by the varint length.
_FIELD_1 = b"\x0a"
_FIELD_2 = b"\x12"
_FIELD_3 = b"\x1a"
# Map entry keys (field 1), in the order deterministic serialization writes them.
_EXAMPLE_ID_KEY = _FIELD_1 + b"\x0aexample_id"
_IMAGE_KEY = _FIELD_1 + b"\x05image"
_LABEL_KEY = _FIELD_1 + b"\x05label"
_ONE_BYTE_VARINTS = [bytes([value]) for value in range(0x80)]
_INT64_RANGE = range(-(1 << 63), 1 << 63)

# data.compression (convflow/tfrecords/features.py's COMPRESSIONS) -> zlib's window bits: 31 writes a gzip
# stream, which TensorFlow's "GZIP" reader reads; zlib's gzip header has mtime 0, so the same
# records make the same bytes.
_GZIP_WINDOW_BITS = 31
COMPRESSIONS = ("none", "gzip")
# Whole megabytes per disk write rather than a syscall per record.
WRITE_BUFFER_BYTES = 1 << 20
# Records per part of a shard (ShardFile): a worker process's task, and one gzip member.
PART_RECORDS = 256


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint, low 7 bits first."""
    if value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _delimited(tag: bytes, size: int) -> bytes:
    """A length-delimited field's tag and length, for a payload of `size` bytes."""
    return tag + _varint(size)


def _bytes_entry_head(key: bytes, size: int) -> bytes:
    """The map entry {key: Feature{bytes_list{value: [data]}}} up to its `size` bytes of data,
    so the data itself is copied only once, into the joined Example."""
    bytes_list = _delimited(_FIELD_1, size)
    feature = _delimited(_FIELD_1, len(bytes_list) + size) + bytes_list
    entry = key + _delimited(_FIELD_2, len(feature) + size) + feature
    return _delimited(_FIELD_1, len(entry) + size) + entry


def _label_entry(label: int) -> bytes:
    """The map entry {"label": Feature{int64_list{value: [label]}}}; int64 varints of negative
    numbers are their 64-bit two's complement."""
    if label not in _INT64_RANGE:
        raise ValueError(f"label {label} is not an int64")
    value = _varint(label & 0xFFFF_FFFF_FFFF_FFFF)
    int64_list = _delimited(_FIELD_1, len(value)) + value
    feature = _delimited(_FIELD_3, len(int64_list)) + int64_list
    entry = _LABEL_KEY + _delimited(_FIELD_2, len(feature)) + feature
    return _delimited(_FIELD_1, len(entry)) + entry


def encode_example(image: bytes, label: int, example_id: str) -> bytes:
    """The serialized tf.train.Example {example_id, image, label}, as TensorFlow serializes it
    with deterministic=True (map entries in key order).

    Raises:
        ValueError: the label is not an int64.
    """
    id_bytes = example_id.encode()
    id_entry = _bytes_entry_head(_EXAMPLE_ID_KEY, len(id_bytes)) + id_bytes
    image_head = _bytes_entry_head(_IMAGE_KEY, len(image))
    label_entry = _label_entry(int(label))
    features_size = len(id_entry) + len(image_head) + len(image) + len(label_entry)
    example_head = _delimited(_FIELD_1, features_size) + id_entry + image_head
    return b"".join((example_head, image, label_entry))


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
            raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
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
        self._compressor = (zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _GZIP_WINDOW_BITS)
                            if self._compression == "gzip" else None)

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

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
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
