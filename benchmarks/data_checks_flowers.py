"""The data checks on the real flower photos (../shared/data/flowers), end to end through `convflow run`.

    .venv/bin/python benchmarks/data_checks_flowers.py [--work DIR] [--epochs N]

1. Production from one random half of the photos (run 1, promoted as version 1).
2. The whole set with one class's photos darkened (x 0.5): must be blocked.
3. The whole set with half of one class's photos filed under another class: must be blocked.
4. The whole set, as it is: must pass every check, train, and be promoted (the gate is opened wide:
   the checks are under test here, not the model).

After 2 and 3 the registry (artifacts/models/) must be byte for byte as run 1 left it. Prints each
run's outcome, the reasons of the blocked ones, and run 4's every figure, data and model checks. Then
the cost: the checks' share of run 4's wall time (check_data's seconds, plus what measuring each
image adds to to_tfrecords, measured here by writing the same shards with and without it, plus at
most what evaluate took beyond run 1's, which had no production model to compare with).

The pipeline is flowers' (augment_cnn at 96 px) with --epochs (default 2): the checks do not depend
on how long the model trains, and a blocked run trains nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "data" / "flowers"
CONVFLOW = str(Path(sys.executable).with_name("convflow"))
PIPELINE = "flowers-checks"


def link_folder(target: Path, files: dict[str, list[Path]]) -> None:
    """`target`/<class>/<file> as symbolic links to `files`, replacing what was there."""
    shutil.rmtree(target, ignore_errors=True)
    for label, paths in files.items():
        (target / label).mkdir(parents=True)
        for path in paths:
            (target / label / path.name).symlink_to(path)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def run(work: Path, label: str) -> dict:
    started = time.perf_counter()
    process = subprocess.run(
        [CONVFLOW, "run", PIPELINE, "--artifacts", "artifacts", "--json"], cwd=work, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    lines = process.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(
            f"{label}: convflow run failed (exit {process.returncode}):\n"
            f"{process.stdout[-3000:]}{process.stderr[-3000:]}"
        )
    summary.update(exit_code=process.returncode, wall=seconds, label=label)
    print(f"\n== {label}: exit {process.returncode}, {summary['status']}, {seconds:.1f} s")
    if summary["status"] == "blocked":
        print("\n".join(line for line in lines if line.startswith("    ")))
    else:
        print(f"   test accuracy {summary['test_accuracy']:.4f}, promoted version {summary['promoted_version']}")
    return summary


def stage_seconds(summary: dict, name: str) -> float:
    return next(stage["seconds"] for stage in summary["stages"] if stage["name"] == name)


def catalog_row(work: Path, run_id: str) -> dict:
    rows = pq.read_table(work / "artifacts" / "runs.parquet").to_pylist()
    return next(row for row in rows if row["run_id"] == run_id)


def print_checks(checks_parquet: str) -> None:
    rows = pq.read_table(checks_parquet).to_pylist()
    print("\n| check | subject | value | production | threshold | verdict |\n|---|---|---|---|---|---|")
    for row in rows:
        figures = ["" if row[key] is None else f"{row[key]:.4g}" for key in ("value", "baseline", "threshold")]
        print(f"| {row['check']} | {row['subject']} | {' | '.join(figures)} | {row['verdict']} |")


def measuring_cost(whole: Path, scratch: Path) -> tuple[float, float]:
    """to_tfrecords' seconds on `whole` with each image measured, and with measuring stubbed out. On
    this process's threads: the stub does not reach worker processes, which import imaging afresh."""
    from convflow.config.schema import DataConfig
    from convflow.data import imaging
    from convflow.tasks import to_tfrecords
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    to_tfrecords.PROCESSES_FROM = 10**9

    data = DataConfig(source=f"folder:{whole}", image_size=(96, 96), channels=3)
    split_set = split_dataset(data, scratch / "split")
    measured = imaging._measured
    stub = measured(np.zeros((96, 96, 3), np.uint8), "RGB", (96, 96))
    timings = {}
    for name in ("with", "without", "with again", "without again"):
        imaging._measured = measured if name.startswith("with ") or name == "with" else (lambda *_: dict(stub))
        started = time.perf_counter()
        write_tfrecords(split_set, data, scratch / name.replace(" ", "-"))
        timings[name] = time.perf_counter() - started
    imaging._measured = measured
    return min(timings["with"], timings["with again"]), min(timings["without"], timings["without again"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convflow-data-checks-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}; {os.cpu_count()} CPUs")

    files = {folder.name: sorted(folder.iterdir()) for folder in sorted(FLOWERS.iterdir()) if folder.is_dir()}
    rng = random.Random(0)
    half = {label: sorted(rng.sample(paths, len(paths) // 2)) for label, paths in files.items()}
    source = work / "photos"
    document = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    flowers = document["pipelines"]["flowers"]
    flowers["data"]["source"] = f"folder:{source}"
    flowers["train"]["epochs"] = args.epochs
    flowers["evaluate"] = {"min_accuracy": 0.0, "max_regression": 1.0}  # the checks are under test, not the gate
    (work / "pipelines.yaml").write_text(
        yaml.safe_dump({"defaults": document["defaults"], "pipelines": {PIPELINE: flowers}})
    )

    link_folder(source, half)
    first = run(work, "1. production from a random half")
    models = work / "artifacts" / "models" / PIPELINE
    production = tree_digest(models)

    darkened_class = "tulip"
    link_folder(source, files)
    (source / darkened_class).rename(work / "undarkened")
    (source / darkened_class).mkdir()
    for path in files[darkened_class]:
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) * 0.5
        Image.fromarray(pixels.astype(np.uint8)).save(source / darkened_class / path.name, quality=95)
    darker = run(work, f"2. the whole set, {darkened_class} darkened")
    assert darker["exit_code"] == 3 and tree_digest(models) == production, "the darkened drop was not blocked"

    link_folder(source, files)
    moved = files["rose"][: len(files["rose"]) // 2]
    for path in moved:
        (source / "rose" / path.name).rename(source / "daisy" / path.name)
    relabelled = run(work, "3. the whole set, half of rose filed as daisy")
    assert relabelled["exit_code"] == 3 and tree_digest(models) == production, "the relabelled drop was not blocked"

    link_folder(source, files)
    whole = run(work, "4. the whole set")
    assert whole["status"] != "blocked" and whole["exit_code"] == 0, "the whole set was blocked"
    print("\nrun 4's data checks against production version 1 (every figure):")
    print_checks(catalog_row(work, whole["run_id"])["checks_parquet"])

    print("\nrun 4's model checks against production version 1 (every figure):")
    print_checks(catalog_row(work, whole["run_id"])["model_checks_parquet"])

    with_measuring, without = measuring_cost(source, work / "cost")
    check_data = stage_seconds(whole, "check_data")
    # Run 1's evaluate had no production to score; run 4's scored production on its test split (the
    # max_regression gate, older than the checks) and on the reference set, and compared embeddings:
    # the difference is an upper bound of what the model checks add.
    model_checks = max(0.0, stage_seconds(whole, "evaluate") - stage_seconds(first, "evaluate"))
    added = check_data + max(0.0, with_measuring - without) + model_checks
    print(
        f"\ncost on run 4: check_data {check_data:.2f} s; to_tfrecords {with_measuring:.2f} s measuring each image, "
        f"{without:.2f} s without; evaluate {stage_seconds(whole, 'evaluate'):.2f} s against production, "
        f"{stage_seconds(first, 'evaluate'):.2f} s in run 1 with none (model checks at most {model_checks:.2f} s); "
        f"in all {added:.2f} s of a {whole['wall']:.1f} s run = {added / whole['wall']:.1%}"
    )
    for summary in (first, darker, relabelled, whole):
        row = catalog_row(work, summary["run_id"])
        print(f"catalog: {summary['label']}: status {row['status']}, report {row['report']}")


if __name__ == "__main__":
    main()
