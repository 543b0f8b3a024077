"""`convflow run`, `compare` and `tune`: a pipeline checked, its flow called, its result printed."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convflow.cli import flow_results
from convflow.cli.options import common_options
from convflow.cli.output import EXIT_BAD_CONFIG, EXIT_BLOCKED, EXIT_FAILED, fail, print_error
from convflow.core.object_store import StoreError, is_remote, normalized_root, store_for
from convflow.runtime.settings import flow_call_settings, process_environment

# The Prefect client retries a lost connection (PREFECT_CLIENT_MAX_RETRIES, with back-off: about a
# minute by default), so a server restarted within that finishes the run; a longer absence fails it.
_LOST_SERVER_HINT = (
    "  the Prefect server (PREFECT_API_URL) was away for longer than its client retries; once it is back, run "
    "`{label}` again: finished stages are cache hits and training resumes from its last checkpoint"
)


def add_run(commands) -> None:
    run = commands.add_parser("run", parents=[common_options()], help="run one pipeline of a pipelines file")
    run.add_argument("name", help="pipeline name in the pipelines file")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    run.set_defaults(handle=run_pipeline)


def add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare", parents=[common_options()], help="run a pipeline's compare variants side by side and rank them"
    )
    compare.add_argument("name", help="pipeline name in the pipelines file; it needs a compare section")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON on the last line")
    compare.add_argument(
        "--dask", type=int, metavar="N", help="run the variants on a local Dask cluster of N worker processes"
    )
    compare.set_defaults(handle=compare_variants)


def add_tune(commands) -> None:
    tune = commands.add_parser(
        "tune",
        parents=[common_options()],
        help="search a pipeline's tune settings, then train the final model with the best",
    )
    tune.add_argument("name", help="pipeline name in the pipelines file; it needs a tune section")
    tune.add_argument("--json", action="store_true", help="print the trials and the final run as JSON on the last line")
    tune.set_defaults(handle=tune_and_train)


def _load_train_pipeline():
    from convflow.flows.train_pipeline import train_pipeline

    return train_pipeline


def _load_run_comparison():
    from convflow.flows.compare import run_comparison

    return run_comparison


def _load_tune_pipeline():
    from convflow.flows.tune import tune_pipeline

    return tune_pipeline


def run_pipeline(args: argparse.Namespace) -> int:
    """`convflow run NAME`: the pipeline trained, evaluated, exported and reported; its summary printed."""
    from convflow.catalog.listing import has_finished_run
    from convflow.config.errors import ConfigError
    from convflow.runtime.fast_start import FlowCommand

    artifacts = prepare_environment(args.artifacts)
    # The temporary server (when no PREFECT_API_URL is set) starts first: its start-up overlaps
    # all that follows until the flow is called. A refused config stops it; nothing is written.
    with FlowCommand(args.exits_after) as command:
        try:
            spec = _load_one(args.file, args.name)
        except ConfigError as error:
            return fail("\n".join(error.problems), EXIT_BAD_CONFIG)
        problem = _run_refusal(spec, command.server, artifacts)
        if problem:
            return fail(f"convflow run {args.name}: {problem}")
        started = time.perf_counter()
        summary = _call_flow(
            f"convflow run {args.name}",
            command,
            _load_train_pipeline,
            artifacts,
            args.name,
            str(Path(args.file).resolve()),
            str(artifacts),
            warm_tensorflow=not has_finished_run(artifacts, args.name, spec.config_hash()),
        )
    if summary is None:
        return EXIT_FAILED
    flow_results.print_run(
        summary,
        time.perf_counter() - started,
        artifacts,
        temporary_server=command.server is not None,
        as_json=args.json,
    )
    return EXIT_BLOCKED if summary.status == "blocked" else 0


def compare_variants(args: argparse.Namespace) -> int:
    """`convflow compare NAME`: the variants trained side by side and ranked; exit 0 when one won."""
    if not _has_section(args, "compare", "a list of variants"):
        return EXIT_BAD_CONFIG
    from convflow.runtime.fast_start import FlowCommand
    from convflow.runtime.server_access import auth_refusal

    refused = auth_refusal()
    if refused:
        return fail(f"convflow compare {args.name}: {refused}")
    artifacts = prepare_environment(args.artifacts)
    problem = _unwritable(artifacts) if is_remote(artifacts) else None
    if problem:
        return fail(f"convflow compare {args.name}: {problem}")
    started = time.perf_counter()
    with FlowCommand(args.exits_after) as command:
        comparison = _call_flow(
            f"convflow compare {args.name}",
            command,
            _load_run_comparison,
            artifacts,
            args.name,
            str(Path(args.file).resolve()),
            str(artifacts),
            args.dask,
            warm_tensorflow=True,
        )
    if comparison is None:
        return EXIT_FAILED
    flow_results.print_comparison(comparison, time.perf_counter() - started, args.json)
    if comparison.blocked:
        return EXIT_BLOCKED
    return 0 if comparison.winner else EXIT_FAILED


def tune_and_train(args: argparse.Namespace) -> int:
    """`convflow tune NAME`: the search, each trial printed; exit 0 once the final model trained."""
    from convflow.runtime.fast_start import FlowCommand

    if not _has_section(args, "tune", "a space of settings"):
        return EXIT_BAD_CONFIG
    artifacts = prepare_environment(args.artifacts)
    started = time.perf_counter()
    with FlowCommand(args.exits_after) as command:
        tuning = _call_flow(
            f"convflow tune {args.name}",
            command,
            _load_tune_pipeline,
            artifacts,
            args.name,
            str(Path(args.file).resolve()),
            str(artifacts),
            warm_tensorflow=True,
        )
    if tuning is None:
        return EXIT_FAILED
    flow_results.print_tuning(tuning, time.perf_counter() - started, args.json)
    return 0 if tuning.final else EXIT_FAILED


def prepare_environment(artifacts: str) -> Path | str:
    """The environment of a flow run from the command line (runtime/settings.py); the resolved artifacts
    root (an object store's URL as given). Set before Prefect and TensorFlow are imported, which read it then."""
    root = normalized_root(artifacts)
    root = root if is_remote(root) else Path(root)
    for name, value in process_environment(root).items():
        os.environ.setdefault(name, value)
    return root


def _load_one(path: str, name: str):
    """Pipeline `name` of `path`, validated before anything is written; each other invalid
    pipeline of the file is a warning on stderr, not an error (`convflow validate` is strict).

    Raises:
        ConfigError: `name` itself is invalid or missing, or the file is unusable.
    """
    from convflow.config.load import check_pipeline

    spec, warnings = check_pipeline(path, name)
    for warning in warnings:
        print_error(f"warning: {warning}")
    return spec


def _has_section(args: argparse.Namespace, section: str, what: str) -> bool:
    """Whether pipeline args.name loads and has the `section` that `convflow <section>` needs; if not,
    says why on stderr (the config's problems, or the missing section and `what` it holds)."""
    from convflow.config.errors import ConfigError

    try:
        spec = _load_one(args.file, args.name)
    except ConfigError as error:
        print_error("\n".join(error.problems))
        return False
    if getattr(spec, section) is None:
        print_error(f"pipelines.{args.name}.{section}: required by convflow {section} ({what})")
        return False
    return True


def _run_refusal(spec, server, artifacts: Path | str) -> str | None:
    """Why this run cannot start, or None: the Prefect server refuses its credentials, train.work_pool's
    workers could not reach a temporary `server`, nobody could answer its question on one, or the
    artifacts root cannot be written to."""
    from convflow.runtime.server_access import auth_refusal

    return (
        (auth_refusal() if server is None else None)
        or _unreachable_pool(spec, server)
        or _nobody_to_ask(spec, server)
        or _unwritable(artifacts)
    )


def _nobody_to_ask(spec, server) -> str | None:
    """Why a run under validate.on_block: ask cannot wait for a person: a temporary server serves no
    UI and stops with the command, so no one could answer."""
    if spec.validate_.on_block == "ask" and server is not None:
        return (
            f"pipelines.{spec.name}.validate.on_block is ask: a blocked run waits for a person's decision in the "
            "Prefect UI, and a temporary server has none; start one (prefect server start) and set "
            "PREFECT_API_URL, or set on_block: fail (see docs/data-checks.md, A person decides)"
        )
    return None


def _unreachable_pool(spec, server) -> str | None:
    """Why `train.work_pool`'s workers cannot take this run's training: a temporary server lives in
    this process alone, and no worker can reach it."""
    if spec.train.work_pool and server is not None:
        return (
            f"pipelines.{spec.name}.train.work_pool {spec.train.work_pool!r} needs a Prefect server that the "
            "pool's workers reach; set PREFECT_API_URL (see README, Training on GPU workers)"
        )
    return None


def _unwritable(artifacts: Path | str) -> str | None:
    """Why the artifacts root cannot be written to, or None; checked before a run starts anything.
    An object store's root: whether it can be reached and listed with the credentials at hand."""
    if is_remote(artifacts):
        try:
            store_for(artifacts).check_reachable()
        except StoreError as error:
            return f"artifacts root {error}"
        return None
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=artifacts):
            pass
    except OSError as error:
        existing = next((path for path in (artifacts, *artifacts.parents) if path.exists()), None)
        blocker = f" ({existing} is not a folder)" if existing is not None and not existing.is_dir() else ""
        return f"artifacts root {artifacts} is not writable: {error.strerror or error}{blocker}"
    return None


def _call_flow(
    label: str, command, load_flow: Callable[[], Callable], artifacts: Path, *args: Any, warm_tensorflow: bool
) -> Any:
    """The flow `load_flow` returns, called through `command` (fast_start.FlowCommand) with `args`;
    its result, or None after printing why it failed."""
    from convflow.runtime.server_access import is_lost_connection

    server = command.server
    settings = flow_call_settings(artifacts, server.api_url if server is not None else None)
    try:
        return command.call(load_flow, *args, settings=settings, warm_tensorflow=warm_tensorflow)
    except Exception as error:  # the flow already logged the traceback
        print_error(f"{label} failed: {type(error).__name__}: {error}")
        if server is None and is_lost_connection(error):
            print_error(_LOST_SERVER_HINT.format(label=label))
        return None
