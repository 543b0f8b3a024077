"""`convflow predict`: a folder, a Parquet table and a corrupt file scored by a trained pipeline's
production model; the probabilities are the SavedModel's own; DuckDB reads the output."""

from __future__ import annotations

import copy

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FOLDER_SPLIT, TINY_PIPELINES, make_image_folder, run_convflow, save_turned, write_yaml
from convflow.catalog import schemas

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A folder pipeline trained once: its root, images and the run's summary."""
    root = tmp_path_factory.mktemp("predict")
    images = make_image_folder(root / "images", classes=CLASSES, per_class=12)
    document = copy.deepcopy(TINY_PIPELINES)
    document["pipelines"]["tiny"]["data"] = {
        "source": "folder:images",
        "image_size": [16, 16],
        "channels": 3,
        "split": FOLDER_SPLIT,
    }
    document["pipelines"]["tiny"]["evaluate"] = {"min_accuracy": 0.0}
    write_yaml(root / "pipelines.yaml", document)
    run = run_convflow(["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=root)
    return {"root": root, "images": images, "summary": run.summary}


def saved_model_probabilities(saved_model: str, files: list) -> np.ndarray:
    import tensorflow as tf
    from PIL import Image

    loaded = tf.saved_model.load(saved_model)
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB"), np.uint8) for path in files])
    return loaded.signatures["serving_default"](images=tf.constant(pixels))["probabilities"].numpy()


@pytest.mark.e2e
@pytest.mark.xdist_group("predict")
@pytest.mark.slow
def test_folder_and_corrupt_file_scored_with_the_production_model(trained):
    root = trained["root"]
    (root / "more").mkdir()
    (root / "more" / "broken.png").write_bytes(b"\x89PNG not really")
    run = run_convflow(
        ["predict", "tiny", "images", "more", "--artifacts", "artifacts", "--output", "out.parquet", "--json"], cwd=root
    )
    assert run.summary["scored"] == 36 and run.summary["errors"] == 1 and run.summary["model_version"] == 1

    rows = pq.read_table(root / "out.parquet").to_pylist()
    files = sorted(trained["images"].glob("*/*.png"))
    assert [row["input"] for row in rows[:36]] == [f"images/{path.relative_to(trained['images'])}" for path in files]
    expected = saved_model_probabilities(trained["summary"]["saved_model"], files)
    assert np.allclose([row["probabilities"] for row in rows[:36]], expected, atol=1e-6)
    assert [row["predicted"] for row in rows[:36]] == [CLASSES[i] for i in expected.argmax(axis=1)]
    broken = rows[36]
    assert broken["input"] == "more/broken.png" and broken["error"].startswith("cannot decode")
    assert broken["predicted"] is None and broken["sha256"] is not None
    assert {row["run_id"] for row in rows} == {trained["summary"]["run_id"]}

    described = duckdb.sql(
        f"SELECT value FROM parquet_kv_metadata('{root / 'out.parquet'}') WHERE key = 'description'"
    ).fetchall()
    assert described and "convflow predict" in described[0][0].decode()
    assert pq.read_schema(root / "out.parquet").equals(schemas.BATCH_PREDICTIONS_SCHEMA, check_metadata=False)


@pytest.mark.e2e
@pytest.mark.xdist_group("predict")
@pytest.mark.slow
def test_parquet_table_rows_are_scored_by_row(trained):
    root = trained["root"]
    files = sorted(trained["images"].glob("*/*.png"))[:5]
    pq.write_table(
        pa.table({"image": pa.array([path.read_bytes() for path in files] + [None], pa.binary())}),
        root / "batch.parquet",
    )
    run = run_convflow(
        ["predict", "tiny", "batch.parquet", "--artifacts", "artifacts", "--output", "rows.parquet", "--json"], cwd=root
    )
    rows = pq.read_table(root / "rows.parquet").to_pylist()
    assert [row["input"] for row in rows] == [f"batch.parquet#{row}" for row in range(6)]
    assert rows[5]["error"] == "no image" and run.summary["errors"] == 1
    expected = saved_model_probabilities(trained["summary"]["saved_model"], files)
    assert np.allclose([row["probabilities"] for row in rows[:5]], expected, atol=1e-6)


@pytest.mark.e2e
@pytest.mark.xdist_group("predict")
@pytest.mark.slow
def test_a_turned_phone_photo_is_scored_as_the_upright_one(trained):
    """A phone stores a photo's pixels sideways and the way up in an EXIF tag: predict scores the
    photo as viewers show it, with the same probabilities as the same photo stored upright."""
    from PIL import Image

    root = trained["root"]
    phone = root / "phone"
    photos = sorted(trained["images"].glob("*/*.png"))[::12]  # one of each class, 16 high, 20 wide
    pairs = []
    for index, (path, orientation) in enumerate(zip(photos, (6, 8, 3))):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        save_turned(phone / f"upright-{index}.png", pixels, 1)
        save_turned(phone / f"turned-{index}.png", pixels, orientation)
        pairs.append((f"turned-{index}.png", f"upright-{index}.png"))
    # A JPEG, as phones write them: its upright twin holds the pixels it decodes to, turned by hand.
    save_turned(phone / "turned-3.jpg", np.asarray(Image.open(photos[0]).convert("RGB")), 6, quality=90)
    stored = np.asarray(Image.open(phone / "turned-3.jpg").convert("RGB"))
    Image.fromarray(np.rot90(stored, k=-1)).save(phone / "upright-3.png")  # orientation 6: a quarter turn clockwise
    pairs.append(("turned-3.jpg", "upright-3.png"))

    run = run_convflow(
        ["predict", "tiny", "phone", "--artifacts", "artifacts", "--output", "phone.parquet", "--json"], cwd=root
    )

    assert run.summary["scored"] == 8 and run.summary["errors"] == 0
    scored = {row["input"].rpartition("/")[2]: row for row in pq.read_table(root / "phone.parquet").to_pylist()}
    for turned, upright in pairs:
        assert np.allclose(scored[turned]["probabilities"], scored[upright]["probabilities"], atol=1e-6), turned
        assert scored[turned]["predicted"] == scored[upright]["predicted"]


def test_a_heic_photo_without_the_extra_gets_a_row_naming_the_fix(tmp_path, monkeypatch):
    """predict takes the images training takes; an iPhone photo without the heic extra is named, not passed over."""
    from PIL import Image

    from convflow.data import imaging
    from convflow.scoring.predict import gather_inputs

    monkeypatch.setattr(imaging, "heif_available", lambda: False)
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(32))
    (tmp_path / "notes.txt").write_text("not an image")
    for suffix in (".webp", ".tiff", ".jpg"):
        Image.new("RGB", (4, 3)).save(tmp_path / f"photo{suffix}")

    inputs = [(item.source.rpartition("/")[2], item.error) for item in gather_inputs([str(tmp_path)])]

    assert inputs == [
        (
            "IMG_0001.HEIC",
            "a HEIC/HEIF photo: convflow reads them with the optional pillow-heif plugin: pip install 'convflow[heic]'",
        ),
        ("photo.jpg", None),
        ("photo.tiff", None),
        ("photo.webp", None),
    ]


def test_no_production_model_is_a_clear_error(tmp_path, capsys):
    from convflow.cli.app import main

    assert main(["predict", "nothing", str(tmp_path), "--artifacts", str(tmp_path / "artifacts")]) == 1
    err = capsys.readouterr().err
    assert "convflow predict: pipeline 'nothing' has no production model under" in err and "--run" in err
