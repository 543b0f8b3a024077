"""A Prefect server's database under many runs at once, without convflow's stages: N processes each
run a flow of T tasks at the same moment against one `prefect server start` on SQLite or on a
throwaway PostgreSQL cluster (tests/postgres.py). Prints wall time, exit codes, flow runs by state,
when every task run was recorded, and what went wrong. Not run by benchmarks/run.py.

    .venv/bin/python benchmarks/server_load.py sqlite|postgresql [PROCESSES] [TASKS]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="server-load-home-")

from postgres import PostgresCluster, postgres_bin  # noqa: E402
from prefect_server import PrefectServer, prefect_client  # noqa: E402

from conftest import PYTHON  # noqa: E402

TROUBLE = re.compile(
    r"database is locked|Server error '5\d\d|5\d\d Internal Server Error|Encountered exception in request"
)
FLOW = """
from prefect import flow, task

@task
def step(index):
    return index

@flow(name="server-load")
def server_load():
    return sum(step(index) for index in range({tasks}))

server_load()
"""


def run_load(server: PrefectServer, processes: int, tasks: int) -> tuple[float, list[int], list[str]]:
    """All processes started at once; (wall seconds, exit codes, outputs)."""
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [PYTHON, "-c", FLOW.format(tasks=tasks)],
            env=server.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(processes)
    ]
    outputs = [child.communicate(timeout=1800)[0] for child in children]
    return time.monotonic() - started, [child.returncode for child in children], outputs


def wait_for_task_runs(server: PrefectServer, tasks: int, started: float) -> tuple[dict[str, int], int, float]:
    """Flow runs by state, task runs recorded, seconds from `started` until the server had recorded
    every task run of the completed flow runs (it records them from events, after the flows end)."""
    with prefect_client(server) as client:
        states = [run.state_name for run in client.read_flow_runs()]
        expected = states.count("Completed") * tasks
        deadline = time.monotonic() + 300
        while (recorded := client._client.post("/task_runs/count", json={}).json()) < expected:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    return {state: states.count(state) for state in set(states)}, recorded, time.monotonic() - started


def main(database: str, processes: int = 12, tasks: int = 100) -> None:
    root = Path(tempfile.mkdtemp(prefix="server-load-"))
    cluster = PostgresCluster(postgres_bin()) if database == "postgresql" else None
    settings = {"PREFECT_API_DATABASE_CONNECTION_URL": cluster.create_database("load")} if cluster else {}
    server = PrefectServer(root / "home", **settings)
    try:
        server.wait_until_ready()
        started = time.monotonic()
        wall, exits, outputs = run_load(server, processes, tasks)
        states, recorded, all_recorded = wait_for_task_runs(server, tasks, started)
    finally:
        server.stop()
        if cluster:
            cluster.stop()
    troubles = sorted({match for output in outputs for match in TROUBLE.findall(output)})
    print(
        f"{database}: {processes} flows of {tasks} tasks at once: {wall:.1f} s; exit codes {sorted(exits)}; "
        f"flow runs {states}; {recorded} task runs, all recorded after {all_recorded:.1f} s; "
        f"client errors {troubles or 'none'}; "
        f"server log errors {sorted(set(TROUBLE.findall(server.output()))) or 'none'}"
    )
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(value) for value in sys.argv[2:4]))
