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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from convflow.catalog import schemas
from convflow.config.schema import FineTuneConfig, TrainConfig
from convflow.core.context import RunContext
from convflow.core.hashing import hash_json
from convflow.core.object_store import CheckpointSync, is_remote, store_for
from convflow.core.records import TFRecordSet, TrainedModel, WrappedModel
from convflow.core.run_log import run_logger
from convflow.core.stage import stage_task
from convflow.core.storage import locked, staged_output
from convflow.modeling import base_features, serving, train_callbacks, train_recipe
from convflow.runtime.process_caches import remember_classifier
from convflow.tfrecords import features


def checkpoint_key(
    wrapped: WrappedModel, tfrecords: TFRecordSet, settings: TrainConfig, fine_tune: FineTuneConfig | None = None
) -> str:
    """Names the checkpoint folder: the same model, data and settings resume the same training."""
    return hash_json([wrapped.fingerprint, tfrecords.fingerprint, settings, fine_tune])[:24]


def _read_history(path: Path, epochs: int) -> pa.Table:
    """Each epoch once: a resumed epoch's last record wins."""
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    rows = [by_epoch[epoch] for epoch in sorted(by_epoch) if epoch <= epochs]
    columns = [field.name for field in schemas.HISTORY_SCHEMA]
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows], schemas.HISTORY_SCHEMA)


def _strategy():
    """MirroredStrategy over the GPUs, or over several logical CPU devices when someone configured them
    (tf.config.set_logical_device_configuration: how the tests exercise the multi-GPU path); else the
    default strategy. Each replica takes train.batch_size examples per step."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1:
        return tf.distribute.MirroredStrategy([device.name for device in cpus])
    return tf.distribute.get_strategy()


def with_precision(model, precision: str):
    """A copy of `model` whose layers compute under the dtype policy `precision`, the output layer
    ("logits") kept in float32 so losses and probabilities stay float32; the same weights.

    Saved models keep their layers' policies, so setting Keras' global policy would not reach a
    loaded model: its layers are rebuilt from their configs with the new policy instead.
    """
    import keras

    if all(layer.dtype_policy.name == precision for layer in _leaf_layers(model) if layer.name != "logits"):
        return model

    def rebuilt(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name == "logits" else precision
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=rebuilt, recursive=True)
    copy.set_weights(model.get_weights())
    _copy_trainable(model, copy)
    return copy


def _leaf_layers(model):
    for layer in model.layers:
        yield from _leaf_layers(layer) if hasattr(layer, "layers") else [layer]


def _copy_trainable(source, copy) -> None:
    """Give each layer of `copy` its twin's trainable flag: a cloned nested model comes back trainable,
    and setting a model's flag sets all its layers', so containers go first, then what they hold."""
    copy.trainable = source.trainable
    for source_layer, copy_layer in zip(source.layers, copy.layers):
        if hasattr(source_layer, "layers"):
            _copy_trainable(source_layer, copy_layer)
        else:
            copy_layer.trainable = source_layer.trainable


def _with_labels_for_loss(dataset, settings: TrainConfig, tfrecords: TFRecordSet, binary: bool, training: bool):
    """`dataset` with the labels the loss takes: one-hot (and mixed, in training) where the recipe needs it."""
    import tensorflow as tf

    transform = train_recipe.label_transform(settings, len(tfrecords.label_names), binary)
    if dataset is None or transform is None:
        return dataset
    mapped = dataset.map(
        lambda images, labels: transform(images, labels, training), num_parallel_calls=tf.data.AUTOTUNE
    )
    return mapped.prefetch(tf.data.AUTOTUNE)


def _datasets(tfrecords: TFRecordSet, settings: TrainConfig, global_batch: int, binary: bool):
    common = {"image_size": tfrecords.image_size, "channels": tfrecords.channels, "batch_size": global_batch}
    training = features.read_dataset(
        tfrecords.shards["train"],
        shuffle_buffer=settings.shuffle_buffer,
        seed=settings.seed,
        augment=train_recipe.image_augmentation(settings),
        **common,
    )
    validation = None
    if tfrecords.counts.get("validation"):
        validation = features.read_dataset(tfrecords.shards["validation"], **common)
    return (
        _with_labels_for_loss(training, settings, tfrecords, binary, training=True),
        _with_labels_for_loss(validation, settings, tfrecords, binary, training=False),
    )


def model_summary(model) -> pa.Table:
    """The model's layers as data (what Keras' summary() prints), the base's layers expanded."""
    rows = []
    for layer in model.layers:
        inner = layer.layers if layer.name == "base" else [layer]
        for item in inner:
            if item.__class__.__name__ == "InputLayer":
                continue
            rows.append(
                {
                    "layer": f"base/{item.name}" if item is not layer else item.name,
                    "type": item.__class__.__name__,
                    "output_shape": str(tuple(item.output.shape)) if hasattr(item, "output") else "",
                    "params": int(sum(int(w.numpy().size) for w in item.weights)),
                    "trainable": bool(item.trainable and layer.trainable),
                }
            )
    return pa.Table.from_pylist(rows, schema=schemas.MODEL_SUMMARY_SCHEMA)


def augmentation_preview(tfrecords: TFRecordSet, settings: TrainConfig, images: int = 4, versions: int = 4):
    """A few training images, each followed by versions of it through train.augment's per-image layers (uint8)."""
    import numpy as np

    first = next(
        iter(
            features.read_dataset(
                tfrecords.shards["train"], tfrecords.image_size, tfrecords.channels, images, cache=False
            )
        )
    )[0]
    augment = train_recipe.image_augmentation(settings)
    rows = [first.numpy()] + [augment(first, training=True).numpy() for _ in range(versions)]
    return np.clip(np.stack(rows, axis=1), 0, 255).astype(np.uint8).reshape(-1, *first.shape[1:])


def _steps_per_execution(settings: TrainConfig, steps_per_epoch: int) -> int:
    """train.steps_per_execution, at most one epoch's; 1 with several replicas, where Keras 3's
    multi-step loop fails ("You must feed a value for placeholder tensor", keras-team/keras#19246)."""
    import tensorflow as tf

    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        return 1
    return max(1, min(settings.steps_per_execution, steps_per_epoch))


def _compile(model, settings: TrainConfig, learning_rate: float, steps_per_epoch: int, epochs: int) -> None:
    """Compile for one phase of `epochs` epochs: the schedule spans that phase."""
    loss, metrics = train_recipe.loss_and_metrics(settings, model.output_shape[-1])
    rate = train_recipe.learning_rate(settings.schedule, learning_rate, epochs, steps_per_epoch)
    model.compile(
        optimizer=train_recipe.optimizer(settings, rate),
        loss=loss,
        metrics=metrics,
        steps_per_execution=_steps_per_execution(settings, steps_per_epoch),
        jit_compile=settings.jit_compile,
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


def _backup_and_restore(backup_dir: Path, every_seconds: float, early_stop=None):
    """Keras' BackupAndRestore, saving at an epoch's end only once `every_seconds` have passed
    since its last save (or the start of training): on a small model a save costs as much as a
    short epoch. What it saved is what a rerun resumes from; `early_stop`'s state is saved with it,
    so a resumed run knows the best epoch so far and its weights."""
    import keras

    class TimedBackupAndRestore(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._saved_at = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() - self._saved_at >= every_seconds:
                if early_stop is not None:
                    early_stop.save_state()
                super().on_epoch_end(epoch, logs)
                self._saved_at = time.monotonic()

    return TimedBackupAndRestore(str(backup_dir))


def _fit(model, datasets, training: Training, phase: str, initial_epoch: int, epochs: int) -> float:
    """model.fit of one phase from `initial_epoch` to `epochs` on (training, validation) `datasets`,
    checkpointed in the phase's folder; returns its wall seconds.

    Inside a Prefect run the epoch recorder logs each epoch through the run logger (the terminal and
    the UI); Keras' own epoch lines would repeat them in the terminal, so they show only outside one.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    in_prefect_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
    # Early stopping ahead of the checkpoint: at an epoch's end it judges the epoch before the
    # checkpoint saves its state.
    stopper = training.early_stopping(phase)
    backup = training.backup(phase, stopper)
    leading = [stopper, backup] if stopper else [backup]
    started = time.perf_counter()
    with warnings.catch_warnings():
        # tf.data input: Keras' notes about `shuffle` and unknown dataset length do not apply.
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        warnings.filterwarnings("ignore", message=".*ran out of data.*")
        model.fit(
            datasets[0],
            validation_data=datasets[1],
            initial_epoch=initial_epoch,
            epochs=epochs,
            verbose=0 if in_prefect_run else 2,
            class_weight=training.class_weight,
            callbacks=[*leading, *train_recipe.plateau_callbacks(training.settings.schedule), *training.callbacks],
        )
    if stopper is not None:
        training.record_stop(phase, stopper)
    return time.perf_counter() - started


@dataclass
class Training:
    """One training's settings and the per-epoch callbacks its phases share."""

    tfrecords: TFRecordSet
    settings: TrainConfig
    fine_tune: FineTuneConfig | None
    checkpoint_dir: Path
    global_batch: int
    recorder: object  # train_callbacks.epoch_recorder
    callbacks: list
    class_weight: dict[int, float] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.tfrecords.counts["train"] / self.global_batch)

    def image_datasets(self, binary: bool):
        return _datasets(self.tfrecords, self.settings, self.global_batch, binary)

    def backup(self, phase: str, early_stop=None):
        return _backup_and_restore(self._backup_dir(phase), self.settings.checkpoint_seconds, early_stop)

    def early_stopping(self, phase: str):
        """train.early_stopping's callback for one phase, its state kept in the phase's checkpoint; None when off."""
        config = self.settings.early_stopping
        if config is None:
            return None
        return train_callbacks.early_stopping(config.patience, config.metric, self._backup_dir(phase))

    def _backup_dir(self, phase: str) -> Path:
        return self.checkpoint_dir / ("backup" if phase == "head" else f"backup-{phase}")

    @property
    def _stops_file(self) -> Path:
        return self.checkpoint_dir / "early_stopping.json"

    def record_stop(self, phase: str, stopper) -> None:
        """Where early stopping ended a phase (1-based epochs); kept beside the checkpoints so a
        resumed fine-tuning still knows the head phase's."""
        stops = self.stops()
        stops[phase] = {
            "best_epoch": stopper.best_epoch + 1,
            "stopped_epoch": stopper.stopped_epoch + 1 if stopper.stopped_epoch else None,
        }
        self._stops_file.write_text(json.dumps(stops))

    def stops(self) -> dict[str, dict]:
        return json.loads(self._stops_file.read_text()) if self._stops_file.exists() else {}


def _feature_datasets(front, training: Training, cache: Path, binary: bool):
    """(training, validation) batches of the frozen front's features, read from `cache` or computed into it."""
    log = run_logger().info
    splits = ["train"] + (["validation"] if training.tfrecords.counts.get("validation") else [])
    infer = base_features.feature_function(front, training.tfrecords)
    extracted = {split: base_features.load_or_extract(infer, training.tfrecords, split, cache, log) for split in splits}
    settings = training.settings
    train_set = base_features.feature_dataset(
        extracted["train"], training.global_batch, settings.shuffle_buffer, settings.seed
    )
    validation = extracted.get("validation")
    validation_set = base_features.feature_dataset(validation, training.global_batch) if validation else None
    # Features never carry augmentation (applies() sends it to images): one-hot labels at most.
    return tuple(
        _with_labels_for_loss(dataset, settings, training.tfrecords, binary, training=False)
        for dataset in (train_set, validation_set)
    )


def _fit_head(model, training: Training, feature_cache: Path | None) -> float:
    """The head phase: on the frozen front's cached features when `feature_cache` is given, else on images."""
    settings = training.settings
    binary = model.output_shape[-1] == 1
    if feature_cache is not None:
        front, fitted = base_features.split_front_and_head(model)
        serving_traced = _trace_serving_ahead(model, training)
        datasets = _feature_datasets(front, training, feature_cache, binary)
        if serving_traced is not None:
            serving_traced.exception()  # the trace calls the head's layers too: it ends before fit does
    else:
        fitted, datasets = model, training.image_datasets(binary)
    _compile(fitted, settings, settings.learning_rate, training.steps_per_epoch, settings.epochs)
    return _fit(fitted, datasets, training, "head", 0, settings.epochs)


def _trace_serving_ahead(model, training: Training):
    """Trace the serving function of `model` while the frozen base computes its features (see
    serving.trace_ahead), when `model` is the object evaluate and export will get: trained in
    float32 (another precision saves a float32 copy) by one replica (a MirroredStrategy's
    variables are read inside its scope only). Fine-tuning after the head trains the same object."""
    import tensorflow as tf

    if training.settings.precision != "float32" or tf.distribute.has_strategy():
        return None
    return serving.trace_ahead(model, training.tfrecords)


def _fit_phases(model_path: str, training: Training, feature_cache: Path | None) -> tuple[object, float]:
    """The head phase (unless head.keras says it finished), then fine-tuning when asked; the model
    and the seconds spent in model.fit (feature extraction included)."""
    import keras

    settings, fine_tune = training.settings, training.fine_tune
    head_model = training.checkpoint_dir / "head.keras"
    total_epochs = settings.epochs + (fine_tune.epochs if fine_tune else 0)
    fit_seconds = 0.0
    model = keras.models.load_model(head_model if head_model.exists() else model_path, compile=False)
    model = with_precision(model, settings.precision)
    if not head_model.exists():
        fit_seconds += _fit_head(model, training, feature_cache)
        if fine_tune:
            model.save(head_model)
    if fine_tune:
        unfreeze_top(model, fine_tune)
        _compile(model, settings, fine_tune.learning_rate, training.steps_per_epoch, fine_tune.epochs)
        training.recorder.phase = "fine_tune"
        fit_seconds += _fit(
            model,
            training.image_datasets(model.output_shape[-1] == 1),
            training,
            "fine-tune",
            settings.epochs,
            total_epochs,
        )
    return model, fit_seconds


def _previews_augmentation(settings: TrainConfig) -> bool:
    return any(name in train_recipe.IMAGE_LAYERS for step in settings.augment_steps for name in step)


def _save_outputs(
    model, tfrecords: TFRecordSet, settings: TrainConfig, checkpoint_dir: Path, output_dir: Path, total_epochs: int
) -> None:
    """The trained model in float32 (whatever train.precision was: evaluation, export and serving then
    see one model), its history, its layers, and the TensorBoard logs."""
    saved = with_precision(model, "float32")
    with staged_output(output_dir) as staging:
        saved.save(staging / "model.keras")
        schemas.write_parquet(
            _read_history(checkpoint_dir / "history.jsonl", total_epochs), staging / "history.parquet"
        )
        schemas.write_parquet(model_summary(model), staging / "model_summary.parquet")
        if (checkpoint_dir / "tensorboard").exists():
            shutil.copytree(checkpoint_dir / "tensorboard", staging / "tensorboard")
        if _previews_augmentation(settings):
            np.save(staging / "augmentation.npy", augmentation_preview(tfrecords, settings))
    remember_classifier(output_dir / "model.keras", saved)  # evaluate, next, uses it as it is


def _hyperparameters(settings: TrainConfig, fine_tune: FineTuneConfig | None, head_trained_on: str) -> dict:
    values = settings.model_dump(mode="json", exclude=set(TrainConfig.EXECUTION_ONLY))
    values.update(
        schedule=describe_schedule(settings),
        augment=json.dumps(values["augment"]),
        early_stopping=json.dumps(values["early_stopping"]),
    )
    values.update(
        {f"fine_tune.{name}": value for name, value in (fine_tune.model_dump(mode="json") if fine_tune else {}).items()}
    )
    return {**values, "head_trained_on": head_trained_on}


def _seed(settings: TrainConfig) -> None:
    """Seed weights, shuffling and dropout; with train.deterministic, deterministic ops too."""
    import keras
    import tensorflow as tf

    import convflow.modeling.layers  # noqa: F401  (registers custom layers for loading)

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
    feature_cache: Path | None = None,
    after_epoch: Callable[[], None] | None = None,
) -> TrainedModel:
    """Fit the head (and then fine-tune the base's top layers, when asked).

    Every epoch is checkpointed under `checkpoint_dir`; a rerun after a crash resumes from the
    last completed epoch, and a finished head phase is kept as head.keras so fine-tuning
    resumes without redoing it. With a frozen base and no augmentation (and train.cache_features),
    the head phase trains on the frozen base's features, kept in `feature_cache` (default: inside
    the checkpoint folder, gone after training). With `progress_label`, inside a Prefect run, each
    epoch updates a progress artifact the Prefect UI shows. `after_epoch` is called once each
    epoch's checkpoint is saved (an object store's root uploads it then).
    """
    _seed(settings)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    strategy = _strategy()
    total_epochs = settings.epochs + (fine_tune.epochs if fine_tune else 0)
    on_features = base_features.applies(wrapped, settings.augment, settings.cache_features)
    head_trained_on = "cached features" if on_features else "images"
    recorder = train_callbacks.epoch_recorder(checkpoint_dir / "history.jsonl", total_epochs)
    progress = train_callbacks.progress_artifact(progress_label, total_epochs)
    train_callbacks.write_hyperparameters(
        checkpoint_dir / "tensorboard", _hyperparameters(settings, fine_tune, head_trained_on)
    )
    callbacks = [
        recorder,
        train_callbacks.tensorboard(checkpoint_dir / "tensorboard"),
        *([progress] if progress else []),
        *([train_callbacks.after_each_epoch(after_epoch)] if after_epoch else []),
    ]
    training = Training(
        tfrecords,
        settings,
        fine_tune,
        checkpoint_dir,
        settings.batch_size * strategy.num_replicas_in_sync,
        recorder,
        callbacks,
        train_recipe.class_weights(tfrecords) if settings.class_weight == "balanced" else None,
    )
    run_logger().info(
        _plan_line(wrapped, settings, head_trained_on, strategy.num_replicas_in_sync, training.global_batch)
    )
    started = time.perf_counter()
    with strategy.scope():
        cache = (feature_cache or checkpoint_dir / "features") if on_features else None
        model, fit_seconds = _fit_phases(wrapped.model_path, training, cache)
    seconds = time.perf_counter() - started
    resumed_from = recorder.first_epoch if recorder.first_epoch is not None else total_epochs
    trained_epochs = recorder.epochs_run
    stop = training.stops().get("fine-tune" if fine_tune else "head", {})
    _save_outputs(model, tfrecords, settings, checkpoint_dir, output_dir, total_epochs)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainedModel(
        output_dir=str(output_dir),
        model_path=str(output_dir / "model.keras"),
        history_parquet=str(output_dir / "history.parquet"),
        model_summary_parquet=str(output_dir / "model_summary.parquet"),
        augmentation_npy=str(output_dir / "augmentation.npy") if _previews_augmentation(settings) else None,
        epochs=total_epochs,
        resumed_from_epoch=resumed_from,
        train_seconds=seconds,
        images_per_second=tfrecords.counts["train"] * trained_epochs / fit_seconds if trained_epochs else 0.0,
        fingerprint=checkpoint_key(wrapped, tfrecords, settings, fine_tune),
        host=socket.gethostname(),
        pid=os.getpid(),
        head_trained_on=head_trained_on,
        precision=settings.precision,
        replicas=strategy.num_replicas_in_sync,
        tensorboard_dir=str(output_dir / "tensorboard"),
        schedule=describe_schedule(settings),
        best_epoch=stop.get("best_epoch"),
        stopped_epoch=stop.get("stopped_epoch"),
    )


def describe_schedule(settings: TrainConfig) -> str:
    """train.schedule in words, for the report: "cosine, 2 warm-up epochs"."""
    schedule = settings.schedule
    details = {
        "constant": "",
        "cosine": f", {schedule.warmup_epochs} warm-up epochs" if schedule.warmup_epochs else "",
        "step": f", x{schedule.factor:g} every {schedule.step_epochs} epochs",
        "reduce_on_plateau": f", x{schedule.factor:g} after {schedule.patience} epochs without a lower validation loss",
    }
    return f"{schedule.kind}{details[schedule.kind]}"


def _plan_line(
    wrapped: WrappedModel, settings: TrainConfig, head_trained_on: str, replicas: int, global_batch: int
) -> str:
    if not wrapped.base_frozen:
        what = "the whole network on images"
    elif head_trained_on == "images":
        what = "the head on images " + (
            "(train.augment is on)" if settings.augment else "(train.cache_features is off)"
        )
    else:
        what = "the head on cached features of the frozen base"
    return (
        f"training {wrapped.trainable_params:,} of {wrapped.total_params:,} parameters for {settings.epochs} epochs: "
        f"{what}; {settings.precision}; {replicas} replica(s), batch {global_batch}"
    )


def checkpoint_dir_for(run: RunContext, key: str) -> Path:
    """The checkpoint folder of one training: keyed on model, data and settings, never on a run, so a
    rerun, a task retry or another worker's attempt resumes it."""
    return run.local_root / run.pipeline / "checkpoints" / key


def train_here(
    wrapped: WrappedModel,
    tfrecords: TFRecordSet,
    settings: TrainConfig,
    fine_tune: FineTuneConfig | None,
    run: RunContext,
    finished: Callable[[str], TrainedModel | None] = lambda key: None,
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
        # On object storage the checkpoints are uploaded each epoch: a lost worker's successor,
        # on another machine, resumes from them.
        sync = CheckpointSync(store_for(run.artifacts_root), checkpoint_dir) if is_remote(run.artifacts_root) else None
        if sync is not None and sync.restore():
            run_logger().info(f"resuming from the checkpoints at {sync.url}")
        trained = train_model(
            wrapped,
            tfrecords,
            settings,
            checkpoint_dir,
            run.stage_dir("train"),
            fine_tune,
            progress_label=f"{run.pipeline} run {run.run_id}, training",
            feature_cache=base_features.cache_dir(run.local_root, run.pipeline, wrapped, tfrecords, settings.precision),
            after_epoch=sync.send_changes if sync else None,
        )
        if sync is not None:
            sync.remove()
        return trained


@stage_task(retries=2, retry_delay_seconds=[10, 60])
def train(
    wrapped: WrappedModel,
    tfrecords: TFRecordSet,
    settings: TrainConfig,
    fine_tune: FineTuneConfig | None,
    run: RunContext,
) -> TrainedModel:
    """Prefect task over train_model: in this process, or as flow runs on the workers of the
    pipeline's `train.work_pool` (a lost worker's attempt is started again there). A retry resumes
    from the last completed epoch."""
    if settings.work_pool:
        from convflow.runtime.work_pool import train_on_pool

        return train_on_pool(wrapped, tfrecords, settings, fine_tune, run)
    return train_here(wrapped, tfrecords, settings, fine_tune, run)
