"""`convflow init NAME SOURCE`: what it finds in a source, the pipeline it writes (which validates
and runs unedited), the splits it keeps, and the files it never damages."""

from __future__ import annotations

import difflib
import re
import shlex
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import CONVFLOW, REPO, make_idx_folder, make_image_folder, run_convflow, subprocess_env
from convflow.cli.app import EXIT_BAD_CONFIG, main
from convflow.config.load import load_pipeline
from convflow.data import imaging
from convflow.tasks.download_and_split import split_dataset

SHARED_DATA = REPO.parent / "shared" / "data"
MOBILENET_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")


def init(capsys, *args: str) -> tuple[int, str, str]:
    """`convflow init ARGS` in this process: exit code, stdout, stderr."""
    code = main(["init", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pipeline_of(file: Path, name: str) -> dict:
    return yaml.safe_load(file.read_text())["pipelines"][name]


def only_insertions(old: bytes, new: bytes) -> list[bytes]:
    """The lines `new` adds to `old`; fails if any line of `old` was changed, moved or removed."""
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    opcodes = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False).get_opcodes()
    assert {tag for tag, *_ in opcodes} <= {"equal", "insert"}, opcodes
    return [line for tag, _, _, start, end in opcodes if tag == "insert" for line in new_lines[start:end]]


def test_init_creates_the_file_reports_what_it_found_and_the_next_command(tmp_path, capsys):
    images = make_image_folder(tmp_path / "photos", classes=("cat", "dog", "owl"), per_class=12)
    file = tmp_path / "mine.yaml"

    code, out, _ = init(capsys, "pets", str(images), "-f", str(file))

    assert code == 0
    assert f"folder:{images}: 3 classes, 36 images (colour, median 16x20)" in out
    for name in ("cat", "dog", "owl"):
        assert re.search(rf"^  {name} +12$", out, re.MULTILINE)
    assert "skipped: none" in out
    assert "balance: every class has 12 images" in out
    assert f"created {file}: pipeline 'pets' at line 3" in out
    assert out.strip().splitlines()[-1] == f"next: convflow run pets -f {file}"
    pets = pipeline_of(file, "pets")
    assert pets["data"] == {
        "source": "folder:photos",
        "image_size": [16, 20],
        "channels": 3,
        "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
    }
    assert pets["model"] == {"base": "cifar_cnn"}  # small colour images, no --weights
    assert pets["evaluate"] == {"min_accuracy": 0.5}  # chance 1/3, a quarter of the way to 1
    spec = load_pipeline(file, "pets")
    assert spec.data.source == f"folder:{images}"  # written relative to the file's folder
    assert spec.train.epochs == 20  # 28 training images: the most epochs init proposes


def test_init_lists_unusable_files_and_imbalance(tmp_path, capsys, messy_image_folder):
    make_image_folder(messy_image_folder["root"], classes=("owl",), per_class=60, start=100)

    code, out, _ = init(capsys, "messy", str(messy_image_folder["root"]), "-f", str(tmp_path / "p.yaml"))

    assert code == 0
    assert "  4 skipped: 2 cannot decode, 1 not images, 1 empty (a run skips them too)" in out
    for bad in messy_image_folder["bad"]:
        assert str(bad) in out
    assert re.search(r"^  cat +21$", out, re.MULTILINE) and re.search(r"^  owl +81$", out, re.MULTILINE)
    assert "imbalance: owl has 3.9x the images of cat (81 vs 21)" in out


def test_init_counts_photos_in_sub_folders_and_says_why_files_are_skipped(tmp_path, capsys, monkeypatch):
    """Photos kept by year inside each class folder, WebP among them, count under their class; an
    iPhone's HEIC photo without the heic extra is named with the command that installs it."""
    monkeypatch.setattr(imaging, "heif_available", lambda: False)
    images = make_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=6)
    for start, name in enumerate(("cat", "dog"), start=1):
        make_image_folder(images / name, classes=("2019",), per_class=3, start=100 * start, suffix=".webp")
        (images / name / "2019" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(32))
    (images / "dog" / "2019" / ".thumbnails").mkdir()
    (images / "dog" / "2019" / ".thumbnails" / "img-000.png").write_bytes((images / "dog" / "img-000.png").read_bytes())
    (images / "cat" / "notes.txt").write_text("not an image")

    code, out, _ = init(capsys, "pets", str(images), "-f", str(tmp_path / "p.yaml"))

    assert code == 0
    assert f"folder:{images}: 2 classes, 18 images" in out
    assert re.search(r"^  cat +9$", out, re.MULTILINE) and re.search(r"^  dog +9$", out, re.MULTILINE)
    assert "  3 skipped: 2 HEIC without convflow[heic], 1 not images (a run skips them too)" in out
    heic = images / "cat" / "2019" / "IMG_0001.HEIC"
    assert f"    {heic}: a HEIC/HEIF photo: convflow reads them with the optional pillow-heif plugin: " in out
    assert "pip install 'convflow[heic]'" in out


def test_init_appends_keeping_every_byte_and_comment_of_the_file(tmp_path, capsys, image_folder):
    file = tmp_path / "pipelines.yaml"
    file.write_bytes((REPO / "pipelines.yaml").read_bytes() + b"# a last comment, no newline after it")
    old = file.read_bytes()

    code, _, _ = init(capsys, "mine", str(image_folder), "-f", str(file))

    assert code == 0
    new = file.read_bytes()
    assert new.startswith(old)  # pipelines: is the file's last section: the new one follows every byte
    assert new[len(old) :].startswith(b"\n\n  # Written by convflow init")
    before = yaml.safe_load(old)
    after = yaml.safe_load(new)
    assert after["pipelines"].pop("mine")["model"] == {"base": "cifar_cnn"}
    assert after == before
    load_pipeline(file, "mine")


def test_init_inserts_inside_pipelines_when_another_section_follows(tmp_path, capsys, image_folder):
    file = tmp_path / "pipelines.yaml"
    old = (
        b"pipelines:\r\n"
        b"    # four-space indent, CRLF line ends\r\n"
        b'    first: {data: {source: "sklearn:digits", image_size: [12, 12], channels: 1}, '
        b"model: {base: mnist_cnn}}\r\n"
        b"\r\n"
        b"# the defaults come last in this file\r\n"
        b"defaults:\r\n"
        b"  train: {epochs: 1}\r\n"
    )
    file.write_bytes(old)

    code, _, _ = init(capsys, "second", str(image_folder), "-f", str(file))

    assert code == 0
    new = file.read_bytes()
    added = only_insertions(old, new)
    assert any(line.startswith(b"    second:") for line in added)
    document = yaml.safe_load(new)
    assert list(document["pipelines"]) == ["first", "second"]
    assert document["defaults"] == {"train": {"epochs": 1}}
    assert all(line.endswith(b"\r\n") for line in added)  # the file's own line ends
    load_pipeline(file, "second")


def test_a_second_init_of_the_same_name_is_refused_and_the_file_untouched(tmp_path, capsys, image_folder):
    file = tmp_path / "pipelines.yaml"
    assert init(capsys, "pets", str(image_folder), "-f", str(file))[0] == 0
    before, modified = file.read_bytes(), file.stat().st_mtime_ns

    result = subprocess.run(
        [CONVFLOW, "init", "pets", str(image_folder), "-f", str(file)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )

    assert result.returncode == EXIT_BAD_CONFIG
    assert f"{file}: already has a pipeline 'pets'; convflow init never replaces one" in result.stderr
    assert file.read_bytes() == before and file.stat().st_mtime_ns == modified


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad Name", "{images}"], "NAME 'Bad Name': must be 1-64 of a-z 0-9 _ . -"),
        (["pets", "{tmp}/nowhere"], "SOURCE '{tmp}/nowhere': no such file or folder"),
        (["pets", "{tmp}/empty"], "no class sub-folders found"),
        (["pets", "{images}", "--weights", "{tmp}/missing.h5"], "--weights {tmp}/missing.h5: no such file"),
        (["pets", "{images}", "--weights", "{tmp}/odd.h5"], "not a Keras Applications MobileNet file name"),
    ],
)
def test_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, capsys, image_folder, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd.h5").write_bytes(b"not weights")
    file = tmp_path / "pipelines.yaml"
    values = {"images": image_folder, "tmp": tmp_path}

    code, _, err = init(capsys, *[arg.format(**values) for arg in args], "-f", str(file))

    assert code == EXIT_BAD_CONFIG
    assert message.format(**values) in err
    assert not file.exists()


def test_idx_files_keep_their_train_and_test_split(tmp_path, capsys):
    make_idx_folder(tmp_path / "idx", train=60, test=15)
    file = tmp_path / "pipelines.yaml"

    code, out, _ = init(capsys, "digits", str(tmp_path / "idx"), "-f", str(file))

    assert code == 0
    assert "3 classes, 75 images (grayscale, median 10x10)" in out
    assert "splits defined by the source: train 60, test 15" in out
    digits = pipeline_of(file, "digits")
    assert digits["data"]["source"] == "idx:idx"
    assert digits["data"]["image_size"] == [10, 10] and digits["data"]["channels"] == 1
    assert digits["model"] == {"base": "mnist_cnn"}


def test_a_parquet_table_of_images(tmp_path, capsys, image_folder):
    import pyarrow as pa

    rows = [{"image": path.read_bytes(), "label": path.parent.name} for path in sorted(image_folder.rglob("*.png"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "photos.parquet")
    file = tmp_path / "new" / "pipelines.yaml"  # its folder is created too

    code, out, _ = init(capsys, "table", str(tmp_path / "photos.parquet"), "-f", str(file))

    assert code == 0
    assert "3 classes, 60 images (colour, median 16x20)" in out
    assert pipeline_of(file, "table")["data"]["source"] == "parquet:../photos.parquet"
    assert load_pipeline(file, "table").data.source == f"parquet:{tmp_path / 'photos.parquet'}"


def test_tfds_source_is_read_through_the_tfds_loader(monkeypatch):
    import tensorflow_datasets as tfds

    from convflow.cli.init_pipeline import pipeline_text
    from convflow.data import sources
    from convflow.data.survey import survey_source

    monkeypatch.setattr(sources, "_network_available", lambda timeout=3.0: True)  # mock_data serves it
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        survey = survey_source("tfds:mnist")

    assert list(survey.class_counts) == [str(digit) for digit in range(10)]
    assert survey.typical_size == (28, 28) and survey.channels == 1
    pipeline = yaml.safe_load(pipeline_text("mnist", survey, Path.cwd(), None))["mnist"]
    assert pipeline["data"]["source"] == "tfds:mnist"
    assert pipeline["model"] == {"base": "mnist_cnn"}


@needs_shared_data
def test_cats_vs_dogs_keeps_its_train_and_validation_folders(tmp_path, capsys):
    file = tmp_path / "pipelines.yaml"
    code, out, _ = init(
        capsys, "cats", str(SHARED_DATA / "cats_vs_dogs"), "-f", str(file), "--weights", str(MOBILENET_WEIGHTS)
    )
    assert code == 0
    assert "splits defined by the source: train 400, validation 200" in out
    spec = load_pipeline(file, "cats")
    assert (spec.model.base, spec.model.alpha) == ("mobilenet", 0.25)
    assert Path(spec.model.weights).resolve() == MOBILENET_WEIGHTS.resolve()  # ../shared may be a link
    assert spec.data.resize == "pad" and spec.data.channels == 3

    split_set = split_dataset(spec.data, tmp_path / "download_and_split")

    rows = pq.read_table(split_set.splits_parquet, columns=["example_id", "split"]).to_pylist()
    folder_of = {row["example_id"]: row["example_id"].split("/")[0] for row in rows}
    assert {row["split"] for row in rows if folder_of[row["example_id"]] == "validation"} == {"validation"}
    from_train = [row["split"] for row in rows if folder_of[row["example_id"]] == "train"]
    assert set(from_train) == {"train", "test"} and len(from_train) == 400
    assert 0.15 < from_train.count("test") / 400 < 0.35  # the quarter the comment promises


# init proposes about as many training images seen for any dataset, so what a run costs follows the
# image side: the real photos, a sample of them shrunk from 128 px (which init trains at 96 px).
FLOWERS_PER_CLASS, FLOWERS_SIDE = 400, 48


def flowers_sample(root: Path) -> Path:
    """root/<class>/<photo>.jpg: the first FLOWERS_PER_CLASS photos of each class of ../shared/data/flowers,
    resized to FLOWERS_SIDE pixels square."""
    from PIL import Image

    for folder in sorted(path for path in (SHARED_DATA / "flowers").iterdir() if path.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for photo in sorted(folder.glob("*.jpg"))[:FLOWERS_PER_CLASS]:
            with Image.open(photo) as image:
                image.convert("RGB").resize((FLOWERS_SIDE, FLOWERS_SIDE)).save(root / folder.name / photo.name)
    return root


@pytest.mark.e2e
@needs_shared_data
@pytest.mark.slow
def test_init_on_flowers_then_the_printed_run_command_completes(tmp_path):
    flowers = flowers_sample(tmp_path / "flowers")
    file = tmp_path / "pipelines.yaml"
    result = subprocess.run(
        [CONVFLOW, "init", "flowers", str(flowers), "-f", str(file)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"5 classes, {5 * FLOWERS_PER_CLASS:,} images (colour, median {FLOWERS_SIDE}x{FLOWERS_SIDE})" in result.stdout
    )
    next_command = result.stdout.strip().splitlines()[-1].removeprefix("next: ")
    assert next_command == f"convflow run flowers -f {file}"

    program, *args = shlex.split(next_command)
    run = run_convflow([*args, "--artifacts", str(tmp_path / "artifacts"), "--json"], timeout=1500)

    assert run.summary["status"] == "completed"  # through the gate init chose
    assert run.summary["test_accuracy"] >= pipeline_of(file, "flowers")["evaluate"]["min_accuracy"]
