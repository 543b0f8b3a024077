"""The gate and the model registry: promote, refuse a worse model, roll back."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CONVFLOW, run_convflow
from convflow.catalog import registry


def _fake_saved_model(root: Path, content: bytes) -> Path:
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(content)
    (root / "variables" / "variables.index").write_bytes(content[::-1])
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.endswith(".lock")
    }


def test_promote_versions_and_rollback(tmp_path):
    first = _fake_saved_model(tmp_path / "run1", b"model one")
    second = _fake_saved_model(tmp_path / "run2", b"model two")
    v1 = registry.promote(tmp_path, "p", "run1", str(first), "run1/model.keras", 0.9)
    v2 = registry.promote(tmp_path, "p", "run2", str(second), "run2/model.keras", 0.95)
    assert (v1.version, v2.version) == (1, 2)
    assert registry.current(tmp_path, "p") == v2
    assert (Path(v2.saved_model) / "saved_model.pb").read_bytes() == b"model two"
    assert registry.rollback(tmp_path, "p") == v1
    assert registry.current(tmp_path, "p").version == 1
    assert (Path(v2.saved_model) / "saved_model.pb").read_bytes() == b"model two"  # kept on disk
    with pytest.raises(registry.RegistryError, match="version 1 is the oldest"):
        registry.rollback(tmp_path, "p")


def test_a_promoted_version_keeps_its_datas_image_properties(tmp_path):
    """The per-image table of the data a version was made from is copied in with it: the data
    checks' baseline stays with the model even when the run's folder is gone."""
    table = tmp_path / "run1" / "image_properties.parquet"
    table.parent.mkdir()
    table.write_bytes(b"per-image table")
    v1 = registry.promote(
        tmp_path, "p", "run1", str(_fake_saved_model(tmp_path / "m1", b"one")), "m1", 0.9, image_properties=str(table)
    )
    table.unlink()
    assert Path(v1.image_properties).read_bytes() == b"per-image table"
    assert Path(v1.image_properties).parent == Path(v1.saved_model)
    v2 = registry.promote(tmp_path, "p", "run2", str(_fake_saved_model(tmp_path / "m2", b"two")), "m2", 0.9)
    assert v2.image_properties is None and registry.current(tmp_path, "p") == v2


def test_a_promoted_version_keeps_its_test_split_as_its_reference_set(tmp_path):
    """The test shards the model was judged on are copied in with it (later gates score them with
    both models), described by reference.json; a version promoted without them has none."""
    shards = [tmp_path / "run1" / f"test-0000{index}-of-00002.n3.tfrecord" for index in range(2)]
    shards[0].parent.mkdir()
    for index, shard in enumerate(shards):
        shard.write_bytes(f"records {index}".encode())
    reference = registry.ReferenceSet(
        shards=[str(shard) for shard in shards], label_names=["cat", "dog"], image_size=(8, 8), channels=3, examples=6
    )
    v1 = registry.promote(
        tmp_path, "p", "run1", str(_fake_saved_model(tmp_path / "m1", b"one")), "m1", 0.9, reference_set=reference
    )
    for shard in shards:
        shard.unlink()  # the run's folder may be gone: the version keeps its own copy

    assert Path(v1.reference_set) == Path(v1.saved_model) / "reference"
    kept = registry.load_reference_set(v1.reference_set)
    assert [Path(shard).read_bytes() for shard in kept.shards] == [b"records 0", b"records 1"]
    assert [Path(shard).parent for shard in kept.shards] == [Path(v1.reference_set)] * 2
    assert kept.model_dump(exclude={"shards"}) == reference.model_dump(exclude={"shards"})
    assert registry.current(tmp_path, "p").reference_set == v1.reference_set
    v2 = registry.promote(tmp_path, "p", "run2", str(_fake_saved_model(tmp_path / "m2", b"two")), "m2", 0.9)
    assert v2.reference_set is None


def test_rival_skips_the_model_already_in_production(tmp_path):
    saved = _fake_saved_model(tmp_path / "run1", b"x")
    registry.promote(tmp_path, "p", "run1", str(saved), "run1/model.keras", 0.9)
    assert registry.rival(tmp_path, "p", "run1/model.keras") is None
    assert registry.rival(tmp_path, "p", "run2/model.keras").version == 1
    assert registry.rival(tmp_path, "other", "run2/model.keras") is None


def test_rollback_without_production_is_a_clear_error(tmp_path):
    with pytest.raises(registry.RegistryError, match="has no production model"):
        registry.rollback(tmp_path, "nothing")


def _pipelines(path: Path, epochs: int) -> Path:
    path.write_text(
        "pipelines:\n  gate:\n"
        "    data: {source: 'sklearn:digits', image_size: [12, 12], channels: 1}\n"
        "    model: {base: mnist_cnn}\n"
        f"    train: {{epochs: {epochs}, batch_size: 128}}\n"
        "    evaluate: {min_accuracy: 0.5}\n"
    )
    return path


def _run(tmp_path: Path, epochs: int) -> dict:
    pipelines = _pipelines(tmp_path / f"pipelines-{epochs}.yaml", epochs)
    return run_convflow(
        ["run", "gate", "-f", str(pipelines), "--artifacts", str(tmp_path / "artifacts"), "--json"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).summary


@pytest.mark.e2e
def test_worse_model_is_not_promoted_better_one_is_and_rollback_restores(tmp_path):
    models = tmp_path / "artifacts" / "models" / "gate"
    first = _run(tmp_path, epochs=2)
    assert first["status"] == "completed" and first["promoted_version"] == 1
    production_before = _tree_digest(models)

    worse = _run(tmp_path, epochs=1)
    assert worse["test_accuracy"] < first["test_accuracy"]
    assert worse["status"] == "not-promoted" and worse["promoted_version"] is None
    assert "production v1" in worse["gate_reason"]
    assert _tree_digest(models) == production_before  # production files byte-identical

    better = _run(tmp_path, epochs=4)
    assert better["test_accuracy"] > first["test_accuracy"]
    assert better["promoted_version"] == 2
    assert registry.current(tmp_path / "artifacts", "gate").version == 2
    assert (models / "1" / "saved_model.pb").exists()  # the old version stays on disk

    rolled = subprocess.run(
        [CONVFLOW, "rollback", "gate", "--artifacts", str(tmp_path / "artifacts")], capture_output=True, text=True
    )
    assert rolled.returncode == 0, rolled.stderr
    assert "production is now version 1" in rolled.stdout
    assert registry.current(tmp_path / "artifacts", "gate").run_id == first["run_id"]


# ----------------------------------------------------------------------------- the per-class gate


def test_the_per_class_gate_names_each_class_below_its_floor():
    """A model may pass on overall accuracy and still lose one class: min_class_recall and
    max_class_regression (against production's recall on the same split) name each such class."""
    import numpy as np

    from convflow.config.schema import EvaluateConfig
    from convflow.tasks.evaluate import _class_gate, class_recalls

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    candidate = class_recalls(labels, np.array([0, 0, 0, 0, 1, 1, 0, 0, 2, 2]), ["cat", "dog", "owl"])
    assert candidate == {"cat": 1.0, "dog": 0.5, "owl": 1.0}
    production = class_recalls(labels, np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 0]), ["cat", "dog", "owl"])
    assert production == {"cat": 0.75, "dog": 1.0, "owl": 0.5}

    assert _class_gate(candidate, EvaluateConfig(), production) == []  # unset: not held
    assert _class_gate(candidate, EvaluateConfig(min_class_recall=0.6), None) == [
        "dog recall 0.5000 < min_class_recall 0.6"
    ]
    assert _class_gate(candidate, EvaluateConfig(max_class_regression=0.2), production) == [
        "dog recall 0.5000 < production's 1.0000 - max_class_regression 0.2"
    ]
    assert _class_gate(candidate, EvaluateConfig(max_class_regression=0.5), production) == []
    assert _class_gate(candidate, EvaluateConfig(max_class_regression=0.2), None) == []  # no production yet


def test_per_class_gate_settings_leave_existing_config_hashes_alone():
    from conftest import REPO
    from convflow.config.load import load_pipeline

    spec = load_pipeline(REPO / "pipelines.yaml", "digits-cnn")
    assert spec.config_hash() == "aed33119b935e2ce"  # as before the per-class settings existed
    stricter = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"min_class_recall": 0.9})})
    assert stricter.config_hash() != spec.config_hash()


def _append_run(artifacts_root: Path, run_id: str, **columns) -> None:
    """A row of pipeline p's run `run_id` in the catalog under `artifacts_root`, with `columns`."""
    import datetime

    from convflow.catalog import tables

    now = datetime.datetime.now(datetime.UTC)
    row = {
        "pipeline": "p",
        "run_id": run_id,
        "started": now,
        "finished": now,
        "config_hash": "h",
        "data_fingerprint": "d",
    }
    tables.append_run(artifacts_root / "runs.parquet", {**row, **columns})


def test_a_blocked_run_cannot_be_promoted_by_hand(tmp_path):
    """A blocked run's catalog row names production's model (it trained none): promoting it by hand
    is refused, naming why, and the registry is left as it was."""
    _append_run(
        tmp_path,
        "r-blocked",
        status="blocked",
        gate_reason="blocked by 1 data check(s), nothing trained: drift brightness: KS 0.8",
    )
    with pytest.raises(registry.RegistryError, match="'r-blocked' is blocked: it trained no model .*drift brightness"):
        registry.promote_run(tmp_path, "r-blocked")
    assert not (tmp_path / "models").exists()


def test_a_run_promoted_by_hand_keeps_its_datas_image_properties(tmp_path):
    """`convflow promote RUN_ID` finds the run's per-image table through its catalog row and keeps it
    with the version, as the gate's promotion does: the next run's data checks have their baseline."""
    properties = tmp_path / "run" / "image_properties.parquet"
    properties.parent.mkdir()
    properties.write_bytes(b"the run's per-image table")
    _append_run(
        tmp_path,
        "r-1",
        status="not-promoted",
        test_accuracy=0.5,
        gate_reason="test accuracy 0.5 < min_accuracy 0.9",
        model="r-1/model.keras",
        saved_model=str(_fake_saved_model(tmp_path / "m1", b"one")),
        image_properties_parquet=str(properties),
    )
    production = registry.promote_run(tmp_path, "r-1")
    assert production.version == 1 and Path(production.image_properties).read_bytes() == properties.read_bytes()
