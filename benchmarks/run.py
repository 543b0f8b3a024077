"""Side-by-side benchmarks: convflow against plain Keras, its input pipeline, Prefect's cost.

    .venv/bin/python benchmarks/run.py [--repeats N] [--mnist-repeats M]
                                       [--only digits|mnist|input|layout|placement ...] [--working-tree]

It measures convflow as committed at HEAD (convflow/ and pipelines.yaml exported to a temporary
folder), so that edits made to the working tree while it runs cannot change the code under test
or its cache keys; --working-tree measures the working tree instead. Prints a table per section
and rewrites that section of benchmarks/RESULTS.md (the others, and the hand-written part at its
end, stay). Every number is the median over --repeats (default 3); the mnist section, about 5
minutes a repeat (all four runs), uses --mnist-repeats (default 1). Sections (all by default):

  digits  `convflow run digits-cnn` (fresh artifacts) vs benchmarks/plain_keras.py digits, both as
          subprocesses: wall time, training images/s, peak RSS, test accuracy; then convflow's fully
          cached rerun (its own temporary Prefect server, and against a running `prefect server
          start`), a rerun with only train.epochs changed, Prefect's per-task cost on cached
          stages, and `convflow --help`.
  mnist   `convflow run mnist` vs benchmarks/plain_keras.py mnist (3 epochs, batch 128), then
          convflow's cached rerun and a rerun with only train.epochs changed (to 2).
  input   in-process: reading convflow's TFRecords (features.read_dataset, cache=False, one pass,
          batch 128) vs decoding the source every epoch (MNIST IDX gz; flowers JPEGs); the TFRecord
          write rate of to_tfrecords.write_tfrecords; the input-bound ratio (training steps fed by
          the real TFRecord pipeline / fed by 50 of its batches cached in memory).
  layout  in-process: write (all cores) and read rates and size of TFRecords of MNIST and of
          1,000 flowers photos at 96 and 224 px, as raw uint8 (uncompressed: convflow's default;
          GZIP), PNG and JPEG records: the measurement behind features.py's choice of layout.
  placement  `convflow run digits-cnn` against one running `prefect server start`, training in the
          flow's process, then on the worker of a work pool (`convflow worker` on this machine):
          what placing the train stage on a worker costs (goal: under 10 s).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONVFLOW = str(Path(PYTHON).parent / "convflow")
DATA = ROOT.parent / "shared" / "data"
CODE = ROOT  # the convflow under test (its package and pipelines.yaml): main() sets it
DATA_STAGES = ("download_and_split", "to_tfrecords")
RERUN_EPOCHS = 5  # digits' rerun with only train.epochs changed (from 10)
MNIST_RERUN_EPOCHS = 2  # mnist's (from 3)
STEPS, WARMUP_STEPS, IN_MEMORY_BATCHES = 150, 20, 50


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
    env.update(PYTHONPATH=str(CODE), **extra_env)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=CODE, env=env, stdout=out, stderr=err)
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
    process = run_process([PYTHON, str(ROOT / "benchmarks" / "plain_keras.py"), dataset,
                           "--epochs", str(epochs), "--batch-size", str(batch_size)])
    result = last_json(process.stdout)
    return {"wall": process.wall, "cpu": process.cpu, "rss": process.peak_rss_mb, "ips": result["images_per_second"],
            "best_epoch_ips": result["best_epoch_images_per_second"], "accuracy": result["test_accuracy"]}


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
    return {"wall": process.wall, "cpu": process.cpu, "rss": process.peak_rss_mb, "accuracy": summary["test_accuracy"],
            "ips": trained["images_per_second"], **stages,
            "best_epoch_ips": best_epoch_images_per_second(
                trained, artifacts / pipeline / summary["run_id"] / "download_and_split" / "splits.parquet"),
            "outside stages": process.wall - sum(stages.values())}


@contextlib.contextmanager
def running_prefect_server(home: Path):
    """`prefect server start` on a free port of 127.0.0.1 (its own PREFECT_HOME); yields its API URL."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api_url}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("prefect server start did not answer within 120 s")
            time.sleep(0.2)
        yield api_url
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- sections -----------------------------------------------------------------------------------


def epochs_changed_file(directory: Path, pipeline: str, epochs: int) -> Path:
    """A pipelines file whose only pipeline is `pipeline` of pipelines.yaml with train.epochs changed."""
    import yaml

    document = yaml.safe_load((CODE / "pipelines.yaml").read_text())
    body = document["pipelines"][pipeline]
    body["train"] = {**body.get("train", {}), "epochs": epochs}
    path = directory / "pipelines-epochs.yaml"
    path.write_text(yaml.safe_dump({"defaults": document.get("defaults", {}), "pipelines": {pipeline: body}}))
    return path


def rerun_measurements(pipeline: str, artifacts: Path, scratch: Path, rerun_epochs: int) -> dict:
    """After a first run into `artifacts`: the fully cached rerun, then a rerun with only
    train.epochs changed (to `rerun_epochs`)."""
    cached, summary = convflow_run(pipeline, artifacts)
    cached_stages = [stage["seconds"] for stage in summary["stages"] if stage["cached"]]
    rerun, rerun_summary = convflow_run(pipeline, artifacts, epochs_changed_file(scratch, pipeline, rerun_epochs))
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


def digits_repeat(scratch: Path) -> dict:
    artifacts = scratch / "artifacts"
    result = {f"plain_{key}": value for key, value in plain_keras("digits", 10, 64).items()}
    result.update({f"cf_{key}": value for key, value in convflow_fresh("digits-cnn", artifacts).items()})
    result.update(rerun_measurements("digits-cnn", artifacts, scratch, RERUN_EPOCHS))
    help_walls = [run_process([CONVFLOW, "--help"]).wall for _ in range(3)]
    with running_prefect_server(scratch / "prefect-home") as api_url:
        convflow_run("digits-cnn", artifacts, PREFECT_API_URL=api_url)  # the server's first flow registers it
        served, _ = convflow_run("digits-cnn", artifacts, PREFECT_API_URL=api_url)
    return {"served_cached_wall": served.wall, **result, "help_wall": statistics.median(help_walls)}


def mnist_repeat(scratch: Path) -> dict:
    artifacts = scratch / "artifacts"
    result = {f"plain_{key}": value for key, value in plain_keras("mnist", 3, 128).items()}
    result.update({f"cf_{key}": value for key, value in convflow_fresh("mnist", artifacts).items()})
    result.update(rerun_measurements("mnist", artifacts, scratch, MNIST_RERUN_EPOCHS))
    return result


PLACEMENT_POOL = "bench-gpu"
PLACEMENT_GOAL_SECONDS = 10.0


def work_pool_file(directory: Path, pipeline: str, pool: str) -> Path:
    """A pipelines file whose only pipeline is `pipeline` of pipelines.yaml, trained on work pool `pool`."""
    import yaml

    document = yaml.safe_load((CODE / "pipelines.yaml").read_text())
    body = document["pipelines"][pipeline]
    body["train"] = {**body.get("train", {}), "work_pool": pool}
    path = directory / "pipelines-pool.yaml"
    path.write_text(yaml.safe_dump({"defaults": document.get("defaults", {}), "pipelines": {pipeline: body}}))
    return path


@contextlib.contextmanager
def convflow_worker(api_url: str, pool: str, folder: Path):
    """`convflow worker --pool` (from CODE) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(CODE), "PREFECT_API_URL": api_url}
    log = folder / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen([CONVFLOW, "worker", "--pool", pool], cwd=folder, env=env, stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "started!" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"convflow worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)


def placement_repeat(scratch: Path) -> dict:
    """digits-cnn's first run against one running server: training in the flow's process, and on a
    work pool's worker on this machine. Each run has fresh artifacts, so nothing is cached."""
    with running_prefect_server(scratch / "prefect-home") as api_url, \
            convflow_worker(api_url, PLACEMENT_POOL, scratch / "worker"):
        convflow_run("digits-cnn", scratch / "warm-up", PREFECT_API_URL=api_url)  # the server's first flow
        here, here_summary = convflow_run("digits-cnn", scratch / "here", PREFECT_API_URL=api_url)
        pool_file = work_pool_file(scratch, "digits-cnn", PLACEMENT_POOL)
        pool, pool_summary = convflow_run("digits-cnn", scratch / "pool", pool_file, PREFECT_API_URL=api_url)
    train_seconds = [next(stage["seconds"] for stage in summary["stages"] if stage["name"] == "train")
                     for summary in (here_summary, pool_summary)]
    return {"here_wall": here.wall, "pool_wall": pool.wall, "here_train": train_seconds[0],
            "pool_train": train_seconds[1], "here_accuracy": here_summary["test_accuracy"],
            "pool_accuracy": pool_summary["test_accuracy"]}


def placement_rows(m: dict) -> list[Row]:
    extra = m["pool_wall"] - m["here_wall"]
    return [
        Row("whole run, wall s (baseline: training in the flow's process)", m["pool_wall"], m["here_wall"],
            f"+{extra:.2f} s", f"< +{PLACEMENT_GOAL_SECONDS:.0f} s", extra < PLACEMENT_GOAL_SECONDS),
        Row("train stage, wall s (baseline: in the flow's process)", m["pool_train"], m["here_train"],
            f"+{m['pool_train'] - m['here_train']:.2f} s"),
        Row("test accuracy", m["pool_accuracy"], m["here_accuracy"],
            f"{100 * (m['pool_accuracy'] - m['here_accuracy']):+.2f} pt"),
    ]


def compare_rows(m: dict, whole_run_target: str, whole_run_ok: bool, real_mnist: bool) -> list[Row]:
    """The side-by-side rows. The issue's training-rate and accuracy targets are for real MNIST;
    on digits the two test sets differ (convflow splits by content hash), one image is ~0.6 pt."""
    ips_ratio = m["cf_ips"] / m["plain_ips"]
    points = (m["cf_accuracy"] - m["plain_accuracy"]) * 100
    stages = [Row(f"first run: {key.removeprefix('cf_stage ')} stage, wall s", value)
              for key, value in m.items() if key.startswith("cf_stage ")]
    return [
        Row("whole run, wall s", m["cf_wall"], m["plain_wall"], f"{m['cf_wall'] / m['plain_wall']:.2f}x",
            whole_run_target, whole_run_ok),
        Row("whole run, CPU s (user + system)", m["cf_cpu"], m["plain_cpu"], f"{m['cf_cpu'] / m['plain_cpu']:.2f}x"),
        Row("training images/s", m["cf_ips"], m["plain_ips"], f"{ips_ratio:.3f}x",
            *((">= 1.0x", ips_ratio >= 1.0) if real_mnist else ())),
        Row("training images/s, fastest epoch", m["cf_best_epoch_ips"], m["plain_best_epoch_ips"],
            f"{m['cf_best_epoch_ips'] / m['plain_best_epoch_ips']:.3f}x"),
        Row("peak RSS, MB", m["cf_rss"], m["plain_rss"], f"{m['cf_rss'] / m['plain_rss']:.2f}x"),
        Row("test accuracy", m["cf_accuracy"], m["plain_accuracy"], f"{points:+.2f} pt",
            *(("within 0.3 pt", abs(points) <= 0.3) if real_mnist else ())),
        *stages,
        Row("first run: outside stages (start-up, Prefect server, exit), wall s", m["cf_outside stages"]),
    ]


def rerun_rows(m: dict, rerun_epochs: int) -> list[Row]:
    cached_ratio = m["cached_wall"] / m["cf_wall"]
    return [
        Row("cached rerun, wall s (baseline: first run)", m["cached_wall"], m["cf_wall"], f"{cached_ratio:.2f}x",
            "<= 0.2x", cached_ratio <= 0.2),
        Row("cached rerun, CPU s (baseline: first run)", m["cached_cpu"], m["cf_cpu"],
            f"{m['cached_cpu'] / m['cf_cpu']:.2f}x"),
        Row(f"rerun, epochs {rerun_epochs}, wall s (baseline: first run)", m["rerun_wall"], m["cf_wall"],
            f"{m['rerun_wall'] / m['cf_wall']:.2f}x", "data stages cached", m["rerun_data_cached"] == 1.0),
        Row(f"Prefect: s per cached task ({m['cached_stage_count']:.0f} cached)", m["per_task"]),
        Row("Prefect: cached run outside its stages, s", m["outside_stages"]),
    ]


def digits_rows(m: dict) -> list[Row]:
    return [
        *compare_rows(m, "<= plain + 15 s", m["cf_wall"] <= m["plain_wall"] + 15, real_mnist=False),
        *rerun_rows(m, RERUN_EPOCHS),
        Row("cached rerun against a running Prefect server, wall s", m["served_cached_wall"], target="< 3 s",
            ok=m["served_cached_wall"] < 3.0),
        Row("convflow --help, wall s", m["help_wall"], target="< 1 s", ok=m["help_wall"] < 1.0),
    ]


def mnist_rows(m: dict) -> list[Row]:
    ratio = m["cf_wall"] / m["plain_wall"]
    return [*compare_rows(m, "<= 1.10x", ratio <= 1.10, real_mnist=True), *rerun_rows(m, MNIST_RERUN_EPOCHS)]


def input_rows(m: dict) -> list[Row]:
    def read(name: str, baseline: str) -> Row:
        ratio = m[f"{name}_tfrecord_ips"] / m[f"{name}_source_ips"]
        return Row(f"{name}: read images/s, TFRecords (baseline: {baseline})", m[f"{name}_tfrecord_ips"],
                   m[f"{name}_source_ips"], f"{ratio:.2f}x")

    bound = m["real_step_s"] / m["in_memory_step_s"]
    cpu_bound = m["real_step_cpu"] / m["in_memory_step_cpu"]
    return [
        read("mnist", "IDX gz parsed per epoch"),
        read("flowers", "JPEG decode+resize per epoch"),
        Row("flowers: TFRecord write images/s (write_tfrecords)", m["flowers_write_ips"]),
        Row("mnist: TFRecord write images/s (write_tfrecords)", m["mnist_write_ips"]),
        Row(f"mnist_cnn step, ms (median of {STEPS}), TFRecord input (baseline: in memory)",
            m["real_step_s"] * 1000, m["in_memory_step_s"] * 1000, f"{bound:.3f}x", "<= 1.05", bound <= 1.05),
        Row("mnist_cnn step, CPU ms (mean), TFRecord input (baseline: in memory)", m["real_step_cpu"] * 1000,
            m["in_memory_step_cpu"] * 1000, f"{cpu_bound:.3f}x"),
    ]


# ---- input pipeline (in-process) ----------------------------------------------------------------


def images_per_second(dataset) -> float:
    started, count = time.perf_counter(), 0
    for images, *_ in dataset:
        count += int(images.shape[0])
    return count / (time.perf_counter() - started)


def write_tfrecords_timed(data, directory: Path):
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    split_set = split_dataset(data, directory / "split")
    started = time.perf_counter()
    tfrecords = write_tfrecords(split_set, data, directory / "tfrecords")
    return split_set, tfrecords, sum(tfrecords.counts.values()) / (time.perf_counter() - started)


def idx_source_dataset(batch_size: int):
    """MNIST train images and labels, gunzipped and parsed from the IDX files on every pass."""
    import tensorflow as tf

    def parse(path, header: int, shape):
        raw = tf.io.decode_compressed(tf.io.read_file(path), "GZIP")
        return tf.reshape(tf.io.decode_raw(tf.strings.substr(raw, header, -1), tf.uint8), shape)

    files = tf.data.Dataset.from_tensors(
        (str(DATA / "mnist" / "train-images-idx3-ubyte.gz"), str(DATA / "mnist" / "train-labels-idx1-ubyte.gz"))
    )
    arrays = files.map(lambda images, labels: (parse(images, 16, [-1, 28, 28, 1]), parse(labels, 8, [-1])))
    batches = arrays.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y))).batch(batch_size)
    return batches.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def jpeg_source_dataset(paths: list[str], labels: list[int], size: tuple[int, int], batch_size: int):
    """Read, decode and resize every JPEG on every pass."""
    import tensorflow as tf

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, size), label

    examples = tf.data.Dataset.from_tensor_slices((paths, labels)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def mnist_classifier():
    """convflow's mnist_cnn classifier (build_base + freeze_and_wrap), compiled as train compiles it."""
    import keras

    from convflow.config import ModelConfig
    from convflow.tasks.build_base import make_base
    from convflow.tasks.freeze_and_wrap import wrap

    model_config = ModelConfig(base="mnist_cnn")
    model = wrap(make_base(model_config, (28, 28, 1), 0), model_config, 10, 0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def step_cost(model, dataset) -> tuple[float, float]:
    """Median wall seconds and mean CPU seconds (this process, input threads included) of one
    training step (next batch + train_on_batch) over STEPS steps, after WARMUP_STEPS (tracing,
    the first fill of the shuffle buffer). The iterator, and its prefetching, ends on return."""
    iterator = iter(dataset)
    for _ in range(WARMUP_STEPS):
        model.train_on_batch(*next(iterator))
    walls, cpu_started = [], time.process_time()
    for _ in range(STEPS):
        started = time.perf_counter()
        model.train_on_batch(*next(iterator))
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), (time.process_time() - cpu_started) / STEPS


def input_repeat(scratch: Path) -> dict:
    if str(CODE) not in sys.path:
        sys.path.insert(0, str(CODE))
    import pyarrow.parquet as pq

    from convflow.config import DataConfig
    from convflow.tasks.features import read_dataset

    mnist = DataConfig(source=f"idx:{DATA / 'mnist'}", image_size=(28, 28), channels=1)
    flowers = DataConfig(source=f"folder:{DATA / 'flowers'}", image_size=(96, 96), channels=3)
    _, mnist_records, mnist_write = write_tfrecords_timed(mnist, scratch / "mnist")
    flowers_split, flowers_records, flowers_write = write_tfrecords_timed(flowers, scratch / "flowers")
    rows = pq.read_table(flowers_split.splits_parquet).to_pylist()
    train_rows = [row for row in rows if row["split"] == "train"]
    mnist_train = mnist_records.shards["train"]
    training_input = read_dataset(mnist_train, (28, 28), 1, 128, shuffle_buffer=10_000, seed=0)  # as train does
    in_memory = training_input.take(IN_MEMORY_BATCHES).cache()
    for _ in in_memory:  # fill the cache before any timing
        pass
    model = mnist_classifier()
    in_memory_wall, in_memory_cpu = step_cost(model, in_memory.repeat())
    real_wall, real_cpu = step_cost(model, training_input.repeat())
    return {
        "mnist_write_ips": mnist_write,
        "flowers_write_ips": flowers_write,
        "mnist_tfrecord_ips": images_per_second(read_dataset(mnist_train, (28, 28), 1, 128, cache=False)),
        "mnist_source_ips": images_per_second(idx_source_dataset(128)),
        "flowers_tfrecord_ips": images_per_second(
            read_dataset(flowers_records.shards["train"], (96, 96), 3, 128, cache=False)),
        "flowers_source_ips": images_per_second(jpeg_source_dataset(
            [row["path"] for row in train_rows], [row["label"] for row in train_rows], (96, 96), 128)),
        "real_step_s": real_wall,
        "in_memory_step_s": in_memory_wall,
        "real_step_cpu": real_cpu,
        "in_memory_step_cpu": in_memory_cpu,
    }


# ---- TFRecord layouts (in-process) --------------------------------------------------------------

# name -> (image encoding, TFRecord compression); "raw" is convflow's own writer and reader.
LAYOUTS = {"raw (default)": ("raw", "none"), "raw, gzip": ("raw", "gzip"), "png": ("png", "none"),
           "jpeg q95 (lossy)": ("jpeg", "none")}
LAYOUT_SHARD = 1_000


def layout_images() -> dict[str, np.ndarray]:
    """MNIST train (60,000 at 28x28x1) and 1,000 flowers photos at 96 and at 224 px."""
    from convflow import imaging
    from convflow.sources import read_idx

    photos = sorted(str(path) for path in (DATA / "flowers").rglob("*.jpg"))[::4][:1_000]
    return {
        "mnist 28x28x1": read_idx(DATA / "mnist" / "train-images-idx3-ubyte.gz")[..., None],
        "flowers 96x96x3": np.stack([imaging.load_file(path, (96, 96), 3, "stretch") for path in photos]),
        "flowers 224x224x3": np.stack([imaging.load_file(path, (224, 224), 3, "stretch") for path in photos]),
    }


def write_layout(images: np.ndarray, encoding: str, compression: str, directory: Path) -> tuple[float, list[str]]:
    """Write `images` in shards on all cores, as to_tfrecords does; (images/s, shard paths)."""
    import concurrent.futures

    import tensorflow as tf

    from convflow.tasks import features
    from convflow.tasks.to_tfrecords import _write_shard

    directory.mkdir(parents=True)
    starts = range(0, len(images), LAYOUT_SHARD)
    paths = [str(directory / f"s{start:06d}.n{len(images[start:start + LAYOUT_SHARD])}"
                 f"{features.shard_suffix(compression)}") for start in starts]

    def encoded(path: str, chunk: np.ndarray) -> None:
        encode = tf.io.encode_png if encoding == "png" else lambda image: tf.io.encode_jpeg(image, quality=95)
        with tf.io.TFRecordWriter(path) as writer:
            for image in chunk:
                feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode(image).numpy()]))
                writer.write(tf.train.Example(features=tf.train.Features(
                    feature={features.IMAGE: feature})).SerializeToString())

    def write(path: str, start: int) -> None:
        chunk = images[start:start + LAYOUT_SHARD]
        if encoding == "raw":
            _write_shard(Path(path), chunk, np.zeros(len(chunk), np.int64), [str(i) for i in range(len(chunk))],
                         compression)
        else:
            encoded(path, chunk)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, paths, starts))
    return len(images) / (time.perf_counter() - started), paths


def encoded_dataset(paths: list[str], shape: tuple[int, ...], batch_size: int):
    """PNG/JPEG records decoded per image: the same interleave, batching and prefetch as read_dataset."""
    import tensorflow as tf

    from convflow.tasks import features

    spec = {features.IMAGE: tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized):
        image = tf.io.parse_single_example(serialized, spec)[features.IMAGE]
        return tf.ensure_shape(tf.io.decode_image(image, channels=shape[-1], expand_animations=False), shape)

    records = tf.data.Dataset.from_tensor_slices(paths).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(paths), 4), num_parallel_calls=tf.data.AUTOTUNE)
    images = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return images.map(lambda batch: (tf.cast(batch, tf.float32),)).prefetch(tf.data.AUTOTUNE)


def layout_repeat(scratch: Path) -> dict:
    if str(CODE) not in sys.path:
        sys.path.insert(0, str(CODE))
    from convflow.tasks.features import read_dataset

    result = {}
    for dataset, images in layout_images().items():
        for layout, (encoding, compression) in LAYOUTS.items():
            folder = scratch / dataset.replace(" ", "-") / encoding / compression
            result[f"{dataset}|{layout}|write"], paths = write_layout(images, encoding, compression, folder)
            result[f"{dataset}|{layout}|MB"] = sum(os.path.getsize(path) for path in paths) / 1e6
            reader = (lambda: read_dataset(paths, images.shape[1:3], images.shape[3], 128, cache=False)) \
                if encoding == "raw" else (lambda: encoded_dataset(paths, images.shape[1:], 128))
            result[f"{dataset}|{layout}|read"] = max(images_per_second(reader()) for _ in range(2))
    return result


def layout_rows(m: dict) -> list[Row]:
    rows = []
    for dataset in dict.fromkeys(key.split("|")[0] for key in m):
        default = next(iter(LAYOUTS))
        for layout in LAYOUTS:
            for measure in ("write", "read"):
                value, baseline = m[f"{dataset}|{layout}|{measure}"], m[f"{dataset}|{default}|{measure}"]
                rows.append(Row(f"{dataset}, {layout} ({m[f'{dataset}|{layout}|MB']:.1f} MB): {measure} images/s",
                                value, baseline, f"{value / baseline:.2f}x"))
    return rows


# ---- report -------------------------------------------------------------------------------------

SECTIONS = {
    "digits": ("digits-cnn: convflow vs plain Keras (10 epochs, batch 64)", digits_repeat, digits_rows),
    "mnist": ("mnist: convflow vs plain Keras (60,000 / 10,000, 3 epochs, batch 128)", mnist_repeat, mnist_rows),
    "input": ("input pipeline (in-process)", input_repeat, input_rows),
    "layout": ("TFRecord layouts: write and read images/s (baseline: raw uint8, uncompressed)", layout_repeat,
               layout_rows),
    "placement": ("digits-cnn: training on a work pool's worker (train.work_pool) vs in the flow's process",
                  placement_repeat, placement_rows),
}


def measure(section: str, repeats: int) -> tuple[list[Row], list[dict]]:
    """The section's rows over the medians of `repeats` repeats, and each repeat's measurements."""
    _, repeat, rows = SECTIONS[section]
    results = []
    for index in range(repeats):
        print(f"[{section}] repeat {index + 1}/{repeats} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"convflow-bench-{section}-") as scratch:
            results.append(repeat(Path(scratch)))
    medians = {key: statistics.median(result[key] for result in results) for key in results[0]}
    return rows(medians), results


def spread(results: list[dict]) -> str:
    """Each repeat's convflow / plain ratios, for the sections that run both: this VM's speed
    drifts between runs by more than some targets' margins, and a median alone hides that."""
    if not results or "plain_wall" not in results[0]:
        return ""
    def ratios(cf: str, plain: str) -> str:
        return ", ".join(f"{result[cf] / result[plain]:.2f}x" for result in results)
    return (f"Each repeat, convflow / plain: whole run {ratios('cf_wall', 'plain_wall')}; training images/s "
            f"{ratios('cf_ips', 'plain_ips')}; fastest epoch {ratios('cf_best_epoch_ips', 'plain_best_epoch_ips')}.")


NOTES = """## How

- Whole runs are subprocesses timed from start to exit; CPU s is user + system of the process tree
  (convflow's includes its temporary Prefect server); peak RSS is the largest single process's.
- Training images/s: convflow's train stage record (train examples x epochs / seconds of its
  model.fit calls); plain Keras the same over its model.fit. Both fits include the per-epoch
  validation pass (and convflow's its checkpoint saves). "Fastest epoch": train examples / the
  shortest epoch, from convflow's history.parquet and the plain script's own epoch timer.
- plain_keras.py splits digits 80/10/10 at random and holds out 1/9 of MNIST train for
  validation; convflow splits by content hash, so the test sets differ for digits (about 160 vs
  180 images: one image is about 0.6 points). The issue's training-rate and accuracy targets
  are for real MNIST, so the digits rows show those ratios without a verdict.
- convflow trains with its defaults, as a user gets them: steps_per_execution 32 (Keras' default,
  which the plain script keeps, is 1), a checkpoint once 10 s have passed at an epoch's end, and
  tf.data without its autotuner. The plain script hands Keras NumPy arrays, as the tutorials do,
  whose per-epoch iterators keep the autotuner and can stall seconds at an epoch's end (RESULTS.md,
  session 4): its epoch times vary with that; the fastest-epoch row compares the compute alone.
- Input-bound ratio: median step time (next batch + train_on_batch) of one model fed 150 steps
  by 50 batches of the real training input cached in memory, then 150 steps by the real input
  (read_dataset as train builds it), each after a 20-step warm-up (tracing, the first fill of
  the 10,000-example shuffle buffer). 170 steps of batch 128 lie within the first, uncached
  epoch, whose reads cost the most. CPU ms counts this process's threads, tf.data's included.
  (Alternating the two inputs every few steps is biased: the real input's prefetching runs on
  into the in-memory steps.)
- Other jobs share these cores (see the load average): wall times are noisy, CPU s less so.
"""


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def table(rows: list[Row]) -> list[str]:
    lines = ["| measurement | convflow | baseline | ratio | target | ok |", "|---|---:|---:|---:|---|---|"]
    for row in rows:
        verdict = "" if row.ok is None else "PASS" if row.ok else "FAIL"
        lines.append(f"| {row.name} | {_number(row.convflow)} | {_number(row.baseline)} | {row.ratio} "
                     f"| {row.target} | {verdict} |")
    return lines


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def snapshot_head(directory: Path) -> tuple[Path, str]:
    """convflow/ and pipelines.yaml as committed at HEAD, exported under `directory` beside a link
    to ../shared (the pipelines' relative data paths still resolve); and which commit that was."""
    commit = git("rev-parse", "HEAD")
    code = directory / "convflow-head"
    code.mkdir()
    archive = subprocess.run(["git", "archive", commit, "convflow", "pipelines.yaml"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    (directory / "shared").symlink_to(ROOT.parent / "shared")
    return code, f"commit {git('log', '-1', '--format=%h %s', commit)[:100]}"


def _loads(loads: tuple[float, ...]) -> str:
    return ", ".join(f"{load:.2f}" for load in loads)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("tensorflow", "keras", "prefect"))
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}; python " \
           f"{platform.python_version()}, {versions}"


def section_block(section: str, rows: list[Row], results: list[dict], command: str, code: str, loads: tuple) -> str:
    lines = [
        f"## {SECTIONS[section][0]}", "",
        f"`{command}`: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {code}; median of "
        f"{len(results)} repeat(s); load average (1, 5, 15 min) before {_loads(loads[0])}, after {_loads(loads[1])}.",
        "", f"Machine: {machine()}.", "", *table(rows), "",
    ]
    repeat_ratios = spread(results)
    if repeat_ratios:
        lines += [repeat_ratios, ""]
    return "\n".join(lines)


HAND_WRITTEN = "<!-- Below this line is written by hand; benchmarks/run.py keeps it as it is. -->"


def previous_blocks(text: str) -> tuple[dict[str, str], str]:
    """The measured section blocks of an earlier RESULTS.md (by title) and its hand-written tail."""
    measured, _, tail = text.partition(HAND_WRITTEN)
    blocks = {}
    for block in measured.split("\n## ")[1:]:
        title = block.splitlines()[0]
        if title != "How":
            blocks[title] = "## " + block.rstrip() + "\n"
    return blocks, tail.strip()


def report(blocks: dict[str, str], tail: str) -> str:
    """RESULTS.md: the section blocks in SECTIONS order (newly measured or kept), the method notes,
    then the hand-written part."""
    ordered = [blocks[title] for title, *_ in SECTIONS.values() if title in blocks]
    return "\n".join(["# convflow benchmarks", "", *ordered, NOTES, HAND_WRITTEN, "", tail, ""])


def main() -> None:
    global CODE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mnist-repeats", type=int, default=1)
    parser.add_argument("--only", choices=list(SECTIONS), action="append",
                        help="measure only this section (repeatable); RESULTS.md keeps the others as they were")
    parser.add_argument("--working-tree", action="store_true", help="measure the working tree, not HEAD")
    args = parser.parse_args()
    results_file = ROOT / "benchmarks" / "RESULTS.md"
    blocks, tail = previous_blocks(results_file.read_text()) if results_file.exists() else ({}, "")
    command = " ".join([".venv/bin/python benchmarks/run.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="convflow-bench-") as scratch:
        if args.working_tree:
            CODE, code = ROOT, f"the working tree (at commit {git('log', '-1', '--format=%h')}, with its edits)"
        else:
            CODE, code = snapshot_head(Path(scratch))
        for section in args.only or list(SECTIONS):
            before = os.getloadavg()
            rows, results = measure(section, args.mnist_repeats if section == "mnist" else args.repeats)
            print("\n".join(["", SECTIONS[section][0], *table(rows), spread(results)]), flush=True)
            blocks[SECTIONS[section][0]] = section_block(section, rows, results, command, code,
                                                         (before, os.getloadavg()))
            results_file.write_text(report(blocks, tail))  # after each section: a later failure loses nothing


if __name__ == "__main__":
    main()
