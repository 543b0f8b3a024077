"""The same pipeline run twice at once into one artifacts root: both complete in run folders of
their own, neither damages the other's files, the catalog keeps both rows and the production
pointer stays valid."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import STAGES, TINY_PIPELINES, finish_convflow, start_convflow, write_yaml
from convflow.catalog import registry, schemas, tables

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_same_pipeline_twice_at_once(tmp_path):
    write_yaml(tmp_path / "pipelines.yaml", TINY_PIPELINES)
    artifacts = tmp_path / "artifacts"
    args = ["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"]
    processes = [start_convflow(args, cwd=tmp_path) for _ in range(2)]
    summaries = [finish_convflow(process, timeout=900).summary for process in processes]
    run_ids = [summary["run_id"] for summary in summaries]
    assert len(set(run_ids)) == 2
    for summary in summaries:
        assert summary["status"] in ("completed", "not-promoted")
        run_dir = artifacts / "tiny" / summary["run_id"]
        assert json.loads((run_dir / tables.RUN_RECORD).read_text())["run_id"] == summary["run_id"]
        assert (Path(summary["saved_model"]) / "saved_model.pb").is_file()
        assert Path(summary["report"]).is_file() and Path(summary["report"]).is_relative_to(run_dir)
        assert not list(run_dir.glob(".*.tmp-*")), "a temporary folder outlived its stage"

    catalog = pq.read_table(artifacts / "runs.parquet", schema=schemas.RUNS_SCHEMA).to_pylist()
    assert sorted(row["run_id"] for row in catalog) == sorted(run_ids)
    assert not list(artifacts.glob("runs.parquet.damaged-*"))

    pointer = json.loads((artifacts / "models" / "tiny" / registry.POINTER).read_text())
    production = registry.Production.model_validate(pointer)
    assert production.run_id in run_ids
    assert production.saved_model == str(artifacts / "models" / "tiny" / str(production.version))
    assert (Path(production.saved_model) / "saved_model.pb").is_file()
    for version in registry.versions(artifacts, "tiny"):  # every promoted version is whole
        assert (Path(version.saved_model) / "saved_model.pb").is_file()
        assert list((Path(version.saved_model) / "variables").glob("variables.data-*"))
    assert not list((artifacts / "models" / "tiny").glob(".*.tmp-*"))

    # Every cached result either run left is readable and points at files that are all there.
    from prefect.serializers import JSONSerializer

    from convflow.core.records import StageRecord  # noqa: F401  (the decoder imports record classes)

    results = sorted((artifacts / ".prefect-results").iterdir())
    assert {path.name.rsplit("-", 1)[0] for path in results} == set(STAGES)
    for path in results:
        record = JSONSerializer().loads(json.loads(path.read_bytes())["result"].encode())
        assert record.damaged_files() == [], path
