"""The bad-input catalog: every way a user can feed convflow something unusable, and the message
they see. docs/bad-input.md lists the same cases with these messages.

Config mistakes are caught by `convflow validate` (and `convflow run`, before anything is
written) with exit code 2; weights and data mistakes fail their stage at once (they are not
retried) with a message naming the field, file or value; unusable image files are skipped and
listed; a full disk is retried, then fails naming the file.
"""

from __future__ import annotations

import copy
import errno
import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    FOLDER_SPLIT,
    TINY_PIPELINES,
    last_json_line,
    make_image_folder,
    subprocess_env,
    write_idx,
    write_yaml,
)
from convflow.cli.app import EXIT_BAD_CONFIG, main
from convflow.config.schema import ModelConfig
from convflow.core.retries import is_transient, retry_on_transient_error
from convflow.data import imaging, sources
from convflow.data.sources import DataError
from convflow.tasks.download_and_split import check_image_sizes, split_dataset


def pipelines_with(tmp_path: Path, dotted: str | None = None, value=None, *, name: str = "tiny") -> Path:
    """The tiny pipelines file with pipelines.tiny.<dotted> set to `value`, its pipeline called `name`."""
    document = copy.deepcopy(TINY_PIPELINES)
    body = document["pipelines"].pop("tiny")
    if dotted:
        node = body
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    document["pipelines"][name] = body
    return write_yaml(tmp_path / "pipelines.yaml", document)


def validate(path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- pipelines.yaml


CONFIG_CASES = {
    "unknown key": ("train.epoch", 3, "pipelines.tiny.train.epoch: 3 — unknown key"),
    "wrong type": ("train.epochs", "ten", 'pipelines.tiny.train.epochs: "ten" — Input should be a valid integer'),
    "wrong shape": (
        "data.image_size",
        [12, 12, 3],
        "pipelines.tiny.data.image_size: [12, 12, 3] — Tuple should have at most 2 items",
    ),
    "negative size": (
        "data.image_size",
        [-4, 12],
        "pipelines.tiny.data.image_size: [-4, 12] — height and width must be ≥ 1, got [-4, 12]",
    ),
    "zero batch size": ("train.batch_size", 0, "pipelines.tiny.train.batch_size: 0 — must be ≥ 1"),
    "zero shard size": ("data.shard_size", 0, "pipelines.tiny.data.shard_size: 0 — must be ≥ 1"),
    "negative split": (
        "data.split",
        {"train": 1.2, "validation": -0.1, "test": -0.1},
        "pipelines.tiny.data.split.validation: -0.1 — must be ≥ 0",
    ),
    "unknown base model": (
        "model.base",
        "resnet9000",
        "pipelines.tiny.model.base: \"resnet9000\" — unknown base model 'resnet9000'; expected one of ['augment_cnn'",
    ),
    "unknown source": (
        "data.source",
        "s3://bucket/cats",
        'pipelines.tiny.data.source: "s3://bucket/cats" — must look like one of',
    ),
    "unknown record format": (
        "data.record_format",
        "webp",
        "pipelines.tiny.data.record_format: \"webp\" — must be one of 'auto', 'raw', 'jpeg' or 'png'",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistake_names_the_field_and_value(tmp_path, capsys, case):
    dotted, value, expected = CONFIG_CASES[case]
    code, err = validate(pipelines_with(tmp_path, dotted, value), capsys)
    assert code == EXIT_BAD_CONFIG
    assert expected in err, err


def test_malformed_yaml(tmp_path, capsys):
    path = write_yaml(tmp_path / "pipelines.yaml", "pipelines:\n  tiny: {data: [unclosed\n")
    code, err = validate(path, capsys)
    assert code == EXIT_BAD_CONFIG
    assert f"{path}: not valid YAML: while parsing a flow sequence" in err and "line 2, column 16" in err, err


def test_a_key_written_twice(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "pipelines.yaml", "pipelines:\n  tiny:\n    train: {epochs: 1}\n    train: {epochs: 3}\n"
    )
    code, err = validate(path, capsys)
    assert code == EXIT_BAD_CONFIG
    assert (
        f"{path}: pipelines.tiny.train: key 'train' written twice, on lines 3 and 4 (the second would "
        "silently replace the first); keep one"
    ) in err, err


def test_image_size_below_the_base_minimum(tmp_path, capsys):
    path = pipelines_with(tmp_path, "model", {"base": "mobilenet"})
    code, err = validate(path, capsys)
    assert code == EXIT_BAD_CONFIG
    assert "  pipelines.tiny: data.image_size [12, 12] is below mobilenet's minimum of 32x32\n" in err, err


def test_channels_mismatching_imagenet_weights(tmp_path, capsys):
    document = copy.deepcopy(TINY_PIPELINES)
    document["pipelines"]["tiny"]["data"]["image_size"] = [32, 32]
    document["pipelines"]["tiny"]["model"] = {"base": "mobilenet_v2", "weights": "imagenet"}
    code, err = validate(write_yaml(tmp_path / "pipelines.yaml", document), capsys)
    assert code == EXIT_BAD_CONFIG
    assert "  pipelines.tiny: data.channels 1 does not match imagenet weights, which take 3 channels\n" in err, err


def test_run_refuses_a_config_mistake_before_writing_anything(tmp_path, capsys):
    path = pipelines_with(tmp_path, "train.batch_size", 0)
    assert main(["run", "tiny", "-f", str(path), "--artifacts", str(tmp_path / "artifacts")]) == EXIT_BAD_CONFIG
    assert "pipelines.tiny.train.batch_size: 0 — must be ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


# ----------------------------------------------------------------------------- weights


def build(tmp_path: Path, weights: str, base: str = "mnist_cnn"):
    from convflow.tasks.build_base import make_base

    return make_base(ModelConfig(base=base, weights=weights), (12, 12, 1), seed=0)


def test_weights_file_missing(tmp_path):
    from convflow.tasks.build_base import WeightsError

    missing = tmp_path / "nowhere" / "mnist.weights.h5"
    with pytest.raises(WeightsError, match=re.escape(f"model.weights: file {missing} does not exist")):
        build(tmp_path, str(missing))


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("notes.h5", b"these are not weights", "file signature not found"),
        ("notes.keras", b"these are not weights", "File is not a zip file"),
    ],
)
def test_weights_file_that_is_not_a_weights_file(tmp_path, name, content, why):
    from convflow.tasks.build_base import WeightsError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(
        WeightsError, match=re.escape(f"model.weights: cannot load {path} into mnist_cnn: ") + f".*{why}"
    ):
        build(tmp_path, str(path))


def test_weights_for_another_architecture(tmp_path):
    from convflow.tasks.build_base import WeightsError, make_base

    path = tmp_path / "cifar.weights.h5"
    make_base(ModelConfig(base="cifar_cnn"), (12, 12, 1), seed=0).save_weights(path)
    with pytest.raises(
        WeightsError, match=re.escape(f"model.weights: cannot load {path} into mnist_cnn: ") + ".*could not be loaded"
    ):
        build(tmp_path, str(path))


# ----------------------------------------------------------------------------- data


def folder_data(root: Path, **fields):
    from convflow.config.schema import DataConfig

    return DataConfig(
        source=f"folder:{root}", image_size=(12, 12), channels=1, split=fields.pop("split", FOLDER_SPLIT), **fields
    )


def test_empty_dataset(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"class folder {tmp_path / 'images' / 'cat'} has no usable image")):
        split_dataset(folder_data(tmp_path / "images"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'}: no class sub-folders found")):
        split_dataset(folder_data(tmp_path / "empty"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_class_dataset(tmp_path):
    make_image_folder(tmp_path / "images", classes=("cat",), per_class=10)
    with pytest.raises(DataError, match=r"only one class \('cat'\); need at least two"):
        split_dataset(folder_data(tmp_path / "images"), tmp_path / "out")


def test_missing_source_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"folder source {tmp_path / 'nope'} does not exist")):
        split_dataset(folder_data(tmp_path / "nope"), tmp_path / "out")


def test_missing_class_folder_in_a_split_folder(tmp_path):
    make_image_folder(tmp_path / "images" / "train", classes=("cat", "dog", "owl"), per_class=6)
    make_image_folder(tmp_path / "images" / "test", classes=("cat", "dog"), per_class=3, start=100)
    expected = (
        f"split 'test' has no example of class(es) ['owl']: {tmp_path / 'images' / 'test'} has no folder for them"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        split_dataset(folder_data(tmp_path / "images"), tmp_path / "out")


def test_split_that_leaves_a_class_out_of_test(tmp_path):
    make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=4)
    split = {"train": 0.9, "validation": 0.05, "test": 0.05}
    with pytest.raises(
        DataError, match=r"split 'test' has no example of class\(es\) \[.*\]: add examples or change data.split"
    ):
        split_dataset(folder_data(tmp_path / "images", split=split), tmp_path / "out")


def test_source_images_smaller_than_the_base_minimum_name_their_files(tmp_path):
    make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=12, size=(40, 48))
    make_image_folder(tmp_path / "images", classes=("dog",), per_class=1, start=50, size=(16, 20))
    split_set = split_dataset(folder_data(tmp_path / "images"), tmp_path / "out")
    check_image_sizes(split_set, folder_data(tmp_path / "images"), "augment_cnn")  # minimum 8: fine

    small = tmp_path / "images" / "dog" / "img-050.png"
    expected = (
        f"1 source image(s) smaller than 32x32, the minimum input of model.base mobilenet: {small} (20x16); "
        "remove them, or use a base with a smaller minimum"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        check_image_sizes(split_set, folder_data(tmp_path / "images"), "mobilenet")


def test_in_memory_images_smaller_than_the_base_minimum_name_the_source(tmp_path):
    from convflow.config.schema import DataConfig

    digits = DataConfig(source="sklearn:digits", image_size=(32, 32), channels=1)
    split_set = split_dataset(digits, tmp_path / "out")
    with pytest.raises(
        DataError,
        match=r"^1797 source image\(s\) smaller than 32x32, the minimum input of model.base "
        r"vgg16: sklearn:digits example digits-00000 \(8x8\), .* and 1792 more; remove them",
    ):
        check_image_sizes(split_set, digits, "vgg16")


@pytest.mark.e2e
@pytest.mark.slow
def test_run_on_images_smaller_than_the_base_minimum_fails_naming_a_file(tmp_path):
    make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=6, size=(16, 20))
    document = copy.deepcopy(TINY_PIPELINES)
    document["pipelines"]["tiny"]["data"] = {
        "source": f"folder:{tmp_path / 'images'}",
        "image_size": [32, 32],
        "channels": 3,
        "split": FOLDER_SPLIT,
    }
    document["pipelines"]["tiny"]["model"] = {"base": "mobilenet", "alpha": 0.25, "weights": "none"}
    path = write_yaml(tmp_path / "pipelines.yaml", document)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convflow.cli",
            "run",
            "tiny",
            "-f",
            str(path),
            "--artifacts",
            str(tmp_path / "artifacts"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 1
    assert re.search(
        r"convflow run tiny failed: DataError: 12 source image\(s\) smaller than 32x32, the minimum "
        rf"input of model.base mobilenet: {re.escape(str(tmp_path / 'images'))}/cat/img-000.png \(20x16\)",
        result.stderr,
    ), result.stderr[-3000:]
    assert not (tmp_path / "artifacts" / "runs.parquet").exists()


def _idx_folder(root: Path, labels: np.ndarray) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 10, 10), dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def test_labels_out_of_range(tmp_path):
    labels = np.arange(60) % 3
    labels[7] = 7  # one label beyond the three names
    root = _idx_folder(tmp_path / "idx", labels)
    from convflow.config.schema import DataConfig

    data = DataConfig(source=f"idx:{root}", image_size=(12, 12), channels=1, label_names=["a", "b", "c"])
    with pytest.raises(
        DataError,
        match=re.escape(f"data.label_names has 3 names but idx:{root} has 8 classes: label 7 is out of range (0..2)"),
    ):
        split_dataset(data, tmp_path / "out")
    without_names = DataConfig(source=f"idx:{root}", image_size=(12, 12), channels=1)
    with pytest.raises(
        DataError,
        match=re.escape(f"idx:{root}: no example of class(es) ['3', '4', '5', '6']; labels must run from 0 to 7"),
    ):
        split_dataset(without_names, tmp_path / "out")


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_unusable_image_files_are_skipped_and_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "heif_available", lambda: False)  # no heic extra
    root = make_image_folder(tmp_path / "images", per_class=10)
    good = (root / "dog" / "img-000.png").read_bytes()
    taken = "(it takes JPEG, PNG, WebP, BMP, GIF, TIFF, and HEIC/HEIF with convflow[heic])"
    bad = {
        root / "cat" / "IMG_0001.HEIC": (
            b"\x00\x00\x00\x18ftypheic" + bytes(32),
            "a HEIC/HEIF photo: convflow reads them with the optional pillow-heif plugin: pip install 'convflow[heic]'",
        ),
        root / "dog" / "scan.ppm": (
            b"P6\n2 2\n255\n" + bytes(12),
            f"PPM image: a format convflow does not take {taken}",
        ),
        root / "owl" / "photo.jfif": (good, "PNG image named .jfif: rename it to .png to use it"),
        root / "cat" / "corrupt.jpg": (b"\xff\xd8\xff\xe0 not really a JPEG" * 4, "cannot decode: "),
        root / "dog" / "empty.png": (b"", "empty file"),
        root / "dog" / "truncated.png": (good[: len(good) // 2], "cannot decode: image file is truncated"),
        root / "owl" / "huge.png": (png_header(20_000, 20_000), f"exceeds {imaging.MAX_PIXELS} pixels"),
        root / "owl" / "big.png": (png_header(8_000, 8_000), f"8000x8000 exceeds {imaging.MAX_PIXELS} pixels"),
        root / "cat" / "notes.txt": (b"not an image", "not an image file"),
        root / "owl" / "labels.csv": (b"file,label\n", "not an image file"),
    }
    for path, (content, _) in bad.items():
        path.write_bytes(content)

    split_set = split_dataset(folder_data(root), tmp_path / "out")

    assert sum(split_set.counts.values()) == 30  # every good image, no bad one
    assert len(split_set.skipped) == len(bad)
    for path, (_, why) in bad.items():
        assert any(line.startswith(f"{path}: {why}") for line in split_set.skipped), (path, split_set.skipped)
    assert split_set.log_line().endswith(
        "; 10 skipped: 2 not images, 2 too large, 1 HEIC without convflow[heic], 1 cannot decode, 1 empty, "
        "1 formats convflow does not take, 1 cut off, 1 images to rename"
    ), split_set.log_line()


# ----------------------------------------------------------------------------- tfds


def test_tfds_name_that_does_not_exist(tmp_path):
    from convflow.config.schema import DataConfig

    data = DataConfig(source="tfds:mnistt", image_size=(28, 28), channels=1)
    with pytest.raises(DataError) as caught:
        split_dataset(data, tmp_path / "out")
    # One line naming the dataset and close names, not TFDS' list of its whole catalog.
    assert str(caught.value).startswith(
        "tfds dataset 'mnistt' not found in the TFDS catalog: Dataset mnistt not found; did you mean 'mnist'"
    )
    assert "\n" not in str(caught.value)


def test_tfds_offline(tmp_path, monkeypatch):
    from convflow.config.schema import DataConfig

    monkeypatch.setattr(sources, "NETWORK_PROBE", ("127.0.0.1", 9))  # refused at once, as offline
    data = DataConfig(source="tfds:mnist", image_size=(28, 28), channels=1, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(
        DataError, match=r"tfds dataset 'mnist' is not in .*tfds.* and this machine is offline\. Pre-download it"
    ):
        split_dataset(data, tmp_path / "out")


# ----------------------------------------------------------------------------- where runs write


def test_artifacts_root_not_writable(tmp_path, capsys):
    """Run as root here, so permissions stop nothing: the root lies under a regular file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    artifacts = blocker / "sub"
    code = main(["run", "tiny", "-f", str(pipelines_with(tmp_path)), "--artifacts", str(artifacts)])
    assert code == 1
    err = capsys.readouterr().err
    assert (
        f"convflow run tiny: artifacts root {artifacts} is not writable: Not a directory ({blocker} is not a folder)"
        in err
    )


def test_full_disk_is_transient_and_bad_input_is_not():
    full = OSError(errno.ENOSPC, "No space left on device", "/artifacts/x")
    assert is_transient(full) and is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not any(
        is_transient(error) for error in (FileNotFoundError(), PermissionError(), DataError("x"), ValueError())
    )

    class FailedState:
        def __init__(self, error):
            self.error = error

        def result(self):
            raise self.error

    assert retry_on_transient_error(None, None, FailedState(full)) is True
    assert retry_on_transient_error(None, None, FailedState(DataError("bad"))) is False


FULL_DISK_RUN = textwrap.dedent(
    """
    import errno, sys
    from convflow.runtime.fast_start import prefect_api

    with prefect_api() as server:  # set PREFECT_API_URL before Prefect is imported, as the CLI does
        from convflow.catalog import schemas
        import convflow.flows.sequences as sequences

        def full_disk(*table, path):  # splits.parquet is written a part at a time
            print(f"writing {path}", flush=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        schemas.write_parquet_parts = lambda parts, schema, path: full_disk(path=path)
        # The real task (its retries and retry condition), without minutes of retry delay.
        sequences.download_and_split = sequences.download_and_split.with_options(retry_delay_seconds=0)
        server.wait_until_ready()
        from convflow.cli.app import main

        code = main(sys.argv[1:])
    sys.exit(code)
    """
)


@pytest.mark.e2e
@pytest.mark.slow
def test_full_disk_is_retried_then_fails_naming_the_file(tmp_path):
    artifacts = tmp_path / "artifacts"
    env = {**subprocess_env(), "PREFECT_LOCAL_STORAGE_PATH": str(artifacts / ".prefect-results")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FULL_DISK_RUN,
            "run",
            "tiny",
            "-f",
            str(pipelines_with(tmp_path)),
            "--artifacts",
            str(artifacts),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = result.stdout + result.stderr
    attempts = re.findall(r"writing (\S+splits\.parquet)", output)
    assert len(attempts) == 4, output[-4000:]  # the first try and download_and_split's three retries
    assert "OSError(28, 'No space left on device') - Retry 3/3" in output
    assert result.returncode == 1
    assert re.search(
        r"convflow run tiny failed: OSError: \[Errno 28\] No space left on device: '.+/splits\.parquet'", result.stderr
    ), result.stderr[-3000:]
    run_dirs = list((artifacts / "tiny").iterdir())
    assert len(run_dirs) == 1 and not list(run_dirs[0].iterdir()), "a failed stage left files behind"
    assert not (artifacts / "runs.parquet").exists()


# ----------------------------------------------------------------------------- security


def test_yaml_is_loaded_safely(tmp_path, capsys):
    marker = tmp_path / "created-by-yaml"
    path = write_yaml(
        tmp_path / "pipelines.yaml",
        "pipelines:\n  tiny: !!python/object/apply:pathlib.Path.touch "
        f"[!!python/object/apply:pathlib.Path ['{marker}']]\n",
    )
    code, err = validate(path, capsys)
    assert code == EXIT_BAD_CONFIG
    assert "not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply" in err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "..", "a/../../b"])
def test_pipeline_names_that_escape_the_artifacts_root_are_rejected(tmp_path, capsys, name):
    code, err = validate(pipelines_with(tmp_path, name=name), capsys)
    assert code == EXIT_BAD_CONFIG
    assert f'pipelines.{name}.name: "{name}" — must be 1-64 of a-z 0-9 _ . - and start with a letter or digit' in err


def test_run_of_an_escaping_name_writes_nothing(tmp_path, capsys):
    code = main(["run", "../tiny", "-f", str(pipelines_with(tmp_path)), "--artifacts", str(tmp_path / "artifacts")])
    assert code == EXIT_BAD_CONFIG
    assert "pipelines.../tiny: no such pipeline; expected one of ['tiny']" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.server
def test_temporary_prefect_server_listens_on_loopback_only():
    from convflow.runtime.fast_start import TemporaryServer

    server = TemporaryServer()
    try:
        server.wait_until_ready()
        port = f"{server.port:04X}"
        listening = [
            line.split()[1]
            for table in ("/proc/net/tcp", "/proc/net/tcp6")
            if Path(table).exists()
            for line in Path(table).read_text().splitlines()[1:]
            if line.split()[1].endswith(f":{port}") and line.split()[3] == "0A"  # 0A: LISTEN
        ]
        assert listening == [f"0100007F:{port}"], listening  # 127.0.0.1, and nothing on other addresses
    finally:
        server.stop()


@pytest.mark.server
def test_temporary_prefect_server_registers_no_block_types(tmp_path, monkeypatch):
    # Registering them made every start import each installed Prefect collection (~0.35 s); convflow
    # uses no blocks (fast_start.NO_BLOCK_REGISTRATION). A fresh database, as on a new machine.
    import urllib.request

    from convflow.runtime.fast_start import TemporaryServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    server = TemporaryServer()
    try:
        server.wait_until_ready()
        request = urllib.request.Request(
            f"{server.api_url}/block_types/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == []
    finally:
        server.stop()


SERVE_WITHOUT_LISTENING = textwrap.dedent(
    """
    import gc, json, uvicorn
    from convflow.runtime import fast_start

    def report(app, **options):  # in place of uvicorn.run: what serve() hands it, and the collector's state
        print(json.dumps({"app": type(app).__name__, "options": options, "gc_enabled": gc.isenabled(),
                          "frozen": gc.get_freeze_count()}))

    uvicorn.run = report
    fast_start.serve(8123)
    """
)


def test_temporary_server_process_freezes_what_prefects_server_import_built():
    # The collector is paused while Prefect's server package is imported (~0.6 s of each start
    # here), then those objects are frozen and collection goes on for the rest of the server's life.
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_LISTENING],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = last_json_line(result.stdout)
    assert served["app"] == "FastAPI"
    assert served["options"] == {"host": "127.0.0.1", "port": 8123, "log_level": "error", "lifespan": "on"}
    assert served["gc_enabled"] is True
    assert served["frozen"] > 100_000, served["frozen"]  # Prefect's server package: ~430,000 objects here


@pytest.mark.e2e
@pytest.mark.slow
def test_skipped_files_are_listed_in_the_run_log(tmp_path):
    """A real run says which files it skipped (they are in the report too). The run is held at
    to_tfrecords and killed there: download_and_split, the stage that logs them, has finished."""
    from test_faults import kill_while_holding

    root = make_image_folder(tmp_path / "images", per_class=10)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    data = {"source": f"folder:{root}", "image_size": [12, 12], "channels": 1, "split": FOLDER_SPLIT}
    pipelines_with(tmp_path, "data", data)

    kill_while_holding(tmp_path, "to_tfrecords")

    log = (tmp_path / "killed-at-to_tfrecords.log").read_text()
    assert f"folder:{root}: 2 skipped: 1 not images, 1 empty:" in log, log[-3000:]
    assert f"{root / 'cat' / 'notes.txt'}: not an image file" in log
    assert f"{root / 'dog' / 'empty.png'}: empty file" in log
