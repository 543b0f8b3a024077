"""The Keras callbacks of the train stage: what each epoch leaves behind for people and for resuming.

- EpochRecorder: one JSON line per epoch (the history that survives resumes) and one log line per
  epoch through Prefect's run logger, so a run's Logs tab in the UI tells how training went.
- progress_artifact: the run's progress bar in the Prefect UI.
- tensorboard: per-epoch scalars and the run's settings for `tensorboard --logdir`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from convflow.core.run_log import run_logger


def _format_metrics(logs: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in logs.items() if name != "learning_rate")


def epoch_recorder(path: Path, total_epochs: int):
    """A callback that appends each finished epoch to `path` (JSON lines), logs it, and notes where fit began.

    fit's own History would hold only the epochs of the last attempt. Epochs trained after the
    last checkpoint are trained and logged again by a resumed run; the last record of an epoch wins.
    """
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        first_epoch: int | None = None
        phase = "head"
        epochs_run = 0  # in this process: a resumed run does not count the epochs restored

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._started
            self.epochs_run += 1
            metrics = {key: float(value) for key, value in (logs or {}).items()}
            row = {
                "epoch": epoch + 1,
                "phase": self.phase,
                "seconds": seconds,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **metrics,
            }
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            run_logger().info(
                f"epoch {epoch + 1}/{total_epochs} ({self.phase}): {_format_metrics(metrics)}; {seconds:.1f} s"
            )

    return EpochRecorder()


def progress_artifact(label: str | None, total_epochs: int):
    """A callback that shows training's progress in the Prefect UI: a progress artifact of the
    train task run (or of the train flow run on a work pool), "<label>: epochs of <total>", updated
    at each epoch's end (a resumed run starts from its epoch). None without a label or outside a
    Prefect run. A failed update is logged; training goes on.
    """
    from convflow.runtime.progress import ProgressArtifact, in_prefect_run

    if label is None or not in_prefect_run():
        return None
    import keras

    class EpochProgress(keras.callbacks.Callback):
        artifact = ProgressArtifact(f"{label}: epochs of {total_epochs}", "training")

        def on_epoch_end(self, epoch, logs=None):
            self.artifact.show(100.0 * (epoch + 1) / total_epochs)

    return EpochProgress()


def after_each_epoch(callback):
    """A Keras callback that calls `callback()` at each epoch's end, after the callbacks before it
    in the list (the checkpoint's) have run."""
    import keras

    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs=None: callback())


def write_hyperparameters(log_dir: Path, settings: dict) -> None:
    """The run's settings in TensorBoard's HParams tab (flat name -> number, string or bool)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams

    values = {name: value for name, value in settings.items() if isinstance(value, (bool, int, float, str))}
    with tf.summary.create_file_writer(str(log_dir)).as_default():
        hparams.hparams(values)


def tensorboard(log_dir: Path):
    """Keras' TensorBoard callback, per epoch: losses, accuracies and the learning rate under
    `log_dir`/train and `log_dir`/validation. No graph or histograms: they cost time every run and
    few look at them."""
    import keras

    return keras.callbacks.TensorBoard(str(log_dir), histogram_freq=0, write_graph=False, update_freq="epoch")


def early_stopping(patience: int, metric: str, state_dir: Path):
    """Keras' EarlyStopping with restore_best_weights, whose state survives a resume.

    Keras keeps the best value, its epoch, the epochs waited and the best weights in memory only,
    so a run resumed from a checkpoint would forget the best epoch before the crash. `save_state`
    (called by the checkpoint callback just before it saves) writes them to `state_dir`, the
    checkpoint's folder, and a resumed fit reads them back: the state matches the checkpoint's epoch.
    """
    import keras
    import numpy as np

    state_file, weights_file = state_dir / "early_stopping.json", state_dir / "best.weights.npz"

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if state_file.exists() and weights_file.exists():
                state = json.loads(state_file.read_text())
                self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
                with np.load(weights_file) as stored:
                    self.best_weights = [stored[f"w{index}"] for index in range(len(stored.files))]

        def save_state(self):
            if self.best_weights is None:
                return
            from convflow.core.storage import atomic_file

            state_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(weights_file) as temporary, open(temporary, "wb") as handle:
                np.savez(handle, **{f"w{index}": weight for index, weight in enumerate(self.best_weights)})
            with atomic_file(state_file) as temporary:
                Path(temporary).write_text(
                    json.dumps({"best": float(self.best), "best_epoch": self.best_epoch, "wait": self.wait})
                )

    return ResumableEarlyStopping(monitor=metric, patience=patience, restore_best_weights=True, verbose=0)
