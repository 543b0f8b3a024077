"""The training flow: one pipeline of pipelines.yaml through the eight stages, then promotion."""

from __future__ import annotations

import datetime
import uuid
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from convflow.catalog import registry, retraining, runs
from convflow.config.derive import tuned_spec
from convflow.config.load import load_pipeline
from convflow.config.schema import PipelineSpec
from convflow.core.context import RunContext
from convflow.core.object_store import normalized_root
from convflow.core.records import Decision, RunSummary
from convflow.flows.asking import ask_a_person
from convflow.flows.sequences import EXPORT_CHECK_AHEAD, data_checks, model_stages, split_data
from convflow.runtime import events
from convflow.runtime.stage_runner import StageRunner
from convflow.tasks.promote import promote
from convflow.tasks.to_tfrecords import to_tfrecords
from convflow.tasks.write_report import write_report


def new_run_id(now: datetime.datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@flow(name="convflow-train", flow_run_name="{pipeline}")
def train_pipeline(
    pipeline: str,
    pipelines_file: str = "pipelines.yaml",
    artifacts: str = "artifacts",
    scheduled: bool = False,
    force: bool = False,
    tuned: dict[str, float] | None = None,
) -> RunSummary:
    """Download, preprocess, check the data, build, wrap, train, evaluate, export, promote and report
    one pipeline. A run whose data checks block ends in the state Blocked before training, with
    catalog status blocked; production is left as it was. Under `validate.on_block: ask` a blocked
    run (its data, or its model at the gate) first waits for a person's decision in the Prefect UI:
    approved, it goes on; the decision leads the run's gate reason in the catalog and the report.

    A `scheduled` run follows the pipeline's `retrain` policy: with the data and config that made
    the production model, it stops after download_and_split and records "unchanged"; `force`
    trains anyway. `tuned`: settings found by `convflow tune` (tune.space names) in place of the pipeline's.
    """
    started = datetime.datetime.now(datetime.UTC)
    spec = load_pipeline(pipelines_file, pipeline)
    if tuned:
        spec = tuned_spec(spec, tuned)
    run = RunContext(pipeline=pipeline, run_id=new_run_id(started), artifacts_root=normalized_root(artifacts))
    with StageRunner(run, ahead=(EXPORT_CHECK_AHEAD,)) as stages:
        split_set = split_data(stages, spec, run)
        if scheduled and not force:
            unchanged = retraining.unchanged_production(run.artifacts_root, spec, split_set.data_fingerprint)
            if unchanged is not None:
                reason = runs.record_unchanged(run, unchanged, started, flow_run.id)
                get_run_logger().info(reason)
                return Completed(name="Unchanged", message=reason)
        tfrecords = stages.run(to_tfrecords, split_set, spec.data, run)
        checks = data_checks(stages, spec, split_set, tfrecords, run)
        decisions = []
        if checks.verdict == "block":  # before training: a bad data drop costs no GPU time
            decisions += _asked(spec, "data checks", checks.blocking(), checks.report_html)
            if not (decisions and decisions[-1].approved):
                summary = runs.record_blocked(
                    run,
                    started,
                    spec.config_hash(),
                    split_set,
                    checks,
                    stages.timings,
                    flow_run.id,
                    next(iter(decisions), None),
                )
                get_run_logger().warning(summary.gate_reason)
                return Completed(name="Blocked", message=summary.gate_reason, data=summary)
        _, trained, evaluation, exported = model_stages(stages, spec, tfrecords, run)
    if not evaluation.passed_gate:
        asked = _asked(spec, "model gate", [evaluation.gate_reason], evaluation.metrics_parquet)
        decisions += asked
        if asked and asked[0].approved:
            evaluation = evaluation.model_copy(
                update={"passed_gate": True, "gate_reason": f"the gate failed: {evaluation.gate_reason}"}
            )
    exported = promote(exported, trained, evaluation, run, tfrecords)
    report = stages.run(
        write_report,
        spec.config_hash(),
        split_set,
        trained,
        evaluation,
        exported,
        stages.timings,
        run,
        tfrecords,
        checks,
        decisions,
    )
    summary = runs.summarize(
        run, started, spec.config_hash(), split_set, trained, evaluation, exported, report, stages.timings, decisions
    )
    runs.record(summary, run, flow_run.id, split_set, trained, evaluation, checks, tfrecords)
    _announce_promotion(run, summary)
    if not evaluation.passed_gate:  # a state of its own, so the Prefect UI shows the verdict
        return Completed(name="Not promoted", message=f"not promoted: {summary.gate_reason}", data=summary)
    return summary


def _announce_promotion(run: RunContext, summary: RunSummary) -> None:
    """convflow.model.promoted, when this run made a new production version (scoring on_promotion
    starts on it); a rerun whose model is production already made none."""
    production = registry.current(run.artifacts_root, run.pipeline)
    if summary.promoted_version is None or production is None or production.run_id != run.run_id:
        return
    details = {"test_accuracy": production.test_accuracy, "flow_run_id": str(flow_run.id)}
    events.emit_model_promoted(run.pipeline, production.version, run.run_id, details)
    get_run_logger().info(f"{events.MODEL_PROMOTED}: {run.pipeline} version {production.version}")


def _asked(
    spec: PipelineSpec, about: Literal["data checks", "model gate"], reasons: list[str], figures: str
) -> list[Decision]:
    """A person's decision on a blocked run under validate.on_block: ask (the run waits for it);
    none under fail."""
    if spec.validate_.on_block != "ask":
        return []
    return [ask_a_person(about, reasons, figures, spec.validate_.ask_timeout)]
