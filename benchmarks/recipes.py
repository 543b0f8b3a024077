"""Training recipes on real data (issue 22): each pipeline as it was beside its recipe pipeline.

    .venv/bin/python benchmarks/recipes.py [--only fashion-mnist cifar10 ...] [--artifacts DIR]

Runs `convflow run NAME` (benchmarks/pipelines.yaml of the working tree, or its pipelines.yaml for
the pipelines users run, such as cats-vs-dogs; real data under ../shared/data) for each pair one
after another, in an artifacts folder of its own (default: a temporary one), and prints one
Markdown row per run: test accuracy, the train stage's wall seconds and the whole run's.
benchmarks/RESULTS.md ("Training recipes") holds the table it printed; run it on an idle machine
(the recipe runs are CPU-heavy: about 20 minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Where each pipeline is looked up, in this order: the benchmarks' own, then the users'.
PIPELINES_FILES = (REPO / "benchmarks" / "pipelines.yaml", REPO / "pipelines.yaml")
CONVFLOW = Path(sys.executable).with_name("convflow")
# (today's pipeline, the recipe pipeline that beats it), by the name --only takes.
PAIRS = {
    "fashion-mnist": ("fashion-mnist", "fashion-mnist-recipe"),
    "cifar10": ("cifar10", "cifar10-mobilenet"),
    "cats-vs-dogs": ("cats-vs-dogs", "cats-vs-dogs-recipe"),
    "flowers": ("flowers-mobilenet-ft", "flowers-mobilenet-recipe"),
}


def pipelines_file(name: str) -> Path:
    """The first of PIPELINES_FILES that defines pipeline `name`."""
    for path in PIPELINES_FILES:
        if name in yaml.safe_load(path.read_text())["pipelines"]:
            return path
    raise LookupError(f"no pipeline {name!r} in {[str(path) for path in PIPELINES_FILES]}")


def run_pipeline(name: str, artifacts: Path) -> dict:
    """`convflow run NAME --json`: its summary, with the whole run's wall seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [str(CONVFLOW), "run", name, "-f", str(pipelines_file(name)), "--artifacts", str(artifacts), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def row(name: str, summary: dict) -> str:
    train = next(stage["seconds"] for stage in summary["stages"] if stage["name"] == "train")
    return f"| {name} | {summary['test_accuracy']:.4f} | {train:.0f} | {summary['wall_seconds']:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    parser.add_argument("--artifacts", type=Path, help="artifacts folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convflow-recipes-") as scratch:
        artifacts = args.artifacts or Path(scratch)
        print("| pipeline | test accuracy | train stage, s | whole run, s |\n|---|---|---|---|")
        for key in args.only:
            for name in PAIRS[key]:
                print(row(name, run_pipeline(name, artifacts)), flush=True)


if __name__ == "__main__":
    main()
