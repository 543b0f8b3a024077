"""Between to_tfrecords and build_base, check_data: this run's data against the data that made the
production model (class set and balance, counts, label conflicts, leakage, image property drift),
every figure recorded in checks.parquet, and a verdict. A blocked run stops here, before training,
so a bad data drop costs no GPU time. The checks themselves are convflow.checks.checks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from convflow.catalog.schemas import write_parquet
from convflow.checks.checks import results_table, run_data_checks, verdict
from convflow.checks.config import ValidateConfig
from convflow.core.context import RunContext
from convflow.core.records import DataChecks, SplitSet, TFRecordSet
from convflow.core.run_log import artifact_key
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.reporting.checks import checks_context, render_checks_page

RESULTS = "checks.parquet"
PAGE = "checks.html"  # the report of a blocked run


def check_images(
    split_set: SplitSet,
    tfrecords: TFRecordSet,
    validate: ValidateConfig,
    baseline: str | None,
    baseline_version: int | None,
    output_dir: Path,
    pipeline: str = "",
    run_id: str = "",
) -> DataChecks:
    """Run every data check of `validate` on the per-image table to_tfrecords measured, against
    `baseline` (the production version's table; None: only the checks that need no baseline). A
    failing check is not an error: its verdict is recorded, and the flow decides what stops."""
    current = pq.read_table(tfrecords.image_properties)
    results = run_data_checks(current, pq.read_table(baseline) if baseline else None, validate)
    worst, reasons = verdict(results)
    with staged_output(output_dir) as staging:
        write_parquet(results_table(results), staging / RESULTS)
        context = checks_context(str(staging / RESULTS), split_set.splits_parquet, split_set.images_npy)
        summary = f"{sum(row.verdict == 'block' for row in results)} blocking figure(s)." if worst == "block" else ""
        (staging / PAGE).write_text(render_checks_page(pipeline, run_id, worst, summary, context))
    return DataChecks(
        output_dir=str(output_dir),
        results_parquet=str(output_dir / RESULTS),
        report_html=str(output_dir / PAGE),
        verdict=worst,
        reasons=reasons,
        baseline_version=baseline_version,
        checks=len(results),
    )


@stage_task()
def check_data(
    split_set: SplitSet,
    tfrecords: TFRecordSet,
    validate: ValidateConfig,
    baseline: str | None,
    baseline_version: int | None,
    run: RunContext,
) -> DataChecks:
    """Prefect task over check_images. Its key holds the baseline's path: a promoted version's files
    never change, so a new production version (or a rollback) is a new key."""
    output_dir = run.stage_dir("check_data")
    checks = check_images(
        split_set, tfrecords, validate, baseline, baseline_version, output_dir, run.pipeline, run.run_id
    )
    _publish_table(checks, run.pipeline)
    return checks


def _publish_table(checks: DataChecks, pipeline: str) -> None:
    """Every figure as a Prefect table artifact: the UI shows the checks beside the run."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(pipeline)
    rows = pq.read_table(checks.results_parquet).drop(["files"]).to_pylist()
    create_table_artifact(key=f"{key}-data-checks", table=rows, description=f"Data checks: {checks.verdict}")
