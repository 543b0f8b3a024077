"""A team's Prefect server: on PostgreSQL (Debian's, a throwaway cluster), behind basic auth
(PREFECT_SERVER_API_AUTH_STRING), its clients (`convflow` commands) with PREFECT_API_AUTH_STRING.

A client without, or with wrong, credentials gets one clear line and exit 1, and nothing is
written. Under load (8 scheduled pipelines due in the same minute under one `convflow serve`,
4 `convflow run` started at once) every run completes and is recorded, with no error from the
database. CONVFLOW_TEAM_DATABASE=sqlite runs the same tests against SQLite, for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from postgres import PostgresCluster, postgres_bin
from prefect_server import Background, PrefectServer, prefect_client, started_server
from test_schedules import finished_runs, read_deployments, task_runs_of

from conftest import (
    CONVFLOW,
    PYTHON,
    TASKS,
    TINY_PIPELINES,
    finish_convflow,
    last_json_line,
    run_convflow,
    start_convflow,
    wait_for,
    write_yaml,
)

pytestmark = pytest.mark.server

AUTH = "convflow-team:s3cret"
DATABASE = os.environ.get("CONVFLOW_TEAM_DATABASE", "postgresql")
SCHEDULED_PIPELINES = 8
RUNS_AT_ONCE = 4
# What a server in trouble says: SQLite's lock errors, and 5xx answers as Prefect's client logs them.
SERVER_TROUBLE = re.compile(
    r"database is locked|Server error '5\d\d|status code 5\d\d|\b5\d\d Internal Server Error"
    r"|Encountered exception in request"  # the server's own log of a request that failed
)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    cluster = PostgresCluster(bin_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


def database_for(database: str, request, name: str) -> dict[str, str]:
    """Server settings for a new database `name` on `database` (sqlite: in PREFECT_HOME)."""
    if database == "sqlite":
        return {}
    return {"PREFECT_API_DATABASE_CONNECTION_URL": request.getfixturevalue("postgres").create_database(name)}


@pytest.fixture(scope="module")
def team_server(request, tmp_path_factory):
    settings = {
        **database_for(DATABASE, request, "team"),
        "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        # Schedules new runs every 5 s instead of 60: a test's deployments get their runs sooner.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    with started_server(tmp_path_factory.mktemp("team-home"), **settings) as server:
        yield server


def client_env(server, auth: str | None) -> dict[str, str]:
    """The server's client environment with PREFECT_API_AUTH_STRING `auth` (None: unset)."""
    env = {key: value for key, value in server.env.items() if key != "PREFECT_API_AUTH_STRING"}
    return env if auth is None else {**env, "PREFECT_API_AUTH_STRING": auth}


def convflow(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([CONVFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xdist_group("team-server")
@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (
            None,
            "requires basic auth (401 Unauthorized); set PREFECT_API_AUTH_STRING=USER:PASSWORD, the server's "
            "PREFECT_SERVER_API_AUTH_STRING",
        ),
        (
            "convflow-team:wrong",
            "refused PREFECT_API_AUTH_STRING (401 Unauthorized); set it to the server's "
            "PREFECT_SERVER_API_AUTH_STRING (USER:PASSWORD)",
        ),
    ],
    ids=["missing", "wrong"],
)
def test_refused_credentials_are_one_clear_line_and_nothing_is_written(team_server, tmp_path, auth, expected):
    scheduled = {
        **TINY_PIPELINES,
        "pipelines": {"tiny": {**TINY_PIPELINES["pipelines"]["tiny"], "schedule": {"cron": "0 3 * * 1"}}},
    }
    write_yaml(tmp_path / "pipelines.yaml", scheduled)
    env = client_env(team_server, auth)
    commands = {
        "run tiny": ["run", "tiny", "--artifacts", "artifacts"],
        "deploy": ["deploy", "--pool", "team", "--artifacts", "artifacts"],
        "serve": ["serve", "--artifacts", "artifacts"],
        "worker": ["worker", "--pool", "team"],
    }
    for label, args in commands.items():
        result = convflow(args, tmp_path, env)
        line = f"convflow {label}: the Prefect server at {team_server.api_url} {expected}"
        assert (result.returncode, result.stderr.strip().splitlines()) == (1, [line]), result.stderr[-3000:]

    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipelines.yaml"]  # no artifacts folder
    with prefect_client(team_server) as client:  # the right credentials see nothing made
        assert client.read_flow_runs() == [] and client.read_deployments() == [] and client.read_work_pools() == []


# ----------------------------------------------------------------------------- load


def team_document(due: datetime.datetime | None) -> dict:
    """warm-up, SCHEDULED_PIPELINES pipelines due once a day at `due` (UTC; None: not scheduled) and
    RUNS_AT_ONCE for `convflow run`, all tiny with the same config: after warm-up, their heavy stages
    are cache hits."""
    tiny = TINY_PIPELINES["pipelines"]["tiny"]
    daily = {"schedule": {"cron": f"{due.minute} {due.hour} * * *", "timezone": "UTC"}} if due else {}
    pipelines = {
        "warm-up": tiny,
        **{f"scheduled-{index}": {**tiny, **daily} for index in range(SCHEDULED_PIPELINES)},
        **{f"run-{index}": tiny for index in range(RUNS_AT_ONCE)},
    }
    return yaml.safe_load(yaml.safe_dump({**TINY_PIPELINES, "pipelines": pipelines}))


def next_minute(after: datetime.datetime) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(math.ceil(after.timestamp() / 60) * 60, datetime.UTC)


def flow_runs_between(client, start: datetime.datetime, end: datetime.datetime):
    """convflow-train flow runs that started (or were due) between `start` and `end`."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime

    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=["convflow-train"])),
        flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=start, before_=end)),
    )


def recorded_task_runs(client, flow_run_id, timeout: float = 60) -> dict[str, str]:
    """A finished flow run's task runs (stage name -> state name), once the server has recorded each
    finished, or as they are after `timeout` s: it records task runs from their events, after the
    flow run's own end."""
    deadline = time.monotonic() + timeout
    while True:
        stages = task_runs_of(client, flow_run_id)
        finished = len(stages) == len(TASKS) and set(stages.values()) <= {"Completed", "Cached"}
        if finished or time.monotonic() > deadline:
            return stages
        time.sleep(1)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.mark.e2e
@pytest.mark.xdist_group("team-server")
@pytest.mark.slow
def test_a_team_load_completes_and_is_recorded(team_server, tmp_path):
    """8 scheduled pipelines due in the same minute under one `convflow serve`, plus 4 `convflow
    run` started at that minute: all 12 complete, the API and runs.parquet record each."""
    # The warm-up run first, alone: its stages are cached for the twelve runs. Their minute is chosen
    # once it has finished, so that a machine slowed by other tests (pytest-xdist workers) delays the
    # warm-up, not serve past that minute.
    write_yaml(tmp_path / "pipelines.yaml", team_document(None))
    run_convflow(["run", "warm-up", "--json"], cwd=tmp_path, env=team_server.env)
    catalog = tmp_path / "artifacts" / "runs.parquet"
    rows_before = pq.read_metadata(catalog).num_rows
    due = next_minute(utc_now() + datetime.timedelta(seconds=70))  # serve is up by then, even on a busy machine
    write_yaml(tmp_path / "pipelines.yaml", team_document(due))
    serve = Background(
        [CONVFLOW, "serve", "--artifacts", "artifacts"], team_server.env, tmp_path / "serve.log", cwd=tmp_path
    )
    try:
        with prefect_client(team_server) as client:
            deployments = [
                wait_for(
                    lambda: read_deployments(client, f"scheduled-{index}"),
                    120,
                    lambda: serve.output()[-3000:],
                    interval=1,
                )[0]
                for index in range(SCHEDULED_PIPELINES)
            ]
            assert utc_now() < due, "serve took too long: the runs' minute has passed"
            time.sleep((due - utc_now()).total_seconds())
            started = time.monotonic()
            runs = [
                start_convflow(["run", f"run-{index}", "--json"], cwd=tmp_path, env=team_server.env)
                for index in range(RUNS_AT_ONCE)
            ]
            summaries = [finish_convflow(run, timeout=600) for run in runs]
            scheduled = [
                wait_for(lambda: finished_runs(client, deployment.id), 600, lambda: serve.output()[-5000:], interval=2)[
                    0
                ]
                for deployment in deployments
            ]
            seconds = time.monotonic() - started
            flow_runs = flow_runs_between(client, due - datetime.timedelta(seconds=1), utc_now())
            task_runs = {flow_run.id: recorded_task_runs(client, flow_run.id) for flow_run in flow_runs}
    finally:
        serve.stop()
    outputs = {
        "server": team_server.output(),
        "serve": serve.output(),
        **{f"run-{index}": summary.output for index, summary in enumerate(summaries)},
    }
    print(
        f"\nteam load on {DATABASE}: {len(flow_runs)} flow runs in {seconds:.1f} s; states "
        f"{sorted(run.state_name for run in flow_runs)}"
    )

    assert [run.state_type.value for run in scheduled] == ["COMPLETED"] * SCHEDULED_PIPELINES, [
        (run.name, run.state) for run in scheduled
    ]
    assert all(summary.summary["status"] in ("completed", "not-promoted") for summary in summaries)
    assert len(flow_runs) == SCHEDULED_PIPELINES + RUNS_AT_ONCE
    assert all(run.state_type.value == "COMPLETED" for run in flow_runs)
    # Each run's task runs (TASKS), finished: the stages the warm-up ran are cache hits ("Cached").
    assert all(
        sorted(stages) == sorted(TASKS) and set(stages.values()) <= {"Completed", "Cached"}
        for stages in task_runs.values()
    ), task_runs
    new_rows = pq.read_table(catalog).to_pylist()[rows_before:]
    assert sorted(row["flow_run_id"] for row in new_rows) == sorted(str(run.id) for run in flow_runs)
    troubles = {name: SERVER_TROUBLE.findall(output) for name, output in outputs.items()}
    assert not any(troubles.values()), troubles


# ----------------------------------------------------------------------------- the server going away


HELD_CONVFLOW = Path(__file__).with_name("held_convflow.py")


def run_past_server_stop(root: Path, server: PrefectServer, **env: str):
    """`convflow run tiny --json` in `root`, its train stage held (trained, not yet published) until
    `server` has stopped, then released: the run's next calls meet no server. Returns the run."""
    run = start_convflow(
        [str(HELD_CONVFLOW), "train", "run", "tiny", "--json"], program=[PYTHON], cwd=root, env={**server.env, **env}
    )
    held = wait_for(
        lambda: next(root.glob("artifacts/tiny/*/train.held"), None),
        300,
        lambda: f"train did not hold; run exited {run.poll()}",
    )
    server.stop()
    (held.parent / "train.release").touch()
    return run


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_run_outlives_its_server_restarting(database, request, tmp_path):
    """The server stops while the run trains and starts again (same port and database) within the
    Prefect client's retries: the run finishes, and the server records it whole."""
    write_yaml(tmp_path / "pipelines.yaml", TINY_PIPELINES)
    servers = [PrefectServer(tmp_path / "prefect-home", **database_for(database, request, "restart"))]
    try:
        servers[0].wait_until_ready()
        run = run_past_server_stop(tmp_path, servers[0])
        stopped = time.monotonic()
        servers.append(servers[0].restarted())
        servers[-1].wait_until_ready()
        outage = time.monotonic() - stopped
        assert run.poll() is None, "the run ended while its server was away"  # it waited through the outage
        stdout, stderr = run.communicate(timeout=300)
        with prefect_client(servers[-1]) as client:
            [flow_run] = client.read_flow_runs()
            stages = recorded_task_runs(client, flow_run.id)
    finally:
        for server in servers:
            server.stop()
    print(
        f"\nserver restart on {database}: {outage:.1f} s without a server; run exited {run.returncode}, "
        f"flow run {flow_run.state_name}, task runs {stages}"
    )

    assert run.returncode == 0, stdout[-3000:] + stderr[-5000:]
    summary = last_json_line(stdout)
    assert summary["status"] == "completed"
    assert flow_run.state_type.value == "COMPLETED" and stages == dict.fromkeys(TASKS, "Completed"), flow_run.state
    [row] = pq.read_table(tmp_path / "artifacts" / "runs.parquet").to_pylist()
    assert (row["run_id"], row["flow_run_id"]) == (summary["run_id"], str(flow_run.id))


class ReadLines:
    """The lines of a child's pipe, read as they come by a thread of their own."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(pipe), daemon=True)
        self._thread.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finished(self) -> list[str]:
        self._thread.join(timeout=60)
        return self.lines


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_run_whose_server_stays_away_fails_clearly_and_a_rerun_finishes(database, request, tmp_path):
    """A server away for longer than the client retries (here: none, PREFECT_CLIENT_MAX_RETRIES=0,
    so that a restart's seconds are enough) fails the run with a line that says what to do;
    run again once the server is back, it reuses the trained model and is recorded once."""
    write_yaml(tmp_path / "pipelines.yaml", TINY_PIPELINES)
    server = PrefectServer(tmp_path / "prefect-home", **database_for(database, request, "away"))
    try:
        server.wait_until_ready()
        failed = run_past_server_stop(tmp_path, server, PREFECT_CLIENT_MAX_RETRIES="0")
        stderr_lines = ReadLines(failed.stderr)
        wait_for(lambda: stderr_lines.has("convflow run tiny failed"), 300, lambda: "".join(stderr_lines.lines)[-5000:])
        # Back once the run has failed: its events client, still trying to deliver the run's events,
        # then gets through and the process ends (with no server it tries for about a minute more).
        server = server.restarted()
        server.wait_until_ready()
        failed.wait(timeout=300)
        stderr = "".join(stderr_lines.finished())
        rerun = run_convflow(["run", "tiny", "--json"], cwd=tmp_path, env=server.env)
    finally:
        server.stop()
    print(
        f"\nserver away on {database}: the run exited {failed.returncode}; "
        f"{[line for line in stderr.splitlines() if 'convflow run tiny' in line]}; rerun {rerun.summary['status']}, "
        f"cached {[stage['name'] for stage in rerun.summary['stages'] if stage['cached']]}"
    )

    assert failed.returncode == 1
    assert "convflow run tiny failed: ConnectError" in stderr
    assert "run `convflow run tiny` again: finished stages are cache hits" in stderr
    assert rerun.summary["status"] == "completed"
    cached = {stage["name"]: stage["cached"] for stage in rerun.summary["stages"]}
    assert cached["train"] or rerun.summary["resumed_from_epoch"], rerun.summary
    [row] = pq.read_table(tmp_path / "artifacts" / "runs.parquet").to_pylist()  # the failed run left no row
    assert row["run_id"] == rerun.summary["run_id"]
