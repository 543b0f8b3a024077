"""What a train work pool needs on the Prefect server, created by `convflow worker --pool`: the process
pool, the deployment of the train attempt flow (flows/train_attempt.py) and the lost-worker
automation. The train stage starts attempts on it with convflow/runtime/work_pool.py."""

from __future__ import annotations

import datetime

from convflow.runtime.work_pool import (
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_LOST_AFTER_SECONDS,
    LOST_WORKER_AUTOMATION,
    TAGS,
    TRAIN_FLOW,
)


def lost_worker_automation(lost_after_seconds: int):
    """Prefect's documented "detect zombie flows" automation, for convflow's train runs only: a train
    run with no event for `lost_after_seconds` after a heartbeat is marked Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=LOST_WORKER_AUTOMATION,
        description="Marks a convflow train run Crashed when its heartbeats stop (a lost worker), so the "
        "pipeline's flow starts the next attempt. Created by `convflow worker`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # a heartbeat or any state change: alive, or finished
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": TRAIN_FLOW}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=datetime.timedelta(seconds=lost_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {lost_after_seconds} s: the worker running this train attempt was lost",
            )
        ],
    )


def ensure_lost_worker_automation(lost_after_seconds: int) -> None:
    """Create the automation, or update it to `lost_after_seconds`; one per server, by name."""
    from prefect.automations import Automation

    wanted = lost_worker_automation(lost_after_seconds)
    try:
        existing = Automation.read(name=LOST_WORKER_AUTOMATION)
    except ValueError:  # Prefect's "not found"
        wanted.create()
        return
    wanted.id = existing.id
    wanted.update()


def ensure_train_deployment(pool: str, heartbeat_seconds: int) -> None:
    """Upsert `convflow-train-stage/<pool>`: the train attempt flow, imported by module path from the
    worker's own install of convflow, with heartbeats every `heartbeat_seconds`."""
    from prefect.deployments.runner import EntrypointType

    from convflow.flows.train_attempt import train_attempt

    environment = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_seconds), "TF_CPP_MIN_LOG_LEVEL": "2"}
    deployment = train_attempt.to_deployment(
        name=pool,
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=TAGS,
        job_variables={"env": environment},
        description="One attempt of a convflow pipeline's train stage; started by the pipeline's flow.",
    )
    deployment.apply()


def ensure_train_pool(
    pool: str, heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS, lost_after_seconds: int = DEFAULT_LOST_AFTER_SECONDS
) -> None:
    """Everything a train pool needs on the server, created or updated (idempotent): the process pool,
    the train deployment and the lost-worker automation.

    Raises:
        DeploymentError: a pool of that name exists with another type.
        ValueError: `lost_after_seconds` is not longer than `heartbeat_seconds`.
    """
    from convflow.flows.deployments import ensure_process_pool

    if lost_after_seconds <= heartbeat_seconds:
        raise ValueError(f"--lost-after {lost_after_seconds} must be longer than --heartbeat {heartbeat_seconds}")
    ensure_process_pool(pool)
    ensure_train_deployment(pool, heartbeat_seconds)
    ensure_lost_worker_automation(lost_after_seconds)
