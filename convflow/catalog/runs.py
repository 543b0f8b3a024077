"""A run as the catalog keeps it: its summary (what `convflow run` prints and returns), its row in
runs.parquet (and run.json in its folder), and the lineage of a model that reached production.
The flows call these; they build no rows themselves."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convflow.catalog import registry, schemas, tables
from convflow.core.context import RunContext
from convflow.core.object_store import local_root
from convflow.core.records import (
    DataChecks,
    Decision,
    Evaluation,
    ExportedModel,
    Report,
    RunSummary,
    SplitSet,
    StageRun,
    TFRecordSet,
    TrainedModel,
)

if TYPE_CHECKING:  # the comparison's module imports what a training run does not need
    from convflow.catalog.comparisons import Comparison

UNCHANGED = "unchanged"
BLOCKED = "blocked"


def summarize(
    run: RunContext,
    started: datetime.datetime,
    config_hash: str,
    split_set: SplitSet,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    report: Report,
    stages: list[StageRun],
    decisions: list[Decision] | None = None,
) -> RunSummary:
    """The summary of a run that went through every stage; a person's `decisions` on its blocks
    (validate.on_block: ask) lead its gate reason."""
    return RunSummary(
        pipeline=run.pipeline,
        run_id=run.run_id,
        status="completed" if evaluation.passed_gate else "not-promoted",
        started=started.isoformat(),
        config_hash=config_hash,
        data_fingerprint=split_set.data_fingerprint,
        test_accuracy=evaluation.test_accuracy,
        passed_gate=evaluation.passed_gate,
        gate_reason=with_decisions(evaluation.gate_reason, decisions),
        model=trained.model_path,
        saved_model=exported.saved_model,
        report=report.report_html,
        resumed_from_epoch=trained.resumed_from_epoch,
        promoted_version=exported.promoted_version,
        stages=stages,
    )


def catalog_row(
    summary: RunSummary,
    run_dir: Path | None,
    flow_run_id: Any = None,
    comparison_id: str | None = None,
    variant: str | None = None,
    run_tables: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The runs.parquet row of one run, or of one variant of a comparison; `run_tables` maps
    schemas.RUN_TABLES names to the run's Parquet files."""
    return {
        **summary.model_dump(
            include={
                "pipeline",
                "run_id",
                "status",
                "config_hash",
                "data_fingerprint",
                "test_accuracy",
                "passed_gate",
                "gate_reason",
                "model",
                "saved_model",
                "promoted_version",
                "report",
            }
        ),
        "started": datetime.datetime.fromisoformat(summary.started),
        "finished": datetime.datetime.now(datetime.UTC),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "flow_run_id": str(flow_run_id) if flow_run_id is not None else None,
        "comparison_id": comparison_id,
        "variant": variant,
        **{f"{name}_parquet": (run_tables or {}).get(name) for name in schemas.RUN_TABLES},
    }


def record(
    summary: RunSummary,
    run: RunContext,
    flow_run_id: Any,
    split_set: SplitSet,
    trained: TrainedModel,
    evaluation: Evaluation,
    checks: DataChecks | None = None,
    tfrecords: TFRecordSet | None = None,
) -> None:
    """Append the run's catalog row; when its model passed the gate, note on the production record
    which config and data made it (the next scheduled run's retraining policy reads that)."""
    if evaluation.passed_gate:
        registry.record_lineage(
            run.artifacts_root, run.pipeline, trained.model_path, summary.config_hash, summary.data_fingerprint
        )
    run_tables = {
        "splits": split_set.splits_parquet,
        # The per-image table: `convflow promote RUN_ID` keeps it as the next runs' data checks baseline.
        "image_properties": tfrecords.image_properties if tfrecords else None,
        "checks": checks.results_parquet if checks else None,
        "history": trained.history_parquet,
        "metrics": evaluation.metrics_parquet,
        "predictions": evaluation.predictions_parquet,
        "model_checks": evaluation.model_checks_parquet,
    }
    tables.append_to_catalog(run.artifacts_root, catalog_row(summary, run.run_dir, flow_run_id, run_tables=run_tables))


def unchanged_reason(production: registry.Production) -> str:
    return (
        f"unchanged since production version {production.version} (run {production.run_id}): "
        f"same config hash {production.config_hash} and data fingerprint {production.data_fingerprint}; "
        "nothing trained"
    )


def record_unchanged(
    run: RunContext, production: registry.Production, started: datetime.datetime, flow_run_id: Any
) -> str:
    """Append the row of a scheduled run that trained nothing (its model columns describe
    production) and its run.json; returns the reason, for logs and the UI."""
    summary = RunSummary(
        pipeline=production.pipeline,
        run_id=run.run_id,
        status=UNCHANGED,
        started=started.isoformat(),
        config_hash=production.config_hash,
        data_fingerprint=production.data_fingerprint,
        test_accuracy=production.test_accuracy,
        passed_gate=None,
        gate_reason=unchanged_reason(production),
        model=production.model,
        saved_model=production.saved_model,
        report=None,
        resumed_from_epoch=0,
        stages=[],
    )
    tables.append_to_catalog(run.artifacts_root, catalog_row(summary, run.run_dir, flow_run_id))
    return summary.gate_reason


def with_decisions(reason: str, decisions: list[Decision] | None) -> str:
    """`reason` led by each decision a person made on the run, so the catalog keeps who let it on and why."""
    return "; ".join([decision.line() for decision in decisions or []] + [reason])


def blocked_reason(checks: DataChecks) -> str:
    blocks = checks.blocking()
    return f"blocked by {len(blocks)} data check(s), nothing trained: " + "; ".join(blocks)


def record_blocked(
    run: RunContext,
    started: datetime.datetime,
    config_hash: str,
    split_set: SplitSet,
    checks: DataChecks,
    stages: list[StageRun],
    flow_run_id: Any,
    decision: Decision | None = None,
) -> RunSummary:
    """Append the row of a run its data checks blocked before training (its model columns describe
    production, which it left as it was) and its run.json; returns its summary. `decision`: a
    person's rejection, or the lack of one in time (validate.on_block: ask)."""
    production = registry.current(run.artifacts_root, run.pipeline)
    summary = RunSummary(
        pipeline=run.pipeline,
        run_id=run.run_id,
        status=BLOCKED,
        started=started.isoformat(),
        config_hash=config_hash,
        data_fingerprint=split_set.data_fingerprint,
        test_accuracy=production.test_accuracy if production else None,
        passed_gate=None,
        gate_reason=blocked_reason(checks) + (f"; {decision.line()}" if decision else ""),
        model=production.model if production else None,
        saved_model=production.saved_model if production else None,
        report=checks.report_html,
        resumed_from_epoch=0,
        stages=stages,
    )
    run_tables = {"splits": split_set.splits_parquet, "checks": checks.results_parquet}
    row = catalog_row(summary, run.run_dir, flow_run_id, run_tables=run_tables)
    tables.append_to_catalog(run.artifacts_root, row)
    return summary


def record_variant_runs(comparison: Comparison, artifacts_root: str | Path, flow_run_id: Any = None) -> None:
    """Append one runs.parquet row per completed variant, with the comparison's id (failed variants
    are in comparison.parquet only: like a failed `convflow run`, they finished no run). Only the
    promoted winner's status is completed; the others are not-promoted, with why."""
    for variant in comparison.variants:
        if not variant.completed:
            continue
        promoted = variant.rank == 1 and variant.promoted_version is not None
        gate_reason = variant.evaluation.gate_reason + ("" if promoted else f"; {comparison.verdict}")
        summary = RunSummary(
            pipeline=comparison.pipeline,
            run_id=variant.run_id,
            status="completed" if promoted else "not-promoted",
            started=comparison.started,
            config_hash=variant.config_hash,
            data_fingerprint=comparison.data_fingerprint,
            test_accuracy=variant.test_accuracy,
            passed_gate=variant.passed_gate,
            gate_reason=gate_reason,
            model=variant.trained.model_path,
            saved_model=variant.exported.saved_model,
            report=comparison.report,
            resumed_from_epoch=variant.trained.resumed_from_epoch,
            promoted_version=variant.promoted_version,
            stages=variant.stages,
        )
        run_dir = local_root(artifacts_root) / comparison.pipeline / variant.run_id
        run_tables = {
            "history": variant.trained.history_parquet,
            "metrics": variant.evaluation.metrics_parquet,
            "predictions": variant.evaluation.predictions_parquet,
            "model_checks": variant.evaluation.model_checks_parquet,
        }
        row = catalog_row(summary, run_dir, flow_run_id, comparison.comparison_id, variant.name, run_tables)
        tables.append_to_catalog(artifacts_root, row)
