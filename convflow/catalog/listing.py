"""The runs catalog read for people and for a run about to start: the table `convflow runs` prints,
and whether a config already finished a run."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

# The columns of the listing, in order; each row holds them as display strings.
RUNS_COLUMNS = (
    "started",
    "pipeline",
    "run_id",
    "status",
    "test_accuracy",
    "promoted_version",
    "seconds",
    "config_hash",
    "data_fingerprint",
)
MISSING = "-"
FINISHED = ("completed", "not-promoted")
# On object storage the hint reads the pipeline's newest catalog files only (one small GET each).
HINT_RUNS = 10
_FORMATS = {"started": "{:%Y-%m-%d %H:%M:%S}", "test_accuracy": "{:.4f}", "seconds": "{:.1f}"}


def catalog_file(artifacts_root: str | Path) -> str:
    """The runs catalog of an artifacts root: its runs.parquet, or an object store's runs/ prefix."""
    from convflow.catalog import tables

    return tables.catalog_location(artifacts_root)


def runs_listing(artifacts_root: str | Path, pipeline: str | None = None) -> list[dict[str, str]]:
    """The catalog's runs, or only `pipeline`'s, oldest first: one row per run of RUNS_COLUMNS as
    display strings, MISSING where a value is. A damaged catalog is rebuilt (tables.read_runs)."""
    from convflow.catalog import tables

    runs = tables.read_catalog(artifacts_root).to_pylist()
    chosen = [run for run in runs if not pipeline or run["pipeline"] == pipeline]
    return [_display_row(run) for run in sorted(chosen, key=lambda run: run["started"])]


def _display_row(run: dict[str, Any]) -> dict[str, str]:
    seconds: datetime.timedelta = run["finished"] - run["started"]
    values = {**run, "seconds": seconds.total_seconds()}
    return {column: _display(values[column], _FORMATS.get(column, "{}")) for column in RUNS_COLUMNS}


def _display(value: Any, template: str) -> str:
    return MISSING if value is None else template.format(value)


def has_finished_run(artifacts_root: str | Path, pipeline: str, config_hash: str) -> bool:
    """Whether the catalog holds a finished run of this very config: its stages are then most likely
    cache hits, which need no TensorFlow. Only a hint, read without the catalog's lock; a missing or
    damaged catalog says no and is left for the run to find."""
    import pyarrow.parquet as pq

    try:
        if "://" in str(artifacts_root):  # an object store: the pipeline's newest catalog files
            from convflow.catalog import tables

            runs = tables.newest_runs(artifacts_root, pipeline, HINT_RUNS)
        else:
            columns = ["pipeline", "config_hash", "status"]
            runs = pq.read_table(catalog_file(artifacts_root), columns=columns).to_pylist()
    except Exception:  # missing or unreadable: the run itself will say so if it matters
        return False
    return any(
        run["pipeline"] == pipeline and run["config_hash"] == config_hash and run["status"] in FINISHED for run in runs
    )
