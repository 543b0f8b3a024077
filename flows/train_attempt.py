"""One attempt of a pipeline's train stage, as a flow run on a work pool's worker (the deployment
`convflow-train-stage/<pool>`; convflow/runtime/work_pool.py starts it and starts another when it is lost).

Records travel as parameters and as one JSON file per attempt under the run's folder: the
artifacts root must be the same path on the flow's machine and on every worker, or an object
store's URL (s3://, gs://, ...) that every worker reaches: the worker then pulls the model and
shards into its own local cache, uploads its checkpoints each epoch and its outputs at the end.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import flow, get_run_logger

from convflow.config.schema import FineTuneConfig, TrainConfig
from convflow.core.context import RunContext
from convflow.core.object_store import StoreError, is_remote, store_for
from convflow.core.records import TFRecordSet, TrainedModel, WrappedModel
from convflow.core.storage import atomic_write_text
from convflow.runtime import fast_start
from convflow.runtime.work_pool import TRAIN_FLOW, attempt_record_location, attempts_dir
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
        SharedArtifactsError: naming the first missing path and what to mount, or for an object
            store's root, what failed when reaching it.
    """
    if is_remote(run.artifacts_root):
        _check_store(run, wrapped, tfrecords)
        return
    needed = [run.run_dir, Path(wrapped.model_path), *map(Path, tfrecords.required_files())]
    missing = next((path for path in needed if not path.exists()), None)
    if missing is not None:
        raise SharedArtifactsError(
            f"worker {socket.gethostname()} (pid {os.getpid()}) does not see the artifacts root "
            f"{run.artifacts_root}: {missing} does not exist here. Mount the file system that holds "
            f"{run.artifacts_root} at that same path on every worker of the pool (NFS, a cloud file "
            "system, a shared volume), or run the pipeline with an artifacts root the workers see."
        )


def _check_store(run: RunContext, wrapped: WrappedModel, tfrecords: TFRecordSet) -> None:
    store = store_for(run.artifacts_root)
    try:
        store.check_reachable()
    except StoreError as error:
        raise SharedArtifactsError(
            f"worker {socket.gethostname()} (pid {os.getpid()}) cannot use the artifacts root: {error}. Give every "
            "worker of the pool the store's credentials and endpoint (for S3: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ~/.aws/)."
        ) from None
    missing = next((url for url in (wrapped.model_path, *tfrecords.required_files()) if not store.exists(url)), None)
    if missing is not None:
        raise SharedArtifactsError(f"worker {socket.gethostname()}: {missing} is not in the object store")


def _finished_attempt(run: RunContext):
    """A lookup for train_here: what an earlier attempt of this run trained under the same checkpoint
    key (one marked Crashed that finished anyway), when all its files are intact."""

    def finished(key: str) -> TrainedModel | None:
        for trained in _attempt_records(run):
            if trained.fingerprint == key and not trained.damaged_files():
                return trained
        return None

    return finished


def _attempt_records(run: RunContext) -> list[TrainedModel]:
    if is_remote(run.artifacts_root):
        store = store_for(run.artifacts_root)
        folder = store.to_url(attempts_dir(run))
        return [
            TrainedModel.model_validate_json(store.read_text(f"{folder}/{name}")) for name in store.list_names(folder)
        ]
    return [TrainedModel.model_validate_json(path.read_text()) for path in sorted(attempts_dir(run).glob("*.json"))]


def _write_attempt_record(run: RunContext, attempt: int, trained: TrainedModel) -> str:
    """Write the attempt's record where the parent reads it; on object storage once the trained
    model's files are uploaded, so the record is the last thing the attempt writes."""
    if is_remote(run.artifacts_root):
        store = store_for(run.artifacts_root)
        location = attempt_record_location(run, attempt)
        store.write_bytes(location, store.published(trained).model_dump_json(indent=2).encode())
        return location
    attempts_dir(run).mkdir(parents=True, exist_ok=True)
    return str(atomic_write_text(attempts_dir(run) / f"{attempt}.json", trained.model_dump_json(indent=2)))


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
    if is_remote(run.artifacts_root):  # local copies of the parent's model and shards, from the store
        store = store_for(run.artifacts_root)
        wrapped, tfrecords = store.localized(wrapped), store.localized(tfrecords)
    trained = train_here(wrapped, tfrecords, settings, fine_tune, run, finished=_finished_attempt(run))
    return _write_attempt_record(run, attempt, trained)
