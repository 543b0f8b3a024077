"""The data-engineering handoff: runs.parquet (the catalog) and each run's Parquet files, read with
DuckDB and pandas, every field and table described in the schema metadata; runs that finish at the
same time all land in the catalog."""

from __future__ import annotations

import subprocess
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import (
    CONVFLOW,
    PYTHON,
    TINY_PIPELINES,
    finish_convflow,
    start_convflow,
    subprocess_env,
    wait_for,
    write_yaml,
)
from convflow.catalog import schemas
from convflow.checks.schemas import CHECK_RESULTS_SCHEMA, IMAGE_PROPERTIES_SCHEMA

# Each run's Parquet tables, by the catalog column that holds their path.
RUN_TABLE_SCHEMAS = {
    "splits_parquet": schemas.SPLITS_SCHEMA,
    "image_properties_parquet": IMAGE_PROPERTIES_SCHEMA,
    "checks_parquet": CHECK_RESULTS_SCHEMA,
    "history_parquet": schemas.HISTORY_SCHEMA,
    "metrics_parquet": schemas.METRICS_SCHEMA,
    "predictions_parquet": schemas.PREDICTIONS_SCHEMA,
    "model_checks_parquet": CHECK_RESULTS_SCHEMA,
}


def assert_described(path: Path, schema) -> None:
    """The file has `schema`'s columns, each with a description, and a table description."""
    written = pq.read_schema(path)
    assert written.names == schema.names, path
    for field in written:
        assert field.metadata and field.metadata[b"description"].strip(), f"{path}: {field.name} undescribed"
    assert written.metadata[b"description"] == schema.metadata[b"description"], path


# ----------------------------------------------------------------------------- the catalog's lock

APPENDER = """
import datetime, sys, time
from pathlib import Path
from convflow.catalog import schemas, tables
catalog, start, name, count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
start.with_name(f"{name}.ready").touch()  # imported: at the start line
while not start.exists():
    time.sleep(0.01)
now = datetime.datetime.now(datetime.timezone.utc)
for index in range(count):
    tables.append_run(catalog, {
        "pipeline": name, "run_id": f"{name}-{index:03d}", "started": now, "finished": now, "status": "completed",
        "config_hash": "c", "data_fingerprint": "d", "test_accuracy": 0.5, "passed_gate": True, "gate_reason": "",
        "model": None, "saved_model": "", "promoted_version": None, "report": "", "run_dir": None,
        "flow_run_id": None,
    })
"""


def test_two_processes_appending_at_once_lose_no_row(tmp_path):
    catalog, start = tmp_path / "runs.parquet", tmp_path / "start"
    appenders = [
        subprocess.Popen([PYTHON, "-c", APPENDER, str(catalog), str(start), name, "40"], env=subprocess_env())
        for name in ("a", "b")
    ]
    ready = [tmp_path / f"{name}.ready" for name in ("a", "b")]
    wait_for(
        lambda: all(marker.exists() for marker in ready) or any(a.poll() is not None for a in appenders),
        120,
        lambda: "the appenders did not reach the start line",
        interval=0.01,
    )
    assert all(appender.poll() is None for appender in appenders), "an appender ended before the start line"
    start.touch()  # both are waiting at the start line: they append at the same time
    assert [appender.wait(timeout=120) for appender in appenders] == [0, 0]

    run_ids = pq.read_table(catalog).column("run_id").to_pylist()
    assert len(run_ids) == 80 and len(set(run_ids)) == 80
    assert sorted(run_ids) == sorted(f"{name}-{index:03d}" for name in "ab" for index in range(40))
    # each process's rows stay in its own order: appends, not rewrites from a stale copy
    assert [r for r in run_ids if r.startswith("a")] == [f"a-{index:03d}" for index in range(40)]


def test_catalog_and_table_schemas_describe_every_field():
    assert sorted(RUN_TABLE_SCHEMAS) == sorted(f"{name}_parquet" for name in schemas.RUN_TABLES)
    for schema in (*RUN_TABLE_SCHEMAS.values(), schemas.MODEL_SUMMARY_SCHEMA, schemas.RUNS_SCHEMA):
        assert schema.metadata[b"description"]
        for field in schema:
            assert field.metadata[b"description"], field.name


# ----------------------------------------------------------------------------- two runs at once


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """`convflow run` of two pipelines at the same time into one artifacts root."""
    root = tmp_path_factory.mktemp("handoff")
    document = yaml.safe_load(yaml.safe_dump(TINY_PIPELINES))
    tiny = document["pipelines"].pop("tiny")
    document["pipelines"]["digits-a"] = tiny
    document["pipelines"]["digits-b"] = {**tiny, "train": {**tiny["train"], "seed": 1}}
    write_yaml(root / "pipelines.yaml", document)
    runs = {
        name: start_convflow(["run", name, "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=root)
        for name in ("digits-a", "digits-b")
    }
    summaries = {name: finish_convflow(process, timeout=600).summary for name, process in runs.items()}
    return {"artifacts": root / "artifacts", "summaries": summaries}


@pytest.mark.e2e
@pytest.mark.xdist_group("handoff")
@pytest.mark.slow
def test_concurrent_runs_both_land_in_the_catalog(two_runs):
    catalog = two_runs["artifacts"] / "runs.parquet"
    frame = pd.read_parquet(catalog)
    assert sorted(frame["pipeline"]) == ["digits-a", "digits-b"]
    assert set(frame["run_id"]) == {summary["run_id"] for summary in two_runs["summaries"].values()}
    assert (frame["status"] == "completed").all() and frame["flow_run_id"].notna().all()
    assert_described(catalog, schemas.RUNS_SCHEMA)
    for _, row in frame.iterrows():
        for column, schema in RUN_TABLE_SCHEMAS.items():
            assert_described(Path(row[column]), schema)
        assert_described(Path(row["history_parquet"]).with_name("model_summary.parquet"), schemas.MODEL_SUMMARY_SCHEMA)


@pytest.mark.e2e
@pytest.mark.xdist_group("handoff")
@pytest.mark.slow
def test_duckdb_reads_the_catalog_and_every_runs_tables(two_runs):
    artifacts = two_runs["artifacts"]
    catalog = duckdb.sql(
        f"SELECT pipeline, test_accuracy, splits_parquet, predictions_parquet "
        f"FROM read_parquet('{artifacts / 'runs.parquet'}') ORDER BY pipeline"
    ).fetchall()
    assert [row[0] for row in catalog] == ["digits-a", "digits-b"]

    for pipeline, test_accuracy, splits, predictions in catalog:
        assert test_accuracy == pytest.approx(two_runs["summaries"][pipeline]["test_accuracy"])
        # The test accuracy, recomputed in SQL by joining predictions to the splits they came from.
        [(tested, accuracy)] = duckdb.sql(
            f"SELECT count(*), avg((p.predicted = p.label)::DOUBLE) FROM read_parquet('{predictions}') p "
            f"JOIN read_parquet('{splits}') s USING (example_id) WHERE s.split = 'test'"
        ).fetchall()
        assert [(tested,)] == duckdb.sql(
            f"SELECT count(*) FROM read_parquet('{splits}') WHERE split = 'test'"
        ).fetchall()
        assert accuracy == pytest.approx(test_accuracy)
        [(description,)] = duckdb.sql(
            f"SELECT value FROM parquet_kv_metadata('{predictions}') WHERE key = 'description'"
        ).fetchall()
        assert description.decode() == schemas.PREDICTIONS_SCHEMA.metadata[b"description"].decode()

    # One query across every run's metrics, as a data engineer would write it.
    accuracies = duckdb.sql(
        f"SELECT r.pipeline, m.value FROM read_parquet('{artifacts}/*/*/evaluate/metrics.parquet', filename = true) m "
        f"JOIN read_parquet('{artifacts / 'runs.parquet'}') r ON m.filename = r.metrics_parquet "
        "WHERE m.metric = 'accuracy' AND m.class_name IS NULL ORDER BY r.pipeline"
    ).fetchall()
    assert [(name, pytest.approx(accuracy)) for name, accuracy in accuracies] == [
        (pipeline, pytest.approx(test_accuracy)) for pipeline, test_accuracy, _, _ in catalog
    ]


@pytest.mark.e2e
@pytest.mark.xdist_group("handoff")
@pytest.mark.slow
def test_pandas_reads_every_runs_tables(two_runs):
    catalog = pd.read_parquet(two_runs["artifacts"] / "runs.parquet").set_index("pipeline")
    for _pipeline, row in catalog.iterrows():
        metrics = pd.read_parquet(row["metrics_parquet"])
        overall = metrics[metrics["class_name"].isna()].set_index("metric")["value"]
        assert overall["accuracy"] == pytest.approx(row["test_accuracy"])
        history = pd.read_parquet(row["history_parquet"])
        assert history["epoch"].tolist() == [1] and history["val_accuracy"].notna().all()
        predictions = pd.read_parquet(row["predictions_parquet"])
        assert predictions["probabilities"].map(len).eq(10).all()
        splits = pd.read_parquet(row["splits_parquet"])
        assert set(splits["split"]) == {"train", "validation", "test"} and len(splits) == 1797


@pytest.mark.e2e
@pytest.mark.xdist_group("handoff")
@pytest.mark.slow
def test_runs_command_prints_the_catalog(two_runs):
    def runs(*args):
        result = subprocess.run(
            [CONVFLOW, "runs", *args, "--artifacts", str(two_runs["artifacts"])],
            capture_output=True,
            text=True,
            env=subprocess_env(),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    everything = runs()
    header = everything.splitlines()[0].split()
    assert header[:5] == ["started", "pipeline", "run_id", "status", "test_accuracy"]
    for summary in two_runs["summaries"].values():
        assert summary["run_id"] in everything and f"{summary['test_accuracy']:.4f}" in everything
    only_a = runs("digits-a")
    assert two_runs["summaries"]["digits-a"]["run_id"] in only_a
    assert two_runs["summaries"]["digits-b"]["run_id"] not in only_a
    assert "no runs of nothing-yet" in runs("nothing-yet")
