"""The tune flow: a pipeline's data stages once, a KerasTuner search whose trials are Prefect tasks,
then the final model trained with the best setting by the training flow (its gate, promotion and report)."""

from __future__ import annotations

import datetime
from pathlib import Path

from prefect import flow

from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline
from convflow.config.schema import PipelineSpec
from convflow.core.context import RunContext
from convflow.core.object_store import normalized_root
from convflow.core.records import TFRecordSet
from convflow.flows.sequences import data_stages
from convflow.flows.train_pipeline import new_run_id, train_pipeline
from convflow.runtime.stage_runner import StageRunner
from convflow.tasks.tune_report import Tuning, tune_report
from convflow.tasks.tune_trial import TrialResult, best_trial, failed_trial, search, tune_trial


def _trial_runner(spec: PipelineSpec, tfrecords: TFRecordSet, run: RunContext):
    """run_one for search(): each trial a tune_trial task run; a failed one becomes a failed TrialResult."""

    def run_one(trial_id: str, settings: dict[str, float], epochs: int) -> TrialResult:
        future = tune_trial.submit(spec, trial_id, settings, epochs, tfrecords, run)
        future.wait()
        if future.state.is_completed():
            return future.result()
        return failed_trial(trial_id, settings, epochs, future.state.result(raise_on_failure=False))

    return run_one


@flow(name="convflow-tune", flow_run_name="{pipeline}")
def tune_pipeline(pipeline: str, pipelines_file: str = "pipelines.yaml", artifacts: str = "artifacts") -> Tuning:
    """Split and write the data once, search tune.space (each trial a task, scored on the validation
    split), train the final model with the best setting through the training flow, and report.

    Raises:
        ConfigError: the pipeline is invalid or has no tune section.
    """
    spec = load_pipeline(pipelines_file, pipeline)
    if spec.tune is None:
        raise ConfigError(Path(pipelines_file), [f"pipelines.{pipeline}.tune: required by convflow tune"])
    run = RunContext(
        pipeline=pipeline,
        run_id=f"tune-{new_run_id(datetime.datetime.now(datetime.UTC))}",
        artifacts_root=normalized_root(artifacts),
    )
    stages = StageRunner(run)
    _, tfrecords = data_stages(stages, spec, run)
    oracle_dir = run.run_dir / "oracle"
    trials = search(spec.tune, spec.tune.epochs or spec.train.epochs, oracle_dir, _trial_runner(spec, tfrecords, run))
    best = best_trial(trials, spec.tune.objective)
    final = train_pipeline(pipeline, pipelines_file, artifacts, tuned=best.settings) if best else None
    tuning = Tuning(
        pipeline=pipeline,
        tune_id=run.run_id,
        algorithm=spec.tune.algorithm,
        objective=spec.tune.objective,
        trials=trials,
        best=best,
        final=final,
    )
    report = stages.run(tune_report, tuning, run)
    return tuning.model_copy(update={"report": report.report_html})
