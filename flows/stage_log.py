"""Runs each stage task of a flow, timing it and noting whether Prefect's cache answered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import Task

from convflow.tasks.records import StageRun


class StageLog:
    """Calls stage tasks in order and keeps a StageRun per stage for the summary and report."""

    def __init__(self) -> None:
        self.stages: list[StageRun] = []

    def run(self, stage: Task, *args: Any) -> Any:
        """Run `stage` to completion and return its record; a failed stage raises its error."""
        started = time.perf_counter()
        state = stage(*args, return_state=True)
        result = state.result()  # raises the stage's exception if it failed
        storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
        self.stages.append(
            StageRun(
                name=stage.name,
                seconds=round(time.perf_counter() - started, 3),
                cached=state.name == "Cached",
                cache_key=Path(storage_key).name if storage_key else None,
            )
        )
        return result
