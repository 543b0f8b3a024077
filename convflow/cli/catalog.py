"""`convflow runs`, `promote`, `rollback` and `predict`: the runs catalog, the production models it
points at, and scoring with them."""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path

from convflow.cli.options import common_options, positive_int
from convflow.cli.output import fail, table_lines


def add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict",
        parents=[common_options(pipelines_file=False)],
        help="score images or a Parquet table with a pipeline's model; write Parquet",
    )
    predict.add_argument("pipeline", help="the pipeline whose model scores (its production model by default)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or Parquet tables")
    which = predict.add_mutually_exclusive_group()
    which.add_argument("--version", type=positive_int, help="a promoted version instead of production")
    which.add_argument("--run", dest="run_id", help="the model a run exported, promoted or not")
    predict.add_argument(
        "--output", help="Parquet file to write (default: <artifacts>/<pipeline>/predictions/<time>.parquet)"
    )
    predict.add_argument("--json", action="store_true", help="print what was written as JSON on the last line")
    predict.set_defaults(handle=score_inputs)


def add_promote(commands) -> None:
    promote = commands.add_parser(
        "promote",
        parents=[common_options(pipelines_file=False)],
        help="make a finished run's SavedModel the production model",
    )
    promote.add_argument("run_id")
    promote.set_defaults(handle=promote_run)


def add_rollback(commands) -> None:
    rollback = commands.add_parser(
        "rollback",
        parents=[common_options(pipelines_file=False)],
        help="point production back at the previous promoted version",
    )
    rollback.add_argument("pipeline")
    rollback.set_defaults(handle=roll_back)


def add_runs(commands) -> None:
    runs = commands.add_parser(
        "runs", parents=[common_options(pipelines_file=False)], help="print the runs catalog (artifacts/runs.parquet)"
    )
    runs.add_argument("pipeline", nargs="?", help="only this pipeline's runs")
    runs.set_defaults(handle=list_runs)


def list_runs(args: argparse.Namespace) -> int:
    """`convflow runs [PIPELINE]`: one line per run, oldest first."""
    from convflow.catalog.listing import RUNS_COLUMNS, catalog_file, runs_listing
    from convflow.core.object_store import normalized_root

    root = normalized_root(args.artifacts)
    rows = runs_listing(root, args.pipeline)
    if not rows:
        print(f"no runs{f' of {args.pipeline}' if args.pipeline else ''} in {catalog_file(root)}")
    else:
        print("\n".join(table_lines(rows, dict(zip(RUNS_COLUMNS, RUNS_COLUMNS)))))
    return 0


def promote_run(args: argparse.Namespace) -> int:
    from convflow.catalog import registry
    from convflow.core.object_store import normalized_root

    return _switch_production("promote", registry.promote_run, normalized_root(args.artifacts), args.run_id)


def roll_back(args: argparse.Namespace) -> int:
    from convflow.catalog import registry
    from convflow.core.object_store import normalized_root

    return _switch_production("rollback", registry.rollback, normalized_root(args.artifacts), args.pipeline)


def _switch_production(command: str, switch: Callable, artifacts: str, target: str) -> int:
    """`switch(artifacts, target)`, a registry change of production; the new production printed."""
    from convflow.catalog.registry import RegistryError

    try:
        production = switch(artifacts, target)
    except RegistryError as error:
        return fail(f"convflow {command}: {error}")
    print(
        f"{production.pipeline}: production is now version {production.version} "
        f"(run {production.run_id}, test accuracy {production.test_accuracy:.4f}) at {production.saved_model}"
    )
    return 0


def score_inputs(args: argparse.Namespace) -> int:
    """`convflow predict PIPELINE INPUT...`: the inputs scored into one Parquet file."""
    from convflow.cli.flows import prepare_environment
    from convflow.core.object_store import is_remote, local_root, upload_file
    from convflow.scoring.predict import PredictError, choose_model, predict

    artifacts = prepare_environment(args.artifacts)
    try:
        model = choose_model(artifacts, args.pipeline, args.version, args.run_id)
        output = args.output or _default_output(artifacts, args.pipeline)
        local = (
            Path(output).resolve() if not is_remote(output) else local_root(artifacts) / ".uploads" / Path(output).name
        )
        written, scored, failed = predict(model, args.inputs, local)
        if is_remote(output):  # written here, then uploaded: TensorFlow and pyarrow write local files
            written = upload_file(written, output)
    except PredictError as error:
        return fail(f"convflow predict: {error}")
    version = f"version {model.version}" if model.version is not None else f"run {model.run_id}"
    print(f"{args.pipeline} {version}: {scored} scored, {failed} with errors -> {written}")
    if args.json:
        print(
            json.dumps(
                {
                    "output": str(written),
                    "scored": scored,
                    "errors": failed,
                    "pipeline": args.pipeline,
                    "model_version": model.version,
                    "run_id": model.run_id,
                }
            )
        )
    return 0


def _default_output(artifacts: Path | str, pipeline: str) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return f"{artifacts}/{pipeline}/predictions/{now:%Y%m%dT%H%M%SZ}.parquet"
