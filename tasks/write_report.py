"""Stage 8, write_report: one self-contained report.html, and the key facts as Prefect artifacts."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from convflow.tasks.records import Evaluation, ExportedModel, Report, SplitSet, StageRun, TrainedModel
from convflow.tasks.stage import RunContext, hash_json, sha256_file, stage_task, staged_output

# Under <artifacts>/<pipeline>/: rendered figures, reused by reports of the same model and evaluation.
FIGURE_CACHE = ".report-figures"
PACKAGES = ("convflow", "tensorflow", "keras", "prefect", "pyarrow", "scikit-learn")

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#176d2c;font-weight:bold}.fail{color:#a61b1b;font-weight:bold}img{max-width:100%}
.grid{display:grid;gap:6px}.grid figure{margin:0;text-align:center;font-size:11px}
.grid img{width:104px;height:104px;object-fit:contain;image-rendering:pixelated;background:#000}
"""


def _figure_tag(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _curves(history_parquet: str) -> str:
    import matplotlib.pyplot as plt

    history = pq.read_table(history_parquet).to_pydict()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        if any(value is not None for value in history[f"val_{metric}"]):
            axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    return _figure_tag(figure)


def _confusion(confusion_json: str) -> str:
    import matplotlib.pyplot as plt

    confusion = json.loads(Path(confusion_json).read_text())
    matrix = np.asarray(confusion["matrix"])
    size = max(4, 0.45 * len(matrix))
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axis.text(column, row, count, ha="center", va="center", fontsize=8)
    ticks = range(len(matrix))
    axis.set_xticks(ticks, confusion["labels"], rotation=90)
    axis.set_yticks(ticks, confusion["labels"])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    return _figure_tag(figure)


def _png_tag(image: np.ndarray) -> str:
    from PIL import Image

    pixels = np.asarray(image, np.uint8)
    if pixels.shape[-1] == 1:  # grayscale: PIL takes H x W
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _image_grid(images: np.ndarray, titles: list[str], columns: int = 8) -> str:
    """Images (uint8) with captions as an HTML grid, each a PNG of its own pixels that the browser
    scales up: a matplotlib figure of 16 subplots took ~0.4 s to draw, this a few milliseconds."""
    if len(images) == 0:
        return "<p>None.</p>"
    cells = "".join(
        f"<figure>{_png_tag(image)}<figcaption>{html.escape(title)}</figcaption></figure>"
        for image, title in zip(images, titles)
    )
    return f'<div class="grid" style="grid-template-columns:repeat({columns},112px)">{cells}</div>'


def _per_class_rows(metrics_parquet: str) -> list[list]:
    metrics = pq.read_table(metrics_parquet).to_pandas()
    per_class = metrics.dropna(subset=["class_name"]).pivot(index="class_name", columns="metric", values="value")
    order = metrics.dropna(subset=["class_name"])["class_name"].drop_duplicates()
    return [
        [name, *(float(per_class.loc[name, column]) for column in ("precision", "recall", "f1")),
         int(per_class.loc[name, "support"])]
        for name in order
    ]


def _feature_maps(maps: np.ndarray) -> str:
    import matplotlib.pyplot as plt

    if maps.size == 0:
        return "<p>The base has no Conv2D layer.</p>"
    count = maps.shape[-1]
    figure, axes = plt.subplots(1, count, figsize=(count * 1.1, 1.3), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.imshow(maps[..., index], cmap="viridis")
        axis.axis("off")
    return _figure_tag(figure)


def _model_summary(summary_parquet: str) -> str:
    rows = pq.read_table(summary_parquet).to_pylist()
    total = sum(row["params"] for row in rows)
    trainable = sum(row["params"] for row in rows if row["trainable"])
    table = _table(["layer", "type", "output shape", "params", "trainable"],
                   [[r["layer"], r["type"], r["output_shape"], r["params"], "yes" if r["trainable"] else "no"]
                    for r in rows])
    return f"<p>{total:,} parameters, {trainable:,} trainable.</p>{table}"


def _production(evaluation: Evaluation, exported: ExportedModel) -> str:
    verdict = "pass" if evaluation.passed_gate else "fail"
    if evaluation.production_version is None:
        comparison = "<p>No other production model to compare against.</p>"
    else:
        comparison = _table(
            ["model", "test accuracy"],
            [[f"production v{evaluation.production_version}", evaluation.production_accuracy],
             ["this run", evaluation.test_accuracy]],
        )
    promoted = (f"Promoted to production version {exported.promoted_version}." if exported.promoted_version
                else ("Not promoted: " + html.escape(evaluation.gate_reason) if not evaluation.passed_gate
                      else "Already in production."))
    return (f'{comparison}<p>Gate: <span class="{verdict}">{verdict}</span> — '
            f"{html.escape(evaluation.gate_reason)}</p><p>{promoted}</p>")


def _git_commit() -> str:
    """The commit of the convflow checkout that ran, with "+changes" when its tree was dirty."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    if commit.returncode != 0:
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def _class_counts(splits_parquet: str) -> str:
    """Examples per class and split: the dataset summary."""
    splits = pq.read_table(splits_parquet, columns=["label_name", "split"]).to_pandas()
    counts = splits.groupby(["label_name", "split"], sort=False).size().unstack(fill_value=0)
    columns = [split for split in ("train", "validation", "test") if split in counts.columns]
    return _table(["class", *columns, "total"],
                  [[name, *(int(row[c]) for c in columns), int(row[columns].sum())] for name, row in counts.iterrows()])


def _lineage(config_hash: str, data_fingerprint: str) -> list[list]:
    rows = [
        ["config hash", config_hash], ["data fingerprint", data_fingerprint], ["git commit", _git_commit()],
        ["python", platform.python_version()],
    ]
    for package in PACKAGES:
        try:
            rows.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            rows.append([package, "not installed"])
    return rows


def _render_figures(split_set: SplitSet, trained: TrainedModel, evaluation: Evaluation) -> dict[str, str]:
    """The report's figures as <img> tags: they depend on the trained model and its evaluation alone."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display here
    samples = np.load(evaluation.samples_npz)
    names = split_set.label_names
    augmentation = np.load(trained.augmentation_npy) if trained.augmentation_npy else None
    return {
        "augmentation": "" if augmentation is None else _image_grid(augmentation, [""] * len(augmentation), columns=5),
        "curves": _curves(trained.history_parquet),
        "confusion": _confusion(evaluation.confusion_json),
        "samples": _image_grid(
            samples["sample_images"],
            [f"{names[p]} ({names[t]})" for t, p in zip(samples["sample_labels"], samples["sample_predicted"])],
        ),
        "mistakes": _image_grid(
            samples["mistake_images"],
            [f"{names[p]} {c:.2f}, true {names[t]}" for t, p, c in
             zip(samples["mistake_labels"], samples["mistake_predicted"], samples["mistake_confidence"])],
        ),
        "feature_maps": _image_grid(samples["sample_images"][:1], [f"test image, true {names[samples['sample_labels'][0]]}"])
        + _feature_maps(samples["feature_maps"]),
    }


def report_figures(
    split_set: SplitSet, trained: TrainedModel, evaluation: Evaluation, cache_dir: Path | None = None
) -> dict[str, str]:
    """The figures, rendered once per (model, evaluation, this module's code) and then read from
    `cache_dir`: a fully cached rerun writes its own report without redrawing them (~1 s)."""
    if cache_dir is None:
        return _render_figures(split_set, trained, evaluation)
    key = hash_json([split_set, trained, evaluation, sha256_file(__file__)])[:24]
    cached = cache_dir / f"{key}.json"
    with contextlib.suppress(OSError, ValueError):  # missing or damaged: draw them again
        figures = json.loads(cached.read_text())
        if isinstance(figures, dict) and all(isinstance(value, str) for value in figures.values()):
            return figures
    figures = _render_figures(split_set, trained, evaluation)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{key}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(figures))
    partial.replace(cached)  # atomic: a reader sees the whole file or none
    return figures


def render_report(
    pipeline: str, run_id: str, config_hash: str, split_set: SplitSet, trained: TrainedModel,
    evaluation: Evaluation, exported: ExportedModel, stages: list[StageRun], figures: dict[str, str],
) -> str:
    """The report's HTML: every figure embedded, no external file needed."""
    names = split_set.label_names
    verdict = "pass" if evaluation.passed_gate else "fail"
    sections = [
        f"<h1>convflow report: {html.escape(pipeline)}</h1><p>run <code>{html.escape(run_id)}</code></p>",
        f'<h2 id="summary">Summary</h2><p>Test accuracy <b>{evaluation.test_accuracy:.4f}</b>, '
        f'loss {evaluation.test_loss:.4f}. Gate: <span class="{verdict}">{verdict}</span> '
        f"({html.escape(evaluation.gate_reason)}). SavedModel: <code>{html.escape(exported.saved_model)}</code></p>",
        '<h2 id="dataset">Dataset</h2>' + _table(["split", "examples"], [[k, v] for k, v in split_set.counts.items()])
        + f"<p>{len(names)} classes; {split_set.duplicates} exact duplicates "
        f"({split_set.duplicates_across_splits} across splits); "
        f"{len(split_set.skipped)} unusable files skipped.</p>" + _class_counts(split_set.splits_parquet)
        + "".join(f"<p><code>{html.escape(line)}</code></p>" for line in split_set.skipped[:50]),
        '<h2 id="augmentation">Augmentation preview</h2>' + (
            figures["augmentation"] + "<p>Each row: a training image, then augmented versions of it.</p>"
            if trained.augmentation_npy else "<p>Augmentation is off for this pipeline (train.augment).</p>"
        ),
        '<h2 id="model">Model summary</h2>' + _model_summary(trained.model_summary_parquet),
        f'<h2 id="training">Training curves</h2><p>{trained.epochs} epochs'
        f"{f', resumed from epoch {trained.resumed_from_epoch}' if trained.resumed_from_epoch else ''}; "
        f"{trained.images_per_second:.0f} images/s.</p>" + figures["curves"],
        '<h2 id="confusion">Confusion matrix</h2>' + figures["confusion"],
        '<h2 id="per-class">Per-class metrics</h2>'
        + _table(["class", "precision", "recall", "f1", "support"], _per_class_rows(evaluation.metrics_parquet)),
        '<h2 id="samples">Sample predictions</h2>' + figures["samples"],
        '<h2 id="mistakes">Worst mistakes</h2>' + figures["mistakes"],
        '<h2 id="feature-maps">First convolution feature maps</h2>' + figures["feature_maps"],
        '<h2 id="production">Comparison with production and gate</h2>' + _production(evaluation, exported),
        '<h2 id="stages">Stages</h2>' + _table(
            ["stage", "seconds", "cache hit", "cache key", "ran on"], _stage_rows(stages, trained)
        ),
        '<h2 id="lineage">Lineage</h2>' + _table(["what", "value"], _lineage(config_hash, split_set.data_fingerprint)),
    ]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>convflow {html.escape(pipeline)}</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"


def _stage_rows(stages: list[StageRun], trained: TrainedModel) -> list[list]:
    """One row per stage; "ran on" names the process: training's own (a work pool's worker, maybe),
    the flow's for the others, nothing for a cache hit, which ran in an earlier run."""
    flow_process = f"{socket.gethostname()} pid {os.getpid()}"
    rows = []
    for stage in stages:
        ran_on = "" if stage.cached else f"{trained.host} pid {trained.pid}" if stage.name == "train" else flow_process
        rows.append([stage.name, round(stage.seconds, 2), "yes" if stage.cached else "no", stage.cache_key or "", ran_on])
    return rows


def write_report_html(output_dir: Path, figure_cache: Path | None = None, **parts) -> Report:
    """Render the report into output_dir/report.html (figures from `figure_cache` when drawn before)."""
    figures = report_figures(parts["split_set"], parts["trained"], parts["evaluation"], figure_cache)
    with staged_output(output_dir) as staging:
        (staging / "report.html").write_text(render_report(**parts, figures=figures))
    return Report(output_dir=str(output_dir), report_html=str(output_dir / "report.html"))


def _publish_artifacts(report: Report, evaluation: Evaluation, pipeline: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = "".join(ch if ch.isalnum() else "-" for ch in pipeline.lower())
    verdict = "passed" if evaluation.passed_gate else "NOT PROMOTED"
    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=f"# {pipeline}\n\nTest accuracy **{evaluation.test_accuracy:.4f}** — gate {verdict}: "
                 f"{evaluation.gate_reason}\n\nReport: `{report.report_html}`",
        description="convflow run summary",
    )
    metrics = pq.read_table(evaluation.metrics_parquet).to_pylist()
    create_table_artifact(key=f"{key}-metrics", table=metrics, description="Test-split metrics")
    create_link_artifact(key=f"{key}-report", link=Path(report.report_html).resolve().as_uri(), link_text="report.html")


@stage_task()
def write_report(
    config_hash: str, split_set: SplitSet, trained: TrainedModel, evaluation: Evaluation,
    exported: ExportedModel, stages: list[StageRun], run: RunContext,
) -> Report:
    """Prefect task over write_report_html; also publishes summary, metrics and link artifacts."""
    report = write_report_html(
        run.stage_dir("write_report"), Path(run.artifacts_root) / run.pipeline / FIGURE_CACHE, pipeline=run.pipeline, run_id=run.run_id, config_hash=config_hash,
        split_set=split_set, trained=trained, evaluation=evaluation, exported=exported, stages=stages,
    )
    _publish_artifacts(report, evaluation, run.pipeline)
    return report
