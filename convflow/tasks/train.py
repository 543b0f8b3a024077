"""Stage 5, train: fit the wrapped model on the training split, resuming from the last epoch after a crash."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pyarrow as pa

from convflow import tables
from convflow.config import TrainConfig
from convflow.tasks import features
from convflow.tasks.records import TFRecordSet, TrainedModel, WrappedModel
from convflow.tasks.stage import RunContext, hash_json, stage_task, staged_output


def checkpoint_key(wrapped: WrappedModel, tfrecords: TFRecordSet, train: TrainConfig) -> str:
    """Names the checkpoint folder: the same model, data and settings resume the same training."""
    return hash_json([wrapped.fingerprint, tfrecords.fingerprint, train])[:24]


def _history_logger(path: Path):
    """A callback that appends each finished epoch to `path` (JSON lines) and notes where fit began.

    It runs after BackupAndRestore in the callback list, so every logged epoch is checkpointed;
    fit's own History would hold only the epochs of the last attempt.
    """
    import keras

    class HistoryLog(keras.callbacks.Callback):
        first_epoch: int | None = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._started}
            row.update({key: float(value) for key, value in (logs or {}).items()})
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    return HistoryLog()


def _read_history(path: Path, epochs: int) -> pa.Table:
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


def _optimizer(train: TrainConfig):
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    return optimizers[train.optimizer](learning_rate=train.learning_rate)


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


def _datasets(tfrecords: TFRecordSet, train: TrainConfig, global_batch: int):
    common = {"image_size": tfrecords.image_size, "channels": tfrecords.channels, "batch_size": global_batch}
    training = features.read_dataset(
        tfrecords.shards["train"],
        shuffle_buffer=train.shuffle_buffer,
        seed=train.seed,
        augment=_augmentation(train.seed) if train.augment else None,
        **common,
    )
    validation = None
    if tfrecords.counts.get("validation"):
        validation = features.read_dataset(tfrecords.shards["validation"], **common)
    return training, validation


def train_model(
    wrapped: WrappedModel, tfrecords: TFRecordSet, train: TrainConfig, checkpoint_dir: Path, output_dir: Path
) -> TrainedModel:
    """Fit the wrapped model; checkpoint every epoch under `checkpoint_dir` and resume from it."""
    import keras
    import tensorflow as tf

    import convflow.tasks.layers  # noqa: F401  (registers custom layers for loading)

    keras.utils.set_random_seed(train.seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    strategy = _strategy()
    with strategy.scope():
        model = keras.models.load_model(wrapped.model_path, compile=False)
        model.compile(
            optimizer=_optimizer(train),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    training, validation = _datasets(tfrecords, train, train.batch_size * strategy.num_replicas_in_sync)
    history_log = _history_logger(checkpoint_dir / "history.jsonl")
    callbacks = [keras.callbacks.BackupAndRestore(str(checkpoint_dir / "backup")), history_log]
    started = time.perf_counter()
    with warnings.catch_warnings():
        # tf.data input: Keras' notes about `shuffle` and unknown dataset length do not apply.
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        model.fit(training, validation_data=validation, epochs=train.epochs, callbacks=callbacks, verbose=2)
    seconds = time.perf_counter() - started
    resumed_from = history_log.first_epoch if history_log.first_epoch is not None else train.epochs
    trained_epochs = train.epochs - resumed_from
    with staged_output(output_dir) as staging:
        model.save(staging / "model.keras")
        tables.write_parquet(_read_history(checkpoint_dir / "history.jsonl", train.epochs), staging / "history.parquet")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainedModel(
        output_dir=str(output_dir),
        model_path=str(output_dir / "model.keras"),
        history_parquet=str(output_dir / "history.parquet"),
        epochs=train.epochs,
        resumed_from_epoch=resumed_from,
        train_seconds=seconds,
        images_per_second=tfrecords.counts["train"] * trained_epochs / seconds if trained_epochs else 0.0,
        fingerprint=checkpoint_key(wrapped, tfrecords, train),
    )


@stage_task(retries=2, retry_delay_seconds=[10, 60])
def train(wrapped: WrappedModel, tfrecords: TFRecordSet, train: TrainConfig, run: RunContext) -> TrainedModel:
    """Prefect task over train_model; a retry resumes from the last completed epoch."""
    checkpoint_dir = Path(run.artifacts_root) / run.pipeline / "checkpoints" / checkpoint_key(wrapped, tfrecords, train)
    return train_model(wrapped, tfrecords, train, checkpoint_dir, run.stage_dir("train"))
