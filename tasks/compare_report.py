"""The comparison's report stage: one self-contained comparison.html ranking the variants,
comparison.parquet (one row per variant), and a Prefect table artifact."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from convflow import tables
from convflow.tasks.compare_variant import HIGHER_IS_BETTER, VariantResult
from convflow.tasks.records import RunSummary, StageRecord, StageRun
from convflow.tasks.stage import RunContext, stage_task, staged_output
from convflow.tasks.write_report import STYLE

EXTRA_STYLE = ".winner{background:#e8f6ec}.failed td{color:#a61b1b}table.text td{text-align:left}"


class Comparison(pydantic.BaseModel):
    """A comparison of a pipeline's variants, ranked; what `convflow compare` reports."""

    model_config = pydantic.ConfigDict(frozen=True)

    pipeline: str
    comparison_id: str
    started: str
    metric: str
    promote: str
    runner: str = pydantic.Field(description="How the variants ran, e.g. 'threads (3 at a time)'.")
    flow_pid: int = pydantic.Field(description="The flow's process; variants on Dask run in others.")
    data_fingerprint: str
    counts: dict[str, int] = pydantic.Field(description="Examples per split, shared by every variant.")
    label_names: list[str]
    overrides: dict[str, dict[str, Any]] = pydantic.Field(description="Each variant's overrides of the pipeline.")
    variants: list[VariantResult] = pydantic.Field(description="Completed variants by rank, then failed ones.")
    verdict: str = pydantic.Field(description="The winner and what happened to it.")
    stages: list[StageRun] = pydantic.Field(description="The shared data stages.")
    report: str | None = pydantic.Field(None, description="comparison.html, once written.")

    @property
    def winner(self) -> VariantResult | None:
        return self.variants[0] if self.variants and self.variants[0].rank == 1 else None


class ComparisonReport(StageRecord):
    """The comparison stage's output: the HTML report and the comparison table."""

    report_html: str
    comparison_parquet: str

    def required_files(self) -> list[str]:
        return [self.report_html, self.comparison_parquet]


def comparison_table(comparison: Comparison) -> pa.Table:
    """comparison.parquet: one row per variant (tables.COMPARISON_SCHEMA)."""
    columns = [field.name for field in tables.COMPARISON_SCHEMA]
    rows = []
    for variant in comparison.variants:
        row = variant.model_dump(include=set(columns))
        row.update(
            comparison_id=comparison.comparison_id, pipeline=comparison.pipeline, variant=variant.name,
            metric=comparison.metric, per_class_f1=list(variant.per_class_f1.items()) or None,
            passed_gate=variant.passed_gate, promoted_version=variant.promoted_version,
            epochs=variant.trained.epochs if variant.trained else None,
            train_seconds=variant.trained.train_seconds if variant.trained else None,
            images_per_second=variant.trained.images_per_second if variant.trained else None,
        )
        rows.append({column: row.get(column) for column in columns})
    return pa.Table.from_pylist(rows, schema=tables.COMPARISON_SCHEMA)


def variant_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """comparison.parquet's rows as plain dicts (per-class F1 as a dict), for JSON and printing."""
    rows = comparison_table(comparison).to_pylist()
    for row in rows:
        row["per_class_f1"] = dict(row["per_class_f1"] or [])
    return rows


def record_variant_runs(comparison: Comparison, artifacts_root: Path, flow_run_id: Any = None) -> None:
    """Append one runs.parquet row per completed variant, with the comparison's id (failed variants
    are in comparison.parquet only: like a failed `convflow run`, they finished no run). Only the
    promoted winner's status is completed; the others are not-promoted, with why."""
    for variant in comparison.variants:
        if not variant.completed:
            continue
        promoted = variant.rank == 1 and variant.promoted_version is not None
        gate_reason = variant.evaluation.gate_reason + ("" if promoted else f"; {comparison.verdict}")
        summary = RunSummary(
            pipeline=comparison.pipeline, run_id=variant.run_id, status="completed" if promoted else "not-promoted",
            started=comparison.started, config_hash=variant.config_hash, data_fingerprint=comparison.data_fingerprint,
            test_accuracy=variant.test_accuracy, passed_gate=variant.passed_gate, gate_reason=gate_reason,
            model=variant.trained.model_path, saved_model=variant.exported.saved_model, report=comparison.report,
            resumed_from_epoch=variant.trained.resumed_from_epoch, promoted_version=variant.promoted_version,
            stages=variant.stages,
        )
        run_dir = Path(artifacts_root) / comparison.pipeline / variant.run_id
        row = tables.catalog_row(summary, run_dir, flow_run_id, comparison.comparison_id, variant.name)
        tables.append_run(Path(artifacts_root) / "runs.parquet", row)


def _figure_tag(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))


def _rows_html(header: list[str], rows: list[tuple[str, list[str]]], css: str = "") -> str:
    """A table from already-escaped cells; each row comes with its CSS class."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join(f'<tr class="{row_css}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
                   for row_css, cells in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _row_css(variant: VariantResult) -> str:
    return "winner" if variant.rank == 1 else ("failed" if not variant.completed else "")


def _gate(variant: VariantResult) -> str:
    if variant.passed_gate is None:
        return "–"
    return '<span class="pass">pass</span>' if variant.passed_gate else '<span class="fail">fail</span>'


def _ranking(comparison: Comparison) -> str:
    """Scores before and after training, then what each variant costs."""
    scores = [
        (_row_css(v), [
            _cell(v.rank), f"<b>{html.escape(v.name)}</b>", html.escape(v.status), _cell(v.initial_accuracy),
            _cell(v.test_accuracy), _cell(v.initial_loss), _cell(v.test_loss), _cell(v.macro_f1), _gate(v),
            _cell(f"v{v.promoted_version}" if v.promoted_version else None),
        ])
        for v in comparison.variants
    ]
    costs = [
        (_row_css(v), [
            f"<b>{html.escape(v.name)}</b>", _cell(v.total_params), _cell(v.trainable_params),
            _cell(v.trained.epochs if v.trained else None), _cell(v.trained.train_seconds if v.trained else None, 1),
            _cell(v.trained.images_per_second if v.trained else None, 0), _cell(v.saved_model_mb, 2),
            _cell(v.latency_ms, 2), _cell(str(v.pid) if v.pid else None),
        ])
        for v in comparison.variants
    ]
    return (
        _rows_html(["rank", "variant", "status", "initial accuracy", "final accuracy", "initial loss", "final loss",
                    "macro F1", "gate", "promoted"], scores)
        + "<h3>Costs</h3>"
        + _rows_html(["variant", "parameters", "trainable", "epochs", "training s", "images/s", "SavedModel MB",
                      "latency ms/image", "process id"], costs)
    )


def _accuracy_bars(comparison: Comparison) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    done = [v for v in comparison.variants if v.completed]
    positions = np.arange(len(done))
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(done) + 2), 3.2))
    before = axis.bar(positions - 0.2, [v.initial_accuracy for v in done], 0.4, label="before training", color="#bbb")
    after = axis.bar(positions + 0.2, [v.test_accuracy for v in done], 0.4, label="after training", color="#2a6fb0")
    axis.bar_label(before, fmt="%.2f", fontsize=8)
    axis.bar_label(after, fmt="%.2f", fontsize=8)
    axis.axhline(1 / len(comparison.label_names), color="#a61b1b", linestyle=":", label="chance")
    axis.set_xticks(positions, [v.name for v in done])
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("test accuracy")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _figure_tag(figure)


def _curves(comparison: Comparison) -> str:
    """Every variant's training curves on shared axes: validation solid, training dashed."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    done = [v for v in comparison.variants if v.completed]
    for index, variant in enumerate(done):
        history = pq.read_table(variant.trained.history_parquet).to_pydict()
        color = colors[index % len(colors)]
        width = 1.5 + 2 * (len(done) - 1 - index)  # higher-ranked variants wider: identical curves stay visible
        for axis, metric in zip(axes, ("accuracy", "loss")):
            axis.plot(history["epoch"], history[metric], linestyle="--", color=color, alpha=0.6, linewidth=width)
            validation = history[f"val_{metric}"]
            shown = validation if any(value is not None for value in validation) else history[metric]
            axis.plot(history["epoch"], shown, marker="o", color=color, label=variant.name, linewidth=width,
                      markersize=3 + width)
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.set_title(f"{metric} (validation solid, training dashed)", fontsize=10)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    return _figure_tag(figure)


def _per_class(comparison: Comparison) -> str:
    done = [v for v in comparison.variants if v.completed]
    rows = [("", [html.escape(name), *(_cell(v.per_class_f1.get(name)) for v in done)])
            for name in comparison.label_names]
    return _rows_html(["class", *(f"F1 {v.name}" for v in done)], rows)


def _failures(comparison: Comparison) -> str:
    failed = [v for v in comparison.variants if not v.completed]
    if not failed:
        return "<p>Every variant completed.</p>"
    rows = [("failed", [f"<b>{html.escape(v.name)}</b>", html.escape(v.error or "")]) for v in failed]
    return "<p>These variants failed; the others ran to the end without them.</p>" + _rows_html(
        ["variant", "error"], rows, css="text"
    )


def _overrides(comparison: Comparison) -> str:
    rows = []
    for name, override in comparison.overrides.items():
        shown = "; ".join(f"{section}: {value}" for section, value in override.items() if value) or "the pipeline as is"
        rows.append(("", [html.escape(name), html.escape(shown)]))
    return _rows_html(["variant", "overrides of the pipeline"], rows, css="text")


def _stages(comparison: Comparison) -> str:
    rows = [("", ["shared", html.escape(s.name), _cell(s.seconds, 2), "yes" if s.cached else "no"])
            for s in comparison.stages]
    for v in comparison.variants:
        rows += [("", [html.escape(v.name), html.escape(s.name), _cell(s.seconds, 2), "yes" if s.cached else "no"])
                 for s in v.stages]
    return _rows_html(["variant", "stage", "seconds", "cache hit"], rows)


def _verdict(comparison: Comparison) -> str:
    direction = "higher" if HIGHER_IS_BETTER[comparison.metric] else "lower"
    winner = comparison.winner
    headline = (f"Winner by {comparison.metric} ({direction} is better): <b>{html.escape(winner.name)}</b> "
                f"({comparison.metric} {_cell(winner.metric(comparison.metric))})." if winner
                else "No variant completed.")
    failed = sum(not v.completed for v in comparison.variants)
    overlap = "" if comparison.runner.startswith("sequential") else (
        "Variants trained at the same time, so their training times include each other's load. ")
    return (f"<p>{headline} {html.escape(comparison.verdict)}.</p><p>{len(comparison.variants)} variants, "
            f"{failed} failed; ran as {html.escape(comparison.runner)} (flow process {comparison.flow_pid}). "
            f"{overlap}SavedModel latency was measured one variant after another once all had trained.</p>")


def render_comparison(comparison: Comparison) -> str:
    """The comparison report's HTML: every figure embedded, no external file needed."""
    counts = ", ".join(f"{split} {count}" for split, count in comparison.counts.items())
    done = any(v.completed for v in comparison.variants)
    sections = [
        f"<h1>convflow comparison: {html.escape(comparison.pipeline)}</h1>"
        f"<p>comparison <code>{html.escape(comparison.comparison_id)}</code>, started {comparison.started}; "
        f"data {comparison.data_fingerprint} ({counts}; {len(comparison.label_names)} classes)</p>",
        '<h2 id="verdict">Verdict</h2>' + _verdict(comparison),
        '<h2 id="ranking">Ranking</h2>' + _ranking(comparison),
        '<h2 id="initial-vs-final">Test accuracy before and after training</h2>'
        + (_accuracy_bars(comparison) if done else "<p>No variant completed.</p>"),
        '<h2 id="curves">Training curves</h2>' + (_curves(comparison) if done else "<p>No variant completed.</p>")
        + "<p>Variants that train the same head the same way (frozen and fine-tuned, before fine-tuning starts) "
        "draw the same curve: the wider line underneath is the higher-ranked variant.</p>",
        '<h2 id="per-class">Per-class F1</h2>' + _per_class(comparison),
        '<h2 id="failed">Failed variants</h2>' + _failures(comparison),
        '<h2 id="variants">Variants</h2>' + _overrides(comparison),
        '<h2 id="stages">Stages</h2>' + _stages(comparison),
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>convflow comparison "
            f"{html.escape(comparison.pipeline)}</title><style>{STYLE}{EXTRA_STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>")


def write_comparison_report(comparison: Comparison, output_dir: Path) -> ComparisonReport:
    """Write comparison.html, comparison.parquet and comparison.json into `output_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    with staged_output(output_dir) as staging:
        (staging / "comparison.html").write_text(render_comparison(comparison))
        tables.write_parquet(comparison_table(comparison), staging / "comparison.parquet")
        (staging / "comparison.json").write_text(comparison.model_dump_json(indent=2))
    return ComparisonReport(
        output_dir=str(output_dir), report_html=str(output_dir / "comparison.html"),
        comparison_parquet=str(output_dir / "comparison.parquet"),
    )


def _publish_artifacts(report: ComparisonReport, comparison: Comparison) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = "".join(ch if ch.isalnum() else "-" for ch in comparison.pipeline.lower())
    rows = comparison_table(comparison).drop_columns(["per_class_f1"]).to_pylist()
    create_table_artifact(key=f"{key}-comparison", table=rows, description=f"Comparison {comparison.comparison_id}")
    create_markdown_artifact(
        key=f"{key}-comparison-verdict",
        markdown=f"# {comparison.pipeline}: comparison\n\n{comparison.verdict}\n\nReport: `{report.report_html}`",
        description="convflow comparison verdict",
    )
    create_link_artifact(
        key=f"{key}-comparison-report", link=Path(report.report_html).resolve().as_uri(), link_text="comparison.html"
    )


@stage_task()
def compare_report(comparison: Comparison, run: RunContext) -> ComparisonReport:
    """Prefect task over write_comparison_report; also publishes the table, verdict and link artifacts."""
    report = write_comparison_report(comparison, run.stage_dir("comparison"))
    _publish_artifacts(report, comparison)
    return report
