"""The @task every stage uses: content-keyed cache, JSON results, retries on transient errors."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pydantic
from prefect import Task, task

from convflow.core.cache_keys import StageCachePolicy
from convflow.core.context import RunContext
from convflow.core.object_store import is_remote, store_for
from convflow.core.records import StageRecord
from convflow.core.retries import retry_on_transient_error
from convflow.core.run_log import run_logger


def stage_task(retries: int = 2, retry_delay_seconds: list[float] | None = None) -> Callable[[Callable], Task]:
    """The @task every stage uses: content-keyed cache, JSON results, retries on transient errors."""

    def decorate(fn: Callable) -> Task:
        return task(
            on_artifacts_store(fn),
            name=fn.__name__,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds or [2, 10],
            retry_condition_fn=retry_on_transient_error,
            cache_policy=StageCachePolicy(),
            persist_result=True,
            result_serializer="json",
        )

    return decorate


def on_artifacts_store(fn: Callable) -> Callable:
    """`fn` as it runs when its run's artifacts root is an object store: its input records name
    local copies (pulled into the mirror), and the record it returns names URLs, once every file
    it names is uploaded. Prefect writes that record after it returns: the last write of a stage.

    A local root calls `fn` unchanged. The wrapper keeps `fn`'s name, module and signature, which
    Prefect's parameters and the stage's cache key read.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def on_store(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        run = next((value for value in bound.arguments.values() if isinstance(value, RunContext)), None)
        if run is None or not is_remote(run.artifacts_root):
            return fn(*args, **kwargs)
        store = store_for(run.artifacts_root)
        before = dataclasses.replace(store.transfers)
        for name, value in bound.arguments.items():
            if isinstance(value, pydantic.BaseModel) and not isinstance(value, RunContext):
                bound.arguments[name] = store.localized(value)  # stage records, production's record
            elif isinstance(value, str) and value.startswith(store.url + "/"):
                bound.arguments[name] = str(store.pull(value))
        result = fn(*bound.args, **bound.kwargs)
        result = store.published(result) if isinstance(result, StageRecord) else result
        run_logger("convflow.store").info(f"{fn.__name__}: {store.transfers.since(before)}")
        return result

    return on_store
