"""Comparison stages of one variant: its export (promotion waits for the verdict), the measures it is
ranked by, the ranking and the winner's promotion."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.catalog.comparisons import VariantResult
from convflow.config.schema import PipelineSpec
from convflow.core.context import RunContext
from convflow.core.object_store import local_copy, local_record
from convflow.core.records import Evaluation, ExportedModel, StageRun, TFRecordSet, TrainedModel
from convflow.tasks.promote import promote_if_passed
from convflow.tfrecords import features

# Whether a higher value of each ranking metric is better.
HIGHER_IS_BETTER = {"test_accuracy": True, "macro_f1": True, "test_loss": False, "latency_ms": False}
LATENCY_IMAGES = 32
LATENCY_WARMUP = 3


def _class_scores(metrics_parquet: str) -> tuple[float, dict[str, float]]:
    rows = pq.read_table(metrics_parquet).to_pylist()
    per_class = {row["class_name"]: row["value"] for row in rows if row["metric"] == "f1"}
    return float(np.mean(list(per_class.values()))), per_class


def _parameters(model_summary_parquet: str) -> tuple[int, int]:
    rows = pq.read_table(model_summary_parquet).to_pylist()
    return sum(row["params"] for row in rows), sum(row["params"] for row in rows if row["trainable"])


def summarize_variant(
    name: str,
    spec: PipelineSpec,
    initial: tuple[float, float],
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    stages: list[StageRun],
    run: RunContext,
) -> VariantResult:
    """A completed variant's result, from its stage records, in the process that ran it."""
    macro_f1, per_class = _class_scores(local_copy(evaluation.metrics_parquet))
    total, trainable = _parameters(local_copy(trained.model_summary_parquet))
    return VariantResult(
        name=name,
        status="completed",
        run_id=run.run_id,
        config_hash=spec.config_hash(),
        pid=os.getpid(),
        initial_accuracy=initial[0],
        initial_loss=initial[1],
        test_accuracy=evaluation.test_accuracy,
        test_loss=evaluation.test_loss,
        macro_f1=macro_f1,
        per_class_f1=per_class,
        total_params=total,
        trainable_params=trainable,
        stages=stages,
        trained=trained,
        evaluation=evaluation,
        exported=exported,
    )


def failed_variant(name: str, error: BaseException | list[str], run_id: str | None = None) -> VariantResult:
    """A variant that did not complete: invalid config (its problems) or an exception in a stage."""
    if isinstance(error, list):
        message = "invalid config: " + "; ".join(error)
    else:
        message = f"{type(error).__name__}: {error}"
    return VariantResult(name=name, status="failed", error=message, run_id=run_id)


def _folder_megabytes(folder: str) -> float:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) / 1e6


def _latency_images(tfrecords: TFRecordSet) -> np.ndarray:
    dataset = features.read_dataset(
        tfrecords.shards["test"], tfrecords.image_size, tfrecords.channels, LATENCY_IMAGES, cache=False
    )
    images, _ = next(iter(dataset))
    return images.numpy().astype(np.uint8)


def saved_model_latency_ms(saved_model: str, images: np.ndarray) -> float:
    """Median milliseconds of the serving signature on one raw image, after a few warm-up calls."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)  # keep referenced while calling its signature
    serve = loaded.signatures["serving_default"]
    singles = [tf.constant(image[np.newaxis]) for image in images]
    for image in singles[:LATENCY_WARMUP]:
        serve(images=image)
    timings = []
    for image in singles:
        started = time.perf_counter()
        serve(images=image)["probabilities"].numpy()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def measure_saved_models(results: list[VariantResult], tfrecords: TFRecordSet) -> list[VariantResult]:
    """Add each completed variant's SavedModel size and latency.

    Measured one variant after another in one process once every variant has trained, so that
    no variant's timing pays for another's training.
    """
    images = _latency_images(local_record(tfrecords)) if any(result.completed for result in results) else None
    measured = []
    for result in results:
        if result.completed:
            saved_model = str(local_copy(result.exported.saved_model))
            result = result.model_copy(
                update={
                    "saved_model_mb": _folder_megabytes(saved_model),
                    "latency_ms": saved_model_latency_ms(saved_model, images),
                }
            )
        measured.append(result)
    return measured


def rank_variants(results: list[VariantResult], metric: str) -> list[VariantResult]:
    """Completed variants best first by `metric` with rank 1, 2, ...; a tie goes to the lower test
    loss (by test_loss: the higher accuracy), then to the config's order. The failed ones follow,
    unranked."""
    completed = [result for result in results if result.completed]
    sign = -1 if HIGHER_IS_BETTER[metric] else 1
    tie_break = (lambda r: -r.test_accuracy) if metric == "test_loss" else (lambda r: r.test_loss)
    ordered = sorted(completed, key=lambda result: (sign * result.metric(metric), tie_break(result)))
    ranked = [result.model_copy(update={"rank": index}) for index, result in enumerate(ordered, start=1)]
    return ranked + [result for result in results if not result.completed]


def promote_winner(
    ranked: list[VariantResult], promote: str, run: RunContext, tfrecords: TFRecordSet | None = None
) -> tuple[list[VariantResult], str]:
    """Send the winner (rank 1) alone through promotion when `promote` is best; the gate verdict
    is the one its evaluation gave against production. Returns the results and the verdict."""
    winner = ranked[0] if ranked and ranked[0].completed else None
    if winner is None:
        return ranked, "no variant completed: nothing to promote"
    if promote == "none":
        return ranked, f"compare.promote is none: {winner.name} won, nothing was promoted"
    winner_run = run.model_copy(update={"run_id": winner.run_id})
    exported = promote_if_passed(winner.exported, winner.trained, winner.evaluation, winner_run, tfrecords)
    ranked = [winner.model_copy(update={"exported": exported}), *ranked[1:]]
    if exported.promoted_version is None:
        return ranked, f"{winner.name} won but was not promoted: {winner.evaluation.gate_reason}"
    return ranked, f"{winner.name} won and is production version {exported.promoted_version}"


@task(name="measure_saved_models", cache_policy=NO_CACHE, retries=0)
def measure_variants(results: list[VariantResult], tfrecords: TFRecordSet) -> list[VariantResult]:
    """Prefect task over measure_saved_models."""
    return measure_saved_models(results, tfrecords)
