"""Runs a flow's stage tasks in order, timing each and noting whether Prefect's cache answered, and
starts helpers ahead of the stage that takes them, so that a flow's body reads as its stage calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task

from convflow.core.context import RunContext
from convflow.core.records import StageRun
from convflow.core.run_log import run_logger
from convflow.runtime import process_caches
from convflow.runtime.settings import result_storage, results_folder


@dataclass(frozen=True)
class StartAhead:
    """A helper (process_caches.prestarted's `name` and `start`) that a later stage takes: started
    before the first of `before` runs, once a stage of this run has missed its cache (after a miss
    the model is new, so the stage that takes it will run)."""

    name: str
    start: Callable[[], Any]
    before: tuple[str, ...]


class StageRunner:
    """Calls one run's stage tasks and keeps a StageRun per stage for the summary and report.

    Each task stores its cached result in the run's artifacts root (runtime.settings.results_folder),
    whoever calls the flow: the CLI, a worker, or Python. Used as a context manager, it stops the
    helpers it started ahead (`ahead`) that no stage took.
    """

    def __init__(self, run: RunContext, ahead: tuple[StartAhead, ...] = ()) -> None:
        self.results = results_folder(run.artifacts_root)
        self.timings: list[StageRun] = []
        self.ahead = ahead
        self._started: list[str] = []
        # Naming the storage costs each task a Prefect client (~20 ms); the CLI and deployments set
        # it as the default already (runtime/settings.py), so only other callers pay that. An object
        # store's root keeps the results in the store, beside the artifacts they describe.
        remote = result_storage(run.artifacts_root)
        if remote is not None:
            self._storage = {"result_storage": remote}
        else:
            self._storage = {} if _default_storage_is(self.results) else {"result_storage": self.results}

    def run(self, stage: Task, *args: Any) -> Any:
        """Run `stage` to completion and return its record; a failed stage raises its error."""
        self._start_helpers_for(stage.name)
        started = time.perf_counter()
        task = stage.with_options(**self._storage) if self._storage else stage
        state = task(*args, return_state=True)
        result = state.result()  # raises the stage's exception if it failed
        storage_key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
        timing = StageRun(
            name=stage.name,
            seconds=round(time.perf_counter() - started, 3),
            cached=state.name == "Cached",
            cache_key=Path(storage_key).name if storage_key else None,
        )
        self.timings.append(timing)
        how = "cached" if timing.cached else f"{timing.seconds:.1f} s"
        run_logger().info(f"{stage.name} ({how}): {result.log_line()}")
        return result

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        for name in self._started:
            process_caches.stop_unused(name)

    def _start_helpers_for(self, stage_name: str) -> None:
        for helper in self.ahead:
            if stage_name in helper.before and self.missed_any and helper.name not in self._started:
                if process_caches.start_ahead(helper.name, helper.start):
                    self._started.append(helper.name)

    @property
    def missed_any(self) -> bool:
        """Whether a stage so far missed its cache (the stages after it then miss too)."""
        return any(not timing.cached for timing in self.timings)


def _default_storage_is(folder: Path) -> bool:
    """Whether Prefect's default result storage in this context is the local folder `folder`."""
    from prefect.settings import get_current_settings

    results = get_current_settings().results
    return results.default_storage_block is None and Path(results.local_storage_path).resolve() == folder
