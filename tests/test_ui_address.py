"""Where `convflow run` says a run can be seen in the Prefect UI: after a run on a temporary server,
its instructions, followed as printed in the same environment, open the run on a lasting server;
with PREFECT_API_URL set, the address is the run's page on that server."""

from __future__ import annotations

import json
import shlex
import urllib.request

import pyarrow.parquet as pq
import pytest
from prefect_server import PREFECT, Background, free_port

from conftest import TASKS, TinyRunner, run_convflow, subprocess_env
from convflow.runtime.fast_start import wait_until_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.server]


# What a browser sends when it opens an address: Prefect's server answers it with the UI's page.
BROWSER_NAVIGATION = {
    "Accept": "text/html,application/xhtml+xml",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
}


def fetch(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def ui_instructions(stdout: str) -> tuple[str, str, str]:
    """The summary's Prefect UI lines: the first, the command of step 1 and the address of step 2."""
    lines = stdout.splitlines()
    at = next(index for index, line in enumerate(lines) if line.startswith("  Prefect UI"))
    command = lines[at + 1].strip().removeprefix("1. ")
    address = lines[at + 2].strip().removeprefix("2. open ")
    return lines[at], command, address


def catalog_flow_run(runner: TinyRunner, run_id: str) -> str:
    rows = pq.read_table(runner.artifacts / "runs.parquet").to_pylist()
    return next(row["flow_run_id"] for row in rows if row["run_id"] == run_id)


def check_run_in_ui(address: str, flow_run_id: str) -> None:
    """The UI page at `address` loads, and the API its UI calls holds that flow run with its task runs."""
    status, page = fetch(address, headers=BROWSER_NAVIGATION)
    assert status == 200 and "<html" in page.lower()
    ui_root, _, path = address.partition("/runs/flow-run/")
    assert path == flow_run_id
    api_url = json.loads(fetch(f"{ui_root}/ui-settings")[1])["api_url"]
    flow_run = json.loads(fetch(f"{api_url}/flow_runs/{flow_run_id}")[1])
    assert flow_run["state"]["type"] == "COMPLETED"
    task_runs = json.loads(fetch(f"{api_url}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})[1])
    assert set(TASKS) <= {run["name"].rsplit("-", 1)[0] for run in task_runs}


@pytest.mark.slow
def test_the_printed_instructions_open_the_run_in_the_ui(tmp_path):
    runner = TinyRunner(tmp_path)
    home = tmp_path / "prefect-home"
    port = free_port()  # a user's `prefect server start` takes 4200; tests on a shared machine may not
    env = {**subprocess_env(), "PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port)}
    run = run_convflow(["run", "tiny", "--artifacts", str(runner.artifacts), "--json"], cwd=tmp_path, env=env)

    first, command, address = ui_instructions(run.stdout)
    flow_run_id = catalog_flow_run(runner, run.summary["run_id"])
    assert f"the run is kept in {home / 'prefect.db'}" in first
    assert command == "prefect server start"
    assert address == f"http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}"
    assert f"View at {address}" in run.stderr  # Prefect's own link names the same lasting address

    program, *arguments = shlex.split(command)
    server = Background([PREFECT, *arguments], env, tmp_path / "server.log")  # `prefect` of this install
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/api", server.process, timeout=240, poll=0.5)
        check_run_in_ui(address, flow_run_id)

        lasting = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        again = run_convflow(["run", "tiny", "--artifacts", str(runner.artifacts), "--json"], cwd=tmp_path, env=lasting)
        line = next(line for line in again.stdout.splitlines() if line.startswith("  Prefect UI"))
        second_id = catalog_flow_run(runner, again.summary["run_id"])
        assert line == f"  Prefect UI     http://127.0.0.1:{port}/runs/flow-run/{second_id}"
        check_run_in_ui(line.split()[-1], second_id)
    finally:
        server.stop()
