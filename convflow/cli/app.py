"""The `convflow` command. Heavy imports (Prefect, TensorFlow) wait until a command needs them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from convflow.runtime.settings import flow_call_settings, process_environment

EXIT_BAD_CONFIG = 2
# The commands that import TensorFlow, whose start-up log --verbose shows.
TENSORFLOW_COMMANDS = ("run", "compare", "tune", "predict", "init")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convflow", description="Train, evaluate, export and report CNN image classifiers as Prefect flows."
    )
    parser.add_argument("--version", action="version", version=f"convflow {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_flow_commands(commands)
    _add_catalog_commands(commands)
    _add_server_commands(commands)
    _add_init_command(commands)
    for name in TENSORFLOW_COMMANDS:
        commands.choices[name].add_argument(
            "-v", "--verbose", action="store_true",
            help="show TensorFlow's native start-up log too (hidden by default; TF_CPP_MIN_LOG_LEVEL, when set, rules)")
    return parser


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convflow")
    except PackageNotFoundError:
        return "(not installed)"


def _add_init_command(commands) -> None:
    init = commands.add_parser("init", help="look at a data source and append a pipeline for it to a pipelines file")
    init.add_argument("name", help="name of the new pipeline; an existing one is never replaced")
    init.add_argument("source", metavar="SOURCE",
                      help="a folder of images (one sub-folder per class), IDX files, a Parquet table, or "
                           "folder:PATH | idx:PATH | parquet:PATH | tfds:NAME")
    init.add_argument("-f", "--file", default="pipelines.yaml",
                      help="pipelines file to append to, created if missing (default: ./pipelines.yaml)")
    init.add_argument("--weights", type=Path, metavar="PATH",
                      help="Keras Applications MobileNet weights (.h5): a pretrained base instead of a CNN from scratch")


def _init(args: argparse.Namespace) -> int:
    from convflow.cli.init_pipeline import InitError, append_pipeline, check_name, check_new_name, report_lines
    from convflow.data.sources import DataError
    from convflow.data.survey import source_of, survey_source

    file = Path(args.file)
    try:
        check_name(args.name)
        check_new_name(file, args.name)  # before the source is read: that can take a while
        survey = survey_source(source_of(args.source))
        appended = append_pipeline(file, args.name, survey, args.weights)
    except (InitError, DataError) as error:
        print(f"convflow init: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print("\n".join(report_lines(args.name, survey, appended, args.file)))
    return 0


def _tensorflow_log(args: argparse.Namespace, exits_after: bool) -> None:
    """TensorFlow's native log as the user asked for it: a TF_CPP_MIN_LOG_LEVEL of their own rules;
    --verbose shows everything; else its warnings and errors, without its info lines and without the
    start-up lines that no level hides, filtered out of the console script's stderr (native_log).
    Tests that call main() in-process keep their own stderr."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or args.command not in TENSORFLOW_COMMANDS:
        return
    if args.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    if exits_after:
        from convflow.runtime.native_log import filter_native_log

        filter_native_log()


def _common_options(pipelines_file: bool = True) -> argparse.ArgumentParser:
    """--file and --artifacts, as every command that takes them spells them."""
    options = argparse.ArgumentParser(add_help=False)
    if pipelines_file:
        options.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)")
    options.add_argument("--artifacts", default="artifacts", help="artifacts root (default: ./artifacts)")
    return options


def _add_flow_commands(commands) -> None:
    common = _common_options()
    run = commands.add_parser("run", parents=[common], help="run one pipeline of a pipelines file")
    run.add_argument("name", help="pipeline name in the pipelines file")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")

    compare = commands.add_parser("compare", parents=[common],
                                  help="run a pipeline's compare variants side by side and rank them")
    compare.add_argument("name", help="pipeline name in the pipelines file; it needs a compare section")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON on the last line")
    compare.add_argument(
        "--dask", type=int, metavar="N", help="run the variants on a local Dask cluster of N worker processes"
    )

    tune = commands.add_parser("tune", parents=[common],
                               help="search a pipeline's tune settings, then train the final model with the best")
    tune.add_argument("name", help="pipeline name in the pipelines file; it needs a tune section")
    tune.add_argument("--json", action="store_true", help="print the trials and the final run as JSON on the last line")

    predict = commands.add_parser("predict", parents=[_common_options(pipelines_file=False)],
                                  help="score images or a Parquet table with a pipeline's model; write Parquet")
    predict.add_argument("pipeline", help="the pipeline whose model scores (its production model by default)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or Parquet tables")
    which = predict.add_mutually_exclusive_group()
    which.add_argument("--version", type=_positive_int, help="a promoted version instead of production")
    which.add_argument("--run", dest="run_id", help="the model a run exported, promoted or not")
    predict.add_argument("--output",
                         help="Parquet file to write (default: <artifacts>/<pipeline>/predictions/<time>.parquet)")
    predict.add_argument("--json", action="store_true", help="print what was written as JSON on the last line")

    validate = commands.add_parser("validate", help="check a pipelines file; exit 2 on any mistake")
    validate.add_argument("file", nargs="?", default="pipelines.yaml")


def _add_catalog_commands(commands) -> None:
    common = _common_options(pipelines_file=False)
    promote = commands.add_parser("promote", parents=[common],
                                  help="make a finished run's SavedModel the production model")
    promote.add_argument("run_id")
    rollback = commands.add_parser("rollback", parents=[common],
                                   help="point production back at the previous promoted version")
    rollback.add_argument("pipeline")
    runs = commands.add_parser("runs", parents=[common], help="print the runs catalog (artifacts/runs.parquet)")
    runs.add_argument("pipeline", nargs="?", help="only this pipeline's runs")


def _add_server_commands(commands) -> None:
    common = _common_options()
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("--force", action="store_true", help="scheduled runs train even when data and config are unchanged")
    commands.add_parser("serve", parents=[common, force],
                        help="serve every scheduled pipeline from this process until stopped (needs PREFECT_API_URL)")
    deploy = commands.add_parser("deploy", parents=[common, force],
                                 help="register every scheduled pipeline on a work pool for workers (needs PREFECT_API_URL)")
    deploy.add_argument("--pool", required=True, help="work pool name; created as a process pool if missing")
    _add_worker_command(commands)


def _add_worker_command(commands) -> None:
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of at least 1")
    return value


def _validate(path: str) -> int:
    from convflow.config.schema import ConfigError, load_pipelines

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
    from convflow.config.schema import variant_specs

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
    """The environment of a flow run from the command line (run_settings); the resolved artifacts
    root. Set before Prefect and TensorFlow are imported, which read it then."""
    root = Path(artifacts).resolve()
    for name, value in process_environment(root).items():
        os.environ.setdefault(name, value)
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


def _call_flow(label: str, command, load_flow, artifacts: Path, *args, warm_tensorflow: bool):
    """The flow `load_flow` returns, called through `command` (fast_start.FlowCommand) with `args`;
    its result, or None after printing why it failed."""
    server = command.server
    settings = flow_call_settings(artifacts, server.api_url if server is not None else None)
    try:
        return command.call(load_flow, *args, settings=settings, warm_tensorflow=warm_tensorflow)
    except Exception as error:  # the flow already logged the traceback
        print(f"{label} failed: {type(error).__name__}: {error}", file=sys.stderr)
        if server is None and _is_lost_connection(error):
            print(_LOST_SERVER_HINT.format(label=label), file=sys.stderr)
        return None


# The Prefect client retries a lost connection (PREFECT_CLIENT_MAX_RETRIES, with back-off: about a
# minute by default), so a server restarted within that finishes the run; a longer absence fails it.
_LOST_SERVER_HINT = (
    "  the Prefect server (PREFECT_API_URL) was away for longer than its client retries; once it is back, run "
    "`{label}` again: finished stages are cache hits and training resumes from its last checkpoint"
)


def _is_lost_connection(error: BaseException) -> bool:
    import httpx

    return isinstance(error, httpx.TransportError) or isinstance(error.__cause__, httpx.TransportError)


def _load_one(path: str, name: str):
    """Pipeline `name` of `path`, validated before anything is written; each other invalid
    pipeline of the file is a warning on stderr, not an error (`convflow validate` is strict).

    Raises:
        ConfigError: `name` itself is invalid or missing, or the file is unusable.
    """
    from convflow.config.schema import check_pipeline

    spec, warnings = check_pipeline(path, name)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return spec


def _has_section(args: argparse.Namespace, section: str, what: str) -> bool:
    """Whether pipeline args.name loads and has the `section` that `convflow <section>` needs; if not,
    says why on stderr (the config's problems, or the missing section and `what` it holds)."""
    from convflow.config.schema import ConfigError

    try:
        spec = _load_one(args.file, args.name)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return False
    if getattr(spec, section) is None:
        print(f"pipelines.{args.name}.{section}: required by convflow {section} ({what})", file=sys.stderr)
        return False
    return True


def _run(args: argparse.Namespace, exits_after: bool) -> int:
    from convflow.config.schema import ConfigError
    from convflow.runtime.fast_start import FlowCommand

    artifacts = _prepare_environment(args.artifacts)
    # The temporary server (when no PREFECT_API_URL is set) starts first: its start-up overlaps
    # all that follows until the flow is called. A refused config stops it; nothing is written.
    with FlowCommand(exits_after) as command:
        try:
            spec = _load_one(args.file, args.name)
        except ConfigError as error:
            print("\n".join(error.problems), file=sys.stderr)
            return EXIT_BAD_CONFIG
        refused = _refused_by_server(f"run {args.name}") if command.server is None else None
        if refused:
            print(refused, file=sys.stderr)
            return 1
        problem = _unreachable_pool(spec, command.server) or _unwritable(artifacts)
        if problem:
            print(f"convflow run {args.name}: {problem}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        summary = _call_flow(f"convflow run {args.name}", command, _load_train_pipeline, artifacts,
                             args.name, str(Path(args.file).resolve()), str(artifacts),
                             warm_tensorflow=not _likely_cached(artifacts, args.name, spec.config_hash()))
    if summary is None:
        return 1
    seconds = time.perf_counter() - started
    _print_summary(summary, seconds)
    _print_ui_address(artifacts, summary.run_id, temporary_server=command.server is not None)
    if args.json:
        print(json.dumps(_summary_json(summary, seconds)))
    return 0


def _print_ui_address(artifacts: Path, run_id: str, temporary_server: bool) -> None:
    from convflow.runtime.ui_address import flow_run_id, ui_lines

    flow_run = flow_run_id(artifacts, run_id)
    if flow_run is not None:
        print("\n".join(ui_lines(flow_run, temporary_server)))


def _summary_json(summary, seconds: float) -> dict:
    payload = summary.model_dump(
        include={"pipeline", "run_id", "status", "test_accuracy", "saved_model", "report", "resumed_from_epoch",
                 "promoted_version", "gate_reason"}
    )
    payload["stages"] = [stage.model_dump(include={"name", "seconds", "cached"}) for stage in summary.stages]
    payload["seconds"] = round(seconds, 3)
    return payload


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


def _compare(args: argparse.Namespace, exits_after: bool) -> int:
    if not _has_section(args, "compare", "a list of variants"):
        return EXIT_BAD_CONFIG
    refused = _refused_by_server(f"compare {args.name}")
    if refused:
        print(refused, file=sys.stderr)
        return 1
    artifacts = _prepare_environment(args.artifacts)
    started = time.perf_counter()
    from convflow.runtime.fast_start import FlowCommand

    with FlowCommand(exits_after) as command:
        comparison = _call_flow(f"convflow compare {args.name}", command, _load_run_comparison, artifacts,
                                args.name, str(Path(args.file).resolve()), str(artifacts), args.dask,
                                warm_tensorflow=True)
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


def _load_tune_pipeline():
    from convflow.flows.tune import tune_pipeline

    return tune_pipeline


def _tune(args: argparse.Namespace, exits_after: bool) -> int:
    """`convflow tune NAME`: the search, each trial printed; exit 0 once the final model trained."""
    from convflow.runtime.fast_start import FlowCommand

    if not _has_section(args, "tune", "a space of settings"):
        return EXIT_BAD_CONFIG
    artifacts = _prepare_environment(args.artifacts)
    started = time.perf_counter()
    with FlowCommand(exits_after) as command:
        tuning = _call_flow(f"convflow tune {args.name}", command, _load_tune_pipeline, artifacts,
                            args.name, str(Path(args.file).resolve()), str(artifacts), warm_tensorflow=True)
    if tuning is None:
        return 1
    for trial in tuning.trials:
        score = "failed: " + (trial.error or "") if trial.score is None else f"{tuning.objective} {trial.score:.4f}"
        print(f"trial {trial.trial_id}: {json.dumps(trial.settings)}, {trial.epochs} epochs: {score}")
    final = tuning.final
    print(f"final model: run {final.run_id}, test accuracy {final.test_accuracy:.4f}, "
          f"{'passed' if final.passed_gate else 'failed'} the gate" if final else "no trial completed: no final model")
    print(f"report: {tuning.report}")
    if args.json:
        payload = tuning.model_dump(mode="json", exclude={"final"})
        payload.update(final={**_summary_json(final, 0.0), "passed_gate": final.passed_gate} if final else None,
                       seconds=round(time.perf_counter() - started, 3))
        print(json.dumps(payload))
    return 0 if final else 1


def _runs(args: argparse.Namespace) -> int:
    from convflow.catalog import tables

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


def _refused_by_server(command: str) -> str | None:
    """Why the Prefect server at PREFECT_API_URL refuses this command's requests (basic auth), in
    one line, or None; None also without PREFECT_API_URL (a temporary server). Asked before anything
    is written, instead of a traceback mid-run."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    if not settings.url:
        return None
    try:
        with get_client(sync_client=True) as client:
            client.hello()  # authenticated, unlike /health
    except httpx.TransportError:
        return None  # not a refusal: the command meets it where it happens
    except httpx.HTTPStatusError as error:
        if error.response.status_code != 401:
            return None
        if settings.auth_string is None:
            return (f"convflow {command}: the Prefect server at {settings.url} requires basic auth (401 Unauthorized); "
                    "set PREFECT_API_AUTH_STRING=USER:PASSWORD, the server's PREFECT_SERVER_API_AUTH_STRING")
        return (f"convflow {command}: the Prefect server at {settings.url} refused PREFECT_API_AUTH_STRING "
                "(401 Unauthorized); set it to the server's PREFECT_SERVER_API_AUTH_STRING (USER:PASSWORD)")
    return None


def _schedules_command(args: argparse.Namespace) -> int:
    """`convflow serve` and `convflow deploy`: the file is checked first, then the server."""
    from convflow.config.schema import ConfigError
    from convflow.flows import deployments

    try:
        deployments.scheduled_pipelines(Path(args.file))
        problem = _missing_server(args.command) or _refused_by_server(args.command)
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
        print(f"deployed {name} on work pool {args.pool} ({deployment_id})")
    print(f"start a worker to run them: prefect worker start --pool {args.pool}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    """`convflow worker`: the pool, its train deployment and the lost-worker automation (created or
    updated), then Prefect's own process worker in place of this process."""
    problem = _missing_server("worker") or _refused_by_server("worker")
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
    # Prefect's default poll interval would add half of it to each training's start, on average.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process",
               "--limit", str(args.limit), *(["--name", args.name] if args.name else [])]
    os.execv(sys.executable, command)  # the worker's pid is this command's: signals reach it directly


def _predict(args: argparse.Namespace) -> int:
    import datetime

    from convflow.scoring.predict import PredictError, choose_model, predict

    artifacts = _prepare_environment(args.artifacts)
    try:
        model = choose_model(artifacts, args.pipeline, args.version, args.run_id)
        now = datetime.datetime.now(datetime.timezone.utc)
        output = Path(args.output) if args.output else artifacts / args.pipeline / "predictions" / f"{now:%Y%m%dT%H%M%SZ}.parquet"
        written, scored, failed = predict(model, args.inputs, output.resolve())
    except PredictError as error:
        print(f"convflow predict: {error}", file=sys.stderr)
        return 1
    version = f"version {model.version}" if model.version is not None else f"run {model.run_id}"
    print(f"{args.pipeline} {version}: {scored} scored, {failed} with errors -> {written}")
    if args.json:
        print(json.dumps({"output": str(written), "scored": scored, "errors": failed, "pipeline": args.pipeline,
                          "model_version": model.version, "run_id": model.run_id}))
    return 0


def _registry_command(args: argparse.Namespace) -> int:
    from convflow.catalog import registry

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
    _tensorflow_log(args, exits_after)
    handlers = {
        "run": lambda a: _run(a, exits_after), "compare": lambda a: _compare(a, exits_after),
        "tune": lambda a: _tune(a, exits_after),
        "validate": lambda a: _validate(a.file), "runs": _runs,
        "promote": _registry_command, "rollback": _registry_command,
        "serve": _schedules_command, "deploy": _schedules_command, "worker": _worker, "predict": _predict,
        "init": _init,
    }
    return handlers[args.command](args)


def run_command() -> None:
    """The console script: main(), then exit without the interpreter's final garbage collection
    (fast_start.exit_process). Tests call main() in-process instead, where collection must go on."""
    code = main(exits_after=True)
    from convflow.runtime.fast_start import exit_process

    exit_process(code)


if __name__ == "__main__":
    run_command()
