"""Prefect's own process worker, started in place of this process."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exec_process_worker(pool: str, limit: int, name: str | None = None) -> NoReturn:
    """Replace this process with `prefect worker start` on work pool `pool`, taking `limit` runs at a
    time: the worker's pid is this process's, so signals sent to it reach the worker directly."""
    # Prefect's default poll interval would add half of it to each training's start, on average.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    command = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--limit",
        str(limit),
        *(["--name", name] if name else []),
    ]
    os.execv(sys.executable, command)
