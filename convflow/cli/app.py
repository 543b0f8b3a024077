"""The `convflow` command: its parser, assembled from the command modules, and one command run.
Heavy imports (Prefect, TensorFlow) wait until a command needs them."""

from __future__ import annotations

import argparse
import os

from convflow.cli import catalog, flows, pipelines_file, server
from convflow.cli.output import EXIT_BAD_CONFIG

__all__ = ["EXIT_BAD_CONFIG", "TENSORFLOW_COMMANDS", "main", "run_command"]

# Each adds one command, in the order `convflow --help` lists them.
COMMANDS = (
    flows.add_run,
    flows.add_compare,
    flows.add_tune,
    catalog.add_predict,
    pipelines_file.add_validate,
    catalog.add_promote,
    catalog.add_rollback,
    catalog.add_runs,
    server.add_serve,
    server.add_deploy,
    server.add_worker,
    server.add_decide,
    server.add_notify,
    pipelines_file.add_init,
)
# The commands that import TensorFlow, whose start-up log --verbose shows.
TENSORFLOW_COMMANDS = ("run", "compare", "tune", "predict", "init")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convflow", description="Train, evaluate, export and report CNN image classifiers as Prefect flows."
    )
    parser.add_argument("--version", action="version", version=f"convflow {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    for name in TENSORFLOW_COMMANDS:
        commands.choices[name].add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show TensorFlow's native start-up log too (hidden by default; TF_CPP_MIN_LOG_LEVEL, when set, rules)",
        )
    return parser


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convflow")
    except PackageNotFoundError:
        return "(not installed)"


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


def main(argv: list[str] | None = None, *, exits_after: bool = False) -> int:
    """Run one convflow command; its exit code. `exits_after`: the process ends with it (the console
    script); it travels in the parsed arguments to the commands that call a flow."""
    args = _parser().parse_args(argv, namespace=argparse.Namespace(exits_after=exits_after))
    _tensorflow_log(args, exits_after)
    return args.handle(args)


def run_command() -> None:
    """The console script: main(), then exit without the interpreter's final garbage collection
    (fast_start.exit_process). Tests call main() in-process instead, where collection must go on."""
    code = main(exits_after=True)
    from convflow.runtime.fast_start import exit_process

    exit_process(code)


if __name__ == "__main__":
    run_command()
