"""The reports: every section present, report.html renders in headless Chromium, and text from a run
is escaped while figures stay markup."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_convflow

SECTIONS = (
    "summary",
    "dataset",
    "augmentation",
    "model",
    "training",
    "confusion",
    "per-class",
    "samples",
    "mistakes",
    "feature-maps",
    "production",
    "checks",
    "stages",
    "lineage",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=20000",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    pipelines = root / "pipelines.yaml"
    pipelines.write_text(
        "pipelines:\n  report:\n"
        "    data: {source: 'sklearn:digits', image_size: [12, 12], channels: 1}\n"
        "    model: {base: mnist_cnn}\n"
        "    train: {epochs: 1, batch_size: 128, augment: true}\n"
    )
    run = run_convflow(["run", "report", "-f", str(pipelines), "--artifacts", str(root / "artifacts"), "--json"])
    return Path(run.summary["report"])


@pytest.mark.e2e
@pytest.mark.xdist_group("report")
def test_report_is_self_contained_with_every_section(report):
    page = report.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page, section
    assert "data:image/png;base64," in page
    samples = page.split('id="samples"')[1].split("<h2")[0]
    assert samples.count("<figure>") == samples.count("<figcaption>") == 16  # each test image with its caption
    assert 'src="http' not in page and 'href="http' not in page  # nothing to fetch
    training = page.split('id="training"')[1].split("<h2")[0]
    assert "Trained on images in every epoch." in training  # augmentation on: no cached features
    assert "Precision float32, 1 replica(s)." in training and "tensorboard --logdir " in training
    # below the data checks, the model checks: with no production yet, each class's recall alone
    checks = page.split('id="checks"')[1].split("<h2")[0]
    model_checks = checks.split('id="model-checks"')[1]
    assert model_checks.count("<td>class_recall</td>") == 10 and "reference_set" not in model_checks


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@pytest.mark.e2e
@pytest.mark.browser
@pytest.mark.xdist_group("report")
def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout, section
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *profile, "--window-size=1200,3000", f"--screenshot={screenshot}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 50_000  # a rendered page with figures, not a blank one


# ----------------------------------------------------------------------------- escaping

HOSTILE = '<script>alert("owned")</script>'


def test_text_from_a_run_is_escaped_and_figures_are_not(tmp_path, digits_split, digits_trained, digits_tfrecords):
    """Class names, a gate reason, skipped files and stage names carry HTML as text, not as markup."""
    from convflow.config.schema import EvaluateConfig
    from convflow.core.records import ExportedModel, StageRun
    from convflow.tasks.evaluate import evaluate_model
    from convflow.tasks.write_report import render_report, report_figures

    evaluation = evaluate_model(digits_trained, digits_tfrecords, EvaluateConfig(top_k=3), tmp_path / "evaluate")
    evaluation = evaluation.model_copy(update={"passed_gate": False, "gate_reason": HOSTILE})
    split_set = digits_split.model_copy(
        update={
            "label_names": [f"{name}{HOSTILE}" for name in digits_split.label_names],
            "skipped": [f"{HOSTILE}.png"],
        }
    )
    exported = ExportedModel(output_dir=str(tmp_path / "export"), saved_model=HOSTILE, max_abs_difference=0.0)
    page = render_report(
        pipeline=HOSTILE,
        run_id="run",
        config_hash="hash",
        split_set=split_set,
        trained=digits_trained,
        evaluation=evaluation,
        exported=exported,
        stages=[StageRun(name=HOSTILE, seconds=1.0, cached=False)],
        figures=report_figures(split_set, digits_trained, evaluation),
    )

    assert "<script" not in page
    escaped = "&lt;script&gt;alert("  # how quotes are escaped is the escaper's business
    # title, heading, gate reason thrice (summary, gate, not promoted), SavedModel, skipped file, stage
    assert page.count(escaped) >= 8
    samples = page.split('id="samples"')[1].split("<h2")[0]
    assert samples.count(escaped) == 2 * samples.count("<figcaption>") == 32  # predicted and true class
    assert page.count('<img alt="figure" src="data:image/png;base64,') == 3  # curves, confusion, feature maps


def _digits_page(tmp_path, digits_tfrecords, split_set, trained, evaluated, **extra) -> str:
    """report.html of `trained` on `split_set`, with the evaluation of the model `evaluated` on the digits
    test split; `extra`: render_report's optional parts."""
    from convflow.config.schema import EvaluateConfig
    from convflow.core.records import ExportedModel
    from convflow.tasks.evaluate import evaluate_model
    from convflow.tasks.write_report import render_report, report_figures

    evaluation = evaluate_model(evaluated, digits_tfrecords, EvaluateConfig(top_k=3), tmp_path / "evaluate")
    return render_report(
        pipeline="tiny",
        run_id="run",
        config_hash="hash",
        split_set=split_set,
        trained=trained,
        evaluation=evaluation,
        exported=ExportedModel(output_dir=str(tmp_path), saved_model="m", max_abs_difference=0.0),
        stages=[],
        figures=report_figures(split_set, trained, evaluation),
        **extra,
    )


def test_skipped_files_are_grouped_by_reason_in_a_folded_list(tmp_path, digits_split, digits_trained, digits_tfrecords):
    from convflow.core.skips import NEEDS_HEIC

    skipped = [f"/photos/cat/notes-{n}.txt: not an image file" for n in range(3)]
    skipped += ["/photos/dog/empty.png: empty file", f"/photos/dog/IMG_1.HEIC: {NEEDS_HEIC}"]
    split_set = digits_split.model_copy(update={"skipped": skipped})
    page = _digits_page(tmp_path, digits_tfrecords, split_set, digits_trained, digits_trained)

    dataset = page.split('id="dataset"')[1].split("<h2")[0]
    summary = "5 skipped: 3 not images, 1 empty, 1 HEIC without convflow[heic]"
    assert f"across splits); {summary}.</p>" in dataset
    folded = dataset.split('<details id="skipped">')[1]
    assert folded.startswith(f"<summary>Skipped files, by reason: {summary}</summary>")  # closed until opened
    groups = folded.split("<details><summary>")[1:]
    assert [group.split("</summary>")[0] for group in groups] == [
        "3 not images",
        "1 empty",
        "1 HEIC without convflow[heic]",
    ]
    assert groups[0].count("<li><code>/photos/cat/notes-") == 3 and "<li><code>/photos/dog/empty.png" in groups[1]


def test_comparison_text_is_escaped():
    from convflow.catalog.comparisons import Comparison, VariantResult
    from convflow.tasks.compare_report import render_comparison

    failed = VariantResult(name=HOSTILE, status="failed", error=f"ValueError: {HOSTILE}")
    comparison = Comparison(
        pipeline=HOSTILE,
        comparison_id="cmp",
        started=HOSTILE,
        metric="test_accuracy",
        promote="best",
        runner=HOSTILE,
        flow_pid=1,
        data_fingerprint=HOSTILE,
        counts={HOSTILE: 1},
        label_names=[HOSTILE],
        overrides={HOSTILE: {"train": {"note": HOSTILE}}},
        variants=[failed],
        verdict=HOSTILE,
        stages=[],
    )

    page = render_comparison(comparison)

    assert "<script" not in page
    assert page.count("&lt;script&gt;") >= 10
    assert '<tr class="failed"><td><b>&lt;script&gt;' in page  # markup from the template itself stays


def test_the_report_shows_the_schedule_and_early_stoppings_epoch(
    tmp_path, digits_split, digits_trained, digits_tfrecords
):
    trained = digits_trained.model_copy(
        update={"schedule": "cosine, 2 warm-up epochs", "best_epoch": 3, "stopped_epoch": 5}
    )
    page = _digits_page(tmp_path, digits_tfrecords, digits_split, trained, digits_trained)

    training = page.split('id="training"')[1].split("<h2")[0]
    assert "Learning-rate schedule: cosine, 2 warm-up epochs." in training
    assert "Early stopping kept the weights of epoch 3 and stopped after epoch 5." in training


def test_the_report_shows_the_record_format(tmp_path, digits_split, digits_trained, digits_tfrecords):
    page = _digits_page(
        tmp_path, digits_tfrecords, digits_split, digits_trained, digits_trained, tfrecords=digits_tfrecords
    )

    dataset = page.split('id="dataset"')[1].split("<h2")[0]
    assert "Records: raw images at 12x12x1,\nnone compression; 3 shards," in dataset
