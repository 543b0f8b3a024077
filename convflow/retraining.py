"""The retraining policy of scheduled runs: train only when the data or the config changed.

A scheduled run learns the data fingerprint from download_and_split (a cache hit while the source
is unchanged) and compares it, and the pipeline's config hash, with what made the production
model. When both match, and the pipeline says `retrain: on_change`, it trains nothing and records
an "unchanged" row in the catalog. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from convflow import registry, tables
from convflow.config import PipelineSpec
from convflow.tasks.stage import RunContext

UNCHANGED = "unchanged"


def unchanged_production(
    artifacts_root: Path, spec: PipelineSpec, data_fingerprint: str
) -> registry.Production | None:
    """The production model that `spec`'s config made from this very data, when the pipeline
    retrains only on change; None when there is none (or its files are gone), anything differs,
    or `retrain: always`."""
    if spec.retrain == "always":
        return None
    production = registry.current(artifacts_root, spec.name)
    if production is None or not Path(production.saved_model).is_dir():  # gone: make a new one
        return None
    if (production.config_hash, production.data_fingerprint) != (spec.config_hash(), data_fingerprint):
        return None
    return production


def unchanged_reason(production: registry.Production) -> str:
    return (
        f"unchanged since production version {production.version} (run {production.run_id}): "
        f"same config hash {production.config_hash} and data fingerprint {production.data_fingerprint}; "
        "nothing trained"
    )


def unchanged_row(
    production: registry.Production, run_id: str, run_dir: Path, started: datetime.datetime, flow_run_id: str | None
) -> dict[str, Any]:
    """The catalog row of a run that trained nothing: its model columns describe production."""
    return {
        "pipeline": production.pipeline, "run_id": run_id, "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc), "status": UNCHANGED,
        "config_hash": production.config_hash, "data_fingerprint": production.data_fingerprint,
        "test_accuracy": production.test_accuracy, "passed_gate": None, "gate_reason": unchanged_reason(production),
        "model": production.model, "saved_model": production.saved_model, "promoted_version": None,
        "report": None, "run_dir": str(run_dir), "flow_run_id": flow_run_id,
    }


def record_unchanged(
    run: RunContext, production: registry.Production, started: datetime.datetime, flow_run_id: str | None
) -> str:
    """Append the unchanged run's row to runs.parquet (and its run.json to the run's folder);
    returns the reason, for logs and the UI."""
    row = unchanged_row(production, run.run_id, run.run_dir, started, flow_run_id)
    tables.append_run(Path(run.artifacts_root) / "runs.parquet", row)
    return unchanged_reason(production)
