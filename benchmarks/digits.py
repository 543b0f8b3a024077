"""`convflow run digits-cnn` (fresh artifacts) vs benchmarks/plain_keras.py digits, both as
subprocesses: wall time, training images/s, peak RSS, test accuracy; then convflow's fully
cached rerun (its own temporary Prefect server, and against a running `prefect server start`),
a rerun with only train.epochs changed, Prefect's per-task cost on cached stages, and
`convflow --help`."""

from __future__ import annotations

import statistics
from pathlib import Path

from common import (
    CONVFLOW,
    Row,
    compare_rows,
    convflow_run,
    rerun_rows,
    run_process,
    running_prefect_server,
    side_by_side,
)

TITLE = "digits-cnn: convflow vs plain Keras (10 epochs, batch 64)"
RERUN_EPOCHS = 5  # the rerun with only train.epochs changed (from 10)


def repeat(scratch: Path) -> dict:
    result = side_by_side("digits", "digits-cnn", 10, 64, scratch, RERUN_EPOCHS)
    artifacts = scratch / "artifacts"  # side_by_side's: its runs cached every stage
    help_walls = [run_process([CONVFLOW, "--help"]).wall for _ in range(3)]
    with running_prefect_server(scratch / "prefect-home") as api_url:
        convflow_run("digits-cnn", artifacts, PREFECT_API_URL=api_url)  # the server's first flow registers it
        served, _ = convflow_run("digits-cnn", artifacts, PREFECT_API_URL=api_url)
    return {"served_cached_wall": served.wall, **result, "help_wall": statistics.median(help_walls)}


def rows(m: dict) -> list[Row]:
    return [
        *compare_rows(m, "<= plain + 15 s", m["cf_wall"] <= m["plain_wall"] + 15, real_mnist=False),
        *rerun_rows(m, RERUN_EPOCHS),
        Row(
            "cached rerun against a running Prefect server, wall s",
            m["served_cached_wall"],
            target="< 3 s",
            ok=m["served_cached_wall"] < 3.0,
        ),
        Row("convflow --help, wall s", m["help_wall"], target="< 1 s", ok=m["help_wall"] < 1.0),
    ]
