"""Shared fixtures: a tiny pipelines file, generated image folders and IDX files, and the
digits pipeline run stage by stage once per session (12x12 digits, mnist_cnn, two epochs)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONVFLOW = str(Path(sys.executable).with_name("convflow"))


def _tiny_pipelines() -> dict:
    """pipelines.yaml's `defaults` and its `smoke` pipeline, one epoch shorter, named `tiny`."""
    document = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    tiny = document["pipelines"]["smoke"]
    tiny["train"]["epochs"] -= 1
    assert tiny["train"]["epochs"] >= 1, "the smoke pipeline in pipelines.yaml is too short to shrink"
    return {"defaults": document["defaults"], "pipelines": {"tiny": tiny}}


TINY_PIPELINES = _tiny_pipelines()

# The stages of a run, in order.
STAGES = [
    "download_and_split",
    "to_tfrecords",
    "check_data",
    "build_base",
    "freeze_and_wrap",
    "train",
    "evaluate",
    "export_savedmodel",
    "write_report",
]
# A training flow run's task runs: the stages, and promotion after export (never cached).
TASKS = [*STAGES[:-1], "promote", STAGES[-1]]

# Generated folders are small, so their test share is larger than the default 0.1: every class
# then has test examples (split_dataset refuses a split that lacks a class).
FOLDER_SPLIT = {"train": 0.5, "validation": 0.2, "test": 0.3}


def pytest_configure(config):
    # Prefect keeps its database under PREFECT_HOME; give the test session its own, so that
    # tests neither read nor lock the developer's ~/.prefect while training jobs run.
    prefect_home = tempfile.mkdtemp(prefix="convflow-tests-prefect-")
    config._convflow_prefect_home = prefect_home
    os.environ["PREFECT_HOME"] = prefect_home
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    # Keras' TensorFlow backend under NumPy 2 warns on every tensor conversion; not convflow's.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


def pytest_collection_modifyitems(config, items):
    """In a pytest-xdist worker: each test's xdist_group where loadgroup finds it, and the modules
    that start servers or run whole pipelines first (the scheduler hands out the groups, then the
    other tests in collection order: a minutes-long test picked up last would leave the other
    workers idle while it runs). A run without workers keeps the files' order."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    if config.getoption("loadgroup", False):
        for item in items:
            _suffix_xdist_group(item)
    heavy = ("e2e", "server", "slow")
    weight: dict[Path, int] = {}
    for item in items:
        marked = sum(item.get_closest_marker(name) is not None for name in heavy)
        weight[item.path] = max(weight.get(item.path, 0), marked)
    items.sort(key=lambda item: -weight[item.path])  # stable: a module's tests keep their order


def _suffix_xdist_group(item) -> None:
    """loadgroup groups the tests whose node ids end in "@<group>"; pytest-xdist 3.8 appends it to an
    attribute that pytest 9.2 no longer reads, so the groups were silently ignored
    (pytest-dev/pytest-xdist#1386). Appended here where pytest 9.2 reads it; a no-op once xdist
    appends it itself."""
    from _pytest.nodeid import NodeId

    mark = item.get_closest_marker("xdist_group")
    if mark is not None and "@" not in item.nodeid and hasattr(item, "_id"):
        item._id = NodeId.parse(f"{item.nodeid}@{mark.args[0] if mark.args else mark.kwargs['name']}")


def pytest_unconfigure(config):
    home = getattr(config, "_convflow_prefect_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: offline Prefect, quiet TensorFlow, no inherited cache path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=os.environ["PREFECT_HOME"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        # Prefect's own temporary server (a flow called without the CLI) may take longer than its
        # default 20 s to start while parallel workers load both cores.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return env


# ----------------------------------------------------------------------------- convflow commands


def last_json_line(output: str) -> dict:
    """The JSON document on the last line of `output` (`--json` prints its summary there)."""
    return json.loads(output.strip().splitlines()[-1])


def wait_for(condition, timeout: float, describe, interval: float = 0.5):
    """condition()'s first true value, asked every `interval` s; fail with describe() after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s: {describe()}")


@dataclasses.dataclass
class ConvflowRun:
    """A `convflow ... --json` that exited 0: the summary on its last stdout line, and its output."""

    summary: dict
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def start_convflow(
    args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, program: Sequence[str] = (CONVFLOW,)
) -> subprocess.Popen:
    """`convflow ARGS` started (`program`: another way in to convflow's main), its output captured;
    env: subprocess_env() unless given."""
    return subprocess.Popen(
        [*program, *args],
        cwd=cwd,
        env=subprocess_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_convflow(process: subprocess.Popen, timeout: float = 540) -> ConvflowRun:
    """Wait for a started `convflow ... --json` (killed after `timeout` s), assert it exited 0, parse its summary."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return ConvflowRun(last_json_line(stdout), stdout, stderr)


def run_convflow(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 540,
    program: Sequence[str] = (CONVFLOW,),
) -> ConvflowRun:
    """`convflow ARGS` (with --json among them) as a subprocess that must exit 0; its summary and output."""
    return finish_convflow(start_convflow(args, cwd=cwd, env=env, program=program), timeout)


def run_tiny(root: Path, env: dict[str, str] | None = None) -> dict:
    """`convflow run tiny --json` in `root` (pipelines.yaml there, artifacts/ beside it); its summary
    with `cached` (stage name: cache hit, in run order), `run_dir` and `output` added."""
    run = run_convflow(["run", "tiny", "-f", "pipelines.yaml", "--artifacts", "artifacts", "--json"], cwd=root, env=env)
    summary = run.summary
    summary["cached"] = {stage["name"]: stage["cached"] for stage in summary["stages"]}
    summary["run_dir"] = root / "artifacts" / "tiny" / summary["run_id"]
    summary["output"] = run.output
    return summary


# ----------------------------------------------------------------------------- pipelines files


def write_yaml(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False) if not isinstance(document, str) else document)
    return path


class TinyRunner:
    """`convflow run tiny` as a user runs it, in its own folder; each run's JSON summary, with
    which stages were cache hits, its run folder and its output."""

    def __init__(self, root: Path):
        self.root = root
        self.file = root / "pipelines.yaml"
        self.artifacts = root / "artifacts"
        write_yaml(self.file, TINY_PIPELINES)

    def set_epochs(self, epochs: int) -> None:
        document = json.loads(json.dumps(TINY_PIPELINES))
        document["pipelines"]["tiny"]["train"]["epochs"] = epochs
        write_yaml(self.file, document)

    def run(self) -> dict:
        return run_tiny(self.root)

    def catalog_ids(self) -> list[str]:
        import pyarrow.parquet as pq

        return [row["run_id"] for row in pq.read_table(self.artifacts / "runs.parquet").to_pylist()]


@pytest.fixture
def tiny_document():
    """A deep copy of the tiny pipelines document, for a test to change."""
    return yaml.safe_load(yaml.safe_dump(TINY_PIPELINES))


@pytest.fixture
def pipelines_file(tmp_path, tiny_document) -> Path:
    """tmp_path/pipelines.yaml holding one pipeline, `tiny`, shaped like `smoke`."""
    return write_yaml(tmp_path / "pipelines.yaml", tiny_document)


# ----------------------------------------------------------------------------- image folders


def _pattern(seed: int, shape: tuple[int, int], channels: int, label: int) -> np.ndarray:
    """Random pixels plus a class-dependent stripe: every image differs, classes are learnable."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(*shape, channels), dtype=np.uint8)
    pixels[:, label * 3 : label * 3 + 3] = 255
    return pixels


def save_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if mode:
        image = image.convert(mode)
    image.save(path)
    return path


def make_image_folder(
    root: Path, classes=("cat", "dog", "owl"), per_class: int = 20, start: int = 0, size=(16, 20), suffix=".png"
) -> Path:
    """root/<class>/img-NNN<suffix>: `per_class` distinct RGB images per class, numbered from `start`."""
    for label, name in enumerate(classes):
        for index in range(start, start + per_class):
            pixels = _pattern(label * 10_000 + index, size, 3, label)
            save_image(root / name / f"img-{index:03d}{suffix}", pixels)
    return root


# How a phone stores an upright photo for each EXIF orientation: the inverse of the transpose by which
# Pillow's ImageOps.exif_transpose turns it upright.
_STORED_BY = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_90"}
_STORED_BY |= {7: "TRANSVERSE", 8: "ROTATE_270"}


def save_turned(path: Path, pixels: np.ndarray, orientation: int, **options) -> Path:
    """Save `pixels` (upright) as a phone does: stored turned, with the EXIF orientation tag that
    turns them upright again. `options` go to Pillow's save (format, lossless, quality ...)."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    stored = image.transpose(getattr(Image.Transpose, _STORED_BY[orientation])) if orientation != 1 else image
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, **options)
    return path


@pytest.fixture
def image_folder_factory():
    """make_image_folder(root, classes=..., per_class=..., start=..., size=..., suffix=...)."""
    return make_image_folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Three classes of 20 distinct 16x20 PNGs each."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def messy_image_folder(image_folder) -> dict[str, Path]:
    """The image folder plus files a real folder holds: some unusable, some odd but good."""
    from PIL import Image

    good_jpeg = image_folder / "cat" / "good.jpg"
    save_image(good_jpeg, _pattern(99, (16, 20), 3, 0))
    truncated = image_folder / "dog" / "truncated.jpg"
    truncated.write_bytes(good_jpeg.read_bytes()[: good_jpeg.stat().st_size // 2])
    garbage = image_folder / "cat" / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 4)
    empty = image_folder / "owl" / "empty.png"
    empty.write_bytes(b"")
    notes = image_folder / "cat" / "notes.txt"
    notes.write_text("not an image")
    hidden = image_folder / "dog" / ".DS_Store"
    hidden.write_bytes(b"\x00\x01")
    rgba = np.zeros((16, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # left half opaque red, right half transparent red
    rgba_png = image_folder / "dog" / "rgba.png"
    rgba_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(rgba_png)
    gray_jpeg = save_image(image_folder / "owl" / "gray.jpg", _pattern(7, (16, 20), 1, 2), mode="L")
    return {
        "root": image_folder,
        "bad": [truncated, garbage, empty, notes],
        "good": [good_jpeg, rgba_png, gray_jpeg],
        "hidden": [hidden],
    }


# ----------------------------------------------------------------------------- IDX files


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array in the big-endian IDX format (magic 0x0000 08 <ndim>)."""
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_folder(root: Path, compress: bool = True, train: int = 60, test: int = 15, classes: int = 3) -> dict:
    """MNIST-named IDX files: `train` + `test` distinct 10x10 images of `classes` labels."""
    rng = np.random.default_rng(1)
    data = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 10, 10), dtype=np.uint8)
        labels = (np.arange(count) % classes).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        data[prefix] = (images, labels)
    return data


@pytest.fixture
def idx_folder(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "idx"
    return root, make_idx_folder(root)


# ----------------------------------------------------------------------------- configs


def data_config(source: str, image_size=(12, 12), channels: int = 1, **fields):
    from convflow.config.schema import DataConfig

    return DataConfig(source=source, image_size=image_size, channels=channels, **fields)


# ----------------------------------------------------------------------------- session stages
# The digits pipeline, run stage by stage through the plain functions, shared by the model,
# train, evaluate and export tests so that each stage's work is done once per session.


@pytest.fixture(scope="session")
def digits_data():
    return data_config("sklearn:digits", image_size=(12, 12), channels=1)


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory, digits_data):
    from convflow.tasks.download_and_split import split_dataset

    return split_dataset(digits_data, tmp_path_factory.mktemp("digits") / "download_and_split")


@pytest.fixture(scope="session")
def digits_tfrecords(tmp_path_factory, digits_split, digits_data):
    from convflow.tasks.to_tfrecords import write_tfrecords

    return write_tfrecords(digits_split, digits_data, tmp_path_factory.mktemp("digits-tfr") / "to_tfrecords")


@pytest.fixture(scope="session")
def mnist_cnn_config():
    from convflow.config.schema import ModelConfig

    return ModelConfig(base="mnist_cnn")


@pytest.fixture(scope="session")
def digits_wrapped(tmp_path_factory, digits_tfrecords, mnist_cnn_config):
    from convflow.tasks.build_base import build_base_model
    from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model

    root = tmp_path_factory.mktemp("digits-model")
    base = build_base_model(mnist_cnn_config, digits_tfrecords, 0, root / "build_base")
    return freeze_and_wrap_model(base, mnist_cnn_config, len(digits_tfrecords.label_names), 0, root / "freeze_and_wrap")


@pytest.fixture(scope="session")
def digits_train_config():
    from convflow.config.schema import TrainConfig

    return TrainConfig(epochs=2, batch_size=128, seed=0)


@pytest.fixture(scope="session")
def digits_trained(tmp_path_factory, digits_wrapped, digits_tfrecords, digits_train_config):
    from convflow.tasks.train import train_model

    root = tmp_path_factory.mktemp("digits-train")
    return train_model(digits_wrapped, digits_tfrecords, digits_train_config, root / "checkpoint", root / "train")


def split_as_before(sha256: str, predefined: str | None, carved: list[str], split_fractions: dict[str, float]) -> str:
    """The split download_and_split gave an example one at a time, before it assigned them as
    arrays: the specification the arrays must keep, so no example ever changes split."""
    if predefined is not None and predefined not in carved:
        return predefined
    position = int(sha256[:15], 16) / 16**15 * sum(split_fractions[name] for name in carved)
    for name in carved:
        position -= split_fractions[name]
        if position < 0:
            return name
    return carved[-1]
