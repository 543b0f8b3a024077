"""The comparison's report stage: one self-contained comparison.html ranking the variants,
comparison.parquet (one row per variant), and a Prefect table artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from markupsafe import Markup

from convflow.catalog import schemas
from convflow.catalog.comparisons import Comparison, VariantResult
from convflow.core.context import RunContext
from convflow.core.object_store import shown_and_linked
from convflow.core.records import StageRecord
from convflow.core.run_log import artifact_key
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.reporting.figures import figure_tag, pyplot, render_page
from convflow.tasks.compare_variant import HIGHER_IS_BETTER


class ComparisonReport(StageRecord):
    """The comparison stage's output: the HTML report and the comparison table."""

    report_html: str
    comparison_parquet: str

    def required_files(self) -> list[str]:
        return [self.report_html, self.comparison_parquet]

    def log_line(self) -> str:
        return f"comparison report at {self.report_html}, table at {self.comparison_parquet}"


def comparison_table(comparison: Comparison) -> pa.Table:
    """comparison.parquet: one row per variant (schemas.COMPARISON_SCHEMA)."""
    columns = [field.name for field in schemas.COMPARISON_SCHEMA]
    rows = []
    for variant in comparison.variants:
        row = variant.model_dump(include=set(columns))
        row.update(
            comparison_id=comparison.comparison_id,
            pipeline=comparison.pipeline,
            variant=variant.name,
            metric=comparison.metric,
            per_class_f1=list(variant.per_class_f1.items()) or None,
            passed_gate=variant.passed_gate,
            promoted_version=variant.promoted_version,
            epochs=variant.trained.epochs if variant.trained else None,
            train_seconds=variant.trained.train_seconds if variant.trained else None,
            images_per_second=variant.trained.images_per_second if variant.trained else None,
        )
        rows.append({column: row.get(column) for column in columns})
    return pa.Table.from_pylist(rows, schema=schemas.COMPARISON_SCHEMA)


def variant_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """comparison.parquet's rows as plain dicts (per-class F1 as a dict), for JSON and printing."""
    rows = comparison_table(comparison).to_pylist()
    for row in rows:
        row["per_class_f1"] = dict(row["per_class_f1"] or [])
    return rows


def _cell(value: Any, digits: int = 4) -> str:
    """A table cell's text: a dash for nothing, floats to `digits` decimals, ints with thousands separators."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _row_css(variant: VariantResult) -> str:
    return "winner" if variant.rank == 1 else ("failed" if not variant.completed else "")


def _ranking(comparison: Comparison) -> list[dict[str, Any]]:
    """Each variant's scores before and after training."""
    return [
        {
            "css": _row_css(v),
            "rank": _cell(v.rank),
            "name": v.name,
            "status": v.status,
            "scores": [
                _cell(score) for score in (v.initial_accuracy, v.test_accuracy, v.initial_loss, v.test_loss, v.macro_f1)
            ],
            "passed_gate": v.passed_gate,
            "promoted": _cell(f"v{v.promoted_version}" if v.promoted_version else None),
        }
        for v in comparison.variants
    ]


def _costs(comparison: Comparison) -> list[dict[str, Any]]:
    """What each variant cost: its size, training time and speed, and its SavedModel's."""
    rows = []
    for v in comparison.variants:
        trained = v.trained
        rows.append(
            {
                "css": _row_css(v),
                "name": v.name,
                "cells": [
                    _cell(v.total_params),
                    _cell(v.trainable_params),
                    _cell(trained.epochs if trained else None),
                    _cell(trained.train_seconds if trained else None, 1),
                    _cell(trained.images_per_second if trained else None, 0),
                    _cell(v.saved_model_mb, 2),
                    _cell(v.latency_ms, 2),
                    _cell(str(v.pid) if v.pid else None),
                ],
            }
        )
    return rows


def _accuracy_bars(comparison: Comparison) -> Markup:
    import numpy as np

    done = [v for v in comparison.variants if v.completed]
    positions = np.arange(len(done))
    figure, axis = pyplot().subplots(figsize=(max(5, 1.6 * len(done) + 2), 3.2))
    before = axis.bar(positions - 0.2, [v.initial_accuracy for v in done], 0.4, label="before training", color="#bbb")
    after = axis.bar(positions + 0.2, [v.test_accuracy for v in done], 0.4, label="after training", color="#2a6fb0")
    axis.bar_label(before, fmt="%.2f", fontsize=8)
    axis.bar_label(after, fmt="%.2f", fontsize=8)
    axis.axhline(1 / len(comparison.label_names), color="#a61b1b", linestyle=":", label="chance")
    axis.set_xticks(positions, [v.name for v in done])
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("test accuracy")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return figure_tag(figure)


def _curves(comparison: Comparison) -> Markup:
    """Every variant's training curves on shared axes: validation solid, training dashed."""
    plt = pyplot()
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
            axis.plot(
                history["epoch"],
                shown,
                marker="o",
                color=color,
                label=variant.name,
                linewidth=width,
                markersize=3 + width,
            )
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.set_title(f"{metric} (validation solid, training dashed)", fontsize=10)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    return figure_tag(figure)


def _per_class(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the completed variants' F1 per class."""
    done = [v for v in comparison.variants if v.completed]
    rows = [[name, *(_cell(v.per_class_f1.get(name)) for v in done)] for name in comparison.label_names]
    return ["class", *(f"F1 {v.name}" for v in done)], rows


def _overrides(comparison: Comparison) -> list[list[str]]:
    rows = []
    for name, override in comparison.overrides.items():
        shown = "; ".join(f"{section}: {value}" for section, value in override.items() if value) or "the pipeline as is"
        rows.append([name, shown])
    return rows


def _stages(comparison: Comparison) -> list[list[str]]:
    """The shared stages, then each variant's."""
    runs = [("shared", stage) for stage in comparison.stages]
    runs += [(v.name, stage) for v in comparison.variants for stage in v.stages]
    return [[owner, s.name, _cell(s.seconds, 2), "yes" if s.cached else "no"] for owner, s in runs]


def _verdict(comparison: Comparison) -> dict[str, Any]:
    """The winner, which way the metric counts, and whether variants shared the machine while training."""
    winner = comparison.winner
    return {
        "winner": winner,
        "winner_score": _cell(winner.metric(comparison.metric)) if winner else None,
        "direction": "higher" if HIGHER_IS_BETTER[comparison.metric] else "lower",
        "overlap": not comparison.runner.startswith("sequential"),
        "failed": [v for v in comparison.variants if not v.completed],
    }


def render_comparison(comparison: Comparison) -> str:
    """The comparison report's HTML: every figure embedded, no external file needed."""
    done = any(v.completed for v in comparison.variants)
    figures = {"accuracy_bars": _accuracy_bars(comparison), "curves": _curves(comparison)} if done else {}
    per_class_header, per_class = _per_class(comparison)
    return render_page(
        "comparison.html.j2",
        comparison=comparison,
        **_verdict(comparison),
        counts=", ".join(f"{split} {count}" for split, count in comparison.counts.items()),
        ranking=_ranking(comparison),
        costs=_costs(comparison),
        figures=figures,
        per_class_header=per_class_header,
        per_class=per_class,
        overrides=_overrides(comparison),
        stages=_stages(comparison),
    )


def write_comparison_report(comparison: Comparison, output_dir: Path) -> ComparisonReport:
    """Write comparison.html, comparison.parquet and comparison.json into `output_dir`."""
    with staged_output(output_dir) as staging:
        (staging / "comparison.html").write_text(render_comparison(comparison))
        schemas.write_parquet(comparison_table(comparison), staging / "comparison.parquet")
        (staging / "comparison.json").write_text(comparison.model_dump_json(indent=2))
    return ComparisonReport(
        output_dir=str(output_dir),
        report_html=str(output_dir / "comparison.html"),
        comparison_parquet=str(output_dir / "comparison.parquet"),
    )


def _publish_artifacts(comparison: Comparison, report_address: str, report_link: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = artifact_key(comparison.pipeline)
    rows = comparison_table(comparison).drop_columns(["per_class_f1"]).to_pylist()
    create_table_artifact(key=f"{key}-comparison", table=rows, description=f"Comparison {comparison.comparison_id}")
    create_markdown_artifact(
        key=f"{key}-comparison-verdict",
        markdown=f"# {comparison.pipeline}: comparison\n\n{comparison.verdict}\n\nReport: `{report_address}`",
        description="convflow comparison verdict",
    )
    create_link_artifact(key=f"{key}-comparison-report", link=report_link, link_text="comparison.html")


@stage_task()
def compare_report(comparison: Comparison, run: RunContext) -> ComparisonReport:
    """Prefect task over write_comparison_report; also publishes the table, verdict and link artifacts."""
    report = write_comparison_report(comparison, run.stage_dir("comparison"))
    address, link = shown_and_linked(report.report_html, run.artifacts_root)
    _publish_artifacts(comparison, address, link)
    return report
