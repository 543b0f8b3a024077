"""`convflow serve`, `deploy` and `worker`: scheduled pipelines and training on a Prefect server's work
pools; `decide` answers a waiting run, `notify` says that data landed. Each checks the pipelines file,
then the server, before it starts anything."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from convflow.cli.options import common_options, positive_int
from convflow.cli.output import EXIT_BAD_CONFIG, fail, print_error


def _force_option() -> argparse.ArgumentParser:
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument(
        "--force", action="store_true", help="scheduled runs train even when data and config are unchanged"
    )
    return force


def add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[common_options(), _force_option()],
        help="serve every scheduled pipeline from this process until stopped (needs PREFECT_API_URL)",
    )
    serve.set_defaults(handle=serve_schedules)


def add_deploy(commands) -> None:
    deploy = commands.add_parser(
        "deploy",
        parents=[common_options(), _force_option()],
        help="register every scheduled pipeline on a work pool for workers (needs PREFECT_API_URL)",
    )
    deploy.add_argument("--pool", required=True, help="work pool name; created as a process pool if missing")
    deploy.set_defaults(handle=deploy_schedules)


def add_worker(commands) -> None:
    worker = commands.add_parser(
        "worker", help="start a worker that trains on a work pool's behalf (train.work_pool; needs PREFECT_API_URL)"
    )
    worker.add_argument("--pool", required=True, help="work pool name; created as a process pool if missing")
    worker.add_argument(
        "--limit",
        type=positive_int,
        default=1,
        help="train runs at a time (default 1: one per GPU; set CUDA_VISIBLE_DEVICES per worker)",
    )
    worker.add_argument("--name", help="worker name shown in the Prefect UI (default: Prefect's)")
    worker.add_argument(
        "--heartbeat",
        type=positive_int,
        default=30,
        metavar="SECONDS",
        help="seconds between a train run's heartbeats (default 30, Prefect's minimum)",
    )
    worker.add_argument(
        "--lost-after",
        type=positive_int,
        default=90,
        metavar="SECONDS",
        help="a train run without heartbeat for this long is marked Crashed and started again (default 90)",
    )
    worker.set_defaults(handle=start_worker)


def add_decide(commands) -> None:
    decide = commands.add_parser(
        "decide",
        help="approve or reject a run that waits for a decision (validate.on_block: ask; needs PREFECT_API_URL)",
    )
    decide.add_argument("flow_run_id", help="the waiting flow run's id, as its log and the Prefect UI show it")
    verdict = decide.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true", help="go on despite the blocking checks")
    verdict.add_argument("--reject", action="store_true", help="end the run blocked")
    decide.add_argument("--reason", required=True, help="why; kept in the run's catalog row and its report")
    decide.set_defaults(handle=decide_run)


def add_notify(commands) -> None:
    notify = commands.add_parser(
        "notify",
        help="say that new data landed in a pipeline's source: its on_data trigger retrains it (needs PREFECT_API_URL)",
    )
    notify.add_argument("pipeline", help="the pipeline whose data landed")
    notify.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)")
    notify.add_argument("--note", help="what landed (a partition, a batch id), carried in the event")
    notify.set_defaults(handle=notify_data_landed)


def serve_schedules(args: argparse.Namespace) -> int:
    """`convflow serve`: every scheduled pipeline served from this process until it is stopped."""
    return _with_schedules(args, _serve)


def deploy_schedules(args: argparse.Namespace) -> int:
    """`convflow deploy --pool POOL`: every scheduled pipeline registered on the work pool."""
    return _with_schedules(args, _deploy)


def _with_schedules(args: argparse.Namespace, act: Callable[[argparse.Namespace], int]) -> int:
    """`act(args)` once the pipelines file and the server proved usable; the exit code."""
    from convflow.config.errors import ConfigError
    from convflow.flows import deployments

    try:
        deployments.scheduled_pipelines(Path(args.file))
        problem = _server_problem(args.command)
        return fail(problem) if problem else act(args)
    except ConfigError as error:
        return fail("\n".join(error.problems), EXIT_BAD_CONFIG)
    except deployments.DeploymentError as error:
        return fail(f"convflow {args.command}: {error}")


def _serve(args: argparse.Namespace) -> int:
    from convflow.flows.deployments import serve_pipelines

    serve_pipelines(Path(args.file), args.artifacts, args.force)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from convflow.flows.deployments import deploy_pipelines

    created = deploy_pipelines(Path(args.file), args.artifacts, args.pool, args.force)
    for name, deployment_id in created.items():
        print(f"deployed {name} on work pool {args.pool} ({deployment_id})")
    print(f"start a worker to run them: prefect worker start --pool {args.pool}")
    return 0


def start_worker(args: argparse.Namespace) -> int:
    """`convflow worker`: the pool, its train deployment and the lost-worker automation (created or
    updated), then Prefect's own process worker in place of this process."""
    problem = _server_problem("worker")
    if problem:
        return fail(problem)
    from convflow.flows.deployments import DeploymentError
    from convflow.flows.train_on_pool import ensure_train_pool
    from convflow.runtime.process_worker import exec_process_worker
    from convflow.runtime.work_pool import deployment_name

    try:
        ensure_train_pool(args.pool, args.heartbeat, args.lost_after)
    except (DeploymentError, ValueError) as error:
        return fail(f"convflow worker: {error}")
    print(
        f"work pool {args.pool}: deployment {deployment_name(args.pool)}, train runs without a heartbeat for "
        f"{args.lost_after} s are crashed and started again",
        flush=True,
    )
    exec_process_worker(args.pool, args.limit, args.name)


def decide_run(args: argparse.Namespace) -> int:
    """`convflow decide RUN --approve|--reject --reason TEXT`: the answer a waiting run's Resume form
    in the Prefect UI sends, through the same API (POST /flow_runs/{id}/resume with its run input)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    problem = _server_problem("decide")
    if problem:
        return fail(problem)
    if not args.reason.strip():
        return fail("convflow decide: --reason is empty; say why, it is kept in the catalog and the report")
    try:
        flow_run_id = uuid.UUID(args.flow_run_id)
    except ValueError:
        return fail(f"convflow decide: {args.flow_run_id!r} is not a flow run id (a UUID, as the run's log shows)")
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:
            return fail(f"convflow decide: no flow run {flow_run_id} on the Prefect server at PREFECT_API_URL")
        if state is None or state.type != StateType.PAUSED:
            name = state.name if state else "without a state"
            return fail(f"convflow decide: flow run {flow_run_id} is {name}, not waiting for a decision")
        result = client.resume_flow_run(flow_run_id, run_input={"approve": args.approve, "reason": args.reason})
    if result.status.value != "ACCEPT":
        return fail(f"convflow decide: the server refused: {result.details.reason or result.status.value}")
    print(f"flow run {flow_run_id} {'approved' if args.approve else 'rejected'}: {args.reason}")
    return 0


def notify_data_landed(args: argparse.Namespace) -> int:
    """`convflow notify PIPELINE`: the convflow.data.landed event about the pipeline, with its source's
    listing (names, sizes, modification times: no image opened), sent to the server's events endpoint."""
    from convflow.config.errors import ConfigError
    from convflow.config.load import load_pipeline
    from convflow.config.schema import WatchConfig
    from convflow.data.listing import list_source
    from convflow.runtime import events

    try:
        spec = load_pipeline(args.file, args.pipeline)
    except ConfigError as error:
        return fail("\n".join(error.problems), EXIT_BAD_CONFIG)
    problem = _server_problem("notify")
    if problem:
        return fail(problem)
    details = list_source(spec.data).as_dict() if spec.data.scheme in WatchConfig.LISTED_SCHEMES else {}
    note = {"note": args.note} if args.note else {}
    event = events.data_landed_event(spec.name, "notify", {"source": spec.data.source, **details, **note})
    events.post_events([event])
    print(f"{events.DATA_LANDED} sent for pipeline {spec.name} (event {event.id})")
    if spec.on_data is None:
        print_error(f"note: pipeline {spec.name} has no on_data section in {args.file}: no deployment retrains on it")
    return 0


def _server_problem(command: str) -> str | None:
    """Why `command` cannot use a Prefect server, or None: PREFECT_API_URL is not set (in the
    environment or the active Prefect profile), or the server refuses this process's credentials."""
    from convflow.runtime import server_access

    if server_access.api_url() is None:
        return (
            f"convflow {command}: PREFECT_API_URL is not set; {command} needs a running Prefect server.\n"
            "  start one:  prefect server start --host 127.0.0.1 --port 4200\n"
            "  then:       export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    refused = server_access.auth_refusal()
    return f"convflow {command}: {refused}" if refused else None
