"""A run's log in Prefect tells its story: a line per stage, a line per epoch, the verdict."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from prefect_server import prefect_client, started_server

from conftest import STAGES, TINY_PIPELINES, run_tiny, wait_for, write_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.server]


def _messages(client, flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_run_log_in_prefect_has_each_stage_and_each_epoch(tmp_path):
    root = tmp_path / "project"
    write_yaml(root / "pipelines.yaml", TINY_PIPELINES)
    epochs = TINY_PIPELINES["pipelines"]["tiny"]["train"]["epochs"]
    with started_server(tmp_path / "prefect-home") as server:
        summary = run_tiny(root, env=server.env)
        [flow_run_id] = pq.read_table(root / "artifacts" / "runs.parquet").column("flow_run_id").to_pylist()
        with prefect_client(server) as client:
            # Logs reach the API in batches: wait for the last stage's line.
            messages = wait_for(
                lambda: (
                    (found := _messages(client, flow_run_id))
                    and any(line.startswith("write_report (") for line in found)
                    and found
                ),
                60,
                lambda: summary["output"][-3000:],
            )

    lines = {stage: [line for line in messages if line.startswith(f"{stage} (")] for stage in STAGES}
    assert all(len(found) == 1 for found in lines.values()), lines
    assert " examples in 10 classes (train " in lines["download_and_split"][0]
    assert " shards, " in lines["to_tfrecords"][0] and " MB of 12x12x1 images" in lines["to_tfrecords"][0]
    assert " parameters trainable" in lines["freeze_and_wrap"][0]
    assert f"{epochs} epochs in " in lines["train"][0] and "on images" in lines["train"][0]
    epoch_lines = [line for line in messages if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == [f"{epoch}/{epochs}" for epoch in range(1, epochs + 1)]
    assert all("val_accuracy" in line and line.endswith(" s") for line in epoch_lines), epoch_lines
    assert f"test accuracy {summary['test_accuracy']:.4f}" in lines["evaluate"][0]
    assert summary["saved_model"] in lines["export_savedmodel"][0]
    assert summary["report"] in lines["write_report"][0]
    assert "production model of tiny: version 1" in messages, messages
