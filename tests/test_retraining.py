"""The retraining policy of scheduled runs, without Prefect: the `retrain` field, what the registry
records about the production model, and when a run counts as unchanged."""

from __future__ import annotations

import datetime
import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import write_yaml
from convflow.catalog import registry, retraining, runs, tables
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline
from convflow.core.context import RunContext

FINGERPRINT = "f" * 24


@pytest.fixture
def spec(pipelines_file):
    return load_pipeline(pipelines_file, "tiny")


@pytest.fixture
def artifacts(tmp_path):
    return tmp_path / "artifacts"


def promote(artifacts, tmp_path, run_id="run-1", model="/models/run-1.keras", **lineage):
    saved_model = tmp_path / f"export-{run_id}"
    saved_model.mkdir()
    (saved_model / "saved_model.pb").write_bytes(b"pb")
    return registry.promote(artifacts, "tiny", run_id, str(saved_model), model, 0.9, **lineage)


def test_retrain_defaults_to_on_change(spec):
    assert spec.retrain == "on_change"


def test_retrain_rejects_other_values(tmp_path, tiny_document):
    tiny_document["pipelines"]["tiny"]["retrain"] = "sometimes"
    path = write_yaml(tmp_path / "bad.yaml", tiny_document)
    with pytest.raises(ConfigError, match=r"pipelines\.tiny\.retrain: \"sometimes\" — must be one of"):
        load_pipeline(path, "tiny")


def test_config_hash_ignores_schedule_and_retrain(tmp_path, tiny_document, spec):
    tiny_document["pipelines"]["tiny"]["retrain"] = "always"
    tiny_document["pipelines"]["tiny"]["schedule"] = {"interval": 3600, "timezone": "Europe/Berlin"}
    changed = load_pipeline(write_yaml(tmp_path / "other.yaml", tiny_document), "tiny")
    assert changed.config_hash() == spec.config_hash()
    tiny_document["pipelines"]["tiny"]["train"]["epochs"] = 3
    retrained = load_pipeline(write_yaml(tmp_path / "epochs.yaml", tiny_document), "tiny")
    assert retrained.config_hash() != spec.config_hash()


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "0 3 * *"}, "must have 5 fields"),
        ({"cron": "0 3 * * 1", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"interval": 30}, "must be ≥ 60"),
        ({"cron": "0 3 * * 1", "interval": 3600}, "exactly one of cron or interval"),
    ],
)
def test_bad_schedules_fail_at_load_time(tmp_path, tiny_document, schedule, message):
    tiny_document["pipelines"]["tiny"]["schedule"] = schedule
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_yaml(tmp_path / "bad.yaml", tiny_document), "tiny")


def test_promote_records_lineage_and_old_records_still_load(artifacts, tmp_path):
    production = promote(artifacts, tmp_path, config_hash="c1", data_fingerprint=FINGERPRINT)
    assert (production.config_hash, production.data_fingerprint) == ("c1", FINGERPRINT)
    assert registry.current(artifacts, "tiny") == production
    pointer = registry.models_dir(artifacts, "tiny") / registry.POINTER
    old_style = {
        k: v for k, v in json.loads(pointer.read_text()).items() if k not in ("config_hash", "data_fingerprint")
    }
    pointer.write_text(json.dumps(old_style))
    assert registry.current(artifacts, "tiny").config_hash is None


def test_record_lineage_only_for_the_production_model(artifacts, tmp_path):
    promote(artifacts, tmp_path)
    assert registry.record_lineage(artifacts, "tiny", "/models/other.keras", "c1", FINGERPRINT) is None
    assert registry.current(artifacts, "tiny").config_hash is None

    updated = registry.record_lineage(artifacts, "tiny", "/models/run-1.keras", "c1", FINGERPRINT)
    assert (updated.config_hash, updated.data_fingerprint) == ("c1", FINGERPRINT)
    assert registry.current(artifacts, "tiny") == updated
    assert registry.versions(artifacts, "tiny") == [updated]  # the version's own record too
    assert registry.record_lineage(artifacts, "never-run", "/models/run-1.keras", "c1", FINGERPRINT) is None


def test_rollback_keeps_each_versions_lineage(artifacts, tmp_path):
    first = promote(artifacts, tmp_path, "run-1", "/m/1.keras", config_hash="c1", data_fingerprint="d1")
    promote(artifacts, tmp_path, "run-2", "/m/2.keras", config_hash="c2", data_fingerprint="d2")
    assert registry.rollback(artifacts, "tiny") == first
    assert registry.current(artifacts, "tiny").config_hash == "c1"


def test_unchanged_only_when_config_and_data_match(artifacts, tmp_path, spec):
    assert retraining.unchanged_production(artifacts, spec, FINGERPRINT) is None  # nothing in production
    promote(artifacts, tmp_path)
    assert retraining.unchanged_production(artifacts, spec, FINGERPRINT) is None  # lineage unknown
    production = registry.record_lineage(artifacts, "tiny", "/models/run-1.keras", spec.config_hash(), FINGERPRINT)

    assert retraining.unchanged_production(artifacts, spec, FINGERPRINT) == production
    assert retraining.unchanged_production(artifacts, spec, "0" * 24) is None  # the data changed
    epochs = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 5})})
    assert retraining.unchanged_production(artifacts, epochs, FINGERPRINT) is None  # the config changed
    always = spec.model_copy(update={"retrain": "always"})
    assert retraining.unchanged_production(artifacts, always, FINGERPRINT) is None
    shutil.rmtree(production.saved_model)
    assert retraining.unchanged_production(artifacts, spec, FINGERPRINT) is None  # production's files are gone


def test_unchanged_run_appends_a_catalog_row_and_run_record(artifacts, tmp_path, spec):
    promote(artifacts, tmp_path, config_hash=spec.config_hash(), data_fingerprint=FINGERPRINT)
    production = registry.current(artifacts, "tiny")
    run = RunContext(pipeline="tiny", run_id="20270101T030000Z-abcdef", artifacts_root=str(artifacts))
    started = datetime.datetime(2027, 1, 1, 3, tzinfo=datetime.UTC)

    reason = runs.record_unchanged(run, production, started, "flow-run-1")

    assert reason.startswith("unchanged since production version 1 (run run-1)") and "nothing trained" in reason
    [row] = pq.read_table(artifacts / "runs.parquet").to_pylist()
    assert row["status"] == "unchanged" and row["run_id"] == run.run_id and row["flow_run_id"] == "flow-run-1"
    assert (row["config_hash"], row["data_fingerprint"]) == (spec.config_hash(), FINGERPRINT)
    assert row["passed_gate"] is None and row["promoted_version"] is None and row["report"] is None
    assert row["saved_model"] == production.saved_model and row["test_accuracy"] == pytest.approx(0.9)
    assert (run.run_dir / tables.RUN_RECORD).is_file()  # the catalog can be rebuilt with this row in it
    assert tables.rebuild_runs(artifacts).column("status").to_pylist() == ["unchanged"]
