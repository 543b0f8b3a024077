"""The train stage on a work pool (`train.work_pool`): a real Prefect server on 127.0.0.1, `convflow
worker` processes started from folders of their own, and `convflow run` against that server.

A lost worker costs one attempt, not the run: the SIGKILLed worker's attempt is marked Crashed (by
Prefect's heartbeat automation when the whole worker is gone, by the worker itself when only its
training process died), the pipeline's flow starts the next attempt, and it resumes from the last
checkpoint in the other worker's process. A worker that does not see the artifacts root fails at
once, changing nothing there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect_server import Background, PrefectServer, prefect_client, started_server

from conftest import CONVFLOW, TINY_PIPELINES, last_json_line, wait_for, write_yaml
from convflow.cli.app import main
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline

POOL = "gpu"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
LOST_AFTER_SECONDS = 60
EPOCHS = 14  # about a second each at 28x28: time to kill after two, and some left to resume


def pool_pipelines(pool: str = POOL, name: str = "tiny") -> dict:
    """The tiny pipeline at 28x28 on work pool `pool`, named `name` (each test its own: attempts are
    found on the shared server by name)."""
    document = copy.deepcopy(TINY_PIPELINES)
    tiny = document["pipelines"].pop("tiny")
    tiny["data"]["image_size"] = [28, 28]
    tiny["train"].update(epochs=EPOCHS, batch_size=64, work_pool=pool, checkpoint_seconds=0)
    document["pipelines"][name] = tiny
    return document


def train_runs(client, pipeline: str) -> dict[int, object]:
    """The pipeline's train attempts by number (from their names, "<pipeline> train, attempt N")."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["convflow-train-stage"])))
    prefix = f"{pipeline} train, attempt "
    return {int(run.name[len(prefix) :]): run for run in runs if run.name.startswith(prefix)}


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def infrastructure_pid(flow_run) -> int:
    """The process a process worker started for the flow run ("host:pid" in the API)."""
    return int(str(flow_run.infrastructure_pid).rsplit(":", 1)[-1])


def kill_session(pid: int) -> None:
    """SIGKILL a process and everything in its session (a flow run's process leads its own)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


class Worker(Background):
    """`convflow worker --pool P` started from a folder of its own."""

    def __init__(self, server: PrefectServer, folder: Path, name: str, pool: str = POOL, wrapper: list[str] = ()):
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            *wrapper,
            CONVFLOW,
            "worker",
            "--pool",
            pool,
            "--name",
            name,
            "--heartbeat",
            str(HEARTBEAT_SECONDS),
            "--lost-after",
            str(LOST_AFTER_SECONDS),
        ]
        super().__init__(command, server.env, folder / "worker.log", cwd=folder)
        self.name = name
        wait_for(lambda: "started!" in self.output() or self.process.poll() is not None, 120, self.output)
        assert self.process.poll() is None, self.output()

    def ran(self, flow_run_id) -> bool:
        """Whether this worker ran the flow run: every idle worker may try to claim a scheduled run,
        and those that lose the race log the run's id too, with "Aborted submission"."""
        output = self.output()
        return f"{flow_run_id}" in output and f"Aborted submission of flow run '{flow_run_id}'" not in output

    def training_children(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def stop(self, timeout: float = 30) -> None:
        for child in self.training_children():
            kill_session(child)
        super().stop(timeout)


class PipelineRun(Background):
    """`convflow run NAME --json` against the server, in its own folder."""

    def __init__(self, server: PrefectServer, root: Path, name: str, pool: str = POOL):
        write_yaml(root / "pipelines.yaml", pool_pipelines(pool, name))
        command = [CONVFLOW, "run", name, "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"]
        super().__init__(command, server.env, root / "run.log", cwd=root)
        self.root, self.name = root, name

    def attempts(self, server: PrefectServer) -> dict[int, object]:
        with prefect_client(server) as client:
            return train_runs(client, self.name)

    def checkpointed_epochs(self) -> int:
        logs = list((self.root / "artifacts" / self.name / "checkpoints").glob("*/history.jsonl"))
        return len(logs[0].read_text().splitlines()) if logs else 0

    def summary(self, timeout: float = 480) -> dict:
        self.process.wait(timeout=timeout)
        output = self.output()
        assert self.process.returncode == 0, output[-6000:]
        return last_json_line(output)


# ----------------------------------------------------------------------------- without a server


def test_work_pool_is_where_training_runs_not_what_it_trains(tmp_path):
    document = pool_pipelines()
    del document["pipelines"]["tiny"]["train"]["work_pool"]
    document["defaults"]["train"]["work_pool"] = "gpu"  # allowed under defaults too
    on_pool = load_pipeline(write_yaml(tmp_path / "pool.yaml", document), "tiny")
    del document["defaults"]["train"]["work_pool"]
    here = load_pipeline(write_yaml(tmp_path / "here.yaml", document), "tiny")

    assert (on_pool.train.work_pool, on_pool.train.max_attempts) == ("gpu", 3)
    assert here.train.work_pool is None
    assert on_pool.config_hash() == here.config_hash()  # same model: same checkpoint, same cached stages


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("work_pool", "GPU pool", "must be 1-64 of a-z 0-9 _ . -"),
        ("max_attempts", 0, "must be ≥ 1"),
    ],
)
def test_bad_work_pool_settings_name_the_field(tmp_path, field, value, message):
    document = pool_pipelines()
    document["pipelines"]["tiny"]["train"][field] = value
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_yaml(tmp_path / "pipelines.yaml", document), "tiny")
    assert any(
        line.startswith(f"pipelines.tiny.train.{field}: {json.dumps(value)}") and message in line
        for line in caught.value.problems
    ), caught.value.problems


def test_run_on_a_pool_without_a_server_refuses_before_writing(tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    pipelines = write_yaml(tmp_path / "pipelines.yaml", pool_pipelines())

    assert main(["run", "tiny", "-f", str(pipelines), "--artifacts", str(artifacts)]) == 1
    err = capsys.readouterr().err
    assert "pipelines.tiny.train.work_pool 'gpu' needs a Prefect server that the pool's workers reach" in err
    assert "PREFECT_API_URL" in err
    assert not artifacts.exists()


def test_worker_without_a_server_says_how_to_start_one(capsys):
    assert main(["worker", "--pool", "gpu"]) == 1
    err = capsys.readouterr().err
    assert "convflow worker: PREFECT_API_URL is not set" in err and "prefect server start" in err


def test_worker_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["worker", "--pool", "gpu", "--limit", "0"])
    assert caught.value.code == 2
    assert "0: must be a whole number of at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real server and workers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with started_server(tmp_path_factory.mktemp("pool-server-home")) as server:
        yield server


@pytest.fixture(scope="module")
def workers(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    started = []
    try:
        for name in ("worker-a", "worker-b"):
            started.append(Worker(server, root / name, name))
        yield {worker.name: worker for worker in started}
    finally:
        for worker in started:
            worker.stop()


def _attempt_while_training(server, run: PipelineRun, workers: dict) -> tuple[object, Worker, int]:
    """Once two epochs are checkpointed: attempt 1, the worker that runs it, and its training process."""
    wait_for(lambda: run.checkpointed_epochs() >= 2 or run.process.poll() is not None, 300, run.output)
    assert run.process.poll() is None, run.output()[-4000:]
    attempt = run.attempts(server)[1]
    training_pid = infrastructure_pid(attempt)
    [worker] = [w for w in workers.values() if w.process.poll() is None and parent_pid(training_pid) == w.process.pid]
    return attempt, worker, training_pid


def _resumed_training(run: PipelineRun, killed_at: float) -> None:
    """Wait until the next attempt has trained an epoch (or the run ended); print how long that took."""
    epochs_before = run.checkpointed_epochs()  # read after the kill: nothing adds to it meanwhile
    wait_for(
        lambda: run.checkpointed_epochs() > epochs_before or run.process.poll() is not None,
        LOST_AFTER_SECONDS + 180,
        run.output,
    )
    print(f"\n{run.name}: {time.monotonic() - killed_at:.1f} s from the kill to the first resumed epoch's end")


def _assert_resumed_run(run: PipelineRun, summary: dict, attempts: dict, first_pid: int, worker: Worker) -> None:
    """Attempt 2 completed in `worker`'s process and resumed where attempt 1 (`first_pid`) stopped."""
    assert summary["status"] == "completed", summary
    assert summary["resumed_from_epoch"] >= 2, summary
    assert sorted(attempts) == [1, 2] and attempts[2].state.is_completed(), attempts
    second_pid = infrastructure_pid(attempts[2])
    assert worker.ran(attempts[2].id)  # the worker that ran it says so in its log
    assert attempts[1].parent_task_run_id is not None and attempts[2].parent_task_run_id is not None  # children
    run_dir = run.root / "artifacts" / run.name / summary["run_id"]
    history = pq.read_table(run_dir / "train" / "history.parquet").to_pylist()
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))  # every epoch once
    pids = [row["pid"] for row in history]
    resumed = summary["resumed_from_epoch"]
    assert set(pids[:resumed]) == {first_pid} and set(pids[resumed:]) == {second_pid}, pids
    record = json.loads((run_dir / "train-attempts" / "2.json").read_text())
    assert record["pid"] == second_pid and record["resumed_from_epoch"] == resumed
    assert f"pid {second_pid}" in (run_dir / "write_report" / "report.html").read_text()  # the stage table


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("train-on-pool")
@pytest.mark.slow
def test_training_process_killed_is_crashed_at_once_and_resumed(server, workers, tmp_path):
    run = PipelineRun(server, tmp_path, "killed-trainer")
    try:
        first, worker, training_pid = _attempt_while_training(server, run, workers)
        killed_at = time.monotonic()
        kill_session(training_pid)  # the worker lives on
        _resumed_training(run, killed_at)
        summary = run.summary()
    finally:
        run.stop()
    attempts = run.attempts(server)
    crashed = attempts[1].state
    assert crashed.is_crashed() and "exited with status code: -9" in crashed.message, crashed  # by the worker at once
    assert worker.process.poll() is None
    [ran_second] = [w for w in workers.values() if w.ran(attempts[2].id)]
    _assert_resumed_run(run, summary, attempts, training_pid, ran_second)


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("train-on-pool")
@pytest.mark.slow
def test_lost_worker_costs_one_attempt_not_the_run(server, workers, tmp_path):
    run = PipelineRun(server, tmp_path, "lost-worker")
    try:
        first, lost, training_pid = _attempt_while_training(server, run, workers)
        [other] = [worker for worker in workers.values() if worker is not lost]
        killed_at = time.monotonic()
        kill_session(lost.process.pid)  # the worker ...
        kill_session(training_pid)  # ... and its training process, which Prefect started in a session of its own
        _resumed_training(run, killed_at)
        summary = run.summary()
    finally:
        run.stop()
    attempts = run.attempts(server)
    crashed = attempts[1].state
    assert crashed.is_crashed() and "no heartbeat for 60 s" in crashed.message, crashed  # the automation's verdict
    _assert_resumed_run(run, summary, attempts, training_pid, other)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("train-on-pool")
@pytest.mark.slow
def test_worker_that_does_not_see_the_artifacts_root_fails_at_once(server, tmp_path):
    """The worker runs in a mount namespace where an empty folder covers the run's folder, as on a
    machine that has not mounted the shared file system."""
    root = tmp_path / "pipeline"
    hidden_view = tmp_path / "what-the-worker-sees"
    hidden_view.mkdir()
    root.mkdir()
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind {hidden_view} {root} && exec "$0" "$@"',
    ]
    worker = Worker(server, tmp_path / "worker-elsewhere", "worker-elsewhere", pool="elsewhere", wrapper=wrapper)
    try:
        run = PipelineRun(server, root, "unseen-root", pool="elsewhere")
        run.process.wait(timeout=300)
    finally:
        worker.stop()
    output = run.output()
    assert run.process.returncode == 1, output[-4000:]
    assert f"does not see the artifacts root {root / 'artifacts'}" in output, output[-4000:]
    assert "Mount the file system" in output
    attempts = run.attempts(server)
    assert list(attempts) == [1] and attempts[1].state.is_failed(), attempts  # failed at once: no second attempt
    assert _tree(hidden_view) == {}  # the worker wrote nothing where it looked
    artifacts = _tree(root / "artifacts")
    assert not any("checkpoints" in path or "/train/" in path or "train-attempts" in path for path in artifacts), (
        sorted(artifacts)
    )
    assert "runs.parquet" not in artifacts
