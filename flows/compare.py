"""The comparison flow: a pipeline's data stages once, then its compare variants side by side."""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from convflow.catalog import runs
from convflow.catalog.comparisons import Comparison, VariantResult
from convflow.config.derive import variant_specs
from convflow.config.errors import ConfigError
from convflow.config.load import check_pipeline, load_pipeline
from convflow.config.schema import CompareConfig, PipelineSpec
from convflow.core.context import RunContext
from convflow.core.object_store import normalized_root
from convflow.core.records import TFRecordSet
from convflow.flows.sequences import compare_variant, data_checks, data_stages
from convflow.runtime.stage_runner import StageRunner
from convflow.tasks.compare_report import compare_report
from convflow.tasks.compare_variant import failed_variant, measure_variants, promote_winner, rank_variants


def new_comparison_id(now: datetime.datetime) -> str:
    return f"cmp-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def task_runner(compare: CompareConfig, variants: int, dask_workers: int | None = None):
    """The task runner the variants fan out on, and its description for the report.

    sequential (the default) is a pool of one thread. Keras seeds through process-wide random
    state, so variants built and trained at once in threads of one process draw each other's
    random numbers: the same config then gives different initial weights from run to run.
    Worker processes (dask, or `dask_workers`) each have their own.

    Raises:
        ImportError: Dask asked for without the dask extra installed.
    """
    if dask_workers is None and compare.runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1), "sequential (one variant at a time)"
    if dask_workers is None and compare.runner == "threads":
        workers = compare.workers or variants
        return ThreadPoolTaskRunner(max_workers=workers), f"threads ({workers} at a time)"
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise ImportError("the dask runner needs prefect-dask: pip install 'convflow[dask]'") from error
    import dask

    workers = dask_workers or compare.workers or min(variants, os.cpu_count() or 1)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler's start-up chatter
    # A variant whose worker dies (out of memory, say) is retried once on another worker, then
    # fails alone with KilledWorker; Dask's default would start it four times.
    dask.config.set({"distributed.scheduler.allowed-failures": 1})
    # One thread per worker: each process trains one variant at a time, with TensorFlow to itself.
    cluster = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster), f"dask ({workers} worker processes)"


def _outcome(name: str, spec: PipelineSpec | list[str], future: PrefectFuture | None, run_id: str) -> VariantResult:
    """A variant's result, or its failure: invalid config (never submitted) or a failed task."""
    if future is None:
        return failed_variant(name, spec)
    future.wait()
    if future.state.is_completed():
        return future.result()
    return failed_variant(name, future.state.result(raise_on_failure=False), run_id)


@flow(name="convflow-compare", flow_run_name="{pipeline}", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compare_pipeline(
    pipeline: str,
    pipelines_file: str = "pipelines.yaml",
    artifacts: str = "artifacts",
    runner: str = "sequential",
) -> Comparison:
    """Run the data stages of `pipeline` once, fan its compare variants out on the flow's task
    runner, rank them, promote the winner when compare.promote is best, and report. Data that the
    data checks block trains no variant (Comparison.blocked; validate.on_block: ask is not asked here).

    Raises:
        ConfigError: the pipeline is invalid or has no compare section.
    """
    started = datetime.datetime.now(datetime.UTC)
    spec = load_pipeline(pipelines_file, pipeline)
    if spec.compare is None:
        raise ConfigError(Path(pipelines_file), [f"pipelines.{pipeline}.compare: required by convflow compare"])
    root = normalized_root(artifacts)
    run = RunContext(pipeline=pipeline, run_id=new_comparison_id(started), artifacts_root=root)
    stages = StageRunner(run)
    split_set, tfrecords = data_stages(stages, spec, run)
    checks = data_checks(stages, spec, split_set, tfrecords, run)
    if checks.verdict == "block":  # before training: no variant trains on a bad data drop
        ranked, verdict = [], runs.blocked_reason(checks)
        get_run_logger().warning(verdict)
    else:
        ranked, verdict = _run_variants(spec, Path(pipelines_file).resolve().parent, tfrecords, run)
    comparison = Comparison(
        pipeline=pipeline,
        comparison_id=run.run_id,
        started=started.isoformat(),
        metric=spec.compare.metric,
        promote=spec.compare.promote,
        runner=runner,
        flow_pid=os.getpid(),
        data_fingerprint=split_set.data_fingerprint,
        counts=tfrecords.counts,
        label_names=tfrecords.label_names,
        variants=ranked,
        verdict=verdict,
        stages=stages.timings,
        overrides={v.name: v.model_dump(include={"model", "train", "evaluate"}) for v in spec.compare.variants},
        blocked=checks.verdict == "block",
    )
    report = stages.run(compare_report, comparison, run)
    comparison = comparison.model_copy(update={"report": report.report_html, "stages": stages.timings})
    runs.record_variant_runs(comparison, run.artifacts_root, flow_run.id)
    return comparison


def _run_variants(
    spec: PipelineSpec, base_dir: Path, tfrecords: TFRecordSet, run: RunContext
) -> tuple[list[VariantResult], str]:
    """Each compare variant trained on the task runner, measured and ranked; the winner promoted
    when compare.promote is best. The results by rank, and the verdict."""
    variants = variant_specs(spec, base_dir)
    variant_runs = {name: run.model_copy(update={"run_id": f"{run.run_id}-{name}"}) for name in variants}
    futures = {
        name: compare_variant.submit(name, variant, tfrecords, variant_runs[name])
        for name, variant in variants.items()
        if isinstance(variant, PipelineSpec)
    }
    results = [
        _outcome(name, variant, futures.get(name), variant_runs[name].run_id) for name, variant in variants.items()
    ]
    results = measure_variants(results, tfrecords)
    return promote_winner(rank_variants(results, spec.compare.metric), spec.compare.promote, run, tfrecords)


def run_comparison(pipeline: str, pipelines_file: str, artifacts: str, dask_workers: int | None = None) -> Comparison:
    """compare_pipeline on the task runner that the pipeline's compare section (or `dask_workers`) asks for.

    Raises:
        ConfigError: the pipeline is invalid or has no compare section.
        ImportError: Dask asked for without prefect-dask installed.
    """
    spec, _ = check_pipeline(pipelines_file, pipeline)  # compare_pipeline logs the other pipelines' mistakes
    if spec.compare is None:
        raise ConfigError(Path(pipelines_file), [f"pipelines.{pipeline}.compare: required by convflow compare"])
    variants = variant_specs(spec, Path(pipelines_file).resolve().parent)
    valid = [variant for variant in variants.values() if isinstance(variant, PipelineSpec)]
    runner, description = task_runner(spec.compare, max(1, len(valid)), dask_workers)
    return compare_pipeline.with_options(task_runner=runner)(pipeline, pipelines_file, artifacts, description)
