"""Runs a flow's stage tasks in order, timing each and noting whether Prefect's cache answered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import Task

from convflow.run_settings import results_folder
from convflow.tasks.records import StageRun
from convflow.tasks.stage import RunContext


class StageRunner:
    """Calls one run's stage tasks and keeps a StageRun per stage for the summary and report.

    Each task stores its cached result in the run's artifacts root (run_settings.results_folder),
    whoever calls the flow: the CLI, a worker, or Python.
    """

    def __init__(self, run: RunContext) -> None:
        self.results = results_folder(run.artifacts_root)
        self.timings: list[StageRun] = []

    def run(self, stage: Task, *args: Any) -> Any:
        """Run `stage` to completion and return its record; a failed stage raises its error."""
        started = time.perf_counter()
        state = stage.with_options(result_storage=self.results)(*args, return_state=True)
        result = state.result()  # raises the stage's exception if it failed
        storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
        self.timings.append(
            StageRun(
                name=stage.name,
                seconds=round(time.perf_counter() - started, 3),
                cached=state.name == "Cached",
                cache_key=Path(storage_key).name if storage_key else None,
            )
        )
        return result

    @property
    def last_cached(self) -> bool:
        return bool(self.timings) and self.timings[-1].cached
