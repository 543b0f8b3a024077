"""Parquet schemas of every table convflow writes, with field descriptions, and how a table is written
whole (never half a file). Stages import this, not the catalog's I/O in tables.py."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from convflow.core.storage import atomic_file


def _schema(*fields: tuple[str, pa.DataType, str], nullable: tuple[str, ...] = (), table: str) -> pa.Schema:
    """A schema whose fields, and the table itself, carry a `description` in their metadata (the
    table's lands in the Parquet file's key-value metadata, which DuckDB's parquet_kv_metadata reads)."""
    return pa.schema(
        [
            pa.field(name, dtype, nullable=name in nullable, metadata={"description": description})
            for name, dtype, description in fields
        ],
        metadata={"description": table},
    )


SPLITS_SCHEMA = _schema(
    ("example_id", pa.string(), "Stable id of the example within its source (file path or index)."),
    ("label", pa.int64(), "Class index, 0-based, in label_names order."),
    ("label_name", pa.string(), "Class name."),
    ("split", pa.string(), "train, validation or test."),
    ("sha256", pa.string(), "sha256 of the example's source bytes; decides its split."),
    ("path", pa.string(), "Source image file, or null for in-memory sources."),
    ("height", pa.int32(), "Source image height in pixels, before resizing."),
    ("width", pa.int32(), "Source image width in pixels, before resizing."),
    nullable=("path",),
    table="One row per example of the dataset: its label and the split it belongs to.",
)

METRICS_SCHEMA = _schema(
    ("metric", pa.string(), "accuracy, loss, top_k_accuracy, precision, recall, f1 or support."),
    ("class_name", pa.string(), "The class a per-class metric is about; null for overall metrics."),
    ("value", pa.float64(), "The metric's value on the test split."),
    nullable=("class_name",),
    table="Test-split metrics in long format: overall (class_name null) and per class.",
)

PREDICTIONS_SCHEMA = _schema(
    ("example_id", pa.string(), "Joins splits.parquet."),
    ("label", pa.int64(), "True class index."),
    ("predicted", pa.int64(), "Predicted class index (argmax)."),
    ("confidence", pa.float32(), "Probability of the predicted class."),
    ("probabilities", pa.list_(pa.float32()), "Probability per class, in label order."),
    table="One row per test example: the model's prediction and class probabilities.",
)

BATCH_PREDICTIONS_SCHEMA = _schema(
    ("input", pa.string(), "The input: an image file's path, or <table>#<row> for a row of a Parquet table."),
    ("sha256", pa.string(), "sha256 of the input's encoded bytes; null when it could not be read."),
    ("predicted", pa.string(), "Predicted class name; null when the input could not be scored."),
    ("probability", pa.float64(), "Probability of the predicted class."),
    ("probabilities", pa.list_(pa.float32()), "Probability per class, in label order."),
    ("error", pa.string(), "Why the input was not scored (unreadable, not an image); null when scored."),
    ("pipeline", pa.string(), "The pipeline whose model scored."),
    ("model_version", pa.int64(), "Registry version of the model; null for a run's unpromoted model."),
    ("run_id", pa.string(), "The run that trained the model."),
    ("scored_at", pa.timestamp("us", tz="UTC"), "When this scoring started."),
    nullable=("sha256", "predicted", "probability", "probabilities", "error", "model_version"),
    table="`convflow predict`: one row per input, scored by a SavedModel's serving signature.",
)

HISTORY_SCHEMA = _schema(
    ("epoch", pa.int64(), "1-based epoch number."),
    ("phase", pa.string(), "head (base frozen) or fine_tune (top of the base unfrozen)."),
    ("loss", pa.float64(), "Training loss."),
    ("accuracy", pa.float64(), "Training accuracy."),
    ("val_loss", pa.float64(), "Validation loss; null without a validation split."),
    ("val_accuracy", pa.float64(), "Validation accuracy; null without a validation split."),
    ("seconds", pa.float64(), "Wall time of the epoch."),
    ("host", pa.string(), "Host name of the machine that trained the epoch."),
    ("pid", pa.int64(), "Process id that trained the epoch; a resumed run's later epochs name the new process."),
    nullable=("val_loss", "val_accuracy"),
    table="One row per training epoch: losses, accuracies and time.",
)

MODEL_SUMMARY_SCHEMA = _schema(
    ("layer", pa.string(), "Layer name; layers inside the base are listed as base/<name>."),
    ("type", pa.string(), "Keras layer class."),
    ("output_shape", pa.string(), "Output shape, batch dimension as None."),
    ("params", pa.int64(), "Number of weights in the layer."),
    ("trainable", pa.bool_(), "Whether the layer's weights were trainable in the last training phase."),
    table="One row per layer of the trained model.",
)

# Each run's Parquet tables, named in the catalog's <name>_parquet columns.
RUN_TABLES = ("splits", "image_properties", "checks", "history", "metrics", "predictions", "model_checks")

RUNS_SCHEMA = _schema(
    ("pipeline", pa.string(), "Pipeline name in pipelines.yaml."),
    ("run_id", pa.string(), "Run id; the run's folder is artifacts/<pipeline>/<run_id>/."),
    ("started", pa.timestamp("us", tz="UTC"), "When the run started."),
    ("finished", pa.timestamp("us", tz="UTC"), "When the run finished."),
    (
        "status",
        pa.string(),
        "completed; not-promoted when the gate failed; unchanged when a scheduled run "
        "found the production model made from the same config and data, and trained nothing; blocked when a data "
        "check blocked it (gate_reason says which): it trained nothing and production is unchanged.",
    ),
    ("config_hash", pa.string(), "Hash of the pipeline's config (schedule excluded)."),
    ("data_fingerprint", pa.string(), "Hash over example hashes, labels and splits."),
    (
        "test_accuracy",
        pa.float64(),
        "Accuracy on the test split (unchanged and blocked runs: the production model's; null with none).",
    ),
    ("passed_gate", pa.bool_(), "Whether the model passed the gate; null when no gate ran (unchanged, blocked)."),
    ("gate_reason", pa.string(), "Why the gate passed or failed, or why nothing was trained."),
    ("model", pa.string(), "The trained Keras model (.keras) of the run (unchanged and blocked runs: production's)."),
    ("saved_model", pa.string(), "Exported SavedModel folder (unchanged and blocked runs: production's)."),
    ("promoted_version", pa.int64(), "Registry version the run was promoted to; null if not promoted."),
    ("report", pa.string(), "report.html path; null when the run wrote no report (unchanged)."),
    ("run_dir", pa.string(), "The run's folder, holding its run.json (the catalog can be rebuilt from these)."),
    ("flow_run_id", pa.string(), "The Prefect flow run (UI page /runs/flow-run/<id>); null when unknown."),
    (
        "comparison_id",
        pa.string(),
        "The `convflow compare` run this variant belonged to (its folder is "
        "artifacts/<pipeline>/<comparison_id>/); null for plain runs. Only the promoted winner is completed.",
    ),
    ("variant", pa.string(), "The compare variant's name; null for plain runs."),
    *(
        (
            f"{name}_parquet",
            pa.string(),
            f"The run's {name}.parquet; it lies in the folder of the run that made "
            "it when the stage was a cache hit. Null when the run wrote none (unchanged).",
        )
        for name in RUN_TABLES
    ),
    nullable=(
        "test_accuracy",
        "passed_gate",
        "model",
        "saved_model",
        "promoted_version",
        "report",
        "run_dir",
        "flow_run_id",
        "comparison_id",
        "variant",
        *(f"{name}_parquet" for name in RUN_TABLES),
    ),
    table="The runs catalog: one row per finished run of any pipeline, appended under a file lock.",
)


COMPARISON_SCHEMA = _schema(
    ("comparison_id", pa.string(), "The comparison; its folder is artifacts/<pipeline>/<comparison_id>/."),
    ("pipeline", pa.string(), "The pipeline whose compare variants these are."),
    ("variant", pa.string(), "Variant name in the pipeline's compare section."),
    ("status", pa.string(), "completed, or failed (invalid config or an error in one of its stages)."),
    ("error", pa.string(), "Why the variant failed; null when it completed."),
    ("rank", pa.int64(), "1 = the winner by the comparison's metric; null for failed variants."),
    ("metric", pa.string(), "The metric the comparison ranks by."),
    ("initial_accuracy", pa.float64(), "Test accuracy of the wrapped model before training (about chance)."),
    ("initial_loss", pa.float64(), "Test loss before training."),
    ("test_accuracy", pa.float64(), "Test accuracy after training."),
    ("test_loss", pa.float64(), "Test loss after training."),
    ("macro_f1", pa.float64(), "F1 averaged over classes, after training."),
    ("per_class_f1", pa.map_(pa.string(), pa.float64()), "F1 per class name, after training."),
    ("total_params", pa.int64(), "Parameters of the trained model."),
    ("trainable_params", pa.int64(), "Parameters trainable in its last training phase."),
    ("epochs", pa.int64(), "Epochs trained, fine-tuning included."),
    ("train_seconds", pa.float64(), "Wall time of training (variants may have trained at the same time)."),
    ("images_per_second", pa.float64(), "Training images per second."),
    ("saved_model_mb", pa.float64(), "Size of the exported SavedModel folder, MB (10^6 bytes)."),
    ("latency_ms", pa.float64(), "Median SavedModel latency for one image, ms, measured variant after variant."),
    ("passed_gate", pa.bool_(), "Whether the variant passed the pipeline's gate."),
    ("promoted_version", pa.int64(), "Registry version, when this variant was promoted."),
    ("run_id", pa.string(), "The variant's run id (runs.parquet); its folder is artifacts/<pipeline>/<run_id>/."),
    ("pid", pa.int64(), "Process that trained the variant."),
    nullable=(
        "error",
        "rank",
        "initial_accuracy",
        "initial_loss",
        "test_accuracy",
        "test_loss",
        "macro_f1",
        "per_class_f1",
        "total_params",
        "trainable_params",
        "epochs",
        "train_seconds",
        "images_per_second",
        "saved_model_mb",
        "latency_ms",
        "passed_gate",
        "promoted_version",
        "run_id",
        "pid",
    ),
    table="One comparison (`convflow compare`): one row per variant, failed ones included.",
)


TRIALS_SCHEMA = _schema(
    (
        "trial_id",
        pa.string(),
        "The trial, as KerasTuner's oracle numbered it; its folder is <tune-id>/trials/<trial_id>/.",
    ),
    ("status", pa.string(), "completed, or failed (an error while building or training it)."),
    ("settings", pa.string(), "The trial's settings as JSON, by tune.space name."),
    ("epochs", pa.int64(), "Head epochs it trained (Hyperband gives trials different ones)."),
    ("objective", pa.string(), "The validation metric trials are ranked by (tune.objective)."),
    ("score", pa.float64(), "The objective on the validation split at the kept epoch; null when failed."),
    ("seconds", pa.float64(), "Wall time of the trial."),
    ("error", pa.string(), "Why it failed; null when it completed."),
    ("best", pa.bool_(), "The trial whose settings trained the final model."),
    nullable=("score", "error"),
    table="One tune run (`convflow tune`): one row per trial, failed ones included.",
)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` through a temporary file, so readers never see half a file."""
    with atomic_file(path) as temporary:
        pq.write_table(table, temporary)


def write_parquet_parts(parts: Iterable[pa.Table], schema: pa.Schema, path: Path) -> None:
    """write_parquet of a table made a part at a time (a row group each), never held whole."""
    with atomic_file(path) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for part in parts:
            writer.write_table(part)
