"""Kill `convflow run` during training, run it again: training resumes, no epoch is trained twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import CONVFLOW, run_convflow, subprocess_env

pytestmark = pytest.mark.e2e

EPOCHS = 5


def _pipelines(path: Path) -> Path:
    # 20x20 digits keep each epoch long enough (about a second) to kill inside one.
    path.write_text(
        "pipelines:\n  resume:\n"
        "    data: {source: 'sklearn:digits', image_size: [20, 20], channels: 1}\n"
        "    model: {base: mnist_cnn}\n"
        f"    train: {{epochs: {EPOCHS}, batch_size: 32, checkpoint_seconds: 0}}\n"
    )
    return path


def _history_lines(artifacts: Path) -> int:
    logs = list(artifacts.glob("resume/checkpoints/*/history.jsonl"))
    return len(logs[0].read_text().splitlines()) if logs else 0


def test_killed_run_resumes_from_last_completed_epoch(tmp_path):
    pipelines, artifacts = _pipelines(tmp_path / "pipelines.yaml"), tmp_path / "artifacts"
    args = ["run", "resume", "-f", str(pipelines), "--artifacts", str(artifacts), "--json"]
    first = subprocess.Popen(
        [CONVFLOW, *args],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while _history_lines(artifacts) < 2:  # epochs 1 and 2 are checkpointed: epoch 3 is running
        assert first.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "training never reached epoch 3"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the CLI, its flow and its temporary Prefect server
    first.wait()
    assert not list(artifacts.glob("resume/*/train/model.keras")), "a killed run left a complete-looking model"

    summary = run_convflow(args).summary
    resumed = summary["resumed_from_epoch"]
    assert 2 <= resumed < EPOCHS
    train_dir = Path(summary["saved_model"]).parents[2] / "train"
    history = pq.read_table(train_dir / "history.parquet").to_pydict()
    assert history["epoch"] == list(range(1, EPOCHS + 1))  # every epoch once
    train_stage = next(stage for stage in summary["stages"] if stage["name"] == "train")
    assert not train_stage["cached"]
    leftover = [path for path in artifacts.glob("resume/checkpoints/*") if path.is_dir()]
    assert not leftover, "checkpoints are removed once training is done"
