"""Stage 2, to_tfrecords: what is written reads back, through the one feature spec, as convflow.data.imaging made it."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from conftest import FOLDER_SPLIT, data_config, make_idx_folder, save_turned
from convflow.checks.schemas import IMAGE_PROPERTIES
from convflow.data import imaging
from convflow.data.sources import DataError
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tfrecords import features

SHARD_NAME = re.compile(r"^(train|validation|test)-(\d{5})-of-(\d{5})\.n(\d+)\.tfrecord$")


def read_split(tfrecords, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """example id -> (uint8 image, label), through features.read_dataset."""
    dataset = features.read_dataset(
        tfrecords.shards[split], tfrecords.image_size, tfrecords.channels, 32, cache=False, with_ids=True
    )
    examples = {}
    for images, labels, ids in dataset:
        assert images.dtype == tf.float32
        for image, label, example_id in zip(images.numpy(), labels.numpy(), ids.numpy()):
            assert image.max() <= 255 and image.min() >= 0 and np.all(image == np.round(image))
            examples[example_id.decode()] = (image.astype(np.uint8), int(label))
    return examples


def read_raw(shard: str) -> list[tf.train.Example]:
    """The records of one shard, decoded eagerly without tf.data's parser."""
    return [
        tf.train.Example.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(shard, compression_type=features.compression_type([shard]))
    ]


@pytest.fixture
def folder_split(image_folder, tmp_path):
    def make(**fields):
        data = data_config(f"folder:{image_folder}", split=FOLDER_SPLIT, **fields)
        return data, split_dataset(data, tmp_path / "split")

    return make


@pytest.mark.parametrize("resize", ["stretch", "pad"])
@pytest.mark.parametrize("channels", [1, 3])
def test_folder_round_trip(folder_split, tmp_path, resize, channels):
    data, split_set = folder_split(image_size=(10, 14), channels=channels, resize=resize)
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")
    rows = pq.read_table(split_set.splits_parquet).to_pydict()
    path_of = dict(zip(rows["example_id"], rows["path"]))
    label_of = dict(zip(rows["example_id"], rows["label"]))

    assert tfrecords.image_size == (10, 14) and tfrecords.channels == channels
    assert tfrecords.label_names == ["cat", "dog", "owl"]
    assert tfrecords.data_fingerprint == split_set.data_fingerprint
    seen = 0
    for split in ("train", "validation", "test"):
        examples = read_split(tfrecords, split)
        assert len(examples) == tfrecords.counts[split] == split_set.counts[split]
        assert {rows["split"][rows["example_id"].index(e)] for e in examples} <= {split}
        for example_id, (image, label) in examples.items():
            expected = imaging.load_file(path_of[example_id], (10, 14), channels, resize)
            assert image.shape == (10, 14, channels)
            np.testing.assert_array_equal(image, expected)
            assert label == label_of[example_id]
        seen += len(examples)
    assert seen == len(rows["example_id"])


def test_digits_round_trip(digits_tfrecords, digits_split):
    source = np.load(digits_split.images_npy)
    rows = pq.read_table(digits_split.splits_parquet).to_pydict()
    index_of = {example_id: index for index, example_id in enumerate(rows["example_id"])}

    for split in ("train", "validation", "test"):
        examples = read_split(digits_tfrecords, split)
        assert len(examples) == digits_tfrecords.counts[split] == digits_split.counts[split]
        for example_id, (image, label) in examples.items():
            index = index_of[example_id]
            assert rows["split"][index] == split
            np.testing.assert_array_equal(image, imaging.load_array(source[index], (12, 12), 1, "stretch"))
            assert label == rows["label"][index]


def test_tf_data_parser_agrees_with_eager_decoding(digits_tfrecords):
    shard = digits_tfrecords.shards["test"][0]
    eager = {}
    for example in read_raw(shard):
        feature = example.features.feature
        image = np.frombuffer(feature[features.IMAGE].bytes_list.value[0], np.uint8).reshape(12, 12, 1)
        label = feature[features.LABEL].int64_list.value[0]
        eager[feature[features.EXAMPLE_ID].bytes_list.value[0].decode()] = (image, label)

    parsed = read_split(digits_tfrecords, "test")
    assert eager.keys() == parsed.keys()
    for example_id, (image, label) in eager.items():
        np.testing.assert_array_equal(parsed[example_id][0], image)
        assert parsed[example_id][1] == label


def test_readers_run_without_the_tf_data_autotuner(digits_tfrecords):
    """An autotuned iterator could take seconds to be destroyed, and Keras destroys one per epoch
    (features.untuned_options): training, augmented and evaluation readers are all built without it."""
    common = (digits_tfrecords.image_size, digits_tfrecords.channels, 32)
    training = features.read_dataset(
        digits_tfrecords.shards["train"], *common, shuffle_buffer=100, augment=lambda images, training: images
    )
    evaluation = features.read_dataset(digits_tfrecords.shards["test"], *common, cache=False, with_ids=True)
    assert training.options().autotune.enabled is False
    assert evaluation.options().autotune.enabled is False
    assert sum(int(labels.shape[0]) for _, labels in training) == digits_tfrecords.counts["train"]


def test_in_memory_images_at_the_model_size_are_stored_unchanged(tmp_path):
    root = tmp_path / "idx"
    written = make_idx_folder(root)
    data = data_config(f"idx:{root}", image_size=(10, 10), channels=1)
    tfrecords = write_tfrecords(split_dataset(data, tmp_path / "split"), data, tmp_path / "tfr")

    test_images, test_labels = written["t10k"]
    examples = read_split(tfrecords, "test")
    for index in range(len(test_labels)):
        image, label = examples[f"t10k-{index:05d}"]
        np.testing.assert_array_equal(image[..., 0], test_images[index])
        assert label == test_labels[index]


def test_shard_names_carry_record_counts(digits_tfrecords):
    for split, shards in digits_tfrecords.shards.items():
        assert len(shards) == 1
        match = SHARD_NAME.match(shards[0].rsplit("/", 1)[-1])
        assert match and match.group(1) == split
        assert (match.group(2), match.group(3)) == ("00000", "00001")
        assert int(match.group(4)) == digits_tfrecords.counts[split] == len(read_raw(shards[0]))
    assert sum(digits_tfrecords.counts.values()) == 1797


def test_records_are_uncompressed_by_default_and_gzip_on_request(digits_split, digits_data, digits_tfrecords, tmp_path):
    assert digits_tfrecords.compression == "none"
    raw_shard = digits_tfrecords.shards["train"][0]
    # An uncompressed record holds the image bytes as they are (12 x 12 pixels, plus id and framing).
    content = Path(raw_shard).read_bytes()
    first = read_raw(raw_shard)[0].features.feature[features.IMAGE].bytes_list.value[0]
    assert len(first) == 144 and first in content
    assert 144 < len(content) / digits_tfrecords.counts["train"] < 2 * 144

    gzipped = write_tfrecords(digits_split, digits_data.model_copy(update={"compression": "gzip"}), tmp_path / "gz")
    assert gzipped.compression == "gzip"
    assert all(
        shard.endswith(f".n{gzipped.counts[split]}.tfrecord.gz")
        for split, shards in gzipped.shards.items()
        for shard in shards
    )
    # digits compress to about half; a gzip member per part of 256 records costs about 2% of that
    assert Path(gzipped.shards["train"][0]).stat().st_size < 0.55 * Path(raw_shard).stat().st_size
    for split in ("train", "test"):
        ours, theirs = read_split(gzipped, split), read_split(digits_tfrecords, split)
        assert ours.keys() == theirs.keys()
        for example_id, (image, label) in ours.items():
            np.testing.assert_array_equal(image, theirs[example_id][0])
            assert label == theirs[example_id][1]


def test_reading_shards_of_mixed_compression_is_refused(digits_tfrecords, tmp_path):
    mixed = [digits_tfrecords.shards["train"][0], str(tmp_path / "other.n1.tfrecord.gz")]
    with pytest.raises(ValueError, match="share one compression"):
        features.read_dataset(mixed, digits_tfrecords.image_size, 1, 32)


def test_shard_size_splits_into_several_shards(image_folder, tmp_path):
    data = data_config(f"folder:{image_folder}", split=FOLDER_SPLIT, shard_size=7)
    split_set = split_dataset(data, tmp_path / "split")
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")

    for split, shards in tfrecords.shards.items():
        count = tfrecords.counts[split]
        assert len(shards) == math.ceil(count / 7)
        total = 0
        for number, shard in enumerate(shards):
            match = SHARD_NAME.match(shard.rsplit("/", 1)[-1])
            assert match.group(1) == split
            assert int(match.group(2)) == number and int(match.group(3)) == len(shards)
            records = len(read_raw(shard))
            assert int(match.group(4)) == records and 1 <= records <= 7
            total += records
        assert total == count
        assert len(read_split(tfrecords, split)) == count
    assert sorted(path.name for path in (tmp_path / "tfr").iterdir()) == sorted(
        [IMAGE_PROPERTIES, *(shard.rsplit("/", 1)[-1] for shards in tfrecords.shards.values() for shard in shards)]
    )


def test_fingerprint_is_stable_and_follows_content(digits_split, digits_data, digits_tfrecords, tmp_path):
    again = write_tfrecords(digits_split, digits_data, tmp_path / "again")
    assert again.fingerprint == digits_tfrecords.fingerprint
    for split in ("train", "validation", "test"):
        for first, second in zip(digits_tfrecords.shards[split], again.shards[split]):
            assert open(first, "rb").read() == open(second, "rb").read()

    bigger = data_config("sklearn:digits", image_size=(14, 14), channels=1)
    assert write_tfrecords(digits_split, bigger, tmp_path / "bigger").fingerprint != digits_tfrecords.fingerprint


def test_output_is_written_atomically(digits_split, digits_data, tmp_path):
    output = tmp_path / "stage" / "to_tfrecords"
    output.mkdir(parents=True)
    (output / "stale-from-an-earlier-attempt.tfrecord").write_bytes(b"old")

    tfrecords = write_tfrecords(digits_split, digits_data, output)

    assert [path.name for path in output.parent.iterdir()] == ["to_tfrecords"]  # no .tmp- folder left
    assert sorted(path.name for path in output.iterdir()) == sorted(
        Path(path).name for path in tfrecords.required_files()
    )
    assert tfrecords.damaged_files() == []


def test_a_failed_write_leaves_nothing_that_looks_complete(image_folder, tmp_path):
    data = data_config(f"folder:{image_folder}", split=FOLDER_SPLIT)
    split_set = split_dataset(data, tmp_path / "split")
    victim = pq.read_table(split_set.splits_parquet).column("path")[5].as_py()
    with open(victim, "wb") as handle:  # the source changes between the stages
        handle.write(b"no longer an image")

    with pytest.raises(DataError, match=re.escape(f"{victim}: cannot decode")):
        write_tfrecords(split_set, data, tmp_path / "stage" / "to_tfrecords")
    assert not (tmp_path / "stage" / "to_tfrecords").exists()
    assert not any(".tmp-" in path.name for path in (tmp_path / "stage").glob("*"))


def _to_tfrecords_cache_key(data) -> str:
    """The real StageCachePolicy key of to_tfrecords for `data` (an empty result store)."""
    from types import SimpleNamespace

    from convflow.core.cache_keys import StageCachePolicy
    from convflow.core.context import RunContext
    from convflow.tasks import to_tfrecords

    task_context = SimpleNamespace(
        task=SimpleNamespace(name="to_tfrecords", fn=to_tfrecords.write_tfrecords),
        result_store=SimpleNamespace(exists=lambda key: False),
    )
    run = RunContext(pipeline="p", run_id="r", artifacts_root="/artifacts")
    return StageCachePolicy().compute_key(task_context, {"data": data, "run": run}, {})


def test_where_shards_are_written_is_not_part_of_the_cache_key_or_config_hash(digits_data, tmp_path):
    from convflow.config.schema import PipelineSpec

    on_dask = digits_data.model_copy(update={"dask_scheduler": "tcp://10.0.0.5:8786"})
    gzipped = digits_data.model_copy(update={"compression": "gzip"})
    assert _to_tfrecords_cache_key(on_dask) == _to_tfrecords_cache_key(digits_data)
    assert _to_tfrecords_cache_key(gzipped) != _to_tfrecords_cache_key(digits_data)  # other files

    def spec(data):
        return PipelineSpec(name="p", data=data, model={"base": "mnist_cnn"})

    assert spec(on_dask).config_hash() == spec(gzipped).config_hash() == spec(digits_data).config_hash()
    resized = digits_data.model_copy(update={"image_size": (14, 14)})
    assert spec(resized).config_hash() != spec(digits_data).config_hash()


def test_record_format_enters_the_cache_key(digits_data):
    keys = {
        _to_tfrecords_cache_key(digits_data.model_copy(update={"record_format": fmt}))
        for fmt in ("auto", "raw", "jpeg", "png")
    }
    assert len(keys) == 4


@pytest.mark.parametrize("record_format", ["raw", "png"])
def test_webp_tiff_and_turned_photos_in_sub_folders_are_written_as_seen(tmp_path, record_format):
    """What a person's photo folder holds, at the model's size so that every pixel can be compared:
    WebP and TIFF files, in sub-folders of their class, and a phone photo stored sideways with its
    EXIF orientation. Each record holds the image as a viewer shows it."""
    rng = np.random.default_rng(5)
    seen: dict[str, np.ndarray] = {}
    for label, name in enumerate(("cat", "dog")):
        for relative in ("a.webp", "2019/b.webp", "c.tiff", "2019/summer/d.tif", "e.png"):
            pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            pixels[:, label * 4 : label * 4 + 4] = 255  # learnable
            path = tmp_path / "photos" / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, **({"lossless": True} if path.suffix == ".webp" else {}))
            seen[f"{name}/{relative}"] = pixels
        pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        save_turned(tmp_path / "photos" / name / "2019" / "phone.png", pixels, 6 + 2 * label)
        seen[f"{name}/2019/phone.png"] = pixels
    data = data_config(
        f"folder:{tmp_path / 'photos'}",
        image_size=(16, 20),
        channels=3,
        split={"train": 0.5, "validation": 0.25, "test": 0.25},
        record_format=record_format,
    )
    split_set = split_dataset(data, tmp_path / "split")
    assert sum(split_set.counts.values()) == 12 and split_set.skipped == []

    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfrecords")

    written = {}
    for split in ("train", "validation", "test"):
        written |= read_split(tfrecords, split)
    assert set(written) == set(seen)
    for example_id, (image, label) in written.items():
        np.testing.assert_array_equal(image, seen[example_id], err_msg=example_id)
        assert label == (0 if example_id.startswith("cat/") else 1)
    properties = pq.read_table(tfrecords.image_properties, columns=["width", "height"]).to_pylist()
    assert {(row["width"], row["height"]) for row in properties} == {(20, 16)}  # the phone photos too, upright


@pytest.mark.parametrize("record_format", ["png", "jpeg"])
def test_encoded_records_round_trip(folder_split, tmp_path, record_format):
    data, split_set = folder_split(image_size=(16, 20), channels=3, record_format=record_format, shard_size=25)
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")
    path_of = dict(zip(*pq.read_table(split_set.splits_parquet, columns=["example_id", "path"]).to_pydict().values()))

    assert tfrecords.record_format == record_format
    shards = tfrecords.shard_files()
    assert all(shard.endswith(f".{record_format}.tfrecord") for shard in shards) and len(shards) > 3
    first = read_raw(shards[0])[0].features.feature[features.IMAGE].bytes_list.value[0]
    assert first.startswith(b"\x89PNG" if record_format == "png" else b"\xff\xd8")
    for split in ("train", "validation", "test"):
        examples = read_split(tfrecords, split)
        assert len(examples) == tfrecords.counts[split] == split_set.counts[split]
        for example_id, (image, _) in examples.items():
            expected = imaging.load_file(path_of[example_id], (16, 20), 3, "stretch")
            if record_format == "png":  # lossless
                np.testing.assert_array_equal(image, expected)
            else:  # lossy: what Pillow decodes of the same JPEG (these test images are noise, far from it)
                jpeg = np.asarray(Image.open(io.BytesIO(imaging.encode_image(expected, "jpeg"))))
                assert np.abs(image.astype(int) - jpeg).mean() < 3  # decoders upsample colour a little differently


def test_auto_picks_raw_for_small_or_cached_datasets_and_encodes_large_photos():
    choose = features.choose_record_format
    assert choose("auto", (28, 28), 1, 70_000) == "raw"  # MNIST: small images, fits the cache
    assert choose("auto", (64, 64), 3, 10_000_000) == "raw"  # small images: reading raw bytes beats decoding
    assert choose("auto", (224, 224), 3, 1_000) == "raw"  # cached in memory after the first epoch
    assert choose("auto", (224, 224), 3, 1_280_000) == "jpeg"  # ImageNet: 190 GB raw, read every epoch
    assert choose("auto", (224, 224), 1, 10_000_000) == "png"  # grayscale stays lossless
    assert choose("jpeg", (28, 28), 1, 10) == "jpeg"


def test_shards_of_mixed_record_formats_are_refused(digits_tfrecords, tmp_path):
    mixed = [digits_tfrecords.shards["train"][0], str(tmp_path / "train-00000-of-00001.n1.png.tfrecord")]
    with pytest.raises(ValueError, match="share one record format"):
        features.read_dataset(mixed, digits_tfrecords.image_size, 1, 32)


def test_a_dask_job_writes_the_shard_this_process_streams(image_folder, tmp_path, monkeypatch):
    """A Dask worker writes a shard on its own (_decode_and_write_shard): the same bytes as this
    process streams into it through its threads; the progress bar counts every image."""
    from convflow.tasks import to_tfrecords

    data = data_config(f"folder:{image_folder}", split=FOLDER_SPLIT, shard_size=20, record_format="png")
    split_set = split_dataset(data, tmp_path / "split")
    shown = []
    monkeypatch.setattr(to_tfrecords.StageProgress, "_show", lambda self: shown.append(self.done))
    streamed = write_tfrecords(split_set, data, tmp_path / "here")
    assert shown[-1] == sum(split_set.counts.values()) == 60

    (tmp_path / "jobs").mkdir()
    plan = to_tfrecords._shard_plan(split_set.counts, data, "png", tmp_path / "jobs")
    for job in to_tfrecords._shard_jobs(split_set, plan):
        to_tfrecords._decode_and_write_shard(job, None, data, "png")
    assert len(streamed.shard_files()) > 2
    for shard in streamed.shard_files():
        assert Path(shard).read_bytes() == (tmp_path / "jobs" / Path(shard).name).read_bytes(), shard


def test_an_image_that_fails_to_decode_is_named_and_nothing_is_written(tmp_path, image_folder_factory):
    """download_and_split reads a JPEG's header and end marker only; an image whose data is damaged
    between them fails to_tfrecords' decode, which names the file and leaves no output."""
    folder = image_folder_factory(tmp_path / "images", size=(16, 20), suffix=".jpg")
    data = data_config(f"folder:{folder}", split=FOLDER_SPLIT)
    split_set = split_dataset(data, tmp_path / "split")
    damaged = Path(pq.read_table(split_set.splits_parquet, columns=["path"])["path"][7].as_py())
    content = damaged.read_bytes()
    tables_at = content.find(b"\xff\xc4") + 4  # Huffman tables zeroed: header and end marker intact
    damaged.write_bytes(content[:tables_at] + bytes(16) + content[tables_at + 16 :])
    with pytest.raises(DataError, match=re.escape(f"{damaged}: cannot decode: broken data stream")):
        write_tfrecords(split_set, data, tmp_path / "tfr")
    assert not (tmp_path / "tfr").exists()


def test_each_data_stage_shows_its_progress_bar(image_folder, tmp_path, caplog):
    from convflow.runtime.progress import progress_line

    assert progress_line("to_tfrecords", 2_500, 10_000, 2.0) == (
        "to_tfrecords: [#####---------------] 2,500/10,000 images (25%), 1,250 images/s"
    )
    data = data_config(f"folder:{image_folder}", split=FOLDER_SPLIT)
    with caplog.at_level("INFO", logger="convflow"):
        write_tfrecords(split_dataset(data, tmp_path / "split"), data, tmp_path / "tfr")
    bars = [record.getMessage() for record in caplog.records if "images/s" in record.getMessage()]
    assert [bar.split(" images (")[0] for bar in bars] == [
        "download_and_split: [####################] 60/60",
        "to_tfrecords: [####################] 60/60",
    ]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_worker_processes_write_the_bytes_this_process_writes(tmp_path, monkeypatch, compression):
    """Large datasets are checked and written by worker processes, a part of a shard each
    (PART_RECORDS images), joined here in order: the same split, the same shard bytes and digests
    as the threads of this process make; a damaged image is still named, and nothing written."""
    from conftest import make_image_folder
    from convflow.config.schema import SplitFractions
    from convflow.data import sources
    from convflow.runtime import parallel
    from convflow.tasks import to_tfrecords
    from convflow.tfrecords.writer import PART_RECORDS

    folder = make_image_folder(tmp_path / "images", per_class=120, size=(10, 12))  # 360 images
    mostly_train = SplitFractions(train=0.8, validation=0.1, test=0.1)
    data = data_config(
        f"folder:{folder}",
        channels=3,
        split=mostly_train,
        shard_size=PART_RECORDS + 30,
        compression=compression,
        record_format="raw",
    )
    threads = split_dataset(data, tmp_path / "split-threads")
    written_here = write_tfrecords(threads, data, tmp_path / "here")
    monkeypatch.setattr(sources, "PROCESSES_FROM", 0)
    monkeypatch.setattr(to_tfrecords, "PROCESSES_FROM", 0)
    processes = split_dataset(data, tmp_path / "split-processes")
    written_by_workers = write_tfrecords(processes, data, tmp_path / "workers")
    assert parallel._workers is not None  # the worker processes were used

    assert pq.read_table(processes.splits_parquet).drop(["path"]) == pq.read_table(threads.splits_parquet).drop(
        ["path"]
    )
    assert written_by_workers.fingerprint == written_here.fingerprint
    shards = [Path(shard).name for shard in written_here.required_files()]
    assert len(shards) >= 3 and written_here.counts["train"] > PART_RECORDS  # a shard of two parts
    assert shards == [Path(shard).name for shard in written_by_workers.required_files()]
    for name in shards:
        if name != IMAGE_PROPERTIES:
            assert (tmp_path / "workers" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    measured_here = pq.read_table(written_here.image_properties)
    assert pq.read_table(written_by_workers.image_properties).to_pylist() == measured_here.to_pylist()
    assert sorted(path.name for path in (tmp_path / "workers").iterdir()) == sorted(shards)  # no part left

    damaged = pq.read_table(processes.splits_parquet, columns=["path"])["path"][300].as_py()
    Path(damaged).write_bytes(Path(damaged).read_bytes()[:40])  # cut: the PNG no longer decodes
    with pytest.raises(DataError, match=re.escape(f"{damaged}: cannot decode")):
        write_tfrecords(processes, data, tmp_path / "damaged")
    assert not (tmp_path / "damaged").exists()


def test_a_jpeg_at_the_models_size_goes_into_a_jpeg_record_as_it_is(tmp_path):
    """JPEG records keep a source JPEG already at the model's size and colours byte for byte
    (decoding and encoding it again costs time and detail); others are resized and encoded. A JPEG
    cut short still fails, named, though it is only decoded at an eighth of its size."""
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", per_class=4, size=(24, 24), suffix=".jpg")
    make_image_folder(tmp_path / "images", per_class=2, start=10, size=(30, 20), suffix=".jpg")  # other size
    data = data_config(f"folder:{folder}", image_size=(24, 24), channels=3, split=FOLDER_SPLIT, record_format="jpeg")
    split_set = split_dataset(data, tmp_path / "split")
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")
    path_of = dict(zip(*pq.read_table(split_set.splits_parquet, columns=["example_id", "path"]).to_pydict().values()))
    kept = resized = 0
    for shard in tfrecords.shard_files():
        for example in read_raw(shard):
            record = example.features.feature[features.IMAGE].bytes_list.value[0]
            source = Path(path_of[example.features.feature[features.EXAMPLE_ID].bytes_list.value[0].decode()])
            if Image.open(source).size == (24, 24):
                assert record == source.read_bytes()
                kept += 1
            else:
                assert record != source.read_bytes() and Image.open(io.BytesIO(record)).size == (24, 24)
                resized += 1
    assert (kept, resized) == (12, 6)

    damaged = next(Path(path) for path in path_of.values() if Image.open(path).size == (24, 24))
    content = damaged.read_bytes()
    tables_at = content.find(b"\xff\xc4") + 4  # Huffman tables zeroed: header and end marker intact
    damaged.write_bytes(content[:tables_at] + bytes(16) + content[tables_at + 16 :])
    split_set = split_dataset(data, tmp_path / "split-damaged")
    with pytest.raises(DataError, match=re.escape(f"{damaged}: cannot decode")):
        write_tfrecords(split_set, data, tmp_path / "tfr-damaged")


def test_each_images_properties_are_measured_where_it_is_decoded(tmp_path):
    """to_tfrecords writes image_properties.parquet beside the shards, a row per example in
    splits.parquet order: the size and mode as decoded, brightness and colour means of the pixels at
    the model's size, whichever path decoded it (resized, or a JPEG kept as it is)."""
    from conftest import save_image

    colours = {"dark": (40, 40, 40), "red": (200, 30, 30)}
    for name, colour in colours.items():
        for index in range(6):
            pixels = np.full((20, 30, 3), colour, np.uint8)  # 30 x 20, resized
            pixels[0, index] += 1  # distinct files (identical ones would be set aside as duplicates)
            save_image(tmp_path / "images" / name / f"big-{index}.png", pixels)
            solid = Image.new("RGB", (24, 24), colour)  # at the model's size: kept as it is
            solid.putpixel((index, 0), (colour[0] + 4, *colour[1:]))
            solid.save(tmp_path / "images" / name / f"kept-{index}.jpg", quality=100)
    data = data_config(
        f"folder:{tmp_path / 'images'}", image_size=(24, 24), channels=3, split=FOLDER_SPLIT, record_format="jpeg"
    )
    split_set = split_dataset(data, tmp_path / "split")
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")

    table = pq.read_table(tfrecords.image_properties)
    splits = pq.read_table(split_set.splits_parquet)
    assert table["example_id"] == splits["example_id"] and table["split"] == splits["split"]
    assert table["sha256"] == splits["sha256"]
    for row in table.to_pylist():
        red, green, blue = colours[row["label"]]
        big = "big-" in row["example_id"]
        assert (row["width"], row["height"], row["mode"], row["channels"]) == ((30, 20) if big else (24, 24)) + (
            "RGB",
            3,
        )
        assert row["mean_r"] == pytest.approx(red, abs=2) and row["mean_b"] == pytest.approx(blue, abs=2)
        assert row["brightness"] == pytest.approx(0.299 * red + 0.587 * green + 0.114 * blue, abs=2)
        assert row["contrast"] < 2 and row["sharpness"] < 2


def test_rows_of_an_in_memory_source_are_measured_as_stored(digits_split, digits_data, digits_tfrecords):
    """images.npy rows are measured many at a time, with the figures image_properties() gives one by one."""
    from convflow.checks.image_properties import image_properties

    table = pq.read_table(digits_tfrecords.image_properties)
    assert table.num_rows == sum(digits_split.counts.values())
    stored = np.load(digits_split.images_npy, mmap_mode="r")
    for row in (0, 17, table.num_rows - 1):
        expected = image_properties(
            imaging.RecordImages(
                tuple(digits_data.image_size), 1, digits_data.resize, "raw", digits_split.images_npy
            ).pixels(row),
            "L",
        )
        measured = table.slice(row, 1).to_pylist()[0]
        assert (measured["width"], measured["height"]) == (stored.shape[2], stored.shape[1])
        assert measured["dhash"] == expected["dhash"]
        for name in ("brightness", "contrast", "mean_g", "sharpness"):
            assert measured[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-3), name
