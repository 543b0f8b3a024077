"""Parquet schemas of every table convflow writes, with field descriptions, and the runs catalog."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _schema(*fields: tuple[str, pa.DataType, str], nullable: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema(
        [
            pa.field(name, dtype, nullable=name in nullable, metadata={"description": description})
            for name, dtype, description in fields
        ]
    )


SPLITS_SCHEMA = _schema(
    ("example_id", pa.string(), "Stable id of the example within its source (file path or index)."),
    ("label", pa.int64(), "Class index, 0-based, in label_names order."),
    ("label_name", pa.string(), "Class name."),
    ("split", pa.string(), "train, validation or test."),
    ("sha256", pa.string(), "sha256 of the example's source bytes; decides its split."),
    ("path", pa.string(), "Source image file, or null for in-memory sources."),
    nullable=("path",),
)

METRICS_SCHEMA = _schema(
    ("metric", pa.string(), "accuracy, loss, top_k_accuracy, precision, recall, f1 or support."),
    ("class_name", pa.string(), "The class a per-class metric is about; null for overall metrics."),
    ("value", pa.float64(), "The metric's value on the test split."),
    nullable=("class_name",),
)

PREDICTIONS_SCHEMA = _schema(
    ("example_id", pa.string(), "Joins splits.parquet."),
    ("label", pa.int64(), "True class index."),
    ("predicted", pa.int64(), "Predicted class index (argmax)."),
    ("confidence", pa.float32(), "Probability of the predicted class."),
    ("probabilities", pa.list_(pa.float32()), "Probability per class, in label order."),
)

HISTORY_SCHEMA = _schema(
    ("epoch", pa.int64(), "1-based epoch number."),
    ("phase", pa.string(), "head (base frozen) or fine_tune (top of the base unfrozen)."),
    ("loss", pa.float64(), "Training loss."),
    ("accuracy", pa.float64(), "Training accuracy."),
    ("val_loss", pa.float64(), "Validation loss; null without a validation split."),
    ("val_accuracy", pa.float64(), "Validation accuracy; null without a validation split."),
    ("seconds", pa.float64(), "Wall time of the epoch."),
    nullable=("val_loss", "val_accuracy"),
)

MODEL_SUMMARY_SCHEMA = _schema(
    ("layer", pa.string(), "Layer name; layers inside the base are listed as base/<name>."),
    ("type", pa.string(), "Keras layer class."),
    ("output_shape", pa.string(), "Output shape, batch dimension as None."),
    ("params", pa.int64(), "Number of weights in the layer."),
    ("trainable", pa.bool_(), "Whether the layer's weights were trainable in the last training phase."),
)

RUNS_SCHEMA = _schema(
    ("pipeline", pa.string(), "Pipeline name in pipelines.yaml."),
    ("run_id", pa.string(), "Run id; the run's folder is artifacts/<pipeline>/<run_id>/."),
    ("started", pa.timestamp("us", tz="UTC"), "When the run started."),
    ("finished", pa.timestamp("us", tz="UTC"), "When the run finished."),
    ("status", pa.string(), "completed, or not-promoted when the gate failed."),
    ("config_hash", pa.string(), "Hash of the pipeline's config (schedule excluded)."),
    ("data_fingerprint", pa.string(), "Hash over example hashes, labels and splits."),
    ("test_accuracy", pa.float64(), "Accuracy on the test split."),
    ("passed_gate", pa.bool_(), "Whether the model passed evaluate.min_accuracy."),
    ("gate_reason", pa.string(), "Why the gate passed or failed."),
    ("model", pa.string(), "The trained Keras model (.keras) of the run."),
    ("saved_model", pa.string(), "Exported SavedModel folder."),
    ("promoted_version", pa.int64(), "Registry version the run was promoted to; null if not promoted."),
    ("report", pa.string(), "report.html path."),
    ("run_dir", pa.string(), "The run's folder."),
    nullable=("model", "promoted_version"),
)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` through a temporary file, so readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_run(catalog: Path, row: dict[str, Any]) -> None:
    """Append one row to runs.parquet; concurrent runs wait on a lock and lose no row."""
    catalog.parent.mkdir(parents=True, exist_ok=True)
    new_row = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    with locked(catalog):
        existing = pq.read_table(catalog, schema=RUNS_SCHEMA) if catalog.exists() else None
        table = new_row if existing is None else pa.concat_tables([existing, new_row])
        write_parquet(table, catalog)


def read_runs(catalog: Path) -> pa.Table:
    if not catalog.exists():
        return RUNS_SCHEMA.empty_table()
    return pq.read_table(catalog, schema=RUNS_SCHEMA)


def catalog_row(summary, run_dir: Path) -> dict[str, Any]:
    """The runs.parquet row of one finished run (a RunSummary)."""
    import datetime

    return {
        "pipeline": summary.pipeline,
        "run_id": summary.run_id,
        "started": datetime.datetime.fromisoformat(summary.started),
        "finished": datetime.datetime.now(datetime.timezone.utc),
        "status": summary.status,
        "config_hash": summary.config_hash,
        "data_fingerprint": summary.data_fingerprint,
        "test_accuracy": summary.test_accuracy,
        "passed_gate": summary.passed_gate,
        "gate_reason": summary.gate_reason,
        "model": summary.model,
        "saved_model": summary.saved_model,
        "promoted_version": summary.promoted_version,
        "report": summary.report,
        "run_dir": str(run_dir),
    }
