"""Retraining when data lands (`on_data:`) and scoring when a model is promoted (`score.on_promotion`):
Prefect events and deployment triggers, run by a real `prefect server start`'s triggers service.

The server tests share one server (basic auth on, as a team's server would have it) and one
`convflow serve` of pipeline my-photos, in order: the watch's first runs see nothing new and start
nothing; `convflow notify` starts one training run, whose promotion starts one scoring run; fifty
photos copied into the source in one burst start one training run through the watch, and its
promotion one scoring run; the UI's event feed lists those events; README's curl line starts one
run, and a burst of events after it no other.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect_server import Background, prefect_client, started_server

from conftest import CONVFLOW, FOLDER_SPLIT, REPO, TINY_PIPELINES, make_image_folder, wait_for, write_yaml
from convflow.cli.app import main
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipelines
from convflow.config.schema import DataConfig
from convflow.data.listing import list_source, settled_listing
from convflow.flows import deployments
from convflow.runtime import events

PIPELINE = "my-photos"  # README's curl line names it
CLASSES = ("cat", "dog")
AUTH = "convflow:s3cret"
WITHIN = 20  # seconds: events within this of the first start no other run


def events_document(images: str = "images", **on_data) -> dict:
    document = copy.deepcopy(TINY_PIPELINES)
    tiny = document["pipelines"].pop("tiny")
    tiny["data"] = {"source": f"folder:{images}", "image_size": [16, 16], "channels": 3, "split": FOLDER_SPLIT}
    tiny["train"]["epochs"] = 1
    tiny["evaluate"] = {"min_accuracy": 0.0, "max_regression": 1.0}  # every new model is promoted
    tiny["on_data"] = {"within": WITHIN, "watch": {"interval": 10, "settle": 1}, **on_data}
    tiny["score"] = {"input": ["incoming"], "output": "scored", "on_promotion": True}
    document["pipelines"][PIPELINE] = tiny
    return document


# ----------------------------------------------------------------------------- without a server


def test_on_data_is_validated_and_leaves_the_config_hash(tmp_path):
    document = events_document()
    path = write_yaml(tmp_path / "pipelines.yaml", document)
    with_events = load_pipelines(path)[PIPELINE]
    del document["pipelines"][PIPELINE]["on_data"]
    assert load_pipelines(write_yaml(tmp_path / "plain.yaml", document))[PIPELINE].config_hash() == (
        with_events.config_hash()
    )

    document = events_document(within=0)
    document["pipelines"][PIPELINE]["score"] = {"input": ["incoming"], "output": "scored"}
    with pytest.raises(ConfigError) as raised:
        load_pipelines(write_yaml(tmp_path / "bad.yaml", document))
    problems = "\n".join(raised.value.problems)
    assert f"pipelines.{PIPELINE}.on_data.within: 0 — must be ≥ 1" in problems
    assert f"pipelines.{PIPELINE}.score" in problems and "give a schedule, on_promotion: true, or both" in problems

    document = events_document()
    document["pipelines"][PIPELINE]["data"]["source"] = "sklearn:digits"
    with pytest.raises(ConfigError, match="on_data.watch lists the source's files; sklearn:digits has none"):
        load_pipelines(write_yaml(tmp_path / "digits.yaml", document))


def test_the_listing_sees_new_files_and_opens_no_image(tmp_path, monkeypatch):
    import PIL.Image

    images = make_image_folder(tmp_path / "images", classes=CLASSES, per_class=3)
    data = DataConfig(source=f"folder:{images}", image_size=(16, 16), channels=3)
    monkeypatch.setattr(PIL.Image, "open", lambda *args, **kwargs: pytest.fail("the listing opened an image"))
    before = list_source(data)
    (images / "cat" / ".DS_Store").write_bytes(b"\x00")  # hidden files are no data
    assert list_source(data) == before and before.files == 6
    make_image_folder(tmp_path / "images", classes=CLASSES, per_class=1, start=50)
    after = list_source(data)
    assert after.fingerprint != before.fingerprint and after.files == 8 and after.bytes > before.bytes


def test_a_parquet_listing_reads_the_footers(tmp_path):
    table = tmp_path / "table"
    table.mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), table / "part-0.parquet")
    data = DataConfig(source=f"parquet:{table}", image_size=(16, 16), channels=3)
    before = list_source(data)
    pq.write_table(pa.table({"image": [b"y", b"z"], "label": ["cat", "dog"]}), table / "part-1.parquet")
    after = list_source(data)
    assert (before.files, after.files) == (1, 2) and after.fingerprint != before.fingerprint


def test_a_changing_listing_is_reported_once_it_settled(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=CLASSES, per_class=2)
    data = DataConfig(source=f"folder:{images}", image_size=(16, 16), channels=3)
    copies = iter(range(100, 103))

    def copying(seconds: float) -> None:  # a copy in progress: a file lands between the first listings
        index = next(copies)
        if index < 102:
            make_image_folder(images, classes=CLASSES, per_class=1, start=index)

    settled = settled_listing(data, 1, sleep=copying)
    assert settled is not None and settled.files == 8 and settled == list_source(data)
    rewriting = lambda seconds: make_image_folder(images, ("cat",), 1, start=0)  # noqa: E731
    assert settled_listing(data, 1, sleep=rewriting, rounds=2) is None


def test_deployments_carry_the_triggers_and_the_watch(tmp_path):
    path = write_yaml(tmp_path / "pipelines.yaml", events_document(delay=30))
    built = {(d.flow_name, d.name): d for d in deployments.served_deployments(path, tmp_path / "artifacts")}
    assert sorted(built) == [("convflow-score", PIPELINE), ("convflow-train", PIPELINE), ("convflow-watch", PIPELINE)]

    training = built[("convflow-train", PIPELINE)]
    assert training.schedules == [] and training.parameters["scheduled"] is True
    [landed] = training.triggers
    assert landed.expect == {events.DATA_LANDED} and landed.posture == "Reactive" and landed.threshold == 1
    assert landed.match.model_dump() == {"prefect.resource.id": f"convflow.pipeline.{PIPELINE}"}
    assert landed.within.total_seconds() == WITHIN and landed.schedule_after.total_seconds() == 30

    [promoted] = built[("convflow-score", PIPELINE)].triggers
    assert promoted.expect == {events.MODEL_PROMOTED} and promoted.within.total_seconds() == 0

    watch = built[("convflow-watch", PIPELINE)]
    assert watch.entrypoint == "convflow.flows.watch.watch_source" and watch.concurrency_limit == 1
    [every] = watch.schedules
    assert every.schedule.interval.total_seconds() == 10


def test_events_name_the_pipeline_as_their_resource():
    event = events.data_landed_event(PIPELINE, "notify", {"files": 3})
    assert event.resource.id == f"convflow.pipeline.{PIPELINE}" and event.resource.name == PIPELINE
    assert event.payload == {"pipeline": PIPELINE, "by": "notify", "files": 3} and isinstance(event.id, uuid.UUID)


def test_notify_checks_the_pipeline_then_the_server(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", events_document())
    assert main(["notify", "nope", "-f", str(path)]) == 2
    assert "pipelines.nope: no such pipeline" in capsys.readouterr().err
    assert main(["notify", PIPELINE, "-f", str(path)]) == 1
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def readme_curl_line() -> str:
    """The shell lines of README's curl block, as printed."""
    readme = (REPO / "README.md").read_text()
    [block] = [block for block in re.findall(r"```bash\n(.*?)```", readme, re.S) if "curl " in block]
    return block


# ----------------------------------------------------------------------------- a real server


def deployment_runs(client, flow: str, final_only: bool = False) -> list:
    """The flow runs of deployment `flow`/my-photos, oldest first."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=final)) if final_only else None
    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[PIPELINE])),
        flow_run_filter=FlowRunFilter(state=state),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=200,
    )


class Served:
    """`convflow serve` of my-photos beside the server, and the waits the tests share."""

    def __init__(self, server, root: Path):
        self.server, self.root = server, root
        env = {**server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        command = [CONVFLOW, "serve", "-f", "pipelines.yaml", "--artifacts", "artifacts"]
        self.process = Background(command, env, root / "serve.log", cwd=root)

    def describe(self) -> str:
        return self.process.output()[-5000:]

    def finished(self, flow: str, count: int, timeout: float = 300) -> list:
        """The first `count` runs of `flow`, once that many have finished."""
        with prefect_client(self.server) as client:
            return wait_for(
                lambda: len(found := deployment_runs(client, flow, final_only=True)) >= count and found[:count],
                timeout,
                self.describe,
                interval=1,
            )

    def runs(self, flow: str) -> list:
        """Every run of `flow` (training and scoring have no schedule here: each run was triggered)."""
        with prefect_client(self.server) as client:
            return deployment_runs(client, flow)

    def watch_after(self, run) -> None:
        """Wait for a watch run that started after `run` ended and found the source unchanged."""
        self.finished_after("convflow-watch", run.end_time, "Unchanged")

    def finished_after(self, flow: str, moment, state_name: str):
        with prefect_client(self.server) as client:
            return wait_for(
                lambda: [
                    run
                    for run in deployment_runs(client, flow, final_only=True)
                    if run.start_time and run.start_time > moment and run.state_name == state_name
                ],
                120,
                self.describe,
                interval=1,
            )


def scored_versions(root: Path) -> list[int]:
    return [
        row[0]
        for row in duckdb.sql(
            f"SELECT DISTINCT model_version FROM read_parquet('{root / 'scored'}/*/*.parquet', "
            "hive_partitioning = true) ORDER BY 1"
        ).fetchall()
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("events-server-home")
    with started_server(
        home, PREFECT_SERVER_API_AUTH_STRING=AUTH, PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="true"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    make_image_folder(root / "images", classes=CLASSES, per_class=12)
    make_image_folder(root / "incoming", classes=CLASSES, per_class=2)
    write_yaml(root / "pipelines.yaml", events_document())
    served = Served(server, root)
    try:
        yield served
    finally:
        served.process.stop()


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("events")
def test_an_unchanged_source_starts_no_run(served):
    first, second = served.finished("convflow-watch", 2, timeout=180)
    assert (first.state_name, second.state_name) == ("Watching", "Unchanged"), served.describe()
    assert "watching 24 files" in first.state.message
    assert served.runs("convflow-train") == []


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("events")
def test_notify_starts_one_training_run_and_its_promotion_one_scoring_run(served, server):
    notified = subprocess.run(
        [CONVFLOW, "notify", PIPELINE, "--note", "nightly export"],
        cwd=served.root,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert notified.returncode == 0, notified.stderr
    assert f"convflow.data.landed sent for pipeline {PIPELINE}" in notified.stdout
    [trained] = served.finished("convflow-train", 1)
    assert trained.state_name == "Completed", (trained.state, served.describe())
    [scored] = served.finished("convflow-score", 1)
    assert scored.state_name == "Completed", (scored.state, served.describe())
    assert scored_versions(served.root) == [1]
    served.watch_after(scored)  # the watch saw nothing new meanwhile
    assert len(served.runs("convflow-train")) == 1 and len(served.runs("convflow-score")) == 1


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("events")
def test_fifty_photos_copied_in_one_burst_start_one_run_through_the_watch(served, tmp_path):
    new = make_image_folder(tmp_path / "new-photos", classes=CLASSES, per_class=25, start=100)
    shutil.copytree(new, served.root / "images", dirs_exist_ok=True)
    first, second = served.finished("convflow-train", 2)
    assert second.state_name == "Completed", (second.state, served.describe())
    _, rescored = served.finished("convflow-score", 2)
    assert rescored.state_name == "Completed" and scored_versions(served.root) == [1, 2]
    served.watch_after(rescored)
    with prefect_client(served.server) as client:
        watched = deployment_runs(client, "convflow-watch", final_only=True)
    landed = [run for run in watched if run.state_name == "Data landed"]
    assert len(landed) == 1 and "24 -> 74 files" in landed[0].state.message
    assert len(served.runs("convflow-train")) == 2 and len(served.runs("convflow-score")) == 2


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("events")
@pytest.mark.browser
def test_the_event_feed_shows_convflow_events(served, server, tmp_path):
    import base64

    from chromium_page import screenshot_after_click
    from test_report import _chromium

    served.finished("convflow-score", 2)  # after the fifty photos' run: both promotions, both ways in
    screenshot = tmp_path / "event-feed.png"
    shown = screenshot_after_click(
        _chromium(),
        f"{server.url}/events?resource={events.pipeline_resource_id(PIPELINE)}",  # the feed of the pipeline's events
        wait_for="convflow.model.promoted",
        click=None,
        then_wait_for="convflow.data.landed",
        screenshot=screenshot,
        profile=tmp_path / "chromium-profile",
        local_storage={"prefect-password": base64.b64encode(AUTH.encode()).decode()},
    )
    print(f"the event feed: {screenshot}")
    assert PIPELINE in shown and screenshot.stat().st_size > 10_000

    landed, promoted = convflow_events(server, events.DATA_LANDED), convflow_events(server, events.MODEL_PROMOTED)
    by_notify, by_watch = landed  # what happened: the pipeline, its source's listing, and who said so
    assert by_notify["payload"]["by"] == "notify" and by_notify["payload"]["note"] == "nightly export"
    assert by_watch["payload"]["files"] == 74 and by_watch["payload"]["watch_flow_run_id"]
    assert by_notify["payload"]["fingerprint"] != by_watch["payload"]["fingerprint"]
    assert [event["payload"]["version"] for event in promoted] == [1, 2]
    assert all(event["payload"]["run_id"] and event["payload"]["pipeline"] == PIPELINE for event in promoted)
    related = {resource["prefect.resource.role"] for resource in promoted[0]["related"]}
    assert {"flow-run", "flow", "deployment"} <= related  # sent from the training run, which the feed links


def convflow_events(server, name: str) -> list[dict]:
    """The server's events called `name`, oldest first."""
    with prefect_client(server) as client:
        page = client.request("POST", "/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50})
    return sorted(page.json()["events"], key=lambda event: event["occurred"])


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.xdist_group("events")
def test_the_readme_curl_line_starts_one_run_and_a_burst_after_it_no_more(served, server):
    env = {**server.env, "PIPELINE": PIPELINE}
    curl = subprocess.run(["bash", "-c", readme_curl_line()], env=env, capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0, curl.stderr
    wait_for(lambda: len(served.runs("convflow-train")) == 3, 60, served.describe, interval=0.5)
    burst = [events.data_landed_event(PIPELINE, "bucket", {"object": f"img-{n}.png"}) for n in range(49)]
    with prefect_client(server) as client:
        response = client.request("POST", "/events", json=[event.model_dump(mode="json") for event in burst])
    assert response.status_code == 204
    *_, third = served.finished("convflow-train", 3)
    assert third.state_name == "Unchanged", (third.state, served.describe())  # the data made production
    served.watch_after(third)
    assert len(served.runs("convflow-train")) == 3
