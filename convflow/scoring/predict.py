"""`convflow predict`: batch predictions a data engineer can read, as a Parquet table.

The inputs (image files, folders, globs, or a Parquet table as the `parquet:` source reads it) are
scored with the exported SavedModel's `serving_default` signature, what TF Serving would serve, in
batches of images of one size. Every input gets a row: its prediction, or the error that kept it
from being scored.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convflow.catalog import registry, schemas, tables
from convflow.core.object_store import local_copy
from convflow.data import imaging

BATCH_SIZE = 64


class PredictError(ValueError):
    """Nothing can be scored: no such model or version, or no input; the message says which."""


@dataclass(frozen=True)
class ScoringModel:
    """The SavedModel that scores, and what identifies it in the output."""

    saved_model: Path
    pipeline: str
    version: int | None
    run_id: str


@dataclass(frozen=True)
class Input:
    """One input: where it came from (a path, or `<table>#<row>`) and its encoded bytes (None: unreadable)."""

    source: str
    content: bytes | None
    error: str | None = None


def choose_model(
    artifacts: str | Path, pipeline: str, version: int | None = None, run_id: str | None = None
) -> ScoringModel:
    """The production model of `pipeline`, a promoted `version`, or the SavedModel a run exported.

    Raises:
        PredictError: no production model, no such version, or no such run.
    """
    if run_id is not None:
        rows = [row for row in tables.read_catalog(artifacts).to_pylist() if row["run_id"] == run_id]
        if not rows or not rows[0]["saved_model"]:
            raise PredictError(f"run {run_id!r} is not in {tables.catalog_location(artifacts)} with a SavedModel")
        return ScoringModel(
            local_copy(rows[0]["saved_model"]), rows[0]["pipeline"], rows[0]["promoted_version"], run_id
        )
    promoted = (
        registry.versions(artifacts, pipeline) if version is not None else [registry.current(artifacts, pipeline)]
    )
    chosen = next((p for p in promoted if p is not None and (version is None or p.version == version)), None)
    if chosen is None:
        what = f"version {version}" if version is not None else "production model"
        raise PredictError(
            f"pipeline {pipeline!r} has no {what} under {registry.models_location(artifacts, pipeline)}; "
            "train one with `convflow run`, or name a run with --run"
        )
    return ScoringModel(local_copy(chosen.saved_model), pipeline, chosen.version, chosen.run_id)


def gather_inputs(inputs: list[str]) -> Iterator[Input]:
    """Each image of `inputs` (files, folders searched recursively, globs, Parquet tables), in order."""
    for item in inputs:
        paths = (
            [Path(item)] if Path(item).exists() else sorted(Path(match) for match in glob.glob(item, recursive=True))
        )
        if not paths:
            yield Input(item, None, "no such file, folder or glob match")
        for path in paths:
            yield from _inputs_of(path)


def _inputs_of(path: Path) -> Iterator[Input]:
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            yield from _inputs_of(file)
    elif path.suffix == ".parquet":
        yield from _table_inputs(path)
    elif imaging.is_image_name(path):
        yield Input(str(path), path.read_bytes())
    elif path.suffix.lower() in imaging.HEIF_SUFFIXES:  # a photo, not litter: say how to score it
        yield Input(str(path), None, imaging.why_not_taken(str(path)))


def _table_inputs(path: Path, column: str = "image") -> Iterator[Input]:
    from convflow.data.parquet_source import open_streaming

    table = open_streaming(path)
    if column not in table.schema_arrow.names:
        raise PredictError(f"{path}: no {column!r} column; its columns are {table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(batch_size=BATCH_SIZE, columns=[column], use_threads=False):
        for value in batch.column(0).to_pylist():
            yield _table_input(path, row, value)
            row += 1


def _table_input(table: Path, row: int, value) -> Input:
    from convflow.data.parquet_source import image_cell

    content, path, problem = image_cell(value, table)
    if path is not None:
        content = path.read_bytes()
    return Input(f"{table}#{row}", content, problem or (None if content else "no image"))


def _decode(content: bytes, channels: int) -> np.ndarray:
    with imaging.open_image(io.BytesIO(content)) as image:
        pixels = np.asarray(imaging.upright(image).convert("L" if channels == 1 else "RGB"), np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def _batches(inputs: Iterator[Input], channels: int) -> Iterator[tuple[list[Input], np.ndarray | None, list[str]]]:
    """Runs of up to BATCH_SIZE decoded images of one shape; an input that fails to decode comes
    alone, with its error, and no pixels."""
    run: list[tuple[Input, np.ndarray]] = []
    for item in inputs:
        error, pixels = item.error, None
        if error is None:
            try:
                pixels = _decode(item.content, channels)
            except Exception as decode_error:  # Pillow raises many types for bad files
                error = f"cannot decode: {decode_error}"
        if run and (error is not None or len(run) == BATCH_SIZE or run[0][1].shape != pixels.shape):
            yield [i for i, _ in run], np.stack([p for _, p in run]), []  # rows keep the inputs' order
            run = []
        if error is not None:
            yield [item], None, [error]
            continue
        run.append((item, pixels))
    if run:
        yield [i for i, _ in run], np.stack([p for _, p in run]), []


def score(model: ScoringModel, items: Iterator[Input], progress=sys.stderr) -> tuple[list[dict], int]:
    """One output row per input (BATCH_PREDICTIONS_SCHEMA's columns) and how many have an error."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(model.saved_model))  # kept referenced while its signature runs
    serve = loaded.signatures["serving_default"]
    channels = int(serve.structured_input_signature[1]["images"].shape[-1])
    scored_at = datetime.datetime.now(datetime.UTC)
    rows: list[dict] = []
    errors = 0
    for batch, pixels, batch_errors in _batches(items, channels):
        if pixels is None:
            rows.append(_row(batch[0], model, scored_at, error=batch_errors[0]))
            errors += 1
            continue
        result = serve(images=tf.constant(pixels))
        probabilities = result["probabilities"].numpy()
        classes = [name.decode() for name in result["classes"].numpy()]
        rows += [_row(item, model, scored_at, probabilities[i], classes[i]) for i, item in enumerate(batch)]
        print(f"scored {len(rows):,} inputs ({errors} with errors)", file=progress, flush=True)
    return rows, errors


def predict(model: ScoringModel, inputs: list[str], output: Path, progress=sys.stderr) -> tuple[Path, int, int]:
    """Score every input with `model` and write `output` (Parquet, schemas.BATCH_PREDICTIONS_SCHEMA);
    returns the output path, rows scored and rows with an error."""
    rows, errors = score(model, gather_inputs(inputs), progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    schemas.write_parquet(_table(rows), output)  # atomically: a reader never sees half a table
    return output, len(rows) - errors, errors


def already_scored(output_root: Path, model: ScoringModel) -> set[str]:
    """Content hashes that `model` (same version and run) scored into `output_root` before."""
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for part in sorted(output_root.glob("scored_date=*/*.parquet")):
        for row in pq.read_table(part, columns=["sha256", "model_version", "run_id", "error"]).to_pylist():
            if row["error"] is None and (row["model_version"], row["run_id"]) == (model.version, model.run_id):
                seen.add(row["sha256"])
    return seen


def score_new(model: ScoringModel, inputs: list[str], output_root: Path, progress=sys.stderr) -> dict:
    """Score the inputs `model` has not scored yet (by content hash) into a new partition
    `output_root/scored_date=YYYY-MM-DD/<time>.parquet`; after a promotion everything is new to
    the new model. Returns what it did: the partition (None when nothing was new), rows, errors,
    the inputs skipped as already scored, and the predicted classes' counts."""
    seen = already_scored(output_root, model)
    skipped = 0

    def unseen() -> Iterator[Input]:
        nonlocal skipped
        for item in gather_inputs(inputs):
            if item.content is not None and hashlib.sha256(item.content).hexdigest() in seen:
                skipped += 1
                continue
            yield item

    rows, errors = score(model, unseen(), progress)
    partition = None
    if rows:
        now = datetime.datetime.now(datetime.UTC)
        partition = output_root / f"scored_date={now:%Y-%m-%d}" / f"{now:%H%M%S%f}.parquet"
        partition.parent.mkdir(parents=True, exist_ok=True)
        schemas.write_parquet(_table(rows), partition)
    counts: dict[str, int] = {}
    for row in rows:
        if row["predicted"] is not None:
            counts[row["predicted"]] = counts.get(row["predicted"], 0) + 1
    return {
        "partition": str(partition) if partition else None,
        "scored": len(rows) - errors,
        "errors": errors,
        "already_scored": skipped,
        "per_class": counts,
    }


def _row(
    item: Input,
    model: ScoringModel,
    scored_at,
    probabilities=None,
    predicted: str | None = None,
    error: str | None = None,
) -> dict:
    return {
        "input": item.source,
        "sha256": hashlib.sha256(item.content).hexdigest() if item.content else None,
        "predicted": predicted,
        "probability": float(probabilities.max()) if probabilities is not None else None,
        "probabilities": probabilities.astype(np.float32).tolist() if probabilities is not None else None,
        "error": error,
        "pipeline": model.pipeline,
        "model_version": model.version,
        "run_id": model.run_id,
        "scored_at": scored_at,
    }


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schemas.BATCH_PREDICTIONS_SCHEMA)
