"""The training flow: one pipeline of pipelines.yaml through the eight stages."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from convflow import registry, retraining, tables
from convflow.config import load_pipeline
from convflow.flows.stage_log import StageLog
from convflow.sources import source_stamp
from convflow.tasks.build_base import build_base, weights_stamp
from convflow.tasks.download_and_split import check_image_sizes, download_and_split
from convflow.tasks.evaluate import evaluate
from convflow.tasks.export_savedmodel import export_savedmodel, prestarted_fresh_process
from convflow.tasks.freeze_and_wrap import freeze_and_wrap
from convflow.tasks.records import RunSummary
from convflow.tasks.stage import RunContext
from convflow.tasks.to_tfrecords import to_tfrecords
from convflow.tasks.train import train
from convflow.tasks.write_report import write_report


def new_run_id(now: datetime.datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@flow(name="convflow-train", flow_run_name="{pipeline}")
def train_pipeline(
    pipeline: str, pipelines_file: str = "pipelines.yaml", artifacts: str = "artifacts",
    scheduled: bool = False, force: bool = False,
) -> RunSummary:
    """Download, preprocess, build, wrap, train, evaluate, export and report one pipeline.

    A `scheduled` run follows the pipeline's `retrain` policy: with the data and config that made
    the production model, it stops after download_and_split and records "unchanged"; `force`
    trains anyway.
    """
    started = datetime.datetime.now(datetime.timezone.utc)
    spec = load_pipeline(pipelines_file, pipeline)
    run = RunContext(pipeline=pipeline, run_id=new_run_id(started), artifacts_root=str(Path(artifacts).resolve()))
    log = StageLog()
    split_set = log.run(download_and_split, spec.data, source_stamp(spec.data), run)
    check_image_sizes(split_set, spec.data, spec.model.base)
    if scheduled and not force:
        unchanged = retraining.unchanged_production(Path(run.artifacts_root), spec, split_set.data_fingerprint)
        if unchanged is not None:
            reason = retraining.record_unchanged(run, unchanged, started, flow_run.id)
            get_run_logger().info(reason)
            return Completed(name="Unchanged", message=reason)
    tfrecords = log.run(to_tfrecords, split_set, spec.data, run)
    weights = weights_stamp(spec.model, Path(run.artifacts_root))
    base = log.run(build_base, spec.model, weights, tfrecords, spec.train.seed, run)
    wrapped = log.run(freeze_and_wrap, base, spec.model, len(tfrecords.label_names), spec.train.seed, run)
    trained = log.run(train, wrapped, tfrecords, spec.train, spec.model.fine_tune, run)
    production = registry.rival(Path(run.artifacts_root), pipeline, trained.model_path)
    # A new model will be exported: the export check's fresh process imports TensorFlow meanwhile.
    with prestarted_fresh_process(enabled=not log.stages[-1].cached):
        evaluation = log.run(evaluate, trained, tfrecords, spec.evaluate, production, run)
        exported = log.run(export_savedmodel, trained, evaluation, tfrecords, run)
    report = log.run(write_report, spec.config_hash(), split_set, trained, evaluation, exported, log.stages, run)
    if evaluation.passed_gate:  # note what made production, for the next scheduled run's policy
        registry.record_lineage(
            Path(run.artifacts_root), pipeline, trained.model_path, spec.config_hash(), split_set.data_fingerprint
        )
    summary = RunSummary(
        pipeline=pipeline, run_id=run.run_id, status="completed" if evaluation.passed_gate else "not-promoted",
        started=started.isoformat(), config_hash=spec.config_hash(), data_fingerprint=split_set.data_fingerprint,
        test_accuracy=evaluation.test_accuracy, passed_gate=evaluation.passed_gate,
        gate_reason=evaluation.gate_reason, model=trained.model_path, saved_model=exported.saved_model, report=report.report_html,
        resumed_from_epoch=trained.resumed_from_epoch, promoted_version=exported.promoted_version, stages=log.stages,
    )
    run_tables = {
        "splits": split_set.splits_parquet, "history": trained.history_parquet,
        "metrics": evaluation.metrics_parquet, "predictions": evaluation.predictions_parquet,
    }
    row = tables.catalog_row(summary, run.run_dir, flow_run.id, run_tables=run_tables)
    tables.append_run(Path(run.artifacts_root) / "runs.parquet", row)
    if not evaluation.passed_gate:  # a state of its own, so the Prefect UI shows the verdict
        return Completed(name="Not promoted", message=f"not promoted: {evaluation.gate_reason}", data=summary)
    return summary
