"""validate.on_block: ask on a real Prefect server: a blocked run pauses with a typed Resume form;
the answer sent through the API the UI's form uses (POST /api/flow_runs/{id}/resume with its run
input) lets it train and promote, with the reason in the catalog and the report, or ends it
blocked with production untouched; no answer within ask_timeout ends it blocked too."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from chromium_page import screenshot_after_click
from prefect_server import Background, prefect_client, started_server
from test_data_checks_flow import darken, folder_document, tree_digest
from test_report import _chromium

from conftest import (
    CONVFLOW,
    last_json_line,
    make_image_folder,
    run_convflow,
    save_image,
    start_convflow,
    wait_for,
    write_yaml,
)
from convflow.cli.output import EXIT_BLOCKED

pytestmark = [pytest.mark.e2e, pytest.mark.server, pytest.mark.xdist_group("asking")]

COMMAND = ["run", "tiny", "--artifacts", "artifacts", "--json"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with started_server(tmp_path_factory.mktemp("prefect-server-home")) as server:
        yield server


def asking_document(images: Path, ask_timeout: float = 600) -> dict:
    document = folder_document(images)
    tiny = document["pipelines"]["tiny"]
    tiny["validate"] = {"on_block": "ask", "ask_timeout": ask_timeout}
    # Any model passes the gate: this test is about the data checks' question, not a second one.
    tiny["evaluate"] = {"min_accuracy": 0.0, "max_regression": 1.0}
    return document


def paused_run(server, process, timeout: float = 400, output=None):
    """The flow run once it waits for a decision (state Paused), with its Resume form's schema saved;
    `process` (a Popen) must live meanwhile; `output()` says what it printed (default: its stderr)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    output = output or (lambda: process.communicate()[1][-3000:])
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + timeout
    with prefect_client(server) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, output()
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs and {"schema", "description"} <= set(_form_inputs(server, runs[0].id)):  # saved after pausing
                return runs[0]
            time.sleep(2)
    process.kill()
    raise AssertionError(f"no run paused within {timeout} s: {output()}")


def finished_run(server, flow_run_id, output):
    """The flow run once it is in a final state (at most 300 s); `output()` says why not."""
    with prefect_client(server) as client:
        return wait_for(
            lambda: (run := client.read_flow_run(flow_run_id)).state.is_final() and run, 300, output, interval=2
        )


def scheduled_after_production(server, root: Path, schedule: dict) -> None:
    """Under `root`: production version 1 of tiny from a `convflow run`, then the same images darker
    (its data checks block) and tiny on `schedule`, for `convflow serve` or `deploy`."""
    images = make_image_folder(root / "images", per_class=40)
    write_yaml(root / "pipelines.yaml", asking_document(images))
    assert run_convflow(COMMAND, cwd=root, env=server.env).summary["promoted_version"] == 1
    darken(images, 0.4)
    document = asking_document(images)
    document["pipelines"]["tiny"]["schedule"] = schedule
    write_yaml(root / "pipelines.yaml", document)


def resume(server, flow_run_id, run_input: dict) -> dict:
    """What the UI's Resume form does on submit."""
    response = httpx.post(f"{server.api_url}/flow_runs/{flow_run_id}/resume", json={"run_input": run_input})
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="module")
def production(server, tmp_path_factory):
    """A folder pipeline under on_block: ask with production version 1 from its first run."""
    root = tmp_path_factory.mktemp("asking")
    images = make_image_folder(root / "images", per_class=40)
    write_yaml(root / "pipelines.yaml", asking_document(images))
    first = run_convflow(COMMAND, cwd=root, env=server.env).summary
    assert first["status"] == "completed" and first["promoted_version"] == 1
    return root, images


def test_convflow_run_under_ask_needs_a_lasting_server(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=5)
    write_yaml(tmp_path / "pipelines.yaml", asking_document(images))
    process = start_convflow(COMMAND, cwd=tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "pipelines.tiny.validate.on_block is ask" in stderr and "PREFECT_API_URL" in stderr
    assert not (tmp_path / "artifacts" / "runs.parquet").exists()


def test_a_blocked_run_waits_and_approval_trains_and_promotes_with_the_reason(server, production):
    root, images = production
    models = root / "artifacts" / "models" / "tiny"
    darken(images, 0.4)
    process = start_convflow(COMMAND, cwd=root, env=server.env)
    waiting = paused_run(server, process)
    assert waiting.state.name == "Paused" and waiting.name == "tiny"
    assert not (models / "2").exists()

    form = _form_schema(server, waiting.id)
    assert {"approve", "reason"} <= set(form["properties"]) and "reason" in form["required"]
    refused = httpx.post(  # the form's schema is enforced: a decision without a reason is refused
        f"{server.api_url}/flow_runs/{waiting.id}/resume", json={"run_input": {"approve": True}}
    )
    assert refused.json()["status"] == "REJECT", refused.text

    reason = "new camera in the greenhouse; looked at the thumbnails"
    assert resume(server, waiting.id, {"approve": True, "reason": reason})["status"] == "ACCEPT"
    stdout, stderr = process.communicate(timeout=540)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = last_json_line(stdout)
    assert summary["status"] == "completed" and summary["promoted_version"] == 2
    assert summary["gate_reason"].startswith(f"data checks approved by a person: {reason}; test accuracy")
    assert [stage["name"] for stage in summary["stages"]][-1] == "write_report"

    row = pq.read_table(root / "artifacts" / "runs.parquet").to_pylist()[-1]
    assert row["status"] == "completed" and reason in row["gate_reason"]
    assert pq.read_table(row["checks_parquet"]).to_pylist()  # the figures that blocked it, kept
    report = Path(summary["report"]).read_text()
    assert f"data checks approved by a person: {reason}" in report
    with prefect_client(server) as client:
        finished = client.read_flow_run(waiting.id)
    assert finished.state.type.value == "COMPLETED" and finished.state.name == "Completed"


@pytest.mark.browser
def test_a_rejected_run_ends_blocked_and_production_is_untouched(server, production):
    root, images = production
    models = root / "artifacts" / "models" / "tiny"
    before = tree_digest(models)
    darken(images, 0.4)  # darker again than the data production now comes from
    process = start_convflow(COMMAND, cwd=root, env=server.env)
    waiting = paused_run(server, process)
    screenshot = root / "resume-form.png"
    shown = screenshot_after_click(
        _chromium(),
        f"{server.url}/runs/flow-run/{waiting.id}",
        wait_for="Paused",
        click="Resume",
        then_wait_for="The data checks blocked this run.",  # the form loads its schema after opening
        screenshot=screenshot,
        profile=root / "chromium-profile",
    )
    print(f"the waiting run's Resume form: {screenshot}")
    assert "The data checks blocked this run." in shown and "drift brightness" in shown
    assert "Approve" in shown and "Reason" in shown and "Submit" in shown
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 30_000
    assert resume(server, waiting.id, {"approve": False, "reason": "broken drop"})["status"] == "ACCEPT"
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_BLOCKED, stdout[-3000:] + stderr[-3000:]
    summary = last_json_line(stdout)
    assert summary["status"] == "blocked" and summary["gate_reason"].endswith(
        "; data checks rejected by a person: broken drop"
    )
    assert [stage["name"] for stage in summary["stages"]] == ["download_and_split", "to_tfrecords", "check_data"]
    assert tree_digest(models) == before
    with prefect_client(server) as client:
        finished = client.read_flow_run(waiting.id)
    assert finished.state.name == "Blocked" and "rejected by a person: broken drop" in finished.state.message


def test_no_decision_in_time_ends_blocked(server, production):
    root, images = production
    write_yaml(root / "pipelines.yaml", asking_document(images, ask_timeout=5))
    darken(images, 0.4)  # darker than production's data, whichever tests ran before
    before = tree_digest(root / "artifacts" / "models" / "tiny")
    stdout = run_convflow_blocked(root, server)
    summary = last_json_line(stdout)
    assert summary["status"] == "blocked"
    assert summary["gate_reason"].endswith("; data checks: no decision within ask_timeout 5 s")
    assert tree_digest(root / "artifacts" / "models" / "tiny") == before
    row = pq.read_table(root / "artifacts" / "runs.parquet").to_pylist()[-1]
    with prefect_client(server) as client:  # the pause ended by its own rejection, not by expiring
        finished = client.read_flow_run(row["flow_run_id"])
    assert finished.state.name == "Blocked", finished.state


def test_a_model_that_fails_the_gate_is_promoted_once_a_person_approves_with_convflow_decide(server, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):  # noise: no model can tell the classes apart
        for index in range(20):
            save_image(tmp_path / "images" / name / f"{index}.png", rng.integers(0, 256, (12, 12, 3), np.uint8))
    document = asking_document(tmp_path / "images")
    document["pipelines"]["tiny"]["evaluate"] = {"min_accuracy": 0.9}
    write_yaml(tmp_path / "pipelines.yaml", document)
    process = start_convflow(COMMAND, cwd=tmp_path, env=server.env)
    waiting = paused_run(server, process)
    assert "model gate" in _form_schema(server, waiting.id, "description")

    decide = [CONVFLOW, "decide", str(waiting.id), "--reason", "noise on purpose"]
    refused = subprocess.run(
        [*decide[:-2], "--approve", "--reason", " "], env=server.env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "--reason is empty" in refused.stderr
    approved = subprocess.run([*decide, "--approve"], env=server.env, capture_output=True, text=True)
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == f"flow run {waiting.id} approved: noise on purpose"
    again = subprocess.run([*decide, "--reject"], env=server.env, capture_output=True, text=True)
    assert again.returncode == 1 and "not waiting for a decision" in again.stderr

    stdout, stderr = process.communicate(timeout=540)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = last_json_line(stdout)
    assert summary["status"] == "completed" and summary["promoted_version"] == 1
    assert summary["gate_reason"].startswith("model gate approved by a person: noise on purpose; the gate failed: test")


def run_convflow_blocked(root: Path, server) -> str:
    process = start_convflow(COMMAND, cwd=root, env=server.env)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_BLOCKED, stdout[-3000:] + stderr[-3000:]
    return stdout


def _form_schema(server, flow_run_id, part: str = "schema"):
    """The Resume form's JSON schema (or its description), as the UI reads it from the flow run's inputs."""
    return _form_inputs(server, flow_run_id)[part]


def _form_inputs(server, flow_run_id) -> dict:
    """The paused run's inputs by their last key part: schema, description, response."""
    response = httpx.post(
        f"{server.api_url}/flow_runs/{flow_run_id}/input/filter", json={"prefix": "paused-", "limit": 10}
    )
    response.raise_for_status()
    return {item["key"].rsplit("-", 1)[1]: json.loads(item["value"]) for item in response.json()}


@pytest.mark.slow
def test_a_scheduled_run_of_convflow_serve_waits_and_goes_on_once_approved(server, tmp_path):
    """The same question from a run that `convflow serve` started on its schedule: the run's own
    process waits, the serving process goes on, and the approved run trains and promotes."""
    scheduled_after_production(server, tmp_path, {"cron": "* * * * *"})
    serve = Background(
        [CONVFLOW, "serve", "-f", "pipelines.yaml", "--artifacts", "artifacts"],
        server.env,
        tmp_path / "serve.log",
        cwd=tmp_path,
    )
    try:
        waiting = paused_run(server, serve.process, output=lambda: serve.output()[-3000:])
        assert waiting.auto_scheduled and waiting.parameters["scheduled"] is True
        assert resume(server, waiting.id, {"approve": True, "reason": "new lamps"})["status"] == "ACCEPT"
        finished = finished_run(server, waiting.id, output=lambda: serve.output()[-3000:])
    finally:
        serve.stop()
    assert finished.state.name == "Completed", finished.state
    row = next(
        row
        for row in pq.read_table(tmp_path / "artifacts" / "runs.parquet").to_pylist()
        if row["flow_run_id"] == str(waiting.id)
    )
    assert row["status"] == "completed" and row["promoted_version"] == 2
    assert row["gate_reason"].startswith("data checks approved by a person: new lamps; test accuracy")


@pytest.mark.slow
def test_a_run_of_convflow_deploy_waits_on_its_worker_and_a_rejection_ends_it_blocked(server, tmp_path):
    """Deployed on a work pool: the run waits in the worker's flow-run process for the decision."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    scheduled_after_production(server, tmp_path, {"cron": "0 3 * * 1"})
    models = tmp_path / "artifacts" / "models" / "tiny"
    before = tree_digest(models)
    deploy = [CONVFLOW, "deploy", "--pool", "asking", "-f", "pipelines.yaml", "--artifacts", "artifacts"]
    deployed = subprocess.run(deploy, capture_output=True, text=True, env=server.env, cwd=tmp_path, timeout=180)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        started = run_deployment("convflow-train/tiny", timeout=0)
    worker = Background([CONVFLOW, "worker", "--pool", "asking"], server.env, tmp_path / "worker.log")
    try:
        waiting = paused_run(server, worker.process, output=lambda: worker.output()[-3000:])
        assert waiting.id == started.id
        assert resume(server, waiting.id, {"approve": False, "reason": "wrong lamps"})["status"] == "ACCEPT"
        finished = finished_run(server, waiting.id, output=lambda: worker.output()[-3000:])
    finally:
        worker.stop()
    assert finished.state.name == "Blocked" and "rejected by a person: wrong lamps" in finished.state.message
    row = pq.read_table(tmp_path / "artifacts" / "runs.parquet").to_pylist()[-1]
    assert (row["flow_run_id"], row["status"]) == (str(waiting.id), "blocked")
    assert tree_digest(models) == before
