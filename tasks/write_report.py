"""Stage 8, write_report: one self-contained report.html, and the key facts as Prefect artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from markupsafe import Markup

from convflow.core.context import RunContext
from convflow.core.hashing import hash_json, sha256_file
from convflow.core.object_store import shown_and_linked
from convflow.core.records import (
    DataChecks,
    Decision,
    Evaluation,
    ExportedModel,
    Report,
    SplitSet,
    StageRun,
    TFRecordSet,
    TrainedModel,
)
from convflow.core.run_log import artifact_key
from convflow.core.skips import skipped_by_reason, skipped_summary
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.reporting.checks import checks_context
from convflow.reporting.figures import figure_tag, image_grid, page_sources, pyplot, render_page

# Under <artifacts>/<pipeline>/: rendered figures, reused by reports of the same model and evaluation.
FIGURE_CACHE = ".report-figures"
PACKAGES = ("convflow", "tensorflow", "keras", "prefect", "pyarrow", "scikit-learn")


def _text_rows(rows: list[list]) -> list[list[str]]:
    """Table rows as the text the report shows: floats to four decimals."""
    return [[f"{cell:.4f}" if isinstance(cell, float) else str(cell) for cell in row] for row in rows]


def _curves(history_parquet: str) -> Markup:
    plt = pyplot()
    history = pq.read_table(history_parquet).to_pydict()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        if any(value is not None for value in history[f"val_{metric}"]):
            axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    return figure_tag(figure)


def _confusion(confusion_json: str) -> Markup:
    confusion = json.loads(Path(confusion_json).read_text())
    matrix = np.asarray(confusion["matrix"])
    size = max(4, 0.45 * len(matrix))
    figure, axis = pyplot().subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axis.text(column, row, count, ha="center", va="center", fontsize=8)
    ticks = range(len(matrix))
    axis.set_xticks(ticks, confusion["labels"], rotation=90)
    axis.set_yticks(ticks, confusion["labels"])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return figure_tag(figure)


def _per_class_rows(metrics_parquet: str, production_recalls: dict[str, float] | None = None) -> list[list]:
    """Precision, recall, F1 and support of each class; with production's recall on the same split
    beside them when there is a production model."""
    metrics = pq.read_table(metrics_parquet).to_pandas()
    per_class = metrics.dropna(subset=["class_name"]).pivot(index="class_name", columns="metric", values="value")
    order = metrics.dropna(subset=["class_name"])["class_name"].drop_duplicates()
    return [
        [
            name,
            *(float(per_class.loc[name, column]) for column in ("precision", "recall", "f1")),
            int(per_class.loc[name, "support"]),
            *([production_recalls.get(name, "")] if production_recalls else []),
        ]
        for name in order
    ]


def _feature_maps(maps: np.ndarray) -> Markup:
    if maps.size == 0:
        return Markup("<p>The base has no Conv2D layer.</p>")
    count = maps.shape[-1]
    figure, axes = pyplot().subplots(1, count, figsize=(count * 1.1, 1.3), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.imshow(maps[..., index], cmap="viridis")
        axis.axis("off")
    return figure_tag(figure)


def _layers(summary_parquet: str) -> tuple[dict[str, int], list[list]]:
    """Parameter totals and one row per layer."""
    rows = pq.read_table(summary_parquet).to_pylist()
    parameters = {
        "total": sum(row["params"] for row in rows),
        "trainable": sum(row["params"] for row in rows if row["trainable"]),
    }
    return parameters, [
        [r["layer"], r["type"], r["output_shape"], r["params"], "yes" if r["trainable"] else "no"] for r in rows
    ]


def _production_rows(evaluation: Evaluation) -> list[list]:
    """This run's accuracy beside the production model's, when there is one."""
    if evaluation.production_version is None:
        return []
    return [
        [f"production v{evaluation.production_version}", evaluation.production_accuracy],
        ["this run", evaluation.test_accuracy],
    ]


def _git_commit() -> str:
    """The commit of the convflow checkout that ran, with "+changes" when its tree was dirty."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if commit.returncode != 0:
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def _class_counts(splits_parquet: str) -> tuple[list[str], list[list]]:
    """Examples per class and split, the dataset summary: the splits present and one row per class."""
    splits = pq.read_table(splits_parquet, columns=["label_name", "split"]).to_pandas()
    counts = splits.groupby(["label_name", "split"], sort=False).size().unstack(fill_value=0)
    columns = [split for split in ("train", "validation", "test") if split in counts.columns]
    rows = [[name, *(int(row[c]) for c in columns), int(row[columns].sum())] for name, row in counts.iterrows()]
    return columns, rows


def _lineage(config_hash: str, data_fingerprint: str) -> list[list]:
    rows = [
        ["config hash", config_hash],
        ["data fingerprint", data_fingerprint],
        ["git commit", _git_commit()],
        ["python", platform.python_version()],
    ]
    for package in PACKAGES:
        try:
            rows.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            rows.append([package, "not installed"])
    return rows


def _render_figures(split_set: SplitSet, trained: TrainedModel, evaluation: Evaluation) -> dict[str, Markup]:
    """The report's figures as <img> tags: they depend on the trained model and its evaluation alone."""
    samples = np.load(evaluation.samples_npz)
    names = split_set.label_names
    augmentation = np.load(trained.augmentation_npy) if trained.augmentation_npy else None
    return {
        "augmentation": Markup("")
        if augmentation is None
        else image_grid(augmentation, [""] * len(augmentation), columns=5),
        "curves": _curves(trained.history_parquet),
        "confusion": _confusion(evaluation.confusion_json),
        "samples": image_grid(
            samples["sample_images"],
            [f"{names[p]} ({names[t]})" for t, p in zip(samples["sample_labels"], samples["sample_predicted"])],
        ),
        "mistakes": image_grid(
            samples["mistake_images"],
            [
                f"{names[p]} {c:.2f}, true {names[t]}"
                for t, p, c in zip(
                    samples["mistake_labels"], samples["mistake_predicted"], samples["mistake_confidence"]
                )
            ],
        ),
        "feature_maps": image_grid(
            samples["sample_images"][:1], [f"test image, true {names[samples['sample_labels'][0]]}"]
        )
        + _feature_maps(samples["feature_maps"]),
    }


def _report_code() -> list[str]:
    """Hashes of the code that draws the figures and lays out the page: changing any redraws them."""
    return [sha256_file(path) for path in (Path(__file__), *page_sources())]


def report_figures(
    split_set: SplitSet, trained: TrainedModel, evaluation: Evaluation, cache_dir: Path | None = None
) -> dict[str, Markup]:
    """The figures, rendered once per (model, evaluation, report code) and then read from
    `cache_dir`: a fully cached rerun writes its own report without redrawing them (~1 s)."""
    if cache_dir is None:
        return _render_figures(split_set, trained, evaluation)
    key = hash_json([split_set, trained, evaluation, _report_code()])[:24]
    cached = cache_dir / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):  # missing or damaged: draw them again
        figures = json.loads(cached.read_text())
        if isinstance(figures, dict) and all(isinstance(value, str) for value in figures.values()):
            return {name: Markup(tag) for name, tag in figures.items()}  # written by _render_figures: HTML
    figures = _render_figures(split_set, trained, evaluation)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{key}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(figures))
    partial.replace(cached)  # atomic: a reader sees the whole file or none
    return figures


def render_report(
    pipeline: str,
    run_id: str,
    config_hash: str,
    split_set: SplitSet,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    stages: list[StageRun],
    figures: dict[str, Markup],
    tfrecords: TFRecordSet | None = None,
    checks: DataChecks | None = None,
    decisions: list[Decision] | None = None,
) -> str:
    """The report's HTML: every figure embedded, no external file needed; `decisions`: a person's
    answers to this run's blocks (validate.on_block: ask), shown atop its checks."""
    parameters, layers = _layers(trained.model_summary_parquet)
    class_count_splits, class_counts = _class_counts(split_set.splits_parquet)
    tables = {
        "splits": [[split, count] for split, count in split_set.counts.items()],
        "class_counts": class_counts,
        "layers": layers,
        "per_class": _per_class_rows(evaluation.metrics_parquet, evaluation.production_class_recalls),
        "production": _production_rows(evaluation),
        "stages": _stage_rows(stages, trained),
        "lineage": _lineage(config_hash, split_set.data_fingerprint),
    }
    return render_page(
        "report.html.j2",
        pipeline=pipeline,
        run_id=run_id,
        split_set=split_set,
        skipped=skipped_by_reason(split_set.skipped),
        skipped_summary=skipped_summary(split_set.skipped) or "no file skipped",
        tfrecords=tfrecords,
        trained=trained,
        evaluation=evaluation,
        exported=exported,
        figures=figures,
        checks={
            **checks_context(
                checks.results_parquet, split_set.splits_parquet, split_set.images_npy, evaluation.model_checks_parquet
            ),
            "decisions": [decision.line() for decision in decisions or []],
        }
        if checks
        else None,
        parameters=parameters,
        class_count_splits=class_count_splits,
        tables={name: _text_rows(rows) for name, rows in tables.items()},
    )


def _stage_rows(stages: list[StageRun], trained: TrainedModel) -> list[list]:
    """One row per stage; "ran on" names the process: training's own (a work pool's worker, maybe),
    the flow's for the others, nothing for a cache hit, which ran in an earlier run."""
    flow_process = f"{socket.gethostname()} pid {os.getpid()}"
    rows = []
    for stage in stages:
        ran_on = "" if stage.cached else f"{trained.host} pid {trained.pid}" if stage.name == "train" else flow_process
        cached = "yes" if stage.cached else "no"
        rows.append([stage.name, round(stage.seconds, 2), cached, stage.cache_key or "", ran_on])
    return rows


def write_report_html(output_dir: Path, figure_cache: Path | None = None, **parts) -> Report:
    """Render the report into output_dir/report.html (figures from `figure_cache` when drawn before)."""
    figures = report_figures(parts["split_set"], parts["trained"], parts["evaluation"], figure_cache)
    with staged_output(output_dir) as staging:
        (staging / "report.html").write_text(render_report(**parts, figures=figures))
    return Report(output_dir=str(output_dir), report_html=str(output_dir / "report.html"))


def _publish_artifacts(evaluation: Evaluation, pipeline: str, report_address: str, report_link: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = artifact_key(pipeline)
    verdict = "passed" if evaluation.passed_gate else "NOT PROMOTED"
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=f"# {pipeline}\n\nTest accuracy **{evaluation.test_accuracy:.4f}** — gate {verdict}: "
        f"{evaluation.gate_reason}\n\nReport: `{report_address}`",
        description="convflow run summary",
    )
    metrics = pq.read_table(evaluation.metrics_parquet).to_pylist()
    create_table_artifact(key=f"{key}-metrics", table=metrics, description="Test-split metrics")
    create_link_artifact(key=f"{key}-report", link=report_link, link_text="report.html")


@stage_task()
def write_report(
    config_hash: str,
    split_set: SplitSet,
    trained: TrainedModel,
    evaluation: Evaluation,
    exported: ExportedModel,
    stages: list[StageRun],
    run: RunContext,
    tfrecords: TFRecordSet | None = None,
    checks: DataChecks | None = None,
    decisions: list[Decision] | None = None,
) -> Report:
    """Prefect task over write_report_html; also publishes summary, metrics and link artifacts."""
    report = write_report_html(
        run.stage_dir("write_report"),
        run.local_root / run.pipeline / FIGURE_CACHE,
        pipeline=run.pipeline,
        run_id=run.run_id,
        config_hash=config_hash,
        split_set=split_set,
        trained=trained,
        evaluation=evaluation,
        exported=exported,
        stages=stages,
        tfrecords=tfrecords,
        checks=checks,
        decisions=decisions,
    )
    address, link = shown_and_linked(report.report_html, run.artifacts_root)
    _publish_artifacts(evaluation, run.pipeline, address, link)
    return report
