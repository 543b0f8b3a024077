"""What a run shows in the Prefect UI: the logger a line goes to (Prefect's run logger inside a flow
or task run, so the line shows in that run's Logs tab and in the terminal; outside one, a plain
logging logger), and the key its artifacts are published under."""

from __future__ import annotations

import logging


def run_logger(fallback: str = "convflow") -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; outside one, the logger named `fallback`
    (asked for after Prefect's import, whose logging set-up disables loggers made before it)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return logging.getLogger(fallback)
    from prefect.logging import get_run_logger

    return get_run_logger()


def artifact_key(pipeline: str) -> str:
    """The stem of a pipeline's Prefect artifact keys: Prefect takes lower-case letters, digits and dashes."""
    return "".join(ch if ch.isalnum() else "-" for ch in pipeline.lower())
