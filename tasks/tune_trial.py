"""Tune, one trial: the pipeline with one candidate setting, built, trained and scored on the
validation split (the test split stays untouched for the final model's gate).

KerasTuner's oracles (random search, Hyperband) propose the settings and keep the search's state;
convflow's stages train each trial, so a trial is a Prefect task like any other stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import pydantic
from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.config.derive import tuned_spec
from convflow.config.schema import PipelineSpec, TuneConfig
from convflow.core.context import RunContext
from convflow.core.object_store import local_record
from convflow.core.records import TFRecordSet
from convflow.modeling import base_features
from convflow.tasks.build_base import build_base_model
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.train import train_model

# Hyperband's bookkeeping values among a trial's hyperparameters: not settings of the pipeline.
TUNER_KEYS = "tuner/"


class TrialResult(pydantic.BaseModel):
    """One trial: its settings and validation score, or why it failed."""

    model_config = pydantic.ConfigDict(frozen=True)

    trial_id: str
    settings: dict[str, int | float]
    epochs: int
    status: Literal["completed", "failed"]
    score: float | None = None
    seconds: float = 0.0
    error: str | None = None


def hyperparameters(tune: TuneConfig):
    """The search space as KerasTuner HyperParameters, one per tuned setting."""
    import keras_tuner as kt

    space = kt.HyperParameters()
    for name, candidates in tune.space.items():
        integer = name in TuneConfig.INTEGER_SETTINGS
        if candidates.values is not None:
            space.Choice(name, [int(value) if integer else value for value in candidates.values])
        elif integer:
            space.Int(
                name,
                int(candidates.min),
                int(candidates.max),
                step=int(candidates.step or 1),
                sampling="log" if candidates.log else "linear",
            )
        else:
            space.Float(
                name,
                candidates.min,
                candidates.max,
                step=candidates.step,
                sampling="log" if candidates.log else "linear",
            )
    return space


def make_oracle(tune: TuneConfig, epochs: int, directory: Path):
    """KerasTuner's oracle for tune.algorithm; a failed trial never ends the search (the cap is max_trials)."""
    import keras_tuner as kt

    common = {
        "objective": kt.Objective(tune.objective, "max" if tune.objective == "val_accuracy" else "min"),
        "seed": tune.seed,
        "hyperparameters": hyperparameters(tune),
        "max_consecutive_failed_trials": tune.max_trials + 1,
    }
    if tune.algorithm == "hyperband":
        oracle = kt.oracles.HyperbandOracle(max_epochs=epochs, factor=3, **common)
    else:
        oracle = kt.oracles.RandomSearchOracle(max_trials=tune.max_trials, **common)
    oracle._set_project_dir(str(directory), "oracle")  # where it keeps its trials; the Tuner class sets it so
    oracle.verbose = 0
    return oracle


def trial_settings(values: dict) -> tuple[dict[str, float], int | None]:
    """(the pipeline settings, Hyperband's epochs or None) of an oracle's proposed values."""
    settings = {name: value for name, value in values.items() if not name.startswith(TUNER_KEYS)}
    return settings, values.get("tuner/epochs")


def _score(history_parquet: str, objective: str, best_epoch: int | None) -> float:
    """The objective at the kept epoch: early stopping's best, else the last."""
    values = pq.read_table(history_parquet).column(objective).to_pylist()
    return float(values[best_epoch - 1] if best_epoch else values[-1])


def run_trial(
    spec: PipelineSpec, trial_id: str, settings: dict[str, float], epochs: int, tfrecords: TFRecordSet, run: RunContext
) -> TrialResult:
    """Train `spec` with `settings` for `epochs` head epochs under `run`'s tune folder; its validation score.

    Raises:
        ValidationError: the settings make the pipeline invalid.
        Exception: whatever building or training raises (out of memory, a NaN): the trial fails.
    """
    started = time.perf_counter()
    tuned = tuned_spec(spec, settings)
    train_settings = tuned.train.model_copy(update={"epochs": epochs})
    folder = run.run_dir / "trials" / trial_id
    base = build_base_model(tuned.model, tfrecords, train_settings.seed, folder / "base", run.artifacts_root)
    wrapped = freeze_and_wrap_model(
        base, tuned.model, len(tfrecords.label_names), train_settings.seed, folder / "wrapped"
    )
    cache = base_features.cache_dir(run.local_root, run.pipeline, wrapped, tfrecords, train_settings.precision)
    trained = train_model(
        wrapped,
        tfrecords,
        train_settings,
        folder / "checkpoint",
        folder / "train",
        tuned.model.fine_tune,
        feature_cache=cache,
    )
    score = _score(trained.history_parquet, spec.tune.objective, trained.best_epoch)
    return TrialResult(
        trial_id=trial_id,
        settings=settings,
        epochs=epochs,
        status="completed",
        score=score,
        seconds=time.perf_counter() - started,
    )


def failed_trial(trial_id: str, settings: dict[str, float], epochs: int, error: BaseException) -> TrialResult:
    return TrialResult(
        trial_id=trial_id, settings=settings, epochs=epochs, status="failed", error=f"{type(error).__name__}: {error}"
    )


@task(name="tune_trial", task_run_name="trial {trial_id}", cache_policy=NO_CACHE, retries=0)
def tune_trial(
    spec: PipelineSpec, trial_id: str, settings: dict[str, float], epochs: int, tfrecords: TFRecordSet, run: RunContext
) -> TrialResult:
    """Prefect task over run_trial. No retries: a trial that fails (out of memory, say) is recorded
    failed and the search goes on. On an object store's root the trial reads local copies of the
    shards; its scratch files (models, checkpoints) stay on this machine."""
    return run_trial(spec, trial_id, settings, epochs, local_record(tfrecords), run)


def search(
    tune: TuneConfig, epochs: int, directory: Path, run_one: Callable[[str, dict[str, float], int], TrialResult]
) -> list[TrialResult]:
    """Ask the oracle for up to tune.max_trials settings, run each with `run_one(trial id, settings,
    epochs)` and report its score back; a failed trial is told to the oracle as failed and the search goes on."""
    oracle = make_oracle(tune, epochs, directory)
    results: list[TrialResult] = []
    while len(results) < tune.max_trials:
        trial = oracle.create_trial("convflow")
        if trial.status != "RUNNING":  # the oracle has nothing more to try
            break
        settings, trial_epochs = trial_settings(trial.hyperparameters.values)
        result = run_one(trial.trial_id, settings, trial_epochs or epochs)
        if result.status == "completed":
            oracle.update_trial(trial.trial_id, {tune.objective: result.score})
            trial.status = "COMPLETED"
        else:
            trial.status, trial.message = "FAILED", result.error
        oracle.end_trial(trial)
        results.append(result)
    return results


def best_trial(results: list[TrialResult], objective: str) -> TrialResult | None:
    """The completed trial with the best score (val_accuracy highest, val_loss lowest); None if none completed."""
    completed = [result for result in results if result.status == "completed"]
    sign = -1 if objective == "val_accuracy" else 1
    return min(completed, key=lambda result: sign * result.score, default=None)
