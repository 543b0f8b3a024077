"""Stage 1, download_and_split: sklearn digits, image folders and IDX files through the real loaders."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import FOLDER_SPLIT, REPO, data_config, make_idx_folder, save_image, split_as_before, write_idx
from convflow.catalog import schemas
from convflow.data.sources import DataError, read_idx
from convflow.tasks.download_and_split import split_dataset


def _rows(split_set) -> dict:
    return pq.read_table(split_set.splits_parquet).to_pydict()


def _no_leftovers(folder):
    return [path.name for path in folder.iterdir() if ".tmp-" in path.name]


def _folder_config(root, **fields):
    return data_config(f"folder:{root}", image_size=(12, 12), channels=3, split=FOLDER_SPLIT, **fields)


# ----------------------------------------------------------------------------- sklearn digits


def test_digits_split(digits_split):
    rows = _rows(digits_split)
    images = np.load(digits_split.images_npy)

    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0  # 0..16 scaled to 0..255
    assert digits_split.label_names == [str(digit) for digit in range(10)]
    assert sum(digits_split.counts.values()) == len(rows["example_id"]) == 1797
    assert digits_split.counts == {split: rows["split"].count(split) for split in ("train", "validation", "test")}
    shares = {split: count / 1797 for split, count in digits_split.counts.items()}
    assert shares["train"] == pytest.approx(0.8, abs=0.05)
    assert shares["validation"] == pytest.approx(0.1, abs=0.04)
    assert shares["test"] == pytest.approx(0.1, abs=0.04)
    assert rows["example_id"][:2] == ["digits-00000", "digits-00001"]
    assert rows["sha256"][0] == hashlib.sha256(images[0].tobytes()).hexdigest()
    assert rows["label_name"] == [digits_split.label_names[label] for label in rows["label"]]
    assert set(rows["path"]) == {None}
    assert digits_split.duplicates == len(rows["sha256"]) - len(set(rows["sha256"]))
    assert digits_split.skipped == []


def test_splits_parquet_schema(digits_split):
    schema = pq.read_schema(digits_split.splits_parquet)
    assert schema.equals(schemas.SPLITS_SCHEMA, check_metadata=True)
    assert schema.names == ["example_id", "label", "label_name", "split", "sha256", "path", "height", "width"]
    sizes = pq.read_table(digits_split.splits_parquet, columns=["height", "width"]).to_pydict()
    assert set(sizes["height"]) == set(sizes["width"]) == {8}  # the 8x8 digits, before resizing
    assert schema.field("split").metadata[b"description"].startswith(b"train, validation or test")
    assert not schema.field("sha256").nullable and schema.field("path").nullable


def test_digits_split_is_deterministic(digits_split, digits_data, tmp_path):
    again = split_dataset(digits_data, tmp_path / "again")
    assert _rows(again) == _rows(digits_split)
    assert again.data_fingerprint == digits_split.data_fingerprint
    assert again.counts == digits_split.counts


def test_duplicates_never_straddle_splits(digits_split):
    rows = _rows(digits_split)
    split_of: dict[str, set] = {}
    for sha, split in zip(rows["sha256"], rows["split"]):
        split_of.setdefault(sha, set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())


# ----------------------------------------------------------------------------- image folders


def test_folder_keeps_good_files_and_lists_bad_ones(messy_image_folder, tmp_path):
    root = messy_image_folder["root"]
    split_set = split_dataset(_folder_config(root), tmp_path / "out")
    rows = _rows(split_set)

    assert split_set.label_names == ["cat", "dog", "owl"]
    assert split_set.images_npy is None
    kept = set(rows["path"])
    assert len(kept) == 3 * 20 + 3
    for good in messy_image_folder["good"]:
        assert str(good) in kept
    for bad in messy_image_folder["bad"] + messy_image_folder["hidden"]:
        assert str(bad) not in kept
    skipped = {line.split(": ")[0]: line for line in split_set.skipped}
    assert set(skipped) == {str(bad) for bad in messy_image_folder["bad"]}
    reasons = {path.rsplit("/", 1)[-1]: line.split(": ", 1)[1] for path, line in skipped.items()}
    assert reasons["empty.png"] == "empty file"
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["garbage.jpg"].startswith("cannot decode")
    assert reasons["truncated.jpg"].startswith("cannot decode")
    # example ids are paths relative to the source folder; labels follow the class folder
    index = rows["example_id"].index("dog/rgba.png")
    assert rows["label"][index] == 1 and rows["label_name"][index] == "dog"
    assert (rows["height"][index], rows["width"][index]) == (16, 20)
    assert rows["sha256"][index] == hashlib.sha256((root / "dog" / "rgba.png").read_bytes()).hexdigest()
    assert split_set.counts == {split: rows["split"].count(split) for split in ("train", "validation", "test")}
    assert _no_leftovers(tmp_path) == []


def test_folder_split_is_stable_when_the_dataset_grows(image_folder, image_folder_factory, tmp_path):
    config = _folder_config(image_folder)
    before = split_dataset(config, tmp_path / "before")
    image_folder_factory(image_folder, per_class=10, start=20)  # 30 new images
    after = split_dataset(config, tmp_path / "after")

    old, new = _rows(before), _rows(after)
    assert len(new["example_id"]) == len(old["example_id"]) + 30
    split_after = dict(zip(new["example_id"], new["split"]))
    assert all(split_after[example] == split for example, split in zip(old["example_id"], old["split"]))
    assert after.data_fingerprint != before.data_fingerprint


def test_folder_split_is_deterministic(image_folder, tmp_path):
    config = _folder_config(image_folder)
    first, second = split_dataset(config, tmp_path / "a"), split_dataset(config, tmp_path / "b")
    assert _rows(first) == _rows(second)
    assert first.data_fingerprint == second.data_fingerprint


# The image file names the folder source took before it took sub-folders and more formats.
FORMERLY_TAKEN = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def test_a_flat_folder_keeps_its_example_ids_order_and_splits(messy_image_folder, tmp_path):
    """Reading sub-folders and more formats changes nothing for a folder with neither: its examples
    are the files the old reader listed (each class folder's own files by name, hidden ones and
    other names left out), in its order, each in the split the old reader's hash gave it."""
    root = messy_image_folder["root"]
    unusable = {str(path) for path in messy_image_folder["bad"]}
    expected_ids = [
        f"{folder.name}/{name}"
        for folder in sorted(path for path in root.iterdir() if path.is_dir())
        for name in sorted(os.listdir(folder))
        if not name.startswith(".") and name.lower().endswith(FORMERLY_TAKEN) and str(folder / name) not in unusable
    ]
    config = _folder_config(root)

    rows = _rows(split_dataset(config, tmp_path / "out"))

    assert rows["example_id"] == expected_ids
    carved = ["train", "validation", "test"]
    expected_splits = [
        split_as_before(hashlib.sha256((root / example).read_bytes()).hexdigest(), None, carved, FOLDER_SPLIT)
        for example in expected_ids
    ]
    assert rows["split"] == expected_splits


FLOWERS = REPO.parent / "shared" / "data" / "flowers"


@pytest.mark.slow
@pytest.mark.skipif(not FLOWERS.is_dir(), reason="../shared/data/flowers is not on this machine")
def test_the_flowers_pipelines_splits_are_those_it_had(tmp_path):
    """The flowers pipeline's source, read by the folder source before it took sub-folders and more
    formats: the same 4,309 examples, in the same splits (the fingerprint hashes them all)."""
    data = data_config(f"folder:{FLOWERS}", image_size=(96, 96), channels=3)

    split_set = split_dataset(data, tmp_path / "out")

    assert split_set.counts == {"train": 3387, "validation": 444, "test": 478}
    assert split_set.data_fingerprint == "883e5e35a22170bb504fcef1"
    assert split_set.skipped == []


def test_files_in_sub_folders_count_under_their_class(image_folder_factory, tmp_path):
    """Photos kept by year inside a class folder belong to it, at any depth; hidden folders and
    files are left out; an example's id is its path inside the source folder."""
    root = image_folder_factory(tmp_path / "photos", classes=("cat", "dog"), per_class=10)
    image_folder_factory(root / "cat" / "2019", classes=("summer",), per_class=3, start=100, suffix=".webp")
    image_folder_factory(root / "dog", classes=("2019",), per_class=2, start=200, suffix=".tiff")
    image_folder_factory(root / "dog" / ".thumbnails", classes=("2019",), per_class=2, start=300)
    image_folder_factory(root / "dog" / "2019", classes=(".cache",), per_class=2, start=400)
    (root / "dog" / "2019" / ".hidden.png").write_bytes((root / "dog" / "img-000.png").read_bytes())

    split_set = split_dataset(_folder_config(root), tmp_path / "out")
    rows = _rows(split_set)

    label_of = dict(zip(rows["example_id"], rows["label_name"]))
    assert len(label_of) == 25 and split_set.skipped == []
    assert label_of["cat/2019/summer/img-100.webp"] == "cat"
    assert label_of["dog/2019/img-201.tiff"] == "dog"
    assert rows["label_name"].count("cat") == 13
    assert not any("/." in example for example in label_of)
    assert rows["example_id"][:11] == [f"cat/2019/summer/img-{n}.webp" for n in (100, 101, 102)] + [
        f"cat/img-{n:03d}.png" for n in range(8)
    ]


def test_skipped_files_are_counted_by_reason():
    from convflow.core.skips import skip_reason, skipped_by_reason, skipped_summary

    lines = [f"/p/cat/notes-{n}.txt: not an image file" for n in range(70)]
    lines += ["/p/dog/a.png: empty file", "/p/dog/b.jpg: cannot decode: image file is truncated"]

    assert skipped_summary(lines) == "72 skipped: 70 not images, 1 empty, 1 cut off"
    assert list(skipped_by_reason(lines)) == ["not images", "empty", "cut off"]
    assert skipped_summary([]) == ""
    assert skip_reason("/t.parquet row 37: no image") == "no image"
    assert skip_reason("/p/owl/big.png: 8000x8000 exceeds 50000000 pixels") == "too large"
    assert skip_reason("/p/owl/odd.png: something else") == "other"


def test_folder_with_predefined_splits(tmp_path, image_folder_factory):
    root = tmp_path / "photos"
    image_folder_factory(root / "train", classes=("cat", "dog"), per_class=20)
    image_folder_factory(root / "test", classes=("cat", "dog"), per_class=4, start=100)

    split_set = split_dataset(_folder_config(root), tmp_path / "out")
    rows = _rows(split_set)

    split_of = dict(zip(rows["example_id"], rows["split"]))
    assert split_set.label_names == ["cat", "dog"]
    assert all(split == "test" for example, split in split_of.items() if example.startswith("test/"))
    # the test folder is the test split; the train folder is carved into train and validation
    assert {split_of[e] for e in split_of if e.startswith("train/")} == {"train", "validation"}
    assert split_set.counts["test"] == 8


def test_one_class_folder_is_refused(tmp_path, image_folder_factory):
    root = image_folder_factory(tmp_path / "one", classes=("cat",), per_class=5)
    with pytest.raises(DataError, match=r"only one class \('cat'\); need at least two"):
        split_dataset(_folder_config(root), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _no_leftovers(tmp_path) == []


def test_missing_folder_is_refused(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match=re.escape(f"folder source {missing} does not exist")):
        split_dataset(_folder_config(missing), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_class_folders_is_refused(tmp_path):
    root = tmp_path / "flat"
    save_image(root / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="no class sub-folders found"):
        split_dataset(_folder_config(root), tmp_path / "out")


def test_class_folder_with_only_corrupt_files_is_refused(image_folder, tmp_path):
    broken = image_folder / "zebra"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    (broken / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"class folder {broken} has no usable image")):
        split_dataset(_folder_config(image_folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_class_missing_from_the_test_split_is_refused(tmp_path, image_folder_factory):
    root = tmp_path / "photos"
    image_folder_factory(root / "train", classes=("cat", "dog"), per_class=10)
    image_folder_factory(root / "test", classes=("cat",), per_class=3, start=100)
    with pytest.raises(DataError, match=r"split 'test' has no example of class\(es\) \['dog'\]"):
        split_dataset(_folder_config(root), tmp_path / "out")


def test_label_names_from_the_config(image_folder, tmp_path):
    split_set = split_dataset(_folder_config(image_folder, label_names=["Cat", "Dog", "Owl"]), tmp_path / "a")
    assert split_set.label_names == ["Cat", "Dog", "Owl"]
    assert set(_rows(split_set)["label_name"]) == {"Cat", "Dog", "Owl"}
    with pytest.raises(DataError, match="data.label_names has 2 names but .* has 3 classes"):
        split_dataset(_folder_config(image_folder, label_names=["a", "b"]), tmp_path / "b")


# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("compress", [True, False])
def test_idx_split(tmp_path, compress):
    root = tmp_path / "idx"
    written = make_idx_folder(root, compress=compress)

    split_set = split_dataset(data_config(f"idx:{root}"), tmp_path / "out")
    rows = _rows(split_set)
    images = np.load(split_set.images_npy)

    train_images, train_labels = written["train"]
    test_images, test_labels = written["t10k"]
    assert images.shape == (75, 10, 10, 1)
    np.testing.assert_array_equal(images[:60, ..., 0], train_images)
    np.testing.assert_array_equal(images[60:, ..., 0], test_images)
    assert rows["label"] == [*train_labels.tolist(), *test_labels.tolist()]
    assert rows["example_id"][0] == "train-00000" and rows["example_id"][60] == "t10k-00000"
    assert split_set.label_names == ["0", "1", "2"]
    # t10k is the test split; train is carved into train and validation only
    assert set(rows["split"][60:]) == {"test"}
    assert set(rows["split"][:60]) == {"train", "validation"}
    assert split_set.counts["test"] == 15


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", array)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte", array, compress=False)), array)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # 0x0D: float data, not unsigned bytes
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((4, 3, 3), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=re.escape("truncated: header says (4, 3, 3), found 31 bytes")):
        read_idx(path)


def test_read_idx_rejects_truncated_header(tmp_path):
    """A header cut short (3 dimensions announced, one given) is a truncated file like any other."""
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (60).to_bytes(4, "big"))
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_idx(path)


def test_read_idx_rejects_a_corrupt_gzip(tmp_path):
    path = tmp_path / "c-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(path)


def test_idx_images_without_labels_are_refused(tmp_path):
    root = tmp_path / "idx"
    make_idx_folder(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k images and labels must both be present"):
        split_dataset(data_config(f"idx:{root}"), tmp_path / "out")


def test_idx_count_mismatch_is_refused(tmp_path):
    root = tmp_path / "idx"
    make_idx_folder(root)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="15 images but 3 labels"):
        split_dataset(data_config(f"idx:{root}"), tmp_path / "out")


def test_idx_folder_without_idx_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        split_dataset(data_config(f"idx:{tmp_path / 'empty'}"), tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        split_dataset(data_config(f"idx:{tmp_path / 'nope'}"), tmp_path / "out")


def test_real_mnist_test_labels():
    """The real t10k labels in ../shared/data/mnist, read with the real reader."""
    labels = read_idx(REPO.parent / "shared" / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_data_fingerprint_hashes_the_sorted_example_hashes_labels_and_splits(digits_split):
    from convflow.core.hashing import hash_json

    rows = _rows(digits_split)
    assert digits_split.data_fingerprint == hash_json(sorted(zip(rows["sha256"], rows["label"], rows["split"])))[:24]


@pytest.mark.parametrize("predefined", [None, "test", "mixed"])
def test_splits_counts_and_fingerprint_from_packed_arrays_are_those_of_one_example_at_a_time(predefined):
    """download_and_split keeps packed arrays, not a Python object per example: every example keeps
    the split it was given one at a time, and the fingerprint and duplicate counts are unchanged.
    Random digests with repeats (some in two splits when the source predefines splits)."""
    from convflow.config.schema import SplitFractions
    from convflow.core.hashing import hash_json
    from convflow.tasks import download_and_split as stage

    rng = np.random.default_rng(7)
    distinct = rng.integers(0, 256, (3_000, 32), dtype=np.uint8)
    digests = distinct[rng.integers(0, len(distinct), 5_000)]
    digests[:40, :8] = 0  # the smallest positions; and the largest, next
    digests[40:80, :8] = 255
    labels = rng.integers(0, 4, len(digests)).astype(np.int64)
    given = {
        None: [None] * len(digests),
        "test": ["test"] * len(digests),
        "mixed": rng.choice(np.array([None, "train", "test"], dtype=object), len(digests)).tolist(),
    }[predefined]
    data = data_config("sklearn:digits", split=SplitFractions(train=0.7, validation=0.1, test=0.2))

    codes = stage._assign_splits(digests, given, data)
    hexes = [bytes(digest).hex() for digest in digests]
    carved = stage._carved_splits(given)
    expected = [split_as_before(sha, split, carved, data.split.model_dump()) for sha, split in zip(hexes, given)]
    names = [stage.SPLIT_NAMES[code] for code in codes]
    assert names == expected

    assert stage._data_fingerprint(digests, labels, codes) == hash_json(sorted(zip(hexes, labels.tolist(), names)))[:24]
    splits_of: dict[str, set[str]] = {}
    for sha, name in zip(hexes, names):
        splits_of.setdefault(sha, set()).add(name)
    across = sum(1 for found_in in splits_of.values() if len(found_in) > 1)
    assert stage._duplicate_counts(digests, codes) == (len(hexes) - len(set(hexes)), across)
    assert predefined != "mixed" or across > 0
