"""A data stage's progress bar: images done of the total and images/s, as a line in the run's log
(the terminal and the Prefect UI's Logs tab) every few seconds, and as a Prefect progress artifact,
as training shows its epochs (convflow/modeling/train_callbacks.py)."""

from __future__ import annotations

import time

from convflow.core.run_log import run_logger

SHOW_EVERY_SECONDS = 10.0
BAR_WIDTH = 20


def progress_line(stage: str, done: int, total: int, seconds: float) -> str:
    """`stage: [#####---------------] 2,500/10,000 images (25%), 1,234 images/s`."""
    filled = BAR_WIDTH * done // max(total, 1)
    rate = done / seconds if seconds > 0 else 0.0
    return (
        f"{stage}: [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:,}/{total:,} images "
        f"({100 * done // max(total, 1)}%), {rate:,.0f} images/s"
    )


class StageProgress:
    """Counts a stage's images; shows the bar at most every `every` seconds and once at the end.
    A failed artifact update is logged; the stage goes on."""

    def __init__(self, stage: str, total: int, every: float = SHOW_EVERY_SECONDS) -> None:
        self.stage, self.total, self.every = stage, total, every
        self.done = 0
        self._started = self._shown = time.perf_counter()
        self._artifact: ProgressArtifact | None = None

    def update(self, done: int) -> None:
        self.done = done
        if time.perf_counter() - self._shown >= self.every:
            self._show()

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        self._show()

    def _show(self) -> None:
        self._shown = time.perf_counter()
        run_logger().info(progress_line(self.stage, self.done, self.total, self._shown - self._started))
        if self._artifact is None and in_prefect_run():
            self._artifact = ProgressArtifact(f"{self.stage}: images of {self.total:,}", self.stage)
        if self._artifact is not None:
            self._artifact.show(100.0 * self.done / max(self.total, 1))


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect task or flow run (a progress artifact has a run to belong to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class ProgressArtifact:
    """A Prefect progress artifact of the current run, made at its first `show`. A failed update is
    logged ("<what> progress not shown in Prefect"); the work it shows goes on."""

    def __init__(self, description: str, what: str) -> None:
        self.description, self.what = description, what
        self._artifact_id = None

    def show(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, description=self.description)
            else:
                update_progress_artifact(self._artifact_id, percent)
        except Exception as error:  # the UI's progress bar is not worth failed work
            run_logger().warning(f"{self.what} progress not shown in Prefect: {error}")
