"""Arguments that several commands take, spelled one way."""

from __future__ import annotations

import argparse


def common_options(pipelines_file: bool = True) -> argparse.ArgumentParser:
    """--file and --artifacts, as every command that takes them spells them (a parent parser)."""
    options = argparse.ArgumentParser(add_help=False)
    if pipelines_file:
        options.add_argument(
            "-f", "--file", default="pipelines.yaml", help="pipelines file (default: ./pipelines.yaml)"
        )
    options.add_argument(
        "--artifacts",
        default="artifacts",
        help="artifacts root: a folder, or an object store's URL such as s3://bucket/prefix (default: ./artifacts)",
    )
    return options


def positive_int(text: str) -> int:
    """An argument that is a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of at least 1")
    return value
