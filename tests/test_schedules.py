"""Schedules in pipelines.yaml as Prefect deployments: built from the config, served by
`convflow serve` against a real `prefect server start`, registered on a work pool by
`convflow deploy`, both idempotent; and scheduled runs that find nothing changed train nothing.

The server tests share one server and one artifacts root, in order: two scheduled runs under
`convflow serve` (the first trains, the second is unchanged), serve again, then deploy twice and
let a process worker run the deployment.
"""

from __future__ import annotations

import datetime
import subprocess
import zoneinfo
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from prefect_server import PREFECT, Background, prefect_client, started_server

from conftest import CONVFLOW, PYTHON, REPO, TASKS, TINY_PIPELINES, subprocess_env, wait_for, write_yaml
from convflow.cli.app import main
from convflow.flows import deployments

FLOW = "convflow-train"


def scheduled_document(**schedules) -> dict:
    """The tiny pipeline document with `schedule:` set per pipeline name (copies of tiny)."""
    document = yaml.safe_load(yaml.safe_dump(TINY_PIPELINES))
    tiny = document["pipelines"].pop("tiny")
    for name, schedule in schedules.items():
        document["pipelines"][name] = {**tiny, **({"schedule": schedule} if schedule else {})}
    return document


# ----------------------------------------------------------------------------- without a server


def test_one_deployment_per_scheduled_pipeline(tmp_path):
    document = scheduled_document(
        weekly={"cron": "0 3 * * 1", "timezone": "Europe/Berlin"}, hourly={"interval": 3600}, manual=None
    )
    document["pipelines"]["hourly"]["retrain"] = "always"
    path = write_yaml(tmp_path / "pipelines.yaml", document)

    built = {deployment.name: deployment for deployment in deployments.served_deployments(path, Path("artifacts"))}

    assert sorted(built) == ["hourly", "weekly"]
    weekly, hourly = built["weekly"], built["hourly"]
    assert weekly.flow_name == FLOW and weekly.entrypoint == "convflow.flows.train_pipeline.train_pipeline"
    assert weekly.parameters == {
        "pipeline": "weekly",
        "pipelines_file": str(path.resolve()),
        "artifacts": str(Path("artifacts").resolve()),
        "scheduled": True,
        "force": False,
    }
    assert weekly.concurrency_limit == 1
    [cron] = weekly.schedules
    assert (cron.schedule.cron, cron.schedule.timezone) == ("0 3 * * 1", "Europe/Berlin")
    [interval] = hourly.schedules
    assert interval.schedule.interval == datetime.timedelta(hours=1) and interval.schedule.timezone == "UTC"
    # Anchored on a fixed date, so serving again keeps the same run times.
    assert interval.schedule.anchor_date == deployments.INTERVAL_ANCHOR.replace(tzinfo=zoneinfo.ZoneInfo("UTC"))


def test_force_is_a_deployment_parameter(tmp_path):
    path = write_yaml(tmp_path / "pipelines.yaml", scheduled_document(tiny={"cron": "0 3 * * 1"}))
    [deployment] = deployments.served_deployments(path, tmp_path / "artifacts", force=True)
    assert deployment.parameters["force"] is True


def test_serve_without_schedules_says_so(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", TINY_PIPELINES)
    assert main(["serve", "-f", str(path)]) == 1
    assert "no pipeline has a schedule" in capsys.readouterr().err


def test_serve_and_deploy_need_a_server(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", scheduled_document(tiny={"cron": "0 3 * * 1"}))
    assert main(["serve", "-f", str(path)]) == 1
    error = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in error and "prefect server start --host 127.0.0.1" in error
    assert main(["deploy", "--pool", "gpu", "-f", str(path)]) == 1
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_serve_checks_the_file_first(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", scheduled_document(tiny={"cron": "0 3 * *"}))
    assert main(["serve", "-f", str(path)]) == 2
    assert "pipelines.tiny.schedule.cron" in capsys.readouterr().err


def test_scheduling_code_does_not_import_tensorflow():
    # An unchanged scheduled run imports the flow module and stops after download_and_split.
    check = (
        "import sys, convflow.flows.deployments, convflow.catalog.retraining, convflow.tasks.download_and_split; "
        "heavy = [m for m in ('tensorflow', 'keras', 'tensorflow_datasets') if m in sys.modules]; "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([PYTHON, "-c", check], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- a real server


def read_deployments(client, name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    return client.read_deployments(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
    )


def finished_runs(client, deployment_id):
    """Flow runs of the deployment in a final state, oldest first."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=final))),
        sort=FlowRunSort.START_TIME_ASC,
    )


def task_runs_of(client, flow_run_id) -> dict[str, str]:
    """Stage name -> state name of a flow run's task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {task_run.name.rsplit("-", 1)[0]: task_run.state_name for task_run in task_runs}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with started_server(tmp_path_factory.mktemp("prefect-server-home")) as server:
        yield server


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """`convflow serve` with tiny due every minute, until two scheduled runs have finished."""
    root = tmp_path_factory.mktemp("served")
    write_yaml(root / "pipelines.yaml", scheduled_document(tiny={"cron": "* * * * *", "timezone": "Europe/Berlin"}))
    command = [CONVFLOW, "serve", "-f", "pipelines.yaml", "--artifacts", "artifacts"]
    serve = Background(command, server.env, root / "serve.log", cwd=root)
    try:
        with prefect_client(server) as client:
            [deployment] = wait_for(
                lambda: read_deployments(client, "tiny"), 120, lambda: serve.output()[-3000:], interval=1
            )
            runs = wait_for(
                lambda: (found := finished_runs(client, deployment.id)) and len(found) >= 2 and found,
                480,
                lambda: serve.output()[-5000:],
                interval=3,
            )
            task_runs = [task_runs_of(client, run.id) for run in runs[:2]]
    finally:
        serve.stop()
    return {
        "root": root,
        "artifacts": root / "artifacts",
        "deployment": deployment,
        "runs": runs[:2],
        "task_runs": task_runs,
        "log": serve.output(),
    }


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("schedules")
@pytest.mark.slow
def test_scheduled_run_completes_all_eight_stages_and_promotion(served):
    first = served["runs"][0]
    assert first.state_type.value == "COMPLETED", (first.state, served["log"][-5000:])
    assert first.state_name == "Completed" and first.name == "tiny"
    assert first.auto_scheduled and "scheduled" in first.tags
    assert first.parameters["scheduled"] is True and first.parameters["force"] is False
    assert served["task_runs"][0] == dict.fromkeys(TASKS, "Completed")

    catalog = pq.read_table(served["artifacts"] / "runs.parquet").to_pylist()
    assert catalog[0]["status"] == "completed" and catalog[0]["promoted_version"] == 1
    assert catalog[0]["flow_run_id"] == str(first.id)


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("schedules")
@pytest.mark.slow
def test_second_scheduled_run_with_unchanged_data_trains_nothing(served):
    first, second = served["runs"]
    assert second.state_type.value == "COMPLETED" and second.state_name == "Unchanged", second.state
    assert "unchanged since production version 1" in second.state.message
    assert second.total_run_time < datetime.timedelta(seconds=30)
    stages = served["task_runs"][1]
    assert list(stages) == ["download_and_split"] and "train" not in stages

    catalog = pq.read_table(served["artifacts"] / "runs.parquet").to_pylist()
    assert [row["status"] for row in catalog[:2]] == ["completed", "unchanged"]
    unchanged = catalog[1]
    assert unchanged["flow_run_id"] == str(second.id) and unchanged["promoted_version"] is None
    assert (unchanged["config_hash"], unchanged["data_fingerprint"]) == (
        catalog[0]["config_hash"],
        catalog[0]["data_fingerprint"],
    )
    run_dir = Path(unchanged["run_dir"])
    assert not (run_dir / "train").exists() and not (run_dir / "to_tfrecords").exists()
    listing = subprocess.run(
        [CONVFLOW, "runs", "tiny", "--artifacts", str(served["artifacts"])],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert listing.returncode == 0 and "unchanged" in listing.stdout and unchanged["run_id"] in listing.stdout


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("schedules")
@pytest.mark.slow
def test_serving_again_keeps_one_deployment(server, served):
    first = served["deployment"]
    command = [CONVFLOW, "serve", "-f", "pipelines.yaml", "--artifacts", "artifacts"]
    serve = Background(command, server.env, served["root"] / "serve-again.log", cwd=served["root"])
    try:
        with prefect_client(server) as client:
            again = wait_for(
                lambda: [d for d in read_deployments(client, "tiny") if d.updated > first.updated and not d.paused],
                120,
                lambda: serve.output()[-3000:],
                interval=1,
            )
    finally:
        serve.stop()
    with prefect_client(server) as client:
        [deployment] = read_deployments(client, "tiny")
    assert deployment.id == first.id == again[0].id
    assert len(deployment.schedules) == 1


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("schedules")
@pytest.mark.slow
def test_deploy_twice_registers_once_and_a_worker_runs_it(server, served):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = served["root"]
    write_yaml(root / "weekly.yaml", scheduled_document(tiny={"cron": "0 3 * * 1", "timezone": "Europe/Berlin"}))
    command = [CONVFLOW, "deploy", "--pool", "convflow-test", "-f", "weekly.yaml", "--artifacts", "artifacts"]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, env=server.env, cwd=root, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "deployed convflow-train/tiny on work pool convflow-test" in result.stdout

    with prefect_client(server) as client:
        [deployment] = read_deployments(client, "tiny")
        pool = client.read_work_pool("convflow-test")
    assert pool.type == "process"
    assert deployment.work_pool_name == "convflow-test"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 3 * * 1", "Europe/Berlin")]
    assert deployment.entrypoint == deployments.ENTRYPOINT
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    assert deployment.job_variables["env"]["PREFECT_LOCAL_STORAGE_PATH"] == str(root / "artifacts" / ".prefect-results")

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        unchanged = run_deployment("convflow-train/tiny", timeout=0)
        forced = run_deployment("convflow-train/tiny", parameters={"force": True}, timeout=0)
    worker = Background([PREFECT, "worker", "start", "--pool", "convflow-test"], server.env, root / "worker.log")
    try:
        with prefect_client(server) as client:
            finished = [
                wait_for(
                    lambda: (run := client.read_flow_run(flow_run.id)).state.is_final() and run,
                    420,
                    lambda: worker.output()[-5000:],
                    interval=3,
                )
                for flow_run in (unchanged, forced)
            ]
            forced_stages = task_runs_of(client, forced.id)
    finally:
        worker.stop()
    # Same config and data as the served production model: the worker's run trains nothing ...
    assert finished[0].state_name == "Unchanged", (finished[0].state, worker.output()[-5000:])
    # ... unless forced: then every stage runs (the cached ones as cache hits).
    assert finished[1].state_name == "Completed", (finished[1].state, worker.output()[-5000:])
    assert sorted(forced_stages) == sorted(TASKS)
