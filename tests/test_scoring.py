"""Scheduled scoring (`score:`): a real Prefect server, `convflow deploy` and a process worker run
the deployment convflow-score/<pipeline>. The second run scores only the files added since; after
a new model is promoted the next run scores everything again; DuckDB reads the partitioned output."""

from __future__ import annotations

import copy
import datetime
import json
import shutil
import subprocess

import duckdb
import pytest
from prefect_server import PREFECT, Background, prefect_client, started_server

from conftest import CONVFLOW, FOLDER_SPLIT, TINY_PIPELINES, make_image_folder, run_convflow, write_yaml

CLASSES = ("cat", "dog", "owl")


def scoring_document(epochs: int = 1) -> dict:
    document = copy.deepcopy(TINY_PIPELINES)
    tiny = document["pipelines"]["tiny"]
    tiny["data"] = {"source": "folder:images", "image_size": [16, 16], "channels": 3, "split": FOLDER_SPLIT}
    tiny["train"]["epochs"] = epochs
    tiny["evaluate"] = {"min_accuracy": 0.0, "max_regression": 1.0}  # every new model is promoted
    tiny["score"] = {"input": ["incoming"], "output": "scored", "schedule": {"cron": "0 3 * * 1"}}
    return document


def score_once(server) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        flow_run = run_deployment("convflow-score/tiny", timeout=300, poll_interval=1)
    assert flow_run.state.is_completed(), flow_run.state


def scored_rows(root) -> list[tuple]:
    """(input file name, model version, scored_date) of every row, from the hive-partitioned output."""
    return duckdb.sql(
        f"SELECT regexp_extract(input, '[^/]+$'), model_version, scored_date "
        f"FROM read_parquet('{root / 'scored'}/*/*.parquet', hive_partitioning = true) "
        "ORDER BY model_version, input"
    ).fetchall()


def scoring_artifacts(server) -> list[dict]:
    """The table artifacts the scoring runs published (the Prefect UI shows them on each run)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect_client(server) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-scoring"])))
    tables = [json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data for artifact in found]
    return [{row["what"]: row["value"] for row in table} for table in tables]


def train(root, env, epochs: int) -> dict:
    write_yaml(root / "pipelines.yaml", scoring_document(epochs))
    return run_convflow(
        ["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=root, env=env
    ).summary


@pytest.mark.e2e
@pytest.mark.server
@pytest.mark.slow
def test_scoring_runs_score_only_what_the_production_model_has_not(tmp_path):
    root = tmp_path
    images = make_image_folder(root / "images", classes=CLASSES, per_class=12)
    incoming = root / "incoming"
    incoming.mkdir()
    for path in sorted(images.glob("*/img-00[0-1].png")):  # six files to begin with
        shutil.copy(path, incoming / f"{path.parent.name}-{path.name}")
    with started_server(root / "prefect-home") as server:
        env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        assert train(root, env, epochs=1)["promoted_version"] == 1
        deployed = subprocess.run(
            [CONVFLOW, "deploy", "--pool", "scoring", "-f", "pipelines.yaml", "--artifacts", "artifacts"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert "deployed convflow-score/tiny on work pool scoring" in deployed.stdout, deployed.stderr[-3000:]
        worker = Background([PREFECT, "worker", "start", "--pool", "scoring"], env, root / "worker.log")
        try:
            score_once(server)
            first = scored_rows(root)
            for path in sorted(images.glob("owl/img-01[0-1].png")):  # two new files
                shutil.copy(path, incoming / f"new-{path.name}")
            score_once(server)
            second = scored_rows(root)
            assert train(root, env, epochs=2)["promoted_version"] == 2
            score_once(server)
            third = scored_rows(root)
        finally:
            worker.stop()
        shown = scoring_artifacts(server)
    today = datetime.datetime.now(datetime.UTC).date()
    assert len(first) == 6 and {row[1:] for row in first} == {(1, today)}
    assert sorted(row[0] for row in second if row not in first) == ["new-img-010.png", "new-img-011.png"]
    assert len(second) == 8
    rescored = [row for row in third if row[1] == 2]
    assert len(third) == 16 and sorted(row[0] for row in rescored) == sorted(row[0] for row in second)
    assert sorted(table["scored"] for table in shown) == [2, 6, 8]  # one table per scoring run


def test_a_score_section_is_served_beside_training(tmp_path):
    from pathlib import Path

    from convflow.flows import deployments

    document = scoring_document()
    document["pipelines"]["tiny"]["schedule"] = {"cron": "0 3 * * 1"}
    path = write_yaml(tmp_path / "pipelines.yaml", document)
    built = {(d.flow_name, d.name): d for d in deployments.served_deployments(path, Path("artifacts"))}

    assert sorted(built) == [("convflow-score", "tiny"), ("convflow-train", "tiny")]
    scoring = built[("convflow-score", "tiny")]
    assert scoring.entrypoint == "convflow.flows.score.score_pipeline"
    assert [schedule.schedule.cron for schedule in scoring.schedules] == ["0 3 * * 1"]
    assert scoring.parameters == {
        "pipeline": "tiny",
        "pipelines_file": str(path.resolve()),
        "artifacts": str(Path("artifacts").resolve()),
    }
