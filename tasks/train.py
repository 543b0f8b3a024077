"""Stage 5, train: fit the wrapped model on the training split, resuming from the last epoch after a crash."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from convflow import tables
from convflow.config import FineTuneConfig, TrainConfig
from convflow.storage import locked, staged_output
from convflow.tasks import features
from convflow.tasks.records import TFRecordSet, TrainedModel, WrappedModel
from convflow.tasks.stage import RunContext, hash_json, stage_task


def checkpoint_key(
    wrapped: WrappedModel, tfrecords: TFRecordSet, settings: TrainConfig, fine_tune: FineTuneConfig | None = None
) -> str:
    """Names the checkpoint folder: the same model, data and settings resume the same training."""
    return hash_json([wrapped.fingerprint, tfrecords.fingerprint, settings, fine_tune])[:24]


def _history_logger(path: Path):
    """A callback that appends each finished epoch to `path` (JSON lines) and notes where fit began.

    fit's own History would hold only the epochs of the last attempt. Epochs trained after the
    last checkpoint are trained and logged again by a resumed run; the last record of an epoch wins.
    """
    import keras

    class HistoryLog(keras.callbacks.Callback):
        first_epoch: int | None = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
            self._started = time.perf_counter()

        phase = "head"

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "phase": self.phase, "seconds": time.perf_counter() - self._started,
                   "host": socket.gethostname(), "pid": os.getpid()}
            row.update({key: float(value) for key, value in (logs or {}).items()})
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    return HistoryLog()


def _progress_artifact(label: str | None, total_epochs: int):
    """A callback that shows training's progress in the Prefect UI: a progress artifact of the
    train task run (or of the train flow run on a work pool), "<label>: epochs of <total>", updated at each epoch's end (a resumed run starts
    from its epoch). None without a label or outside a Prefect task run. A failed update is
    logged; training goes on.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    if label is None or (TaskRunContext.get() is None and FlowRunContext.get() is None):
        return None
    description = f"{label}: epochs of {total_epochs}"
    import keras
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.logging import get_run_logger

    class EpochProgress(keras.callbacks.Callback):
        artifact_id = None

        def on_epoch_end(self, epoch, logs=None):
            percent = 100.0 * (epoch + 1) / total_epochs
            try:
                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(percent, description=description)
                else:
                    update_progress_artifact(self.artifact_id, percent)
            except Exception as error:  # the UI's progress bar is not worth a failed training
                get_run_logger().warning(f"training progress not shown in Prefect: {error}")

    return EpochProgress()


def _read_history(path: Path, epochs: int) -> pa.Table:
    """Each epoch once: a resumed epoch's last record wins."""
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    rows = [by_epoch[epoch] for epoch in sorted(by_epoch) if epoch <= epochs]
    columns = [field.name for field in tables.HISTORY_SCHEMA]
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows], tables.HISTORY_SCHEMA)


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()


def _optimizer(settings: TrainConfig, learning_rate: float):
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    return optimizers[settings.optimizer](learning_rate=learning_rate)


def _augmentation(seed: int):
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.1, seed=seed),
            layers.RandomZoom(0.1, seed=seed),
            layers.RandomContrast(0.1, seed=seed),
        ],
        name="augmentation",
    )


def _datasets(tfrecords: TFRecordSet, settings: TrainConfig, global_batch: int):
    common = {"image_size": tfrecords.image_size, "channels": tfrecords.channels, "batch_size": global_batch}
    training = features.read_dataset(
        tfrecords.shards["train"],
        shuffle_buffer=settings.shuffle_buffer,
        seed=settings.seed,
        augment=_augmentation(settings.seed) if settings.augment else None,
        **common,
    )
    validation = None
    if tfrecords.counts.get("validation"):
        validation = features.read_dataset(tfrecords.shards["validation"], **common)
    return training, validation


def model_summary(model) -> pa.Table:
    """The model's layers as data (what Keras' summary() prints), the base's layers expanded."""
    rows = []
    for layer in model.layers:
        inner = layer.layers if layer.name == "base" else [layer]
        for item in inner:
            if item.__class__.__name__ == "InputLayer":
                continue
            rows.append({
                "layer": f"base/{item.name}" if item is not layer else item.name,
                "type": item.__class__.__name__,
                "output_shape": str(tuple(item.output.shape)) if hasattr(item, "output") else "",
                "params": int(sum(int(w.numpy().size) for w in item.weights)),
                "trainable": bool(item.trainable and layer.trainable),
            })
    return pa.Table.from_pylist(rows, schema=tables.MODEL_SUMMARY_SCHEMA)


def augmentation_preview(tfrecords: TFRecordSet, seed: int, images: int = 4, versions: int = 4):
    """A few training images, each followed by augmented versions of it (uint8)."""
    import numpy as np

    first = next(iter(features.read_dataset(tfrecords.shards["train"], tfrecords.image_size,
                                            tfrecords.channels, images, cache=False)))[0]
    augment = _augmentation(seed)
    rows = [first.numpy()] + [augment(first, training=True).numpy() for _ in range(versions)]
    return np.clip(np.stack(rows, axis=1), 0, 255).astype(np.uint8).reshape(-1, *first.shape[1:])


def _compile(model, settings: TrainConfig, learning_rate: float, steps_per_epoch: int) -> None:
    import keras

    if model.output_shape[-1] == 1:  # a binary head: one logit for the second class
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)]
    else:
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    model.compile(
        optimizer=_optimizer(settings, learning_rate), loss=loss, metrics=metrics,
        steps_per_execution=max(1, min(settings.steps_per_execution, steps_per_epoch)),
    )


def unfreeze_top(model, fine_tune: FineTuneConfig) -> None:
    """Make the base's top layers trainable (from `from_layer`, or the last `unfreeze_top`).

    BatchNormalization layers stay frozen: a frozen BN layer runs in inference mode in Keras 3,
    so its moving statistics, learnt on the base's original data, are never overwritten by
    small fine-tuning batches (the `training=False` of the wrapper's call does not survive
    saving and loading the model).

    Raises:
        ValueError: `from_layer` is not a layer of the base.
    """
    base = model.get_layer("base")
    names = [layer.name for layer in base.layers]
    if fine_tune.from_layer is not None:
        if fine_tune.from_layer not in names:
            raise ValueError(f"model.fine_tune.from_layer {fine_tune.from_layer!r} is not a layer of the base")
        boundary = names.index(fine_tune.from_layer)
    else:
        boundary = max(0, len(names) - fine_tune.unfreeze_top)
    import keras

    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= boundary and not isinstance(layer, keras.layers.BatchNormalization)


def _backup_and_restore(backup_dir: Path, every_seconds: float):
    """Keras' BackupAndRestore, saving at an epoch's end only once `every_seconds` have passed
    since its last save (or the start of training): on a small model a save costs as much as a
    short epoch. What it saved is what a rerun resumes from."""
    import keras

    class TimedBackupAndRestore(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._saved_at = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() - self._saved_at >= every_seconds:
                super().on_epoch_end(epoch, logs)
                self._saved_at = time.monotonic()

    return TimedBackupAndRestore(str(backup_dir))


def _fit(model, training, validation, callbacks, backup, initial_epoch: int, epochs: int) -> float:
    """model.fit from `initial_epoch` to `epochs`; returns its wall seconds."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        # tf.data input: Keras' notes about `shuffle` and unknown dataset length do not apply.
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        model.fit(
            training, validation_data=validation, initial_epoch=initial_epoch, epochs=epochs, verbose=2,
            callbacks=[backup, *callbacks],
        )
    return time.perf_counter() - started


def _fit_phases(model_path: str, checkpoint_dir: Path, settings: TrainConfig, fine_tune: FineTuneConfig | None,
                datasets, callbacks: list, steps_per_epoch: int, history_log) -> tuple[object, float]:
    """The head phase (unless head.keras says it finished), then fine-tuning when asked; the model
    and the seconds spent in model.fit."""
    import keras

    head_model = checkpoint_dir / "head.keras"
    total_epochs = settings.epochs + (fine_tune.epochs if fine_tune else 0)
    fit_seconds = 0.0
    model = keras.models.load_model(head_model if head_model.exists() else model_path, compile=False)
    if not head_model.exists():
        _compile(model, settings, settings.learning_rate, steps_per_epoch)
        backup = _backup_and_restore(checkpoint_dir / "backup", settings.checkpoint_seconds)
        fit_seconds += _fit(model, *datasets, callbacks, backup, 0, settings.epochs)
        if fine_tune:
            model.save(head_model)
    if fine_tune:
        unfreeze_top(model, fine_tune)
        _compile(model, settings, fine_tune.learning_rate, steps_per_epoch)
        history_log.phase = "fine_tune"
        backup = _backup_and_restore(checkpoint_dir / "backup-fine-tune", settings.checkpoint_seconds)
        fit_seconds += _fit(model, *datasets, callbacks, backup, settings.epochs, total_epochs)
    return model, fit_seconds


def _save_outputs(model, tfrecords: TFRecordSet, settings: TrainConfig, checkpoint_dir: Path, output_dir: Path,
                  total_epochs: int) -> None:
    with staged_output(output_dir) as staging:
        model.save(staging / "model.keras")
        tables.write_parquet(_read_history(checkpoint_dir / "history.jsonl", total_epochs), staging / "history.parquet")
        tables.write_parquet(model_summary(model), staging / "model_summary.parquet")
        if settings.augment:
            np.save(staging / "augmentation.npy", augmentation_preview(tfrecords, settings.seed))


def _seed(settings: TrainConfig) -> None:
    """Seed weights, shuffling and dropout; with train.deterministic, deterministic ops too."""
    import keras
    import tensorflow as tf

    import convflow.tasks.layers  # noqa: F401  (registers custom layers for loading)

    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        tf.config.experimental.enable_op_determinism()


def train_model(
    wrapped: WrappedModel,
    tfrecords: TFRecordSet,
    settings: TrainConfig,
    checkpoint_dir: Path,
    output_dir: Path,
    fine_tune: FineTuneConfig | None = None,
    progress_label: str | None = None,
) -> TrainedModel:
    """Fit the head (and then fine-tune the base's top layers, when asked).

    Every epoch is checkpointed under `checkpoint_dir`; a rerun after a crash resumes from the
    last completed epoch, and a finished head phase is kept as head.keras so fine-tuning
    resumes without redoing it. With `progress_label`, inside a Prefect run, each epoch
    updates a progress artifact the Prefect UI shows.
    """
    _seed(settings)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    strategy = _strategy()
    global_batch = settings.batch_size * strategy.num_replicas_in_sync
    history_log = _history_logger(checkpoint_dir / "history.jsonl")
    total_epochs = settings.epochs + (fine_tune.epochs if fine_tune else 0)
    progress = _progress_artifact(progress_label, total_epochs)
    callbacks = [history_log, *([progress] if progress else [])]
    datasets = _datasets(tfrecords, settings, global_batch)
    steps_per_epoch = math.ceil(tfrecords.counts["train"] / global_batch)
    started = time.perf_counter()
    with strategy.scope():
        model, fit_seconds = _fit_phases(wrapped.model_path, checkpoint_dir, settings, fine_tune, datasets, callbacks,
                                         steps_per_epoch, history_log)
    seconds = time.perf_counter() - started
    resumed_from = history_log.first_epoch if history_log.first_epoch is not None else total_epochs
    trained_epochs = total_epochs - resumed_from
    _save_outputs(model, tfrecords, settings, checkpoint_dir, output_dir, total_epochs)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainedModel(
        output_dir=str(output_dir), model_path=str(output_dir / "model.keras"),
        history_parquet=str(output_dir / "history.parquet"),
        model_summary_parquet=str(output_dir / "model_summary.parquet"),
        augmentation_npy=str(output_dir / "augmentation.npy") if settings.augment else None,
        epochs=total_epochs, resumed_from_epoch=resumed_from, train_seconds=seconds,
        images_per_second=tfrecords.counts["train"] * trained_epochs / fit_seconds if trained_epochs else 0.0,
        fingerprint=checkpoint_key(wrapped, tfrecords, settings, fine_tune), host=socket.gethostname(), pid=os.getpid(),
    )


def checkpoint_dir_for(run: RunContext, key: str) -> Path:
    """The checkpoint folder of one training: keyed on model, data and settings, never on a run, so a
    rerun, a task retry or another worker's attempt resumes it."""
    return Path(run.artifacts_root) / run.pipeline / "checkpoints" / key


def train_here(
    wrapped: WrappedModel, tfrecords: TFRecordSet, settings: TrainConfig, fine_tune: FineTuneConfig | None,
    run: RunContext, finished: Callable[[str], TrainedModel | None] = lambda key: None,
) -> TrainedModel:
    """train_model in this process, holding the checkpoint folder's lock.

    The same training started twice at once (two runs, or a worker's attempt marked Crashed while it
    still trains and the attempt that replaced it) would share one checkpoint folder: the second
    waits here (an fcntl lock, released even if its holder is killed). Once it holds the lock,
    `finished(key)` may return what the first one trained, which is then not trained again.
    """
    key = checkpoint_key(wrapped, tfrecords, settings, fine_tune)
    checkpoint_dir = checkpoint_dir_for(run, key)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(checkpoint_dir):  # the lock file is <key>.lock beside the folder
        earlier = finished(key)
        if earlier is not None:
            return earlier
        return train_model(wrapped, tfrecords, settings, checkpoint_dir, run.stage_dir("train"), fine_tune,
                           progress_label=f"{run.pipeline} run {run.run_id}, training")


@stage_task(retries=2, retry_delay_seconds=[10, 60])
def train(
    wrapped: WrappedModel, tfrecords: TFRecordSet, settings: TrainConfig, fine_tune: FineTuneConfig | None, run: RunContext
) -> TrainedModel:
    """Prefect task over train_model: in this process, or as flow runs on the workers of the pipeline's `train.work_pool`
    (a lost worker's attempt is started again there). A retry resumes from the last completed epoch."""
    if settings.work_pool:
        from convflow.flows.train_on_pool import train_on_pool

        return train_on_pool(wrapped, tfrecords, settings, fine_tune, run)
    return train_here(wrapped, tfrecords, settings, fine_tune, run)
