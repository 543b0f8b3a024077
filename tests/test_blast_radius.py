"""One broken pipeline in a shared pipelines file stops only itself: `convflow run` of a valid
pipeline completes with a warning naming the broken one, `validate` and a starting `serve` stay
strict, and a `serve` already running keeps running the valid pipeline's schedule after the file
broke, while the broken pipeline's own scheduled run fails naming its mistake.
"""

from __future__ import annotations

import datetime

import pytest
from prefect_server import Background, prefect_client, started_server
from test_schedules import finished_runs, read_deployments, scheduled_document

from conftest import CONVFLOW, run_convflow, wait_for, write_yaml
from convflow.cli.app import main

pytestmark = [pytest.mark.e2e, pytest.mark.server]

EVERY_MINUTE = {"cron": "* * * * *", "timezone": "UTC"}
MISTAKE = "pipelines.other.train.epochs: 0 — must be ≥ 1"


def pipelines(broken: bool) -> dict:
    """tiny and other, both due every minute; other with train.epochs 0 when `broken`."""
    document = scheduled_document(tiny=EVERY_MINUTE, other=EVERY_MINUTE)
    if broken:
        document["pipelines"]["other"] = {**document["pipelines"]["other"], "train": {"epochs": 0}}
    return document


def run_logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def first_run_after(client, deployment, moment: datetime.datetime):
    """The deployment's first finished flow run that started after `moment`, or None."""
    return next((run for run in finished_runs(client, deployment.id) if run.start_time > moment), None)


@pytest.mark.slow
def test_a_broken_pipeline_stops_only_itself(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", pipelines(broken=True))
    with started_server(tmp_path / "prefect-home") as server:
        run = run_convflow(
            ["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=tmp_path, env=server.env
        )
        assert run.summary["status"] == "completed"
        assert "warning: pipelines.yaml: pipeline 'other' is invalid" in run.stderr and MISTAKE in run.stderr

        # Strict where a person is there to fix the file.
        assert main(["validate", str(path)]) == 2
        assert MISTAKE in capsys.readouterr().err
        assert main(["serve", "-f", str(path)]) == 2
        assert MISTAKE in capsys.readouterr().err

        write_yaml(path, pipelines(broken=False))
        command = [CONVFLOW, "serve", "-f", "pipelines.yaml", "--artifacts", "artifacts"]
        serve = Background(command, server.env, tmp_path / "serve.log", cwd=tmp_path)
        try:
            with prefect_client(server) as client:
                [tiny], [other] = (
                    wait_for(lambda: read_deployments(client, name), 120, lambda: serve.output()[-3000:], interval=1)
                    for name in ("tiny", "other")
                )
                broken_at = datetime.datetime.now(datetime.UTC)
                write_yaml(path, pipelines(broken=True))
                tiny_run, other_run = (
                    wait_for(
                        lambda: first_run_after(client, deployment, broken_at),
                        300,
                        lambda: serve.output()[-5000:],
                        interval=2,
                    )
                    for deployment in (tiny, other)
                )
                assert serve.process.poll() is None, serve.output()[-3000:]  # still serving
                tiny_logs = wait_for(lambda: run_logs(client, tiny_run.id), 30, lambda: "no logs of the tiny run")
                other_logs = run_logs(client, other_run.id)
        finally:
            serve.stop()

    assert tiny_run.state_type.value == "COMPLETED", (tiny_run.state, serve.output()[-5000:])
    assert [line for line in tiny_logs if "pipeline 'other' is invalid" in line and MISTAKE in line] != []
    assert len([line for line in tiny_logs if "pipeline 'other' is invalid" in line]) == 1  # once per run
    assert other_run.state_type.value == "FAILED", other_run.state
    assert any(MISTAKE in line for line in other_logs), other_logs
