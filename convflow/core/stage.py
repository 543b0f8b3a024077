"""The @task every stage uses: content-keyed cache, JSON results, retries on transient errors."""

from __future__ import annotations

from collections.abc import Callable

from prefect import Task, task

from convflow.core.cache_keys import StageCachePolicy
from convflow.core.retries import retry_on_transient_error


def stage_task(retries: int = 2, retry_delay_seconds: list[float] | None = None) -> Callable[[Callable], Task]:
    """The @task every stage uses: content-keyed cache, JSON results, retries on transient errors."""

    def decorate(fn: Callable) -> Task:
        return task(
            fn,
            name=fn.__name__,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds or [2, 10],
            retry_condition_fn=retry_on_transient_error,
            cache_policy=StageCachePolicy(),
            persist_result=True,
            result_serializer="json",
        )

    return decorate
