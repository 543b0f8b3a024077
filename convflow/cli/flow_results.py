"""What `convflow run`, `compare` and `tune` print once their flow returned: a summary for people and,
with --json, one JSON line for scripts."""

from __future__ import annotations

import json
from pathlib import Path

from convflow.cli.output import table_lines

_STAGE_COLUMNS = {"stage": "stage", "seconds": "seconds", "cache": "cache", "key": "key"}
# A variant row's key: its column's title, and the format of its value ("-" where it has none).
_VARIANT_COLUMNS = {
    "rank": ("rank", ""),
    "variant": ("variant", ""),
    "status": ("status", ""),
    "initial_accuracy": ("initial", ".4f"),
    "test_accuracy": ("final", ".4f"),
    "test_loss": ("loss", ".4f"),
    "macro_f1": ("F1", ".4f"),
    "total_params": ("params", ","),
    "trainable_params": ("trainable", ","),
    "train_seconds": ("train s", ".1f"),
    "images_per_second": ("img/s", ".0f"),
    "saved_model_mb": ("MB", ".2f"),
    "latency_ms": ("ms/img", ".2f"),
    "pid": ("pid", ""),
}


def print_json(payload: dict) -> None:
    print(json.dumps(payload))


def print_run(summary, seconds: float, artifacts: Path, temporary_server: bool, as_json: bool) -> None:
    """A training run's outcome, what it wrote, each stage's time and cache use, and where the Prefect
    UI shows it."""
    print(f"\n{summary.pipeline} run {summary.run_id}: {summary.status}")
    if summary.status == "blocked":
        _print_blocked(summary)
    else:
        _print_trained(summary)
    print("\n".join(table_lines(_stage_rows(summary, seconds), _STAGE_COLUMNS, indent="  ")))
    _print_ui_address(artifacts, summary.run_id, temporary_server)
    if as_json:
        print_json(summary_json(summary, seconds))


def _print_blocked(summary) -> None:
    """Why the data checks stopped the run, a line a check; production stays as it was."""
    head, _, reasons = summary.gate_reason.partition(": ")
    print(f"  {head}:")
    for reason in reasons.split("; "):
        print(f"    {reason}")
    print("  production     unchanged" + (f": {summary.saved_model}" if summary.saved_model else " (none yet)"))


def _print_trained(summary) -> None:
    verdict = "passed" if summary.passed_gate else "NOT PROMOTED"
    print(f"  test accuracy  {summary.test_accuracy:.4f}  (gate {verdict}: {summary.gate_reason})")
    if summary.resumed_from_epoch:
        print(f"  resumed from epoch {summary.resumed_from_epoch}")
    print(f"  SavedModel     {summary.saved_model}")
    if summary.promoted_version is not None:
        print(f"  promoted       production version {summary.promoted_version}")
    print(f"  report         {summary.report}")


def _stage_rows(summary, seconds: float) -> list[dict[str, str]]:
    stages = [
        {
            "stage": stage.name,
            "seconds": f"{stage.seconds:.2f}",
            "cache": "hit" if stage.cached else "miss",
            "key": stage.cache_key or "",
        }
        for stage in summary.stages
    ]
    return [*stages, {"stage": "total", "seconds": f"{seconds:.2f}", "cache": "", "key": ""}]


def _print_ui_address(artifacts: Path, run_id: str, temporary_server: bool) -> None:
    from convflow.catalog.tables import flow_run_id
    from convflow.runtime.ui_address import ui_lines

    flow_run = flow_run_id(artifacts, run_id)
    if flow_run is not None:
        print("\n".join(ui_lines(flow_run, temporary_server)))


def summary_json(summary, seconds: float) -> dict:
    """A run summary as `convflow run --json` prints it."""
    payload = summary.model_dump(
        include={
            "pipeline",
            "run_id",
            "status",
            "test_accuracy",
            "saved_model",
            "report",
            "resumed_from_epoch",
            "promoted_version",
            "gate_reason",
        }
    )
    payload["stages"] = [stage.model_dump(include={"name", "seconds", "cached"}) for stage in summary.stages]
    payload["seconds"] = round(seconds, 3)
    return payload


def print_comparison(comparison, seconds: float, as_json: bool) -> None:
    """The variants ranked, each with its metrics and costs; why those that failed did; the verdict."""
    from convflow.tasks.compare_report import variant_rows

    rows = variant_rows(comparison)
    print(
        f"\n{comparison.pipeline} comparison {comparison.comparison_id} ({comparison.runner}), "
        f"ranked by {comparison.metric}"
    )
    header = {key: title for key, (title, _) in _VARIANT_COLUMNS.items()}
    print("\n".join(table_lines([_variant_cells(row) for row in rows], header, indent="  ")))
    for row in rows:
        if row["error"]:
            print(f"  {row['variant']} failed: {row['error']}")
    print(f"  {comparison.verdict}")
    print(f"  report  {comparison.report}")
    print(f"  total   {seconds:.2f} s")
    if as_json:
        payload = comparison.model_dump(
            include={"pipeline", "comparison_id", "metric", "promote", "runner", "flow_pid", "verdict", "report"}
        )
        payload.update(
            winner=comparison.winner.name if comparison.winner else None, variants=rows, seconds=round(seconds, 3)
        )
        print_json(payload)


def _variant_cells(row: dict) -> dict[str, str]:
    return {key: "-" if row[key] is None else format(row[key], spec) for key, (_, spec) in _VARIANT_COLUMNS.items()}


def print_tuning(tuning, seconds: float, as_json: bool) -> None:
    """Each trial's settings and score, then the final model trained with the best of them."""
    for trial in tuning.trials:
        score = "failed: " + (trial.error or "") if trial.score is None else f"{tuning.objective} {trial.score:.4f}"
        print(f"trial {trial.trial_id}: {json.dumps(trial.settings)}, {trial.epochs} epochs: {score}")
    final = tuning.final
    print(
        f"final model: run {final.run_id}, test accuracy {final.test_accuracy:.4f}, "
        f"{'passed' if final.passed_gate else 'failed'} the gate"
        if final
        else "no trial completed: no final model"
    )
    print(f"report: {tuning.report}")
    if as_json:
        payload = tuning.model_dump(mode="json", exclude={"final"})
        payload.update(
            final={**summary_json(final, 0.0), "passed_gate": final.passed_gate} if final else None,
            seconds=round(seconds, 3),
        )
        print_json(payload)
