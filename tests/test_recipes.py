"""Training recipes: early stopping that keeps the best epoch's weights (and survives a kill), the
learning-rate schedules, AdamW, label smoothing, balanced class weights and augmentation layers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import save_image
from convflow.config.schema import DataConfig, ModelConfig, TrainConfig
from convflow.tasks.build_base import build_base_model
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tasks.train import train_model

PATIENCE = 2
EPOCHS = 25
# Random labels: nothing generalises, so as the network memorises the training images its
# validation loss rises after the first epoch or two; early stopping must then stop.
STOPPING = TrainConfig(
    epochs=EPOCHS,
    batch_size=16,
    learning_rate=0.003,
    seed=0,
    deterministic=True,
    checkpoint_seconds=0,
    early_stopping={"patience": PATIENCE, "metric": "val_loss"},
)


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """(TFRecordSet, WrappedModel): 3 classes of 16x16 noise images, and mnist_cnn from scratch."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        for index in range(40):
            save_image(root / "images" / label / f"{index}.png", rng.integers(0, 256, (16, 16, 1), dtype=np.uint8))
    data = DataConfig(
        source=f"folder:{root / 'images'}",
        image_size=(16, 16),
        channels=1,
        split={"train": 0.5, "validation": 0.3, "test": 0.2},
    )
    tfrecords = write_tfrecords(split_dataset(data, root / "split"), data, root / "tfrecords")
    model = ModelConfig(base="mnist_cnn")
    base = build_base_model(model, tfrecords, seed=0, output_dir=root / "base")
    return tfrecords, freeze_and_wrap_model(base, model, 3, 0, root / "wrapped")


def _validation_loss(model_path: str, tfrecords) -> float:
    """The saved model's mean cross-entropy over the validation split, as fit's val_loss computes it."""
    import keras

    from convflow.tfrecords import features

    model = keras.models.load_model(model_path, compile=False)
    losses = [
        keras.losses.sparse_categorical_crossentropy(labels, model(images, training=False), from_logits=True)
        for images, labels in features.read_dataset(
            tfrecords.shards["validation"], tfrecords.image_size, tfrecords.channels, 16
        )
    ]
    return float(np.concatenate([np.asarray(loss) for loss in losses]).mean())


def _history(trained) -> dict:
    return pq.read_table(trained.history_parquet).to_pydict()


@pytest.fixture(scope="module")
def stopped(noise, tmp_path_factory):
    tfrecords, wrapped = noise
    root = tmp_path_factory.mktemp("stopped")
    return train_model(wrapped, tfrecords, STOPPING, root / "checkpoint", root / "train")


@pytest.mark.xdist_group("early-stopping")
def test_early_stopping_stops_within_patience_and_keeps_the_best_epochs_weights(noise, stopped):
    tfrecords, _ = noise
    history = _history(stopped)
    best = int(np.argmin(history["val_loss"])) + 1

    assert stopped.best_epoch == best
    assert stopped.stopped_epoch == best + PATIENCE < EPOCHS  # stopped at the first chance after the best
    assert history["epoch"] == list(range(1, best + PATIENCE + 1))
    assert history["val_loss"][-1] > history["val_loss"][best - 1]  # the last epoch was worse
    assert _validation_loss(stopped.model_path, tfrecords) == pytest.approx(history["val_loss"][best - 1], rel=1e-4)


def _train_killed_after(epoch: int, wrapped, tfrecords, root: Path) -> None:
    """In a child process: train_model, SIGKILLed by itself at the end of `epoch`, once the epoch is
    checkpointed and recorded (its TensorBoard callback, which runs after both, is the killer)."""
    import keras

    from convflow.modeling import train_callbacks

    class Killer(keras.callbacks.Callback):
        def on_epoch_end(self, index, logs=None):
            if index + 1 == epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    train_callbacks.tensorboard = lambda log_dir: Killer()
    train_model(wrapped, tfrecords, STOPPING, root / "checkpoint", root / "train")


@pytest.mark.e2e
@pytest.mark.xdist_group("early-stopping")
def test_a_run_killed_after_the_best_epoch_resumes_and_still_keeps_its_weights(noise, stopped, tmp_path):
    tfrecords, wrapped = noise
    best = stopped.best_epoch
    kill_at = best + 1  # after the best epoch, before patience runs out
    child = multiprocessing.get_context("spawn").Process(
        target=_train_killed_after, args=(kill_at, wrapped, tfrecords, tmp_path)
    )
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    state = json.loads((tmp_path / "checkpoint" / "backup" / "early_stopping.json").read_text())
    assert state["best_epoch"] + 1 == best  # the checkpoint holds early stopping's state

    resumed = train_model(wrapped, tfrecords, STOPPING, tmp_path / "checkpoint", tmp_path / "train")

    assert resumed.resumed_from_epoch == kill_at
    assert resumed.best_epoch == best and resumed.stopped_epoch == best + PATIENCE
    best_loss = _history(resumed)["val_loss"][best - 1]
    assert best_loss == _history(stopped)["val_loss"][best - 1]  # deterministic up to the kill
    assert _validation_loss(resumed.model_path, tfrecords) == pytest.approx(best_loss, rel=1e-4)


# ----------------------------------------------------------------------------- the other settings


def test_cosine_warms_up_then_decays_and_step_drops_by_its_factor():
    from convflow.config.schema import LearningRateSchedule
    from convflow.modeling.train_recipe import learning_rate

    cosine = learning_rate(LearningRateSchedule(kind="cosine", warmup_epochs=2), 0.01, epochs=10, steps_per_epoch=5)
    rates = [float(cosine(step)) for step in (0, 5, 10, 30, 50)]
    assert rates[0] == 0 and rates[1] == pytest.approx(0.005) and rates[2] == pytest.approx(0.01)
    assert rates[2] > rates[3] > rates[4] and rates[4] == pytest.approx(0, abs=1e-9)
    step = learning_rate(LearningRateSchedule(kind="step", step_epochs=3, factor=0.5), 0.01, 10, 5)
    assert [float(step(s)) for s in (0, 14, 15, 30)] == pytest.approx([0.01, 0.01, 0.005, 0.0025])
    assert learning_rate(LearningRateSchedule(), 0.01, 10, 5) == 0.01


def test_balanced_class_weights_weigh_the_rare_class_up(tmp_path):
    from convflow.modeling.train_recipe import class_weights

    rng = np.random.default_rng(1)
    for label, count in (("many", 45), ("few", 15)):
        for index in range(count):
            save_image(tmp_path / "images" / label / f"{index}.png", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
    data = DataConfig(
        source=f"folder:{tmp_path / 'images'}",
        image_size=(8, 8),
        channels=1,
        split={"train": 0.6, "validation": 0.1, "test": 0.3},
    )
    split_set = split_dataset(data, tmp_path / "split")
    tfrecords = write_tfrecords(split_set, data, tmp_path / "tfrecords")
    rows = pq.read_table(split_set.splits_parquet).to_pydict()
    counts = np.bincount([label for label, split in zip(rows["label"], rows["split"]) if split == "train"])

    weights = class_weights(tfrecords)

    assert weights == pytest.approx({label: counts.sum() / (2 * count) for label, count in enumerate(counts)})
    assert weights[tfrecords.label_names.index("few")] > 1 > weights[tfrecords.label_names.index("many")]


def test_a_full_recipe_trains_and_records_its_schedule(digits_wrapped, digits_tfrecords, tmp_path):
    settings = TrainConfig(
        epochs=2,
        batch_size=64,
        optimizer="adamw",
        weight_decay=0.01,
        label_smoothing=0.1,
        class_weight="balanced",
        schedule={"kind": "cosine", "warmup_epochs": 1},
        augment=["flip", {"rotation": 0.05}, "zoom", "contrast", "randaugment", "mixup", "cutmix"],
    )

    trained = train_model(digits_wrapped, digits_tfrecords, settings, tmp_path / "checkpoint", tmp_path / "train")

    history = _history(trained)
    assert trained.schedule == "cosine, 1 warm-up epochs" and trained.best_epoch is None
    assert history["epoch"] == [1, 2] and history["loss"][1] < history["loss"][0]
    assert np.load(trained.augmentation_npy).shape[0] == 4 * 5  # four images, each with four augmented versions
