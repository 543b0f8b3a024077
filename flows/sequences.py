"""The stage sequences that flows share: the data stages (training, compare and tune run them), the
model stages (training runs them; compare runs them once per variant), and the helper started
ahead of them. A flow's body is these calls and what it does with their records."""

from __future__ import annotations

from typing import NamedTuple

from prefect import task
from prefect.cache_policies import NO_CACHE

from convflow.catalog import registry
from convflow.catalog.comparisons import VariantResult
from convflow.config.schema import PipelineSpec
from convflow.core.context import RunContext
from convflow.core.hashing import sha256_file
from convflow.core.object_store import local_copy, local_record
from convflow.core.records import (
    DataChecks,
    Evaluation,
    ExportedModel,
    SplitSet,
    TFRecordSet,
    TrainedModel,
    WrappedModel,
)
from convflow.data.sources import source_fingerprint
from convflow.modeling.export_check import FRESH_PROCESS, FreshProcessCheck
from convflow.runtime.stage_runner import StageRunner, StartAhead
from convflow.tasks.build_base import build_base, weights_fingerprint
from convflow.tasks.check_data import check_data
from convflow.tasks.compare_variant import summarize_variant
from convflow.tasks.download_and_split import check_image_sizes, download_and_split
from convflow.tasks.evaluate import evaluate, score_untrained
from convflow.tasks.export_savedmodel import export_savedmodel
from convflow.tasks.freeze_and_wrap import freeze_and_wrap
from convflow.tasks.to_tfrecords import to_tfrecords
from convflow.tasks.train import train

# The export check's fresh process imports TensorFlow while Python builds, traces and trains the
# model: started before the model stages once a stage has missed its cache (the model is then new
# and will be exported), never during the data stages, whose worker processes need the CPU.
EXPORT_CHECK_AHEAD = StartAhead(FRESH_PROCESS, FreshProcessCheck, before=("build_base", "evaluate"))


class ModelStages(NamedTuple):
    wrapped: WrappedModel
    trained: TrainedModel
    evaluation: Evaluation
    exported: ExportedModel


def split_data(stages: StageRunner, spec: PipelineSpec, run: RunContext) -> SplitSet:
    """download_and_split, then a check that the images suit the model's base."""
    split_set = stages.run(download_and_split, spec.data, source_fingerprint(spec.data), run)
    check_image_sizes(split_set, spec.data, spec.model.base)
    return split_set


def data_stages(stages: StageRunner, spec: PipelineSpec, run: RunContext) -> tuple[SplitSet, TFRecordSet]:
    """split_data, then to_tfrecords."""
    split_set = split_data(stages, spec, run)
    return split_set, stages.run(to_tfrecords, split_set, spec.data, run)


def data_checks(
    stages: StageRunner, spec: PipelineSpec, split_set: SplitSet, tfrecords: TFRecordSet, run: RunContext
) -> DataChecks:
    """check_data, against the data of the pipeline's production version (when it kept any). Data
    that made production itself is compared with nothing, as evaluate's rival skips production's
    own model: it would pass every comparison, and a rerun's check_data stays a cache hit."""
    production = registry.current(run.artifacts_root, run.pipeline)
    if production is None or not production.image_properties or _made_from(production, split_set, tfrecords):
        return stages.run(check_data, split_set, tfrecords, spec.validate_, None, None, run)
    return stages.run(
        check_data, split_set, tfrecords, spec.validate_, production.image_properties, production.version, run
    )


def _made_from(production: registry.Production, split_set: SplitSet, tfrecords: TFRecordSet) -> bool:
    """Whether production was made from this very data: its lineage says so, or (a run stopped
    between promotion and recording its lineage) its per-image table is this run's, byte for byte."""
    if production.data_fingerprint is not None:
        return production.data_fingerprint == split_set.data_fingerprint
    return sha256_file(local_copy(production.image_properties)) == sha256_file(local_copy(tfrecords.image_properties))


def wrapped_model(stages: StageRunner, spec: PipelineSpec, tfrecords: TFRecordSet, run: RunContext) -> WrappedModel:
    """build_base, then freeze_and_wrap."""
    weights = weights_fingerprint(spec.model, run.artifacts_root)
    base = stages.run(build_base, spec.model, weights, tfrecords, spec.train.seed, run)
    return stages.run(freeze_and_wrap, base, spec.model, len(tfrecords.label_names), spec.train.seed, run)


def model_stages(
    stages: StageRunner,
    spec: PipelineSpec,
    tfrecords: TFRecordSet,
    run: RunContext,
    wrapped: WrappedModel | None = None,
) -> ModelStages:
    """wrapped_model (unless given), train, evaluate against production's model, export_savedmodel."""
    wrapped = wrapped or wrapped_model(stages, spec, tfrecords, run)
    trained = stages.run(train, wrapped, tfrecords, spec.train, spec.model.fine_tune, run)
    production = registry.rival(run.artifacts_root, run.pipeline, trained.model_path)
    evaluation = stages.run(
        evaluate, trained, tfrecords, spec.evaluate, spec.validate_.embedding_drift, production, run
    )
    exported = stages.run(export_savedmodel, trained, evaluation, tfrecords, run)
    return ModelStages(wrapped, trained, evaluation, exported)


@task(name="compare_variant", task_run_name="{name}", cache_policy=NO_CACHE, retries=0)
def compare_variant(name: str, spec: PipelineSpec, tfrecords: TFRecordSet, run: RunContext) -> VariantResult:
    """One compare variant's model stages, with the untrained model's score first: a task so that a
    comparison fans variants out on its task runner (threads or Dask). Each stage is a task of its
    own, cached as in a plain run, and retries transient errors; the variant itself does not retry."""
    stages = StageRunner(run)
    wrapped = wrapped_model(stages, spec, tfrecords, run)
    initial = score_untrained(local_record(wrapped), local_record(tfrecords))
    model = model_stages(stages, spec, tfrecords, run, wrapped)
    return summarize_variant(name, spec, initial, model.trained, model.evaluation, model.exported, stages.timings, run)
