"""End to end: `convflow run` on a tiny pipeline, four times, to see outputs and content caching.

Each run starts Prefect's temporary server (several seconds), so the runs are few and shared:
1. a fresh run; 2. the same again (all cached up to export); 3. train.epochs changed (data and
model stages cached, training onwards not); 4. a cached stage's folder deleted (it re-runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import STAGES, TinyRunner
from convflow.cli.app import main

# The runs are shared by the module's tests: one worker runs them all, once.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("flow")]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return TinyRunner(tmp_path_factory.mktemp("flow"))


@pytest.fixture(scope="module")
def first(runner):
    return runner.run()


@pytest.fixture(scope="module")
def second(runner, first):
    return runner.run()


@pytest.fixture(scope="module")
def third(runner, second):
    runner.set_epochs(2)
    return runner.run()


@pytest.fixture(scope="module")
def fourth(runner, first, third):
    shutil.rmtree(first["run_dir"] / "to_tfrecords")
    return runner.run()


def test_first_run_writes_every_output(first, runner):
    run_dir = first["run_dir"]

    assert [stage["name"] for stage in first["stages"]] == STAGES
    assert not any(first["cached"].values())
    assert first["pipeline"] == "tiny" and first["status"] == "completed"
    assert 0.5 <= first["test_accuracy"] <= 1
    assert first["resumed_from_epoch"] == 0
    assert (run_dir / "download_and_split" / "splits.parquet").is_file()
    assert (run_dir / "download_and_split" / "images.npy").is_file()
    shards = sorted((run_dir / "to_tfrecords").glob("*.tfrecord"))
    assert [shard.name.split("-")[0] for shard in shards] == ["test", "train", "validation"]
    assert (run_dir / "build_base" / "base.keras").is_file()
    assert (run_dir / "freeze_and_wrap" / "wrapped.keras").is_file()
    assert (run_dir / "train" / "model.keras").is_file()
    assert pq.read_table(run_dir / "train" / "history.parquet").column("epoch").to_pylist() == [1]
    for name in ("metrics.parquet", "predictions.parquet", "confusion.json", "samples.npz"):
        assert (run_dir / "evaluate" / name).is_file()
    assert first["saved_model"] == str(run_dir / "export_savedmodel" / "tiny" / "1")
    assert (Path(first["saved_model"]) / "saved_model.pb").is_file()
    assert first["report"] == str(run_dir / "write_report" / "report.html")
    report = Path(first["report"]).read_text()
    assert "convflow report: tiny" in report and first["run_id"] in report
    assert f"{first['test_accuracy']:.4f}" in report and "data:image/png;base64," in report

    catalog = pq.read_table(runner.artifacts / "runs.parquet").to_pylist()
    assert len(catalog) == 1
    row = catalog[0]
    assert (row["pipeline"], row["run_id"], row["status"]) == ("tiny", first["run_id"], "completed")
    assert row["test_accuracy"] == pytest.approx(first["test_accuracy"]) and row["passed_gate"] is True
    assert row["run_dir"] == str(run_dir) and row["saved_model"] == first["saved_model"]
    assert row["finished"] >= row["started"]
    assert not list(runner.artifacts.rglob("*.tmp-*"))
    assert not [
        p for p in (runner.artifacts / "tiny" / "checkpoints").glob("*") if p.is_dir()
    ]  # no training state left


def test_second_run_is_cached(first, second, runner):
    assert second["run_id"] != first["run_id"]
    assert all(second["cached"][stage] for stage in STAGES[:7]), str(second["cached"])
    assert second["test_accuracy"] == first["test_accuracy"]
    assert second["saved_model"] == first["saved_model"]  # the cached export, in the first run's folder
    assert Path(second["report"]).is_file() and str(second["run_dir"]) in second["report"]
    catalog = pq.read_table(runner.artifacts / "runs.parquet").to_pylist()
    assert [row["run_id"] for row in catalog] == [first["run_id"], second["run_id"]]
    assert catalog[0]["config_hash"] == catalog[1]["config_hash"]


def test_changing_epochs_reruns_training_only(first, third, runner):
    cached = third["cached"]
    assert all(cached[stage] for stage in ("download_and_split", "to_tfrecords", "build_base", "freeze_and_wrap"))
    assert not any(cached[stage] for stage in ("train", "evaluate", "export_savedmodel"))
    history = third["run_dir"] / "train" / "history.parquet"
    assert pq.read_table(history).column("epoch").to_pylist() == [1, 2]
    assert not (third["run_dir"] / "to_tfrecords").exists()  # the cached shards stay where they were
    catalog = pq.read_table(runner.artifacts / "runs.parquet").to_pylist()
    assert len(catalog) == 3
    assert catalog[2]["config_hash"] != catalog[0]["config_hash"]
    assert catalog[2]["data_fingerprint"] == catalog[0]["data_fingerprint"]


def test_deleted_stage_output_reruns_that_stage(first, fourth, runner):
    assert fourth["cached"]["download_and_split"]
    assert not fourth["cached"]["to_tfrecords"]
    assert sorted((fourth["run_dir"] / "to_tfrecords").glob("*.tfrecord"))
    assert fourth["status"] in ("completed", "not-promoted")
    assert (Path(fourth["saved_model"]) / "saved_model.pb").is_file()
    assert len(pq.read_table(runner.artifacts / "runs.parquet")) == 4


def test_runs_command_lists_the_catalog(first, second, third, fourth, runner, capsys):
    assert main(["runs", "tiny", "--artifacts", str(runner.artifacts)]) == 0
    out = capsys.readouterr().out
    assert out.count("tiny ") >= 4
    assert all(run["run_id"] in out for run in (first, second, third, fourth))
    assert fourth["run_id"] in out


@pytest.mark.server
def test_training_progress_is_a_prefect_progress_artifact(first, third):
    """Each run that trains shows its epochs in the Prefect UI: a progress artifact of its train
    task run, at 100 once training ended (the second run's training was a cache hit)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from convflow.runtime.fast_start import TemporaryServer

    server = TemporaryServer()  # on the test session's PREFECT_HOME, where the runs were recorded
    try:
        server.wait_until_ready()
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
            ours = {
                artifact.description: artifact for artifact in progress if "tiny run " in (artifact.description or "")
            }
            train_tasks = {
                description: client.read_task_run(artifact.task_run_id).name for description, artifact in ours.items()
            }
    finally:
        server.stop()
    expected = {
        f"tiny run {first['run_id']}, training: epochs of 1",
        f"tiny run {third['run_id']}, training: epochs of 2",
    }
    assert expected <= set(ours), sorted(ours)
    for description in expected:
        assert ours[description].data == 100.0
        assert train_tasks[description].startswith("train-")
