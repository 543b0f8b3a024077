"""convflow.tfrecords.writer: the Examples and shards it writes are TensorFlow's, byte for byte, and
read back through TensorFlow's own readers with the spec the writer took its features from;
importing it does not import TensorFlow."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from convflow.tfrecords import features
from convflow.tfrecords.example_proto import Example
from convflow.tfrecords.writer import PART_RECORDS, ShardFile, ShardOfParts, encode_example, shard_digest

REPO = Path(__file__).resolve().parents[1]
# Lengths whose varints take 1, 2 and 3 bytes, on both sides of each boundary, and a 128x128x3 image.
IMAGE_SIZES = [0, 1, 127, 128, 16383, 16384, 49152]
LABELS = [0, 1, 127, 128, 300, 2**31 - 1, 2**31, -1]
EXAMPLE_IDS = ["", "a", "chat/été.jpg", "x" * 200]


def image_of(size: int, seed: int = 0) -> bytes:
    return bytes((index * 7 + seed) % 256 for index in range(size))


def tensorflow_example(image: bytes, label: int, example_id: str) -> bytes:
    """The record as tf.train.Example serializes it, deterministically (map entries by key)."""
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                features.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                features.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                features.EXAMPLE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[example_id.encode()])),
            }
        )
    ).SerializeToString(deterministic=True)


def sample_records(count: int = 5) -> list[tuple[bytes, int, str]]:
    return [(image_of(100 * index + 3, index), index * 37, f"folder/{index}.png") for index in range(count)]


@pytest.mark.parametrize("size", IMAGE_SIZES)
@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("example_id", EXAMPLE_IDS)
def test_encode_example_is_what_tensorflow_serializes(size, label, example_id):
    image = image_of(size)
    assert encode_example(image, label, example_id) == tensorflow_example(image, label, example_id)


def test_encode_example_rejects_labels_beyond_int64():
    with pytest.raises(ValueError, match="out of range"):
        encode_example(b"", 2**63, "a")


def test_the_example_schema_is_tensorflows():
    """example_proto's messages have TensorFlow's fields: names, numbers, types, oneofs, packing."""

    def fields(message):
        return [
            (
                field.name,
                field.number,
                field.type,
                field.is_repeated,
                field.is_packed,
                field.message_type and field.message_type.full_name,
                field.containing_oneof and field.containing_oneof.name,
            )
            for field in message.fields
        ]

    messages = Example.DESCRIPTOR.file.message_types_by_name
    assert set(messages) == {"Example", "Features", "Feature", "BytesList", "FloatList", "Int64List"}
    for name, ours in messages.items():
        theirs = getattr(tf.train, name).DESCRIPTOR
        assert ours.full_name == theirs.full_name and fields(ours) == fields(theirs), name
        for nested in ours.nested_types:
            assert fields(nested) == fields(theirs.nested_types_by_name[nested.name])
            assert nested.GetOptions().map_entry and theirs.nested_types_by_name[nested.name].GetOptions().map_entry


def test_a_record_holds_exactly_the_features_the_reader_parses():
    """The reader's spec ignores features it does not name, so parsing alone would miss a feature
    the writer adds: each feature written is one the reader parses, of the same kind, and no more."""
    dtypes = {"bytes_list": tf.string, "int64_list": tf.int64}
    written = tf.train.Example.FromString(encode_example(b"pixels", 3, "a.jpg")).features.feature
    assert {key: dtypes[feature.WhichOneof("kind")] for key, feature in written.items()} == {
        key: spec.dtype for key, spec in features.feature_spec().items()
    }


def test_uncompressed_shard_is_tensorflows(tmp_path):
    records = [encode_example(*record) for record in sample_records()]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    with ShardFile(tmp_path / "ours.tfrecord", "none") as shard:
        for record in records:
            shard.write(record)
    written = (tmp_path / "ours.tfrecord").read_bytes()
    assert written == (tmp_path / "tf.tfrecord").read_bytes()
    assert shard.digest == shard_digest([hashlib.sha256(written).digest()])  # one part
    assert shard.records == len(records)


def write_shard(path: Path, records: list[bytes], compression: str) -> ShardFile:
    with ShardFile(path, compression) as shard:
        for record in records:
            shard.write(record)
    return shard


def test_gzip_shard_reads_back_and_is_deterministic(tmp_path):
    records = [encode_example(*record) for record in sample_records()] + [b""]
    first = write_shard(tmp_path / "first.tfrecord.gz", records, "gzip")
    write_shard(tmp_path / "second.tfrecord.gz", records, "gzip")
    written = (tmp_path / "first.tfrecord.gz").read_bytes()
    read = [record.numpy() for record in tf.data.TFRecordDataset(str(tmp_path / "first.tfrecord.gz"), "GZIP")]
    assert read == records
    assert written[:2] == b"\x1f\x8b" and written[4:8] == bytes(4)  # a gzip stream with mtime 0
    assert written == (tmp_path / "second.tfrecord.gz").read_bytes()
    assert first.digest == shard_digest([hashlib.sha256(written).digest()])
    assert first.records == len(records)


@pytest.mark.parametrize("compression", list(features.COMPRESSIONS))
def test_records_parse_with_the_feature_spec(tmp_path, compression):
    samples = sample_records() + [(image_of(49152), 2**31 - 1, "chat/été.jpg")]
    path = tmp_path / f"shard{features.shard_suffix(compression)}"
    write_shard(path, [encode_example(*sample) for sample in samples], compression)
    dataset = tf.data.TFRecordDataset(str(path), features.compression_type([str(path)]))
    parsed = [tf.io.parse_single_example(record, features.feature_spec()) for record in dataset]
    assert [
        (example["image"].numpy(), int(example["label"]), example["example_id"].numpy().decode()) for example in parsed
    ] == samples


def test_an_error_inside_the_shard_propagates_and_closes_it(tmp_path):
    with pytest.raises(RuntimeError, match="decode failed"):
        with ShardFile(tmp_path / "staged.tfrecord.gz", "gzip") as shard:
            shard.write(b"record")
            raise RuntimeError("decode failed")
    assert shard._file.closed
    assert shard.digest is None


def test_unknown_compression_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown compression 'zstd'; expected one of \['none', 'gzip'\]"):
        ShardFile(tmp_path / "shard", "zstd")


def test_import_leaves_tensorflow_out():
    imported = subprocess.run(
        [sys.executable, "-c", "import convflow.tfrecords.writer, sys; print('tensorflow' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "False"


@pytest.mark.parametrize("compression", list(features.COMPRESSIONS))
def test_a_shard_joined_from_parts_is_the_shard_written_whole(tmp_path, compression):
    """Worker processes write a shard's parts (PART_RECORDS records each, the last fewer) and one
    process joins them: the same bytes and digest as one ShardFile, whose digest hashes each part's
    bytes as they lie in the file; TensorFlow reads every record back."""
    records = [
        encode_example(image_of(300 + index % 7, index), index, f"c/{index}.jpg")
        for index in range(2 * PART_RECORDS + 10)
    ]
    whole = write_shard(tmp_path / "whole", records, compression)
    joined = ShardOfParts(tmp_path / "joined")
    for number, start in enumerate(range(0, len(records), PART_RECORDS)):
        part = write_shard(tmp_path / f"part{number}", records[start : start + PART_RECORDS], compression)
        joined.append(str(tmp_path / f"part{number}"), part.part_digests[0], part.records)
        assert not (tmp_path / f"part{number}").exists()
    joined.close()

    written = (tmp_path / "whole").read_bytes()
    assert (tmp_path / "joined").read_bytes() == written
    assert joined.digest == whole.digest and joined.records == whole.records == len(records)
    if compression == "none":  # parts are byte ranges of framed records: 16 bytes of frame each
        ends = [sum(16 + len(record) for record in records[:end]) for end in (PART_RECORDS, 2 * PART_RECORDS)]
        ranges = zip([0, *ends], [*ends, len(written)])
        assert whole.digest == shard_digest([hashlib.sha256(written[start:end]).digest() for start, end in ranges])
    kind = "GZIP" if compression == "gzip" else ""
    assert [record.numpy() for record in tf.data.TFRecordDataset(str(tmp_path / "joined"), kind)] == records
