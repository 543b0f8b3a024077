"""The training flow: one pipeline of pipelines.yaml through the eight stages, then promotion."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from convflow.catalog import registry
from convflow.catalog import retraining
from convflow.catalog import runs
from convflow.config.schema import load_pipeline, tuned_spec
from convflow.flows.stage_runner import StageRunner
from convflow.data.sources import source_fingerprint
from convflow.tasks.build_base import build_base, weights_fingerprint
from convflow.tasks.download_and_split import check_image_sizes, download_and_split
from convflow.tasks.evaluate import evaluate
from convflow.tasks.export_savedmodel import export_savedmodel, prestarted_fresh_process
from convflow.tasks.freeze_and_wrap import freeze_and_wrap
from convflow.tasks.promote import promote
from convflow.core.records import RunSummary
from convflow.core.stage import RunContext
from convflow.tasks.to_tfrecords import to_tfrecords
from convflow.tasks.train import train
from convflow.tasks.write_report import write_report


def new_run_id(now: datetime.datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@flow(name="convflow-train", flow_run_name="{pipeline}")
def train_pipeline(
    pipeline: str, pipelines_file: str = "pipelines.yaml", artifacts: str = "artifacts",
    scheduled: bool = False, force: bool = False, tuned: dict[str, float] | None = None,
) -> RunSummary:
    """Download, preprocess, build, wrap, train, evaluate, export, promote and report one pipeline.

    A `scheduled` run follows the pipeline's `retrain` policy: with the data and config that made
    the production model, it stops after download_and_split and records "unchanged"; `force`
    trains anyway. `tuned`: settings found by `convflow tune` (tune.space names) in place of the pipeline's.
    """
    started = datetime.datetime.now(datetime.timezone.utc)
    spec = load_pipeline(pipelines_file, pipeline)
    if tuned:
        spec = tuned_spec(spec, tuned)
    run = RunContext(pipeline=pipeline, run_id=new_run_id(started), artifacts_root=str(Path(artifacts).resolve()))
    stages = StageRunner(run)
    split_set = stages.run(download_and_split, spec.data, source_fingerprint(spec.data), run)
    check_image_sizes(split_set, spec.data, spec.model.base)
    if scheduled and not force:
        unchanged = retraining.unchanged_production(Path(run.artifacts_root), spec, split_set.data_fingerprint)
        if unchanged is not None:
            reason = runs.record_unchanged(run, unchanged, started, flow_run.id)
            get_run_logger().info(reason)
            return Completed(name="Unchanged", message=reason)
    tfrecords = stages.run(to_tfrecords, split_set, spec.data, run)
    # After a stage that missed its cache, the model will be new and exported: the export check's
    # fresh process imports TensorFlow meanwhile (on a CPU, while Python builds and traces the model).
    with prestarted_fresh_process(enabled=stages.missed_any):
        base = stages.run(build_base, spec.model, weights_fingerprint(spec.model, Path(run.artifacts_root)),
                          tfrecords, spec.train.seed, run)
        wrapped = stages.run(freeze_and_wrap, base, spec.model, len(tfrecords.label_names), spec.train.seed, run)
        trained = stages.run(train, wrapped, tfrecords, spec.train, spec.model.fine_tune, run)
        production = registry.rival(Path(run.artifacts_root), pipeline, trained.model_path)
        with prestarted_fresh_process(enabled=not stages.last_cached):  # when the data stages were cached
            evaluation = stages.run(evaluate, trained, tfrecords, spec.evaluate, production, run)
            exported = stages.run(export_savedmodel, trained, evaluation, tfrecords, run)
    exported = promote(exported, trained, evaluation, run)
    report = stages.run(write_report, spec.config_hash(), split_set, trained, evaluation, exported, stages.timings,
                        run, tfrecords)
    summary = runs.summarize(run, started, spec.config_hash(), split_set, trained, evaluation, exported, report,
                             stages.timings)
    runs.record(summary, run, flow_run.id, split_set, trained, evaluation)
    if not evaluation.passed_gate:  # a state of its own, so the Prefect UI shows the verdict
        return Completed(name="Not promoted", message=f"not promoted: {evaluation.gate_reason}", data=summary)
    return summary
