"""The train stage on a work pool's workers (`train.work_pool`): each attempt a flow run of its own.
Where training runs, never what it computes: outside every stage's cache key.

The pipeline's flow starts the deployment `convflow-train-stage/<pool>` (created by
`convflow worker --pool <pool>`) with `run_deployment`, which links the run to the train task in
the Prefect UI as `<pipeline> train, attempt N`, and waits for it. An attempt whose worker was
lost ends Crashed: the worker marks it so when the training process dies under it, and the
server's "convflow: crash train runs without heartbeats" automation when the worker's whole
machine is gone. The parent then starts the next attempt, up to `train.max_attempts`; it resumes
from the last checkpoint, which is keyed on model, data and settings (never on a flow run).
Prefect's own flow retries do not fire on Crashed, so this loop does.

Records travel as parameters and as one JSON file per attempt under the run's folder: the
artifacts root must be the same path on the flow's machine and on every worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger

from convflow.core.context import RunContext
from convflow.core.object_store import is_remote, store_for
from convflow.core.records import TFRecordSet, TrainedModel, WrappedModel

if TYPE_CHECKING:
    from convflow.config.schema import FineTuneConfig, TrainConfig

TRAIN_FLOW = "convflow-train-stage"  # the flow of flows/train_attempt.py, which the workers run
LOST_WORKER_AUTOMATION = "convflow: crash train runs without heartbeats"
TAGS = ["convflow", "train"]
DEFAULT_HEARTBEAT_SECONDS = 30  # Prefect's minimum
DEFAULT_LOST_AFTER_SECONDS = 90  # three heartbeats missed
POLL_SECONDS = 0.5
# What a process worker's state message says when its flow run's process died under it, and what
# a worker says when it could not start one: both are infrastructure, so another attempt may do.
INFRASTRUCTURE_FAILURES = ("Submission failed",)


class TrainOnPoolError(RuntimeError):
    """The train stage could not run on the work pool; the message says why and what to do."""


def attempts_dir(run: RunContext) -> Path:
    """Where each attempt writes its TrainedModel record, `<n>.json`, for the parent to read."""
    return run.run_dir / "train-attempts"


def attempt_record_location(run: RunContext, attempt: int) -> str:
    """Attempt `attempt`'s TrainedModel record: a file of the run's folder, or its URL in an object store."""
    path = attempts_dir(run) / f"{attempt}.json"
    return store_for(run.artifacts_root).to_url(path) if is_remote(run.artifacts_root) else str(path)


def read_attempt_record(run: RunContext, attempt: int) -> TrainedModel:
    location = attempt_record_location(run, attempt)
    if is_remote(location):
        return TrainedModel.model_validate_json(store_for(run.artifacts_root).read_text(location))
    return TrainedModel.model_validate_json(Path(location).read_text())


def deployment_name(pool: str) -> str:
    return f"{TRAIN_FLOW}/{pool}"


def _lost(state) -> bool:
    """A run that its infrastructure lost (another attempt may succeed), not one whose code failed."""
    if state.is_crashed():
        return True
    return state.is_failed() and (state.message or "").startswith(INFRASTRUCTURE_FAILURES)


def _check_pool_ready(pool: str) -> None:
    """Fail at once when the pool has no train deployment; warn when no worker is online.

    Raises:
        TrainOnPoolError: no deployment `convflow-train-stage/<pool>`.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment_name(pool))
        except ObjectNotFound:
            raise TrainOnPoolError(
                f"train.work_pool {pool!r}: the pool has no deployment {deployment_name(pool)!r}; start a "
                f"worker with `convflow worker --pool {pool}`, which creates the pool, the deployment and "
                "the lost-worker automation"
            ) from None
        workers = client.read_workers_for_work_pool(pool)
    if not any(str(worker.status).upper().endswith("ONLINE") for worker in workers):
        get_run_logger().warning(
            f"no worker is online on work pool {pool!r}; the train run waits until one starts "
            f"(`convflow worker --pool {pool}`)"
        )


def train_on_pool(
    wrapped: WrappedModel,
    tfrecords: TFRecordSet,
    settings: TrainConfig,
    fine_tune: FineTuneConfig | None,
    run: RunContext,
) -> TrainedModel:
    """Train as flow runs on `train.work_pool`, starting a new attempt for each lost one.

    Raises:
        TrainOnPoolError: an attempt failed in its own code (bad input, an artifacts root the worker
            does not see), or `train.max_attempts` attempts were lost.
    """
    from prefect.deployments import run_deployment

    pool = settings.work_pool
    _check_pool_ready(pool)
    logger = get_run_logger()
    if is_remote(run.artifacts_root):  # the worker pulls them from the store: their URLs, not this machine's paths
        store = store_for(run.artifacts_root)
        wrapped, tfrecords = store.as_urls(wrapped), store.as_urls(tfrecords)
    parameters = {
        "wrapped": wrapped.model_dump(mode="json"),
        "tfrecords": tfrecords.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json"),
        "fine_tune": fine_tune.model_dump(mode="json") if fine_tune else None,
        "run": run.model_dump(mode="json"),
    }
    for attempt in range(1, settings.max_attempts + 1):
        child = run_deployment(
            deployment_name(pool),
            parameters={**parameters, "attempt": attempt},
            poll_interval=POLL_SECONDS,
            flow_run_name=f"{run.pipeline} train, attempt {attempt}",
            tags=TAGS,
        )
        state = child.state
        if state.is_completed():
            return read_attempt_record(run, attempt)
        if not _lost(state):
            raise TrainOnPoolError(
                f"train attempt {attempt} ({child.name}, flow run {child.id}) ended {state.name}: {state.message}"
            )
        logger.warning(
            f"train attempt {attempt} ({child.name}, flow run {child.id}) was lost: {state.name}, "
            f"{state.message}"
            + ("; the next attempt resumes from the last checkpoint" if attempt < settings.max_attempts else "")
        )
    raise TrainOnPoolError(
        f"train.max_attempts: all {settings.max_attempts} train attempts on work pool {pool!r} "
        "were lost (see their flow runs); rerun to resume from the last checkpoint"
    )
