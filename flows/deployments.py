"""Scheduled pipelines as Prefect deployments: served by one long-running process (`convflow
serve`) or registered on a work pool for workers (`convflow deploy`).

Each pipeline with a `schedule:` becomes the deployment `convflow-train/<pipeline>` of the
training flow, and each with a `score:` section `convflow-score/<pipeline>` of the scoring flow.
Deployments are upserted by name, so serving or deploying again never duplicates one.
"""

from __future__ import annotations

import datetime
import os
import zoneinfo
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron, Interval, Schedule

from convflow.config.load import load_pipelines
from convflow.config.schema import PipelineSpec, ScheduleConfig
from convflow.flows.train_pipeline import train_pipeline
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
    """The pipelines of `pipelines_file` that have a training schedule or a scoring section.

    Raises:
        ConfigError: the file is invalid.
        DeploymentError: no pipeline has either.
    """
    scheduled = {name: spec for name, spec in load_pipelines(pipelines_file).items() if spec.schedule or spec.score}
    if not scheduled:
        raise DeploymentError(
            f"{pipelines_file}: no pipeline has a schedule; add e.g. "
            '`schedule: {cron: "0 3 * * 1", timezone: UTC}` to one'
        )
    return scheduled


def prefect_schedule(schedule: ScheduleConfig) -> Schedule:
    if schedule.cron is not None:
        return Cron(schedule.cron, timezone=schedule.timezone)
    anchor = INTERVAL_ANCHOR.replace(tzinfo=zoneinfo.ZoneInfo(schedule.timezone))
    return Interval(schedule.interval, anchor_date=anchor, timezone=schedule.timezone)


def _deployment_options(spec: PipelineSpec, pipelines_file: Path, artifacts: Path, force: bool) -> dict[str, Any]:
    return {
        "name": spec.name,
        "schedules": [prefect_schedule(spec.schedule)],
        "parameters": {
            "pipeline": spec.name,
            "pipelines_file": str(pipelines_file),
            "artifacts": str(artifacts),
            "scheduled": True,
            "force": force,
        },
        "concurrency_limit": 1,  # a pipeline's runs queue; they never train over each other
        "tags": TAGS,
        "description": f"Scheduled retraining of pipeline {spec.name!r} of {pipelines_file} (retrain: {spec.retrain}).",
    }


def _score_options(spec: PipelineSpec, pipelines_file: Path, artifacts: Path) -> dict[str, Any]:
    return {
        "name": spec.name,
        "schedules": [prefect_schedule(spec.score.schedule)],
        "parameters": {"pipeline": spec.name, "pipelines_file": str(pipelines_file), "artifacts": str(artifacts)},
        "concurrency_limit": 1,  # two scoring runs would score the same new inputs twice
        "tags": TAGS,
        "description": f"Scheduled scoring by pipeline {spec.name!r}'s production model into {spec.score.output}.",
    }


def _flows_and_options(pipelines_file: Path, artifacts: Path, force: bool):
    """(flow, deployment options) of every deployment the file asks for: training, then scoring."""
    from convflow.flows.score import score_pipeline

    specs = scheduled_pipelines(pipelines_file).values()
    return [
        *(
            (train_pipeline, _deployment_options(spec, pipelines_file, artifacts, force))
            for spec in specs
            if spec.schedule
        ),
        *((score_pipeline, _score_options(spec, pipelines_file, artifacts)) for spec in specs if spec.score),
    ]


def served_deployments(pipelines_file: Path, artifacts: Path, force: bool = False) -> list[RunnerDeployment]:
    """One deployment per schedule, for `prefect.serve`; the flows are imported by module."""
    pipelines_file, artifacts = Path(pipelines_file).resolve(), Path(artifacts).resolve()
    return [
        flow.to_deployment(**options, entrypoint_type=EntrypointType.MODULE_PATH)
        for flow, options in _flows_and_options(pipelines_file, artifacts, force)
    ]


def serve_pipelines(pipelines_file: Path, artifacts: Path, force: bool = False) -> None:
    """Serve every scheduled pipeline from this process until it is stopped; runs are subprocesses."""
    from prefect import serve

    deployments = served_deployments(pipelines_file, artifacts, force)
    for name, value in process_environment(Path(artifacts).resolve()).items():
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
    pipelines_file, artifacts = Path(pipelines_file).resolve(), Path(artifacts).resolve()
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
