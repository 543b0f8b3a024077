"""One attempt of a pipeline's train stage, as a flow run on a work pool's worker (the deployment
`convflow-train-stage/<pool>`; convflow/runtime/work_pool.py starts it and starts another when it is lost).

Records travel as parameters and as one JSON file per attempt under the run's folder: the
artifacts root must be the same path on the flow's machine and on every worker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import flow, get_run_logger

from convflow.config.schema import FineTuneConfig, TrainConfig
from convflow.core.context import RunContext
from convflow.core.records import TFRecordSet, TrainedModel, WrappedModel
from convflow.core.storage import atomic_write_text
from convflow.runtime import fast_start
from convflow.runtime.work_pool import TRAIN_FLOW, attempts_dir
from convflow.tasks.train import train_here

# Imported by the worker's new process to run this flow: TensorFlow's import overlaps the Prefect
# engine's start of the flow run (API calls, state changes) instead of following it. Not in
# `convflow worker`, which imports this module only to register the deployment.
if fast_start.in_flow_run_process():
    fast_start.import_tensorflow_in_background()


class SharedArtifactsError(RuntimeError):
    """The worker does not see the pipeline's artifacts root; the message says what to mount."""


def check_shared_artifacts(run: RunContext, wrapped: WrappedModel, tfrecords: TFRecordSet) -> None:
    """Fail unless this machine sees the files the parent's stages wrote, before writing anything.

    Raises:
        SharedArtifactsError: naming the first missing path and what to mount.
    """
    needed = [run.run_dir, Path(wrapped.model_path), *map(Path, tfrecords.required_files())]
    missing = next((path for path in needed if not path.exists()), None)
    if missing is not None:
        raise SharedArtifactsError(
            f"worker {socket.gethostname()} (pid {os.getpid()}) does not see the artifacts root "
            f"{run.artifacts_root}: {missing} does not exist here. Mount the file system that holds "
            f"{run.artifacts_root} at that same path on every worker of the pool (NFS, a cloud file "
            "system, a shared volume), or run the pipeline with an artifacts root the workers see."
        )


def _finished_attempt(run: RunContext):
    """A lookup for train_here: what an earlier attempt of this run trained under the same checkpoint
    key (one marked Crashed that finished anyway), when all its files are intact."""

    def finished(key: str) -> TrainedModel | None:
        for record_file in sorted(attempts_dir(run).glob("*.json")):
            trained = TrainedModel.model_validate_json(record_file.read_text())
            if trained.fingerprint == key and not trained.damaged_files():
                return trained
        return None

    return finished


def _write_attempt_record(run: RunContext, attempt: int, trained: TrainedModel) -> Path:
    attempts_dir(run).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(attempts_dir(run) / f"{attempt}.json", trained.model_dump_json(indent=2))


@flow(name=TRAIN_FLOW, persist_result=False)
def train_attempt(
    wrapped: WrappedModel,
    tfrecords: TFRecordSet,
    settings: TrainConfig,
    fine_tune: FineTuneConfig | None,
    run: RunContext,
    attempt: int = 1,
) -> str:
    """One attempt of a pipeline's train stage on a worker; returns the path of its TrainedModel record
    (`<run>/train-attempts/<attempt>.json`)."""
    check_shared_artifacts(run, wrapped, tfrecords)
    get_run_logger().info(
        f"attempt {attempt} of {run.pipeline} run {run.run_id} on {socket.gethostname()} pid {os.getpid()}"
    )
    trained = train_here(wrapped, tfrecords, settings, fine_tune, run, finished=_finished_attempt(run))
    return str(_write_attempt_record(run, attempt, trained))
