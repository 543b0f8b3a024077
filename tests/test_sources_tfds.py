"""tfds: sources through the real TFDS loader, on tfds.testing.mock_data; offline failure."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from convflow import sources
from convflow.config import DataConfig
from convflow.sources import DataError
from convflow.tasks.download_and_split import split_dataset


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
    assert rows["path"].map(lambda path: path.startswith(str(tmp_path / "split" / "images"))).all()
    assert all((tmp_path / "split" / "images").joinpath(p.split("/")[-1]).exists() for p in rows["path"])
    assert rows["label"].between(0, len(classes) - 1).all()


def test_tfds_slicing_maps_to_splits(tmp_path, online):
    data = DataConfig(
        source="tfds:mnist", image_size=(28, 28), channels=1, data_dir=str(tmp_path / "tfds"),
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
