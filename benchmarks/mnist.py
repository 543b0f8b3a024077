"""`convflow run mnist` vs benchmarks/plain_keras.py mnist (3 epochs, batch 128), then convflow's
cached rerun and a rerun with only train.epochs changed (to 2). About 5 minutes a repeat (all
four runs): it takes --mnist-repeats, not --repeats."""

from __future__ import annotations

from pathlib import Path

from common import Row, compare_rows, rerun_rows, side_by_side

TITLE = "mnist: convflow vs plain Keras (60,000 / 10,000, 3 epochs, batch 128)"
RERUN_EPOCHS = 2  # the rerun with only train.epochs changed (from 3)


def repeat(scratch: Path) -> dict:
    return side_by_side("mnist", "mnist", 3, 128, scratch, RERUN_EPOCHS)


def rows(m: dict) -> list[Row]:
    ratio = m["cf_wall"] / m["plain_wall"]
    return [*compare_rows(m, "<= 1.10x", ratio <= 1.10, real_mnist=True), *rerun_rows(m, RERUN_EPOCHS)]
