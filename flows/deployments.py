"""Scheduled pipelines as Prefect deployments: served by one long-running process (`convflow
serve`) or registered on a work pool for workers (`convflow deploy`).

Each pipeline with a `schedule:` or an `on_data:` section becomes the deployment
`convflow-train/<pipeline>` of the training flow, and each with a `score:` section
`convflow-score/<pipeline>` of the scoring flow; `on_data.watch` adds `convflow-watch/<pipeline>`.
Deployments are upserted by name, so serving or deploying again never duplicates one. Event-driven
ones carry a deployment trigger, an automation run by the server's triggers service: training on
convflow.data.landed, scoring on convflow.model.promoted, each about its pipeline (events.py).
"""

from __future__ import annotations

import datetime
import os
import zoneinfo
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron, Interval, Schedule

from convflow.config.load import load_pipelines
from convflow.config.schema import PipelineSpec, ScheduleConfig
from convflow.core.object_store import normalized_root
from convflow.flows.train_pipeline import train_pipeline
from convflow.runtime import events
from convflow.runtime.settings import process_environment

TAGS = ["convflow", "scheduled"]
# The code the worker runs: this checkout (or install) of convflow, and the flow within it:
# <checkout>/flows/train_pipeline.py, or <site-packages>/convflow/flows/train_pipeline.py.
FLOWS_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = FLOWS_DIR.parent
ENTRYPOINT = f"{FLOWS_DIR.name}/train_pipeline.py:train_pipeline"
# Intervals count from here, in the schedule's time zone, so restarts keep the same run times.
INTERVAL_ANCHOR = datetime.datetime(2000, 1, 1)


class DeploymentError(ValueError):
    """Deployments that cannot be made; the message says why and what to do."""


def scheduled_pipelines(pipelines_file: Path) -> dict[str, PipelineSpec]:
    """The pipelines of `pipelines_file` that have a training schedule, an on_data or a score section.

    Raises:
        ConfigError: the file is invalid.
        DeploymentError: no pipeline has any.
    """
    scheduled = {
        name: spec
        for name, spec in load_pipelines(pipelines_file).items()
        if spec.schedule or spec.on_data or spec.score
    }
    if not scheduled:
        raise DeploymentError(
            f"{pipelines_file}: no pipeline has a schedule, an on_data or a score section; add e.g. "
            '`schedule: {cron: "0 3 * * 1", timezone: UTC}` to one'
        )
    return scheduled


def prefect_schedule(schedule: ScheduleConfig) -> Schedule:
    if schedule.cron is not None:
        return Cron(schedule.cron, timezone=schedule.timezone)
    anchor = INTERVAL_ANCHOR.replace(tzinfo=zoneinfo.ZoneInfo(schedule.timezone))
    return Interval(schedule.interval, anchor_date=anchor, timezone=schedule.timezone)


def on_event(pipeline: str, event: str, within: int = 0, delay: int = 0) -> DeploymentEventTrigger:
    """A trigger that starts the deployment on `event` about `pipeline`: at the first event, then no
    other run for `within` seconds (Reactive, threshold 1: Prefect drops the burst's later events);
    the run is scheduled `delay` seconds after the event."""
    return DeploymentEventTrigger(
        name=f"{pipeline}: on {event}",
        expect={event},
        match={"prefect.resource.id": events.pipeline_resource_id(pipeline)},
        for_each={"prefect.resource.id"},
        posture="Reactive",
        threshold=1,
        within=datetime.timedelta(seconds=within),
        schedule_after=datetime.timedelta(seconds=delay),
    )


def _deployment_options(spec: PipelineSpec, pipelines_file: Path, artifacts: Path, force: bool) -> dict[str, Any]:
    on_data = spec.on_data
    return {
        "name": spec.name,
        "schedules": [prefect_schedule(spec.schedule)] if spec.schedule else [],
        "triggers": [on_event(spec.name, events.DATA_LANDED, on_data.within, on_data.delay)] if on_data else [],
        "parameters": {
            "pipeline": spec.name,
            "pipelines_file": str(pipelines_file),
            "artifacts": str(artifacts),
            "scheduled": True,
            "force": force,
        },
        "concurrency_limit": 1,  # a pipeline's runs queue; they never train over each other
        "tags": TAGS,
        "description": f"Retraining of pipeline {spec.name!r} of {pipelines_file}, on "
        f"{' and '.join(_when(spec.schedule, on_data, 'data landed'))} (retrain: {spec.retrain}).",
    }


def _score_options(spec: PipelineSpec, pipelines_file: Path, artifacts: Path) -> dict[str, Any]:
    return {
        "name": spec.name,
        "schedules": [prefect_schedule(spec.score.schedule)] if spec.score.schedule else [],
        "triggers": [on_event(spec.name, events.MODEL_PROMOTED)] if spec.score.on_promotion else [],
        "parameters": {"pipeline": spec.name, "pipelines_file": str(pipelines_file), "artifacts": str(artifacts)},
        "concurrency_limit": 1,  # two scoring runs would score the same new inputs twice
        "tags": TAGS,
        "description": f"Scoring by pipeline {spec.name!r}'s production model into {spec.score.output}, on "
        f"{' and '.join(_when(spec.score.schedule, spec.score.on_promotion, 'a model promoted'))}.",
    }


def _watch_options(spec: PipelineSpec, pipelines_file: Path) -> dict[str, Any]:
    return {
        "name": spec.name,
        "schedules": [Interval(spec.on_data.watch.interval, anchor_date=INTERVAL_ANCHOR.replace(tzinfo=datetime.UTC))],
        "parameters": {"pipeline": spec.name, "pipelines_file": str(pipelines_file)},
        "concurrency_limit": 1,
        "tags": TAGS,
        "description": f"Lists the source of pipeline {spec.name!r} every {spec.on_data.watch.interval} s; "
        f"emits {events.DATA_LANDED} when it changed.",
    }


def _when(schedule: ScheduleConfig | None, event: object, what: str) -> list[str]:
    return [*(["its schedule"] if schedule else []), *([what] if event else [])]


def _flows_and_options(pipelines_file: Path, artifacts: Path, force: bool):
    """(flow, deployment options) of every deployment the file asks for: training, scoring, watches."""
    from convflow.flows.score import score_pipeline
    from convflow.flows.watch import watch_source

    specs = scheduled_pipelines(pipelines_file).values()
    return [
        *(
            (train_pipeline, _deployment_options(spec, pipelines_file, artifacts, force))
            for spec in specs
            if spec.schedule or spec.on_data
        ),
        *((score_pipeline, _score_options(spec, pipelines_file, artifacts)) for spec in specs if spec.score),
        *(
            (watch_source, _watch_options(spec, pipelines_file))
            for spec in specs
            if spec.on_data and spec.on_data.watch
        ),
    ]


def served_deployments(pipelines_file: Path, artifacts: Path, force: bool = False) -> list[RunnerDeployment]:
    """One deployment per schedule or trigger, for `prefect.serve`; the flows are imported by module."""
    pipelines_file, artifacts = Path(pipelines_file).resolve(), normalized_root(artifacts)
    return [
        flow.to_deployment(**options, entrypoint_type=EntrypointType.MODULE_PATH)
        for flow, options in _flows_and_options(pipelines_file, artifacts, force)
    ]


def serve_pipelines(pipelines_file: Path, artifacts: Path, force: bool = False) -> None:
    """Serve every scheduled pipeline from this process until it is stopped; runs are subprocesses."""
    from prefect import serve

    deployments = served_deployments(pipelines_file, artifacts, force)
    for name, value in process_environment(normalized_root(artifacts)).items():
        os.environ.setdefault(name, value)  # served runs inherit it, as `convflow run` would set it
    serve(*deployments)


def ensure_process_pool(pool: str) -> bool:
    """Create work pool `pool` of type process unless it exists; True when it was created.

    Raises:
        DeploymentError: a pool of that name exists with another type.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
                return True
            except ObjectAlreadyExists:  # two workers started together: the other one created it
                existing = client.read_work_pool(pool)
    if existing.type != "process":
        raise DeploymentError(
            f"work pool {pool!r} has type {existing.type!r}; convflow deploy and convflow worker need a process pool"
        )
    return False


def deploy_pipelines(pipelines_file: Path, artifacts: Path, pool: str, force: bool = False) -> dict[str, UUID]:
    """Register every scheduled pipeline on work pool `pool` (created as a process pool if missing);
    returns the id per deployment name (`<flow>/<pipeline>`). Workers run the flows from SOURCE_ROOT."""
    pipelines_file, artifacts = Path(pipelines_file).resolve(), normalized_root(artifacts)
    planned = _flows_and_options(pipelines_file, artifacts, force)
    ensure_process_pool(pool)
    created = {}
    for flow, options in planned:
        from_source = flow.from_source(source=str(SOURCE_ROOT), entrypoint=_entrypoint(flow))
        created[f"{flow.name}/{options['name']}"] = from_source.deploy(
            **options,
            work_pool_name=pool,
            job_variables={"env": process_environment(artifacts)},
            print_next_steps=False,
            ignore_warnings=True,
        )
    return created


def _entrypoint(flow) -> str:
    """`<flows folder>/<module>.py:<function>` of one of convflow's flows, relative to SOURCE_ROOT."""
    return f"{FLOWS_DIR.name}/{flow.fn.__module__.rsplit('.', 1)[-1]}.py:{flow.fn.__name__}"
