"""The `parquet:` source: tables written by DuckDB (image bytes), in Hugging Face's Image layout
(a struct of bytes and path) and of paths; renamed columns; hive partitions; bad rows skipped and
named; a missing column named with the columns found; a table that trains end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FOLDER_SPLIT, TINY_PIPELINES, data_config, make_image_folder, run_convflow, write_yaml
from convflow.data.sources import DataError, load_source
from convflow.tasks.download_and_split import split_dataset

CLASSES = ("cat", "dog", "owl")


def duckdb_table(folder: Path, output: Path, image: str = "image", label: str = "label") -> Path:
    """The image folder as DuckDB writes it: the files' bytes, the class folder as the label."""
    duckdb.sql(
        f"COPY (SELECT content AS {image}, regexp_extract(filename, '/([a-z]+)/[^/]+$', 1) AS {label} "
        f"FROM read_blob('{folder}/*/*.png') ORDER BY filename) TO '{output}' (FORMAT parquet)"
    )
    return output


def image_files(folder: Path) -> list[tuple[Path, str]]:
    return [(path, path.parent.name) for path in sorted(folder.glob("*/*.png"))]


def hugging_face_table(folder: Path, output: Path) -> Path:
    """Hugging Face `datasets`' Image feature in Parquet: struct<bytes: binary, path: string>."""
    files = image_files(folder)
    image = pa.array(
        [{"bytes": path.read_bytes(), "path": path.name} for path, _ in files],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": image, "label": [CLASSES.index(name) for _, name in files]}), output)
    return output


def paths_table(folder: Path, output: Path) -> Path:
    """Paths relative to the table's folder."""
    files = image_files(folder)
    paths = [str(path.relative_to(output.parent)) for path, _ in files]
    pq.write_table(pa.table({"image": paths, "label": [name for _, name in files]}), output)
    return output


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images", classes=CLASSES, per_class=12)


def test_duckdb_bytes_table_reads_as_the_folder_does(folder, tmp_path):
    table = duckdb_table(folder, tmp_path / "images.parquet")
    loaded = load_source(data_config(f"parquet:{table}", channels=3), tmp_path / "scratch")

    assert loaded.label_names == list(CLASSES)
    assert loaded.labels.tolist() == [label for label in range(3) for _ in range(12)]
    assert [Path(path).read_bytes() for path in loaded.files] == [path.read_bytes() for path, _ in image_files(folder)]
    assert all(path.endswith(".png") for path in loaded.files) and loaded.skipped == []
    assert loaded.example_ids[0] == "images.parquet#0"


def test_hugging_face_layout_with_integer_labels_and_names(folder, tmp_path):
    table = hugging_face_table(folder, tmp_path / "hf.parquet")
    loaded = load_source(data_config(f"parquet:{table}", channels=3, label_names=list(CLASSES)), tmp_path / "s")

    assert loaded.label_names == list(CLASSES)
    assert sorted(loaded.labels.tolist()) == sorted([0] * 12 + [1] * 12 + [2] * 12)


def test_paths_relative_to_the_table(folder, tmp_path):
    table = paths_table(folder, tmp_path / "paths.parquet")
    loaded = load_source(data_config(f"parquet:{table}", channels=3), tmp_path / "s")

    assert loaded.files == [str(path) for path, _ in image_files(folder)]


def test_renamed_columns(folder, tmp_path):
    table = duckdb_table(folder, tmp_path / "renamed.parquet", image="jpeg_bytes", label="species")
    data = data_config(f"parquet:{table}", channels=3, columns={"image": "jpeg_bytes", "label": "species"})

    assert load_source(data, tmp_path / "s").label_names == list(CLASSES)


def test_missing_column_names_the_columns_found(folder, tmp_path):
    table = duckdb_table(folder, tmp_path / "renamed.parquet", image="pixels")
    with pytest.raises(DataError) as caught:
        load_source(data_config(f"parquet:{table}", channels=3), tmp_path / "s")
    message = str(caught.value)
    assert "no image column 'image'" in message and "['pixels', 'label']" in message and "data.columns" in message


def test_hive_split_partitions_are_predefined_splits(folder, tmp_path):
    files = image_files(folder)
    root = tmp_path / "table"
    for split, rows in (("train", files[0::2]), ("test", files[1::2])):
        (root / f"split={split}").mkdir(parents=True)
        pq.write_table(
            pa.table({"image": [path.read_bytes() for path, _ in rows], "label": [name for _, name in rows]}),
            root / f"split={split}" / "part-0.parquet",
        )
    loaded = load_source(data_config(f"parquet:{root}", channels=3), tmp_path / "s")

    assert sorted(set(loaded.predefined_split)) == ["test", "train"]
    assert loaded.predefined_split.count("train") == len(files[0::2])


def test_unusable_rows_are_skipped_and_named(folder, tmp_path):
    files = image_files(folder)
    images = [path.read_bytes() for path, _ in files] + [b"not an image", None]
    labels = [name for _, name in files] + ["cat", "dog"]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), tmp_path / "t.parquet")
    loaded = load_source(data_config(f"parquet:{tmp_path / 't.parquet'}", channels=3), tmp_path / "s")

    assert len(loaded.files) == len(files)
    assert loaded.skipped[0].startswith(f"{tmp_path / 't.parquet'} row {len(files)}: cannot decode")
    assert loaded.skipped[1] == f"{tmp_path / 't.parquet'} row {len(files) + 1}: no image"


def test_mixed_label_types_are_refused(folder, tmp_path):
    files = image_files(folder)[:4]
    pq.write_table(
        pa.table({"image": [path.read_bytes() for path, _ in files], "label": pa.array(["cat", "dog", "cat", "dog"])}),
        tmp_path / "a.parquet",
    )
    pq.write_table(
        pa.table({"image": [path.read_bytes() for path, _ in files], "label": pa.array([0, 1, 0, 1])}),
        tmp_path / "b.parquet",
    )
    with pytest.raises(DataError, match=r"labels must be all strings or all integers, found \['int', 'str'\]"):
        load_source(data_config(f"parquet:{tmp_path}/*.parquet", channels=3), tmp_path / "s")


def test_the_split_stage_keeps_the_images_it_wrote(folder, tmp_path):
    table = duckdb_table(folder, tmp_path / "images.parquet")
    split_set = split_dataset(data_config(f"parquet:{table}", channels=3, split=FOLDER_SPLIT), tmp_path / "out")

    paths = pq.read_table(split_set.splits_parquet).column("path").to_pylist()
    assert all(Path(path).is_file() and path.startswith(str(tmp_path / "out" / "images")) for path in paths)
    assert sum(split_set.counts.values()) == 36


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("layout", [duckdb_table, hugging_face_table, paths_table])
def test_each_layout_trains_end_to_end(folder, tmp_path, layout):
    table = layout(folder, tmp_path / "table.parquet")
    document = copy.deepcopy(TINY_PIPELINES)
    tiny = document["pipelines"]["tiny"]
    tiny["data"] = {
        "source": f"parquet:{table.name}",
        "image_size": [16, 16],
        "channels": 3,
        "split": FOLDER_SPLIT,
        "label_names": list(CLASSES),
    }
    tiny["evaluate"] = {"min_accuracy": 0.0}
    write_yaml(tmp_path / "pipelines.yaml", document)

    run = run_convflow(["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=tmp_path)
    assert run.summary["status"] == "completed"
    assert run.summary["test_accuracy"] > 1 / 3  # the classes' stripes are learnable


SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.e2e
@pytest.mark.slow
def test_cats_vs_dogs_as_a_table_trains_as_the_folder_does(tmp_path):
    """../shared/data/cats_vs_dogs, and the same photos as a DuckDB-written table (bytes, label and
    split columns), train frozen MobileNet to the same test accuracy within a point."""
    folder = SHARED / "data" / "cats_vs_dogs"
    duckdb.sql(
        "COPY (SELECT content AS image, regexp_extract(filename, '/([a-z]+)/[^/]+$', 1) AS label, "
        "regexp_extract(filename, '/(train|validation|test)/', 1) AS split "
        f"FROM read_blob('{folder}/*/*/*.jpg') ORDER BY filename) TO '{tmp_path / 'cats_vs_dogs.parquet'}' "
        "(FORMAT parquet)"
    )
    pipeline = {
        "data": {
            "image_size": [160, 160],
            "channels": 3,
            "resize": "pad",
            "split": {"train": 0.6, "validation": 0.1, "test": 0.3},
        },
        "model": {
            "base": "mobilenet",
            "alpha": 0.25,
            "dropout": 0.2,
            "weights": str(SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"),
        },
        "train": {"epochs": 5, "batch_size": 32, "seed": 0},
        "evaluate": {"min_accuracy": 0.0},
    }
    sources = {"from-folder": f"folder:{folder}", "from-table": "parquet:cats_vs_dogs.parquet"}
    document = {
        "pipelines": {
            name: {**copy.deepcopy(pipeline), "data": {**pipeline["data"], "source": source}}
            for name, source in sources.items()
        }
    }
    write_yaml(tmp_path / "pipelines.yaml", document)
    accuracy = {
        name: run_convflow(
            ["run", name, "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=tmp_path
        ).summary["test_accuracy"]
        for name in sources
    }
    print(f"\ncats_vs_dogs test accuracy: {accuracy}")
    assert accuracy["from-folder"] > 0.75  # a sanity floor: 5 epochs at 160 px
    assert abs(accuracy["from-table"] - accuracy["from-folder"]) <= 0.01
