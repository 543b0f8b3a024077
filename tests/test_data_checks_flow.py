"""check_data in a whole run: the first run promotes and keeps its data's per-image table with the
production version; a later run over faulty data is blocked before training, exits 3, records
status blocked with its checks, and leaves production byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_PIPELINES, last_json_line, make_image_folder, run_convflow, start_convflow, write_yaml
from convflow.cli.output import EXIT_BLOCKED

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("data-checks-flow")]


def folder_document(images: Path) -> dict:
    tiny = {
        **TINY_PIPELINES["pipelines"]["tiny"],
        "data": {
            "source": f"folder:{images}",
            "image_size": [12, 12],
            "channels": 1,
            "split": {"train": 0.6, "validation": 0.1, "test": 0.3},
        },
        "evaluate": {"min_accuracy": 0.0},
    }
    return {**TINY_PIPELINES, "pipelines": {"tiny": tiny}}


def tree_digest(root: Path) -> str:
    """One digest over every file's path and bytes under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def darken(folder: Path, factor: float) -> None:
    for path in folder.rglob("*.png"):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        Image.fromarray((pixels * factor).astype(np.uint8)).save(path)


def test_a_darker_data_drop_is_blocked_before_training_and_production_is_untouched(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=40)
    write_yaml(tmp_path / "pipelines.yaml", folder_document(images))
    command = ["run", "tiny", "--artifacts", "artifacts", "--json"]

    first = run_convflow(command, cwd=tmp_path).summary
    assert first["status"] == "completed" and first["promoted_version"] == 1
    models = tmp_path / "artifacts" / "models" / "tiny"
    baseline = pq.read_table(models / "1" / "image_properties.parquet")
    assert baseline.num_rows == 120 and set(baseline["label"].to_pylist()) == {"cat", "dog", "owl"}
    before = tree_digest(models)

    darken(images, 0.4)
    process = start_convflow(command, cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=540)
    assert process.returncode == EXIT_BLOCKED, stdout[-3000:] + stderr[-3000:]
    summary = last_json_line(stdout)
    assert summary["status"] == "blocked"
    assert "drift brightness" in summary["gate_reason"] and "drift mean_r" in summary["gate_reason"]
    assert [stage["name"] for stage in summary["stages"]] == ["download_and_split", "to_tfrecords", "check_data"]
    assert "blocked by" in stdout and "production     unchanged" in stdout
    assert tree_digest(models) == before  # nothing promoted, nothing touched

    row = pq.read_table(tmp_path / "artifacts" / "runs.parquet").to_pylist()[-1]
    assert (row["run_id"], row["status"], row["promoted_version"]) == (summary["run_id"], "blocked", None)
    assert row["saved_model"] == str(models / "1")  # production's, as an unchanged run records it
    checks = pq.read_table(row["checks_parquet"]).to_pylist()
    brightness = next(check for check in checks if (check["check"], check["subject"]) == ("drift", "brightness"))
    assert brightness["verdict"] == "block" and brightness["value"] > 0.9 and brightness["threshold"] < 0.5
    assert {check["check"] for check in checks} >= {"class_set", "class_balance", "min_count", "leakage", "drift"}
    assert not (Path(row["run_dir"]) / "train").exists()

    # convflow compare checks the same data first, and trains no variant on it.
    document = folder_document(images)
    document["pipelines"]["tiny"]["compare"] = {
        "variants": [{"name": "plain"}, {"name": "fast", "train": {"learning_rate": 0.003}}],
        "promote": "best",
    }
    write_yaml(tmp_path / "pipelines.yaml", document)
    process = start_convflow(["compare", "tiny", "--artifacts", "artifacts", "--json"], cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=540)
    assert process.returncode == EXIT_BLOCKED, stdout[-3000:] + stderr[-3000:]
    comparison = last_json_line(stdout)
    assert comparison["verdict"].startswith("blocked by") and "drift brightness" in comparison["verdict"]
    assert comparison["winner"] is None and comparison["variants"] == []
    assert not list((tmp_path / "artifacts" / "tiny").glob(f"{comparison['comparison_id']}-plain"))
    assert tree_digest(models) == before
