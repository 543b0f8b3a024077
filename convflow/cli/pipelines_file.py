"""`convflow init` and `validate`: writing a pipeline into a pipelines file, and checking one."""

from __future__ import annotations

import argparse
from pathlib import Path

from convflow.cli.output import EXIT_BAD_CONFIG, fail, print_error


def add_validate(commands) -> None:
    validate = commands.add_parser("validate", help="check a pipelines file; exit 2 on any mistake")
    validate.add_argument("file", nargs="?", default="pipelines.yaml")
    validate.set_defaults(handle=validate_file)


def add_init(commands) -> None:
    init = commands.add_parser("init", help="look at a data source and append a pipeline for it to a pipelines file")
    init.add_argument("name", help="name of the new pipeline; an existing one is never replaced")
    init.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder of images (one sub-folder per class), IDX files, a Parquet table, or "
        "folder:PATH | idx:PATH | parquet:PATH | tfds:NAME",
    )
    init.add_argument(
        "-f",
        "--file",
        default="pipelines.yaml",
        help="pipelines file to append to, created if missing (default: ./pipelines.yaml)",
    )
    init.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="Keras Applications MobileNet weights (.h5): a pretrained base instead of a CNN from scratch",
    )
    init.set_defaults(handle=survey_and_append)


def validate_file(args: argparse.Namespace) -> int:
    """`convflow validate [FILE]`: every mistake of every pipeline on stderr, exit 2; or the pipelines."""
    from convflow.config.errors import ConfigError
    from convflow.config.load import load_pipelines

    try:
        specs = load_pipelines(args.file)
    except ConfigError as error:
        return fail(
            "\n".join(
                [f"{args.file}: {len(error.problems)} problem(s)", *(f"  {problem}" for problem in error.problems)]
            ),
            EXIT_BAD_CONFIG,
        )
    print(f"{args.file}: {len(specs)} pipeline(s) valid: {', '.join(specs)}")
    _warn_invalid_variants(specs, Path(args.file).resolve().parent)
    return 0


def _warn_invalid_variants(specs: dict, base_dir: Path) -> None:
    """Compare variants whose merged config is invalid: `convflow compare` reports them as failed
    and runs the others, so they are warnings here, not errors."""
    from convflow.config.derive import variant_specs

    for spec in specs.values():
        for name, variant in variant_specs(spec, base_dir).items():
            if isinstance(variant, list):
                print_error(
                    "\n".join(
                        [
                            f"warning: compare variant {spec.name}/{name} will fail:",
                            *(f"  {problem}" for problem in variant),
                        ]
                    )
                )


def survey_and_append(args: argparse.Namespace) -> int:
    """`convflow init NAME SOURCE`: the source surveyed, a pipeline for it appended to the file."""
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
        return fail(f"convflow init: {error}", EXIT_BAD_CONFIG)
    print("\n".join(report_lines(args.name, survey, appended, args.file)))
    return 0
