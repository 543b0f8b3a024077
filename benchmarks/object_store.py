"""An artifacts root on object storage against a local one: the flower photos (../shared/data/flowers)
with a frozen MobileNet (benchmarks/pipelines.yaml's flowers-mobilenet), through `convflow run`.

    .venv/bin/python benchmarks/object_store.py [--work DIR] [--epochs N]

The store is moto's S3 server on 127.0.0.1 (in this process; a real S3 endpoint over HTTP, its
objects in memory). Four runs, one after another, each a fresh `convflow run` process:

1. local root, first run;          2. local root, rerun (every stage but the report cached);
3. s3:// root, first run, empty local cache;  4. s3:// root, rerun on the same machine (same cache);
5. s3:// root, one more epoch, same machine: the data stages hit, train and the stages after it run
   and read the shards: none may be downloaded, they are in the local cache;
6. the same with two more epochs on "another machine" (an empty cache): the shards are downloaded.

Prints each run's wall time, the ratios s3/local (targets: first run at most 1.15x, cached rerun at
most 1.5x), and what the s3 runs moved, from their stages' log lines (`<stage>: downloaded N
file(s) ...`): files downloaded, found in the local cache, uploaded.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONVFLOW = str(Path(sys.executable).with_name("convflow"))
PIPELINE = "flowers-mobilenet"
MOVED = re.compile(
    r"(?P<stage>\w+): downloaded (?P<down>\d+) file\(s\) \((?P<mb>[\d.]+) MB\), (?P<cached>\d+) already in the local "
    r"cache; uploaded (?P<up>\d+) file\(s\) \((?P<upmb>[\d.]+) MB\)"
)


def start_store() -> dict[str, str]:
    """moto's S3 server on a free port, with the bucket `convflow`; the environment that reaches it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "benchmark",
        "AWS_SECRET_ACCESS_KEY": "benchmark",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="convflow")
    return env


def pipelines_file(work: Path, epochs: int | None, more_epochs: int = 0) -> Path:
    config = yaml.safe_load((REPO / "benchmarks" / "pipelines.yaml").read_text())
    spec = config["pipelines"][PIPELINE]
    for section, key in (("data", "source"), ("model", "weights")):
        value = spec[section][key]
        prefix = "folder:" if value.startswith("folder:") else ""
        spec[section][key] = prefix + str((REPO / "benchmarks" / value.removeprefix(prefix)).resolve())
    spec["train"]["epochs"] = (epochs or spec["train"]["epochs"]) + more_epochs
    path = work / f"pipelines-{more_epochs}.yaml"
    path.write_text(yaml.safe_dump({"defaults": config.get("defaults", {}), "pipelines": {PIPELINE: spec}}))
    return path


def timed_run(label: str, pipelines: Path, artifacts: str, env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [CONVFLOW, "run", PIPELINE, "-f", str(pipelines), "--artifacts", artifacts],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{label} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds, done.stdout + done.stderr


def moved(output: str) -> dict[str, int | float]:
    """Files moved by one run's stages, from their `<stage>: downloaded ...` log lines."""
    totals = {"downloaded": 0, "downloaded_mb": 0.0, "cached": 0, "uploaded": 0, "uploaded_mb": 0.0}
    for match in MOVED.finditer(output):
        totals["downloaded"] += int(match["down"])
        totals["downloaded_mb"] += float(match["mb"])
        totals["cached"] += int(match["cached"])
        totals["uploaded"] += int(match["up"])
        totals["uploaded_mb"] += float(match["upmb"])
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the pipeline's)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="convflow-object-store-"))
    work.mkdir(parents=True, exist_ok=True)
    store_env = start_store()
    env = {**os.environ, **store_env, "CONVFLOW_CACHE_DIR": str(work / "cache"), "PREFECT_HOME": str(work / "prefect")}
    pipelines = pipelines_file(work, args.epochs)
    local = str(work / "artifacts")
    remote = "s3://convflow/benchmark"

    local_first, _ = timed_run("1. local, first run", pipelines, local, env, work)
    local_rerun, _ = timed_run("2. local, rerun", pipelines, local, env, work)
    s3_first, first_log = timed_run("3. s3, first run (empty cache)", pipelines, remote, env, work)
    s3_rerun, rerun_log = timed_run("4. s3, rerun on the same machine", pipelines, remote, env, work)
    _, more_log = timed_run(
        "5. s3, one more epoch, same machine", pipelines_file(work, args.epochs, 1), remote, env, work
    )
    elsewhere = {**env, "CONVFLOW_CACHE_DIR": str(work / "cache-elsewhere")}
    _, elsewhere_log = timed_run(
        "6. s3, two more epochs, another machine", pipelines_file(work, args.epochs, 2), remote, elsewhere, work
    )
    print()
    print("| run | local root (s) | s3:// root (s) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| first run | {local_first:.1f} | {s3_first:.1f} | {s3_first / local_first:.2f}x | ≤ 1.15x |")
    print(f"| cached rerun | {local_rerun:.1f} | {s3_rerun:.1f} | {s3_rerun / local_rerun:.2f}x | ≤ 1.5x |")
    print()
    print("| s3 run | files downloaded (MB) | files from the local cache | files uploaded (MB) |")
    print("|---|---|---|---|")
    for label, log in (
        ("3. first run, empty cache", first_log),
        ("4. rerun, same machine", rerun_log),
        ("5. one more epoch, same machine", more_log),
        ("6. two more epochs, another machine", elsewhere_log),
    ):
        totals = moved(log)
        print(
            f"| {label} | {totals['downloaded']} ({totals['downloaded_mb']:.1f}) | {totals['cached']} | "
            f"{totals['uploaded']} ({totals['uploaded_mb']:.1f}) |"
        )


if __name__ == "__main__":
    main()
