"""The `convflow` command. Heavy imports (Prefect, TensorFlow) wait until a command needs them."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convflow", description="Train, evaluate, export and report CNN image classifiers as Prefect flows."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one pipeline of a pipelines file")
    run.add_argument("name", help="pipeline name in the pipelines file")
    run.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)")
    run.add_argument("--artifacts", default="artifacts", help="artifacts root (default: ./artifacts)")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")

    compare = commands.add_parser("compare", help="run a pipeline's compare variants side by side and rank them")
    compare.add_argument("name", help="pipeline name in the pipelines file; it needs a compare section")
    compare.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)")
    compare.add_argument("--artifacts", default="artifacts", help="artifacts root (default: ./artifacts)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON on the last line")
    compare.add_argument(
        "--dask", type=int, metavar="N", help="run the variants on a local Dask cluster of N worker processes"
    )

    validate = commands.add_parser("validate", help="check a pipelines file; exit 2 on any mistake")
    validate.add_argument("file", nargs="?", default="pipelines.yaml")

    promote = commands.add_parser("promote", help="make a finished run's SavedModel the production model")
    promote.add_argument("run_id")
    promote.add_argument("--artifacts", default="artifacts")

    rollback = commands.add_parser("rollback", help="point production back at the previous promoted version")
    rollback.add_argument("pipeline")
    rollback.add_argument("--artifacts", default="artifacts")

    runs = commands.add_parser("runs", help="print the runs catalog (artifacts/runs.parquet)")
    runs.add_argument("pipeline", nargs="?", help="only this pipeline's runs")
    runs.add_argument("--artifacts", default="artifacts")

    serve = commands.add_parser(
        "serve", help="serve every scheduled pipeline from this process until stopped (needs PREFECT_API_URL)"
    )
    deploy = commands.add_parser(
        "deploy", help="register every scheduled pipeline on a work pool for workers (needs PREFECT_API_URL)"
    )
    deploy.add_argument("--pool", required=True, help="work pool name; created as a process pool if missing")
    for command in (serve, deploy):
        command.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)")
        command.add_argument("--artifacts", default="artifacts", help="artifacts root (default: ./artifacts)")
        command.add_argument(
            "--force", action="store_true", help="scheduled runs train even when data and config are unchanged"
        )
    worker = commands.add_parser(
        "worker", help="start a worker that trains on a work pool's behalf (train.work_pool; needs PREFECT_API_URL)"
    )
    worker.add_argument("--pool", required=True, help="work pool name; created as a process pool if missing")
    worker.add_argument("--limit", type=_positive_int, default=1,
                        help="train runs at a time (default 1: one per GPU; set CUDA_VISIBLE_DEVICES per worker)")
    worker.add_argument("--name", help="worker name shown in the Prefect UI (default: Prefect's)")
    worker.add_argument("--heartbeat", type=_positive_int, default=30, metavar="SECONDS",
                        help="seconds between a train run's heartbeats (default 30, Prefect's minimum)")
    worker.add_argument("--lost-after", type=_positive_int, default=90, metavar="SECONDS",
                        help="a train run without heartbeat for this long is marked Crashed and started again "
                             "(default 90)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of at least 1")
    return value


def _validate(path: str) -> int:
    from convflow.config import ConfigError, load_pipelines

    try:
        specs = load_pipelines(path)
    except ConfigError as error:
        print(f"{path}: {len(error.problems)} problem(s)", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"{path}: {len(specs)} pipeline(s) valid: {', '.join(specs)}")
    _warn_invalid_variants(specs, Path(path).resolve().parent)
    return 0


def _warn_invalid_variants(specs: dict, base_dir: Path) -> None:
    """Compare variants whose merged config is invalid: `convflow compare` reports them as failed
    and runs the others, so they are warnings here, not errors."""
    from convflow.config import variant_specs

    for spec in specs.values():
        for name, variant in variant_specs(spec, base_dir).items():
            if isinstance(variant, list):
                print(f"warning: compare variant {spec.name}/{name} will fail:", file=sys.stderr)
                for problem in variant:
                    print(f"  {problem}", file=sys.stderr)


def _print_summary(summary, seconds: float) -> None:
    verdict = "passed" if summary.passed_gate else "NOT PROMOTED"
    print(f"\n{summary.pipeline} run {summary.run_id}: {summary.status}")
    print(f"  test accuracy  {summary.test_accuracy:.4f}  (gate {verdict}: {summary.gate_reason})")
    if summary.resumed_from_epoch:
        print(f"  resumed from epoch {summary.resumed_from_epoch}")
    print(f"  SavedModel     {summary.saved_model}")
    if summary.promoted_version is not None:
        print(f"  promoted       production version {summary.promoted_version}")
    print(f"  report         {summary.report}")
    print(f"  {'stage':<20}{'seconds':>9}  cache  key")
    for stage in summary.stages:
        print(f"  {stage.name:<20}{stage.seconds:>9.2f}  {'hit ' if stage.cached else 'miss'}   {stage.cache_key or ''}")
    print(f"  {'total':<20}{seconds:>9.2f}")


def _prepare_environment(artifacts: str) -> Path:
    """Settings for a flow run from the command line; returns the resolved artifacts root."""
    root = Path(artifacts).resolve()
    # Prefect's cached results live beside the artifacts they describe.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(root / ".prefect-results"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter, not errors
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls offline
    return root


def _unwritable(artifacts: Path) -> str | None:
    """Why the artifacts root cannot be written to, or None; checked before a run starts anything."""
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=artifacts):
            pass
    except OSError as error:
        existing = next((path for path in (artifacts, *artifacts.parents) if path.exists()), None)
        blocker = f" ({existing} is not a folder)" if existing is not None and not existing.is_dir() else ""
        return f"artifacts root {artifacts} is not writable: {error.strerror or error}{blocker}"
    return None


def _load_train_pipeline():
    from convflow.flows.train_pipeline import train_pipeline

    return train_pipeline


def _load_run_comparison():
    from convflow.flows.compare import run_comparison

    return run_comparison


def _likely_cached(artifacts: Path, pipeline: str, config_hash: str) -> bool:
    """Whether the catalog holds a finished run of this very config: its stages are then most
    likely cache hits, which need no TensorFlow. Only a hint; a damaged catalog says no."""
    try:
        import pyarrow.parquet as pq

        runs = pq.read_table(artifacts / "runs.parquet", columns=["pipeline", "config_hash", "status"]).to_pylist()
    except Exception:  # missing or unreadable: the run itself will say so if it matters
        return False
    return any(row["pipeline"] == pipeline and row["config_hash"] == config_hash
               and row["status"] in ("completed", "not-promoted") for row in runs)


def _import_tensorflow_in_background() -> None:
    """TensorFlow (~3 s), scikit-learn's metrics (~1 s) and matplotlib take long to import; a run
    that trains pays that anyway, so it is paid while the temporary server starts instead of
    inside the stages."""
    def load() -> None:
        with contextlib.suppress(Exception):  # a broken install fails loudly in the stage that needs it
            import keras  # noqa: F401
            import matplotlib
            import sklearn.metrics  # noqa: F401
            import tensorflow  # noqa: F401

            matplotlib.use("Agg")  # as write_report sets it, before pyplot is imported
            import matplotlib.pyplot  # noqa: F401

    threading.Thread(target=load, name="import-tensorflow", daemon=True).start()


# What a flow run imports only once it has started: Prefect's flow and task engines, the encoder
# its parameters go through (FastAPI's), its artifacts and graph helpers; ~0.13 s of a fully cached
# run. The temporary server answers ~2 s after the CLI has imported the flow, so imported in that
# wait they cost nothing.
FLOW_RUN_MODULES = (
    "prefect.flow_engine", "prefect.task_engine", "fastapi.encoders", "prefect.artifacts",
    "prefect.utilities.visualization",
)


def _import_flow_run_modules() -> None:
    for name in FLOW_RUN_MODULES:
        with contextlib.suppress(ImportError):  # one a later Prefect moved is imported when needed
            importlib.import_module(name)


def _pause_collector(args: argparse.Namespace) -> None:
    """Pause the garbage collector while a flow command imports Prefect and convflow's stages, in a
    process that ends with the command; `_call_flow(paused_collector=True)` freezes what was
    imported and resumes it.

    Those imports build ~270,000 objects that live as long as the process; the collections they set
    off walk them again and again (~0.17 s of a cached run against a running server here). Tests
    call main() in-process, where freezing would keep every later test's garbage alive, so there the
    collector is left alone. A command that returns early leaves it paused: the process then ends.
    """
    if args.exits_after:
        gc.disable()


def _call_flow(
    label: str, server, load_flow, *args, warm_tensorflow: bool = False, paused_collector: bool = False
):
    """Call the flow `load_flow` returns, against PREFECT_API_URL or the temporary `server`.

    The flow's modules (Prefect, convflow's stages) are imported while the server starts, and
    TensorFlow too when `warm_tensorflow`; with `paused_collector` (see `_pause_collector`) they
    are then frozen and the garbage collector resumes. Returns the flow's result, or None after
    printing why it failed.
    """
    if server is not None and warm_tensorflow:
        _import_tensorflow_in_background()
    flow = load_flow()
    if paused_collector:
        gc.freeze()  # the imported modules: later collections skip them
        gc.enable()
    if server is not None:
        _import_flow_run_modules()
        server.wait_until_ready()
    try:
        with _settings_for(server):
            return flow(*args)
    except Exception as error:  # the flow already logged the traceback
        print(f"{label} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def _settings_for(server):
    """Prefect settings for a flow run against the temporary `server` (none for a lasting one).

    Its address: a process that imported Prefect before the server started (main() called from
    Python) can keep the address Prefect read then (an empty PREFECT_API_URL, say), and would
    start Prefect's own temporary server as well. No flow-run heartbeats: they let a
    lasting server mark a crashed run; a temporary server dies with this process, and joining the
    heartbeat thread (it sleeps in 1 s steps) adds up to ~1 s to every run's end.
    """
    if server is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _run(args: argparse.Namespace) -> int:
    from convflow.config import ConfigError, load_pipeline
    from convflow.local_server import prefect_api

    _pause_collector(args)
    artifacts = _prepare_environment(args.artifacts)
    # The temporary server (when no PREFECT_API_URL is set) starts first: its ~3 s overlap all
    # that follows until the flow is called. A refused config stops it; nothing is written.
    with prefect_api() as server:
        try:
            spec = load_pipeline(args.file, args.name)  # validate before anything is written
        except ConfigError as error:
            print("\n".join(error.problems), file=sys.stderr)
            return EXIT_BAD_CONFIG
        problem = _unreachable_pool(spec, server) or _unwritable(artifacts)
        if problem:
            print(f"convflow run {args.name}: {problem}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        summary = _call_flow(f"convflow run {args.name}", server, _load_train_pipeline,
                             args.name, str(Path(args.file).resolve()), str(artifacts),
                             warm_tensorflow=not _likely_cached(artifacts, args.name, spec.config_hash()),
                             paused_collector=args.exits_after)
    if summary is None:
        return 1
    seconds = time.perf_counter() - started
    _print_summary(summary, seconds)
    if args.json:
        payload = summary.model_dump(
            include={"pipeline", "run_id", "status", "test_accuracy", "saved_model", "report", "resumed_from_epoch",
                     "promoted_version", "gate_reason"}
        )
        payload["stages"] = [stage.model_dump(include={"name", "seconds", "cached"}) for stage in summary.stages]
        payload["seconds"] = round(seconds, 3)
        print(json.dumps(payload))
    return 0


def _unreachable_pool(spec, server) -> str | None:
    """Why `train.work_pool`'s workers cannot take this run's training: a temporary server lives in
    this process alone, and no worker can reach it."""
    if spec.train.work_pool and server is not None:
        return (f"pipelines.{spec.name}.train.work_pool {spec.train.work_pool!r} needs a Prefect server that the "
                "pool's workers reach; set PREFECT_API_URL (see README, Training on GPU workers)")
    return None


def _print_comparison(comparison, rows: list[dict], seconds: float) -> None:
    print(f"\n{comparison.pipeline} comparison {comparison.comparison_id} ({comparison.runner}), "
          f"ranked by {comparison.metric}")
    print(f"  {'rank':<5}{'variant':<20}{'status':<11}{'initial':>8}{'final':>8}{'loss':>8}{'F1':>8}"
          f"{'params':>11}{'trainable':>11}{'train s':>9}{'img/s':>7}{'MB':>7}{'ms/img':>8}  pid")
    for row in rows:
        def cell(key, spec, width):
            return f"{row[key]:{width}{spec}}" if row[key] is not None else f"{'-':>{width}}"
        print(f"  {row['rank'] or '-':<5}{row['variant']:<20}{row['status']:<11}{cell('initial_accuracy', '.4f', 8)}"
              f"{cell('test_accuracy', '.4f', 8)}{cell('test_loss', '.4f', 8)}{cell('macro_f1', '.4f', 8)}"
              f"{cell('total_params', ',', 11)}{cell('trainable_params', ',', 11)}{cell('train_seconds', '.1f', 9)}"
              f"{cell('images_per_second', '.0f', 7)}{cell('saved_model_mb', '.2f', 7)}{cell('latency_ms', '.2f', 8)}"
              f"  {row['pid'] or '-'}")
    for row in rows:
        if row["error"]:
            print(f"  {row['variant']} failed: {row['error']}")
    print(f"  {comparison.verdict}")
    print(f"  report  {comparison.report}")
    print(f"  total   {seconds:.2f} s")


def _compare(args: argparse.Namespace) -> int:
    from convflow.config import ConfigError, load_pipeline

    try:
        spec = load_pipeline(args.file, args.name)  # validate before anything is written
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return EXIT_BAD_CONFIG
    if spec.compare is None:
        print(f"pipelines.{args.name}.compare: required by convflow compare (a list of variants)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    artifacts = _prepare_environment(args.artifacts)
    started = time.perf_counter()
    _pause_collector(args)
    from convflow.local_server import prefect_api

    with prefect_api() as server:
        comparison = _call_flow(f"convflow compare {args.name}", server, _load_run_comparison,
                                args.name, str(Path(args.file).resolve()), str(artifacts), args.dask,
                                warm_tensorflow=True, paused_collector=args.exits_after)
    if comparison is None:
        return 1
    seconds = time.perf_counter() - started
    from convflow.tasks.compare_report import variant_rows

    rows = variant_rows(comparison)
    _print_comparison(comparison, rows, seconds)
    if args.json:
        payload = comparison.model_dump(include={"pipeline", "comparison_id", "metric", "promote", "runner",
                                                 "flow_pid", "verdict", "report"})
        payload.update(winner=comparison.winner.name if comparison.winner else None, variants=rows,
                       seconds=round(seconds, 3))
        print(json.dumps(payload))
    return 0 if comparison.winner else 1


def _runs(args: argparse.Namespace) -> int:
    from convflow import tables

    path = Path(args.artifacts) / "runs.parquet"
    catalog = tables.read_runs(path).to_pandas()
    if args.pipeline:
        catalog = catalog[catalog["pipeline"] == args.pipeline]
    if not len(catalog):
        print(f"no runs{f' of {args.pipeline}' if args.pipeline else ''} in {path}")
        return 0
    catalog = catalog.sort_values("started")
    catalog["seconds"] = (catalog["finished"] - catalog["started"]).dt.total_seconds()
    catalog["started"] = catalog["started"].dt.strftime("%Y-%m-%d %H:%M:%S")
    catalog["promoted_version"] = catalog["promoted_version"].astype("Int64")
    columns = ["started", "pipeline", "run_id", "status", "test_accuracy", "promoted_version", "seconds",
               "config_hash", "data_fingerprint"]
    formats = {"test_accuracy": "{:.4f}".format, "seconds": "{:.1f}".format}
    print(catalog[columns].to_string(index=False, na_rep="-", formatters=formats))
    return 0


def _missing_server(command: str) -> str | None:
    """Why `command` cannot talk to a Prefect server, or None when PREFECT_API_URL is set (in the
    environment or the active Prefect profile)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    return (
        f"convflow {command}: PREFECT_API_URL is not set; {command} needs a running Prefect server.\n"
        "  start one:  prefect server start --host 127.0.0.1 --port 4200\n"
        "  then:       export PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def _schedules_command(args: argparse.Namespace) -> int:
    """`convflow serve` and `convflow deploy`: the file is checked first, then the server."""
    from convflow.config import ConfigError
    from convflow.flows import deployments

    try:
        deployments.scheduled_pipelines(Path(args.file))
        problem = _missing_server(args.command)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        if args.command == "serve":
            deployments.serve_pipelines(Path(args.file), Path(args.artifacts), args.force)
            return 0
        created = deployments.deploy_pipelines(Path(args.file), Path(args.artifacts), args.pool, args.force)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except deployments.DeploymentError as error:
        print(f"convflow {args.command}: {error}", file=sys.stderr)
        return 1
    for name, deployment_id in created.items():
        print(f"deployed convflow-train/{name} on work pool {args.pool} ({deployment_id})")
    print(f"start a worker to run them: prefect worker start --pool {args.pool}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    """`convflow worker`: the pool, its train deployment and the lost-worker automation (created or
    updated), then Prefect's own process worker in place of this process."""
    problem = _missing_server("worker")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    from convflow.flows.deployments import DeploymentError
    from convflow.flows.train_on_pool import deployment_name, ensure_train_pool

    try:
        ensure_train_pool(args.pool, args.heartbeat, args.lost_after)
    except (DeploymentError, ValueError) as error:
        print(f"convflow worker: {error}", file=sys.stderr)
        return 1
    print(f"work pool {args.pool}: deployment {deployment_name(args.pool)}, train runs without a heartbeat for "
          f"{args.lost_after} s are crashed and started again", flush=True)
    # Prefect's default of 10 s between polls would add 5 s to each training's start on average.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process",
               "--limit", str(args.limit), *(["--name", args.name] if args.name else [])]
    os.execv(sys.executable, command)  # the worker's pid is this command's: signals reach it directly


def _registry_command(args: argparse.Namespace) -> int:
    from convflow import registry

    artifacts = Path(args.artifacts)
    try:
        if args.command == "promote":
            production = registry.promote_run(artifacts, args.run_id)
        else:
            production = registry.rollback(artifacts, args.pipeline)
    except registry.RegistryError as error:
        print(f"convflow {args.command}: {error}", file=sys.stderr)
        return 1
    print(f"{production.pipeline}: production is now version {production.version} "
          f"(run {production.run_id}, test accuracy {production.test_accuracy:.4f}) at {production.saved_model}")
    return 0


def main(argv: list[str] | None = None, *, exits_after: bool = False) -> int:
    """Run one convflow command; `exits_after`: the process ends with it (the console script)."""
    args = _parser().parse_args(argv)
    args.exits_after = exits_after
    handlers = {
        "run": _run, "compare": _compare, "validate": lambda a: _validate(a.file), "runs": _runs,
        "promote": _registry_command, "rollback": _registry_command,
        "serve": _schedules_command, "deploy": _schedules_command, "worker": _worker,
    }
    return handlers[args.command](args)


def run_command() -> None:
    """The console script: main(), then exit without the interpreter's final garbage collection.

    After a flow, that collection walks every object Prefect and pydantic made (~0.35 s, a tenth
    of a fully cached run); gc.freeze() leaves them to the operating system. Files and streams are
    closed as usual. Tests call main() in-process instead, where collection must go on.
    """
    code = main(exits_after=True)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run_command()
