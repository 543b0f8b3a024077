"""Tune's report stage: trials.parquet (one row per trial), tune.html (every trial, the best
setting and the final model's verdict) and a Prefect table artifact of the trials."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pydantic

from convflow.catalog import schemas
from convflow.core.context import RunContext
from convflow.core.records import RunSummary, StageRecord
from convflow.core.run_log import artifact_key
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.reporting.figures import render_page
from convflow.tasks.tune_trial import TrialResult


class Tuning(pydantic.BaseModel):
    """What a tune run did: its trials, the best one, and the final run trained with its settings."""

    pipeline: str
    tune_id: str
    algorithm: str
    objective: str
    trials: list[TrialResult]
    best: TrialResult | None = None
    final: RunSummary | None = None
    report: str | None = None


class TuneReport(StageRecord):
    report_html: str
    trials_parquet: str

    def required_files(self) -> list[str]:
        return [self.report_html, self.trials_parquet]


def trials_table(tuning: Tuning) -> pa.Table:
    best_id = tuning.best.trial_id if tuning.best else None
    rows = [
        {
            **trial.model_dump(exclude={"settings"}),
            "settings": json.dumps(trial.settings, sort_keys=True),
            "objective": tuning.objective,
            "best": trial.trial_id == best_id,
        }
        for trial in tuning.trials
    ]
    return pa.Table.from_pylist(rows, schema=schemas.TRIALS_SCHEMA)


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render_tuning(tuning: Tuning) -> str:
    names = sorted({name for trial in tuning.trials for name in trial.settings})
    rows = [
        [
            trial.trial_id,
            trial.status,
            *(_cell(trial.settings.get(name)) for name in names),
            trial.epochs,
            _cell(trial.score),
            f"{trial.seconds:.1f}",
            trial.error or "",
        ]
        for trial in tuning.trials
    ]
    return render_page(
        "tune.html.j2",
        tuning=tuning,
        header=["trial", "status", *names, "epochs", tuning.objective, "seconds", "error"],
        rows=rows,
    )


def write_tune_report(tuning: Tuning, output_dir: Path) -> TuneReport:
    """Write tune.html and trials.parquet into `output_dir`."""
    with staged_output(output_dir) as staging:
        (staging / "tune.html").write_text(render_tuning(tuning))
        schemas.write_parquet(trials_table(tuning), staging / "trials.parquet")
    return TuneReport(
        output_dir=str(output_dir),
        report_html=str(output_dir / "tune.html"),
        trials_parquet=str(output_dir / "trials.parquet"),
    )


@stage_task()
def tune_report(tuning: Tuning, run: RunContext) -> TuneReport:
    """Prefect task over write_tune_report; the trials also as a table artifact in the UI."""
    from prefect.artifacts import create_table_artifact

    report = write_tune_report(tuning, run.stage_dir("tune_report"))
    key = artifact_key(tuning.pipeline)
    create_table_artifact(
        key=f"{key}-tune-trials", table=trials_table(tuning).to_pylist(), description=f"Tune {tuning.tune_id}: trials"
    )
    return report
