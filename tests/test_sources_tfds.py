"""tfds: sources through the real TFDS loader, on tfds.testing.mock_data, straight into shards; offline failure."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_to_tfrecords import read_split

from conftest import split_as_before
from convflow.config.schema import DataConfig
from convflow.data import imaging, sources
from convflow.data.sources import DataError
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.to_tfrecords import write_tfrecords


@pytest.fixture
def online(monkeypatch):
    """mock_data serves examples without a download; only the reachability probe needs faking."""
    monkeypatch.setattr(sources, "_network_available", lambda timeout=3.0: True)


@pytest.mark.parametrize(
    ("name", "channels", "classes"),
    [("mnist", 1, [str(digit) for digit in range(10)]), ("cats_vs_dogs", 3, ["cat", "dog"])],
)
def test_tfds_source_reads_mock_data(tmp_path, online, name, channels, classes):
    data = DataConfig(source=f"tfds:{name}", image_size=(32, 32), channels=channels, data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
        split_set = split_dataset(data, tmp_path / "split")
    rows = pq.read_table(split_set.splits_parquet).to_pandas()
    assert split_set.label_names == classes
    assert len(rows) == sum(split_set.counts.values()) > 0
    assert set(rows["split"]) <= {"train", "validation", "test"}
    assert rows["path"].isna().all() and not list(tmp_path.rglob("*.png"))  # no image files in between
    assert rows["label"].between(0, len(classes) - 1).all()


def _old_png_hash(image: np.ndarray, path: Path) -> str:
    """What download_and_split hashed before: the PNG file it saved of each TFDS example."""
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tfds_goes_straight_into_shards_with_the_splits_of_before(tmp_path, online):
    data = DataConfig(
        source="tfds:mnist",
        image_size=(20, 20),
        channels=1,
        data_dir=str(tmp_path / "tfds"),
        record_format="png",
        shard_size=16,
    )
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        split_set = split_dataset(data, tmp_path / "split")
        tfrecords = write_tfrecords(split_set, data, tmp_path / "tfr")
        examples = {example.example_id: example for example in sources.iter_tfds_examples(data)}
    rows = pq.read_table(split_set.splits_parquet).to_pandas().set_index("example_id")

    assert not [path for path in tmp_path.rglob("*") if path.suffix == ".png"]
    before = tmp_path / "before.png"
    carved = ["train", "validation"]  # mock mnist has train and test splits: validation is carved from train
    for example_id, example in examples.items():
        assert rows.at[example_id, "sha256"] == _old_png_hash(example.image, before)
        assert rows.at[example_id, "split"] == split_as_before(
            rows.at[example_id, "sha256"], example.split, carved, data.split.model_dump()
        )
    assert tfrecords.record_format == "png" and len(tfrecords.shards["train"]) > 1
    for split in ("train", "validation", "test"):
        read = read_split(tfrecords, split)
        assert set(read) == set(rows.index[rows["split"] == split])
        for example_id, (image, label) in read.items():
            np.testing.assert_array_equal(image, imaging.load_array(examples[example_id].image, (20, 20), 1, "stretch"))
            assert label == examples[example_id].label


def test_tfds_slicing_maps_to_splits(tmp_path, online):
    data = DataConfig(
        source="tfds:mnist",
        image_size=(28, 28),
        channels=1,
        data_dir=str(tmp_path / "tfds"),
        tfds_split={"train": "train[:50%]", "test": "train[50%:]"},
    )
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        split_set = split_dataset(data, tmp_path / "split")
    rows = pq.read_table(split_set.splits_parquet).to_pandas()
    from_test_slice = rows[rows["example_id"].str.startswith("train[50%:]")]
    assert (from_test_slice["split"] == "test").all()
    assert set(rows[~rows.index.isin(from_test_slice.index)]["split"]) <= {"train", "validation"}


def test_tfds_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    # A closed local port stands in for an unreachable network: refused at once, as offline here.
    monkeypatch.setattr(sources, "NETWORK_PROBE", ("127.0.0.1", 9))
    data = DataConfig(source="tfds:mnist", image_size=(28, 28), channels=1, data_dir=str(tmp_path / "nowhere"))
    started = time.monotonic()
    with pytest.raises(DataError, match=r"tfds dataset 'mnist' is not in .*nowhere.*offline.*download_and_prepare"):
        split_dataset(data, tmp_path / "split")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "split").exists()


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    data = DataConfig(source="tfds:no_such_dataset_xyz", image_size=(28, 28), channels=1)
    with pytest.raises(DataError, match="no_such_dataset_xyz.*not found"):
        split_dataset(data, tmp_path / "split")
