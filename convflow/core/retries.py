"""Retries only where they help: transient failures retry, bad input fails at once."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun

# Errors that say the input is wrong: retrying cannot help, so the task fails at once.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException | None) -> bool:
    """True for failures that a retry can fix: I/O hiccups, a full disk, a lost connection."""
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(error, OSError | TimeoutError | ConnectionError)


def retry_on_transient_error(task_: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry_condition_fn: retry transient errors; bad input fails at once."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by Prefect
        return is_transient(error)
    return False
