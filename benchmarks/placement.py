"""`convflow run digits-cnn` against one running `prefect server start`, training in the flow's
process, then on the worker of a work pool (`convflow worker` on this machine): what placing the
train stage on a worker costs (goal: under 10 s)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from common import CODE, CONVFLOW, Row, convflow_run, running_prefect_server, train_changed_file, wait_until

TITLE = "digits-cnn: training on a work pool's worker (train.work_pool) vs in the flow's process"
POOL = "bench-gpu"
GOAL_SECONDS = 10.0


@contextlib.contextmanager
def convflow_worker(api_url: str, pool: str, folder: Path):
    """`convflow worker --pool` (from CODE) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(CODE.folder), "PREFECT_API_URL": api_url}
    log = folder / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [CONVFLOW, "worker", "--pool", pool],
            cwd=folder,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: "started!" in log.read_text(errors="replace"),
            worker,
            lambda: f"convflow worker did not start:\n{log.read_text(errors='replace')[-3000:]}",
        )
        yield
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)


def repeat(scratch: Path) -> dict:
    """digits-cnn's first run against one running server: training in the flow's process, and on a
    work pool's worker on this machine. Each run has fresh artifacts, so nothing is cached."""
    with (
        running_prefect_server(scratch / "prefect-home") as api_url,
        convflow_worker(api_url, POOL, scratch / "worker"),
    ):
        convflow_run("digits-cnn", scratch / "warm-up", PREFECT_API_URL=api_url)  # the server's first flow
        here, here_summary = convflow_run("digits-cnn", scratch / "here", PREFECT_API_URL=api_url)
        pool_file = train_changed_file(scratch / "pipelines-pool.yaml", "digits-cnn", work_pool=POOL)
        pool, pool_summary = convflow_run("digits-cnn", scratch / "pool", pool_file, PREFECT_API_URL=api_url)
    train_seconds = [
        next(stage["seconds"] for stage in summary["stages"] if stage["name"] == "train")
        for summary in (here_summary, pool_summary)
    ]
    return {
        "here_wall": here.wall,
        "pool_wall": pool.wall,
        "here_train": train_seconds[0],
        "pool_train": train_seconds[1],
        "here_accuracy": here_summary["test_accuracy"],
        "pool_accuracy": pool_summary["test_accuracy"],
    }


def rows(m: dict) -> list[Row]:
    extra = m["pool_wall"] - m["here_wall"]
    return [
        Row(
            "whole run, wall s (baseline: training in the flow's process)",
            m["pool_wall"],
            m["here_wall"],
            f"+{extra:.2f} s",
            f"< +{GOAL_SECONDS:.0f} s",
            extra < GOAL_SECONDS,
        ),
        Row(
            "train stage, wall s (baseline: in the flow's process)",
            m["pool_train"],
            m["here_train"],
            f"+{m['pool_train'] - m['here_train']:.2f} s",
        ),
        Row(
            "test accuracy",
            m["pool_accuracy"],
            m["here_accuracy"],
            f"{100 * (m['pool_accuracy'] - m['here_accuracy']):+.2f} pt",
        ),
    ]
