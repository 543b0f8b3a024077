"""What several sections of benchmarks/run.py share: where the code under test lies, running it as
subprocesses (convflow's CLI, plain Keras, a Prefect server), and the side-by-side measurements
and rows of the sections that compare convflow with plain Keras (digits, mnist)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONVFLOW = str(Path(PYTHON).parent / "convflow")
DATA = ROOT.parent / "shared" / "data"
DATA_STAGES = ("download_and_split", "to_tfrecords")


@dataclass
class CodeUnderTest:
    """Where the convflow under test lies: a folder holding its package (convflow/, with flows/ and
    tasks/ inside, as installed) and pipelines.yaml. The runner points it at its snapshot before
    any section runs; every section reads it here, so that all of them measure the same code."""

    folder: Path = ROOT


CODE = CodeUnderTest()


def import_code_under_test() -> None:
    """For the in-process sections: `import convflow` finds the code under test before any install."""
    if str(CODE.folder) not in sys.path:
        sys.path.insert(0, str(CODE.folder))


@dataclass
class Row:
    """One line of the table: convflow's number, its baseline's, and the verdict on the target."""

    name: str
    convflow: float
    baseline: float | None = None
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


# ---- subprocesses -------------------------------------------------------------------------------


@dataclass
class Process:
    wall: float
    cpu: float
    peak_rss_mb: float
    stdout: str


def run_process(command: list[str], **extra_env: str) -> Process:
    """Run `command` in CODE, importing convflow from there: wall and CPU time (user + system, the
    process tree's), and the peak RSS of its largest process. PREFECT_API_URL only as `extra_env` says."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(CODE.folder), **extra_env)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=CODE.folder, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # rusage of this child (and what it waited for)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read()
        if process.returncode:
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{err.read()[-3000:]}")
    return Process(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def plain_keras(dataset: str, epochs: int, batch_size: int) -> dict:
    process = run_process(
        [
            PYTHON,
            str(ROOT / "benchmarks" / "plain_keras.py"),
            dataset,
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batch_size),
        ]
    )
    result = last_json(process.stdout)
    return {
        "wall": process.wall,
        "cpu": process.cpu,
        "rss": process.peak_rss_mb,
        "ips": result["images_per_second"],
        "best_epoch_ips": result["best_epoch_images_per_second"],
        "accuracy": result["test_accuracy"],
    }


def convflow_run(
    pipeline: str, artifacts: Path, pipelines_file: Path | None = None, **extra_env: str
) -> tuple[Process, dict]:
    command = [CONVFLOW, "run", pipeline, "--artifacts", str(artifacts), "--json"]
    if pipelines_file is not None:
        command += ["-f", str(pipelines_file)]
    process = run_process(command, **extra_env)
    return process, last_json(process.stdout)


def trained_record(artifacts: Path, summary: dict) -> dict:
    """The train stage's TrainedModel record of this run, from Prefect's stored results."""
    train_dir = str(artifacts.resolve() / summary["pipeline"] / summary["run_id"] / "train")
    for path in (artifacts / ".prefect-results").glob("train-*"):
        record = json.loads(json.loads(path.read_text())["result"])["data"]
        if record["output_dir"] == train_dir:
            return record
    raise LookupError(f"no train record for {train_dir}")


def best_epoch_images_per_second(trained: dict, splits_parquet: Path) -> float:
    """Train images / the fastest epoch's seconds, from the run's splits.parquet and history.parquet."""
    import pyarrow.parquet as pq

    train_images = pq.read_table(splits_parquet, columns=["split"]).column("split").to_pylist().count("train")
    return train_images / min(pq.read_table(trained["history_parquet"]).column("seconds").to_pylist())


def convflow_fresh(pipeline: str, artifacts: Path) -> dict:
    process, summary = convflow_run(pipeline, artifacts)
    stages = {f"stage {stage['name']}": stage["seconds"] for stage in summary["stages"]}
    trained = trained_record(artifacts, summary)
    return {
        "wall": process.wall,
        "cpu": process.cpu,
        "rss": process.peak_rss_mb,
        "accuracy": summary["test_accuracy"],
        "ips": trained["images_per_second"],
        **stages,
        "best_epoch_ips": best_epoch_images_per_second(
            trained, artifacts / pipeline / summary["run_id"] / "download_and_split" / "splits.parquet"
        ),
        "outside stages": process.wall - sum(stages.values()),
    }


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, failure: Callable[[], str], seconds: float = 120
) -> None:
    """Poll `ready()` until it is true; RuntimeError(`failure()`) once `process` exits or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(failure())
        time.sleep(0.2)


def answers(url: str) -> bool:
    """Whether a GET of `url` succeeds within a second."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
        return True
    return False


@contextlib.contextmanager
def running_prefect_server(home: Path):
    """`prefect server start` on a free port of 127.0.0.1 (its own PREFECT_HOME); yields its API URL."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
    }
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: answers(f"{api_url}/health"), server, lambda: "prefect server start did not answer within 120 s"
        )
        yield api_url
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- convflow vs plain Keras (digits, mnist) ----------------------------------------------------


def train_changed_file(path: Path, pipeline: str, **train: object) -> Path:
    """`path`: a pipelines file whose only pipeline is `pipeline` of the code under test's
    pipelines.yaml with its train settings changed as `train` says."""
    import yaml

    document = yaml.safe_load((CODE.folder / "pipelines.yaml").read_text())
    body = document["pipelines"][pipeline]
    body["train"] = {**body.get("train", {}), **train}
    path.write_text(yaml.safe_dump({"defaults": document.get("defaults", {}), "pipelines": {pipeline: body}}))
    return path


def rerun_measurements(pipeline: str, artifacts: Path, scratch: Path, rerun_epochs: int) -> dict:
    """After a first run into `artifacts`: the fully cached rerun, then a rerun with only
    train.epochs changed (to `rerun_epochs`)."""
    cached, summary = convflow_run(pipeline, artifacts)
    cached_stages = [stage["seconds"] for stage in summary["stages"] if stage["cached"]]
    epochs_changed = train_changed_file(scratch / "pipelines-epochs.yaml", pipeline, epochs=rerun_epochs)
    rerun, rerun_summary = convflow_run(pipeline, artifacts, epochs_changed)
    rerun_hits = {stage["name"] for stage in rerun_summary["stages"] if stage["cached"]}
    return {
        "cached_wall": cached.wall,
        "cached_cpu": cached.cpu,
        "cached_stage_count": len(cached_stages),
        "per_task": statistics.mean(cached_stages) if cached_stages else float("nan"),
        "outside_stages": cached.wall - sum(stage["seconds"] for stage in summary["stages"]),
        "rerun_wall": rerun.wall,
        "rerun_data_cached": float(set(DATA_STAGES) <= rerun_hits),
    }


def side_by_side(dataset: str, pipeline: str, epochs: int, batch_size: int, scratch: Path, rerun_epochs: int) -> dict:
    """plain_keras.py on `dataset`, then `pipeline`'s first run into scratch/artifacts, its cached
    rerun and a rerun with train.epochs changed: plain_* and cf_* keys, then rerun_measurements'."""
    artifacts = scratch / "artifacts"
    result = {f"plain_{key}": value for key, value in plain_keras(dataset, epochs, batch_size).items()}
    result.update({f"cf_{key}": value for key, value in convflow_fresh(pipeline, artifacts).items()})
    result.update(rerun_measurements(pipeline, artifacts, scratch, rerun_epochs))
    return result


def compare_rows(m: dict, whole_run_target: str, whole_run_ok: bool, real_mnist: bool) -> list[Row]:
    """The side-by-side rows. The issue's training-rate and accuracy targets are for real MNIST;
    on digits the two test sets differ (convflow splits by content hash), one image is ~0.6 pt."""
    ips_ratio = m["cf_ips"] / m["plain_ips"]
    points = (m["cf_accuracy"] - m["plain_accuracy"]) * 100
    stages = [
        Row(f"first run: {key.removeprefix('cf_stage ')} stage, wall s", value)
        for key, value in m.items()
        if key.startswith("cf_stage ")
    ]
    return [
        Row(
            "whole run, wall s",
            m["cf_wall"],
            m["plain_wall"],
            f"{m['cf_wall'] / m['plain_wall']:.2f}x",
            whole_run_target,
            whole_run_ok,
        ),
        Row("whole run, CPU s (user + system)", m["cf_cpu"], m["plain_cpu"], f"{m['cf_cpu'] / m['plain_cpu']:.2f}x"),
        Row(
            "training images/s",
            m["cf_ips"],
            m["plain_ips"],
            f"{ips_ratio:.3f}x",
            *((">= 1.0x", ips_ratio >= 1.0) if real_mnist else ()),
        ),
        Row(
            "training images/s, fastest epoch",
            m["cf_best_epoch_ips"],
            m["plain_best_epoch_ips"],
            f"{m['cf_best_epoch_ips'] / m['plain_best_epoch_ips']:.3f}x",
        ),
        Row("peak RSS, MB", m["cf_rss"], m["plain_rss"], f"{m['cf_rss'] / m['plain_rss']:.2f}x"),
        Row(
            "test accuracy",
            m["cf_accuracy"],
            m["plain_accuracy"],
            f"{points:+.2f} pt",
            *(("within 0.3 pt", abs(points) <= 0.3) if real_mnist else ()),
        ),
        *stages,
        Row("first run: outside stages (start-up, Prefect server, exit), wall s", m["cf_outside stages"]),
    ]


def rerun_rows(m: dict, rerun_epochs: int) -> list[Row]:
    cached_ratio = m["cached_wall"] / m["cf_wall"]
    return [
        Row(
            "cached rerun, wall s (baseline: first run)",
            m["cached_wall"],
            m["cf_wall"],
            f"{cached_ratio:.2f}x",
            "<= 0.2x",
            cached_ratio <= 0.2,
        ),
        Row(
            "cached rerun, CPU s (baseline: first run)",
            m["cached_cpu"],
            m["cf_cpu"],
            f"{m['cached_cpu'] / m['cf_cpu']:.2f}x",
        ),
        Row(
            f"rerun, epochs {rerun_epochs}, wall s (baseline: first run)",
            m["rerun_wall"],
            m["cf_wall"],
            f"{m['rerun_wall'] / m['cf_wall']:.2f}x",
            "data stages cached",
            m["rerun_data_cached"] == 1.0,
        ),
        Row(f"Prefect: s per cached task ({m['cached_stage_count']:.0f} cached)", m["per_task"]),
        Row("Prefect: cached run outside its stages, s", m["outside_stages"]),
    ]


# ---- in-process sections (input, layout) --------------------------------------------------------


def images_per_second(dataset) -> float:
    started, count = time.perf_counter(), 0
    for images, *_ in dataset:
        count += int(images.shape[0])
    return count / (time.perf_counter() - started)
