"""After export: a model that passed the gate becomes the production model, as TFX's Pusher
follows its Evaluator. Its own task and never cached: whether to promote depends on what the
registry holds now, not only on the stage records."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.catalog import registry
from convflow.core.context import RunContext
from convflow.core.records import Evaluation, ExportedModel, TFRecordSet, TrainedModel
from convflow.core.retries import retry_on_transient_error
from convflow.core.run_log import run_logger


def promote_if_passed(
    exported: ExportedModel,
    trained: TrainedModel,
    evaluation: Evaluation,
    run: RunContext,
    tfrecords: TFRecordSet | None = None,
) -> ExportedModel:
    """Copy a gate-passing export into the registry as the new production version (unless this
    very model is production already: a rerun does not duplicate it), with the per-image table of
    `tfrecords`' data as the next runs' check baseline and its test split as their reference set;
    the export with its version."""
    if not evaluation.passed_gate:
        return exported
    production = registry.current(run.artifacts_root, run.pipeline)
    if production is not None and production.model == trained.model_path:
        return exported.model_copy(update={"promoted_version": production.version})
    production = registry.promote(
        run.artifacts_root,
        run.pipeline,
        run.run_id,
        exported.saved_model,
        trained.model_path,
        evaluation.test_accuracy,
        image_properties=tfrecords.image_properties if tfrecords else None,
        reference_set=registry.ReferenceSet.of_test_split(tfrecords) if tfrecords else None,
    )
    return exported.model_copy(update={"promoted_version": production.version})


@task(
    name="promote",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_transient_error,
)
def promote(
    exported: ExportedModel,
    trained: TrainedModel,
    evaluation: Evaluation,
    run: RunContext,
    tfrecords: TFRecordSet | None = None,
) -> ExportedModel:
    """Prefect task over promote_if_passed; transient I/O errors retry."""
    promoted = promote_if_passed(exported, trained, evaluation, run, tfrecords)
    if promoted.promoted_version is None:
        run_logger().info(f"not promoted: {evaluation.gate_reason}")
    else:
        run_logger().info(f"production model of {run.pipeline}: version {promoted.promoted_version}")
    return promoted
