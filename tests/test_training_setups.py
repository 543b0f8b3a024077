"""How training runs: mixed precision, two replicas (the multi-GPU path on two logical CPUs), TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_transfer import _load, _mobilenet, rgb_tfrecords  # noqa: F401  (fixture)

from conftest import data_config, subprocess_env
from convflow.config.schema import EvaluateConfig, FineTuneConfig, ModelConfig, TrainConfig
from convflow.tasks.build_base import build_base_model
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.evaluate import evaluate_model
from convflow.tasks.export_savedmodel import export_model
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tasks.train import train_model


def _saved_model_probabilities(saved_model: str, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)  # keep referenced while calling its signature
    probabilities = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    assert probabilities.dtype == tf.float32
    return probabilities.numpy()


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_evaluates_and_exports_float32(tmp_path, rgb_tfrecords, precision):  # noqa: F811
    config = _mobilenet(fine_tune=FineTuneConfig(epochs=1, unfreeze_top=6, learning_rate=1e-4))
    base = build_base_model(config, rgb_tfrecords, seed=0, output_dir=tmp_path / "base")
    wrapped = freeze_and_wrap_model(base, config, 2, 0, tmp_path / "wrapped")
    settings = TrainConfig(epochs=2, batch_size=16, learning_rate=0.01, precision=precision)
    # The head on features the base computed in `precision`, then fine-tuning on images in it.
    trained = train_model(
        wrapped,
        rgb_tfrecords,
        settings,
        tmp_path / "ckpt",
        tmp_path / "train",
        config.fine_tune,
        feature_cache=tmp_path / "cache",
    )
    assert trained.precision == precision and trained.head_trained_on == "cached features"
    losses = pq.read_table(trained.history_parquet).column("loss").to_pylist()
    assert len(losses) == 3 and all(np.isfinite(losses))
    saved = _load(trained.model_path)  # saved in float32: evaluation and serving see one model
    assert {layer.dtype_policy.name for layer in saved.get_layer("base").layers} == {"float32"}

    evaluation = evaluate_model(trained, rgb_tfrecords, EvaluateConfig(), tmp_path / "evaluate")
    assert evaluation.test_accuracy > 0.5
    exported = export_model(trained, rgb_tfrecords, precision, tmp_path / "export", evaluation)
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(_saved_model_probabilities(exported.saved_model, images).sum(axis=1), 1.0, rtol=1e-6)


def test_tensorboard_reads_back_epoch_scalars_and_settings(tmp_path, digits_wrapped, digits_tfrecords):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = TrainConfig(epochs=3, batch_size=128, learning_rate=0.002)
    trained = train_model(digits_wrapped, digits_tfrecords, settings, tmp_path / "ckpt", tmp_path / "train")
    assert trained.tensorboard_dir == str(tmp_path / "train" / "tensorboard")
    history = pq.read_table(trained.history_parquet).to_pydict()

    def scalars(run: str, tag: str) -> list[float]:
        events = EventAccumulator(str(Path(trained.tensorboard_dir) / run))
        events.Reload()
        return [
            float(np.asarray(__import__("tensorflow").make_ndarray(event.tensor_proto)))
            for event in events.Tensors(tag)
        ]

    np.testing.assert_allclose(scalars("train", "epoch_loss"), history["loss"], rtol=1e-5)
    np.testing.assert_allclose(scalars("train", "epoch_accuracy"), history["accuracy"], rtol=1e-5)
    np.testing.assert_allclose(scalars("validation", "epoch_loss"), history["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(scalars("train", "epoch_learning_rate"), [0.002] * 3, rtol=1e-6)
    settings_events = EventAccumulator(trained.tensorboard_dir)
    settings_events.Reload()
    assert "_hparams_/session_start_info" in settings_events.Tags()["tensors"]


REPLICA_DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import tensorflow as tf

    # Two logical CPU devices before TensorFlow starts: MirroredStrategy then trains on both.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from convflow.config.schema import TrainConfig
    from convflow.tasks.export_savedmodel import export_model
    from convflow.core.records import TFRecordSet, WrappedModel
    from convflow.tasks.train import train_model

    wrapped, tfrecords, root = (WrappedModel.model_validate_json(Path(sys.argv[1]).read_text()),
                                TFRecordSet.model_validate_json(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
    settings = TrainConfig(epochs=int(sys.argv[4]), batch_size=16, checkpoint_seconds=0)
    trained = train_model(wrapped, tfrecords, settings, root / "checkpoint", root / "train")
    exported = export_model(trained, tfrecords, "replicas", root / "export")
    print(json.dumps({"replicas": trained.replicas, "resumed_from_epoch": trained.resumed_from_epoch,
                      "max_abs_difference": exported.max_abs_difference, "saved_model": exported.saved_model}))
""")


def _history_lines(root: Path) -> int:
    log = root / "checkpoint" / "history.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.e2e
@pytest.mark.slow
def test_two_replicas_killed_mid_training_resume_and_export(tmp_path):
    data = data_config("sklearn:digits", image_size=(20, 20), channels=1)  # about a second per epoch
    tfrecords = write_tfrecords(split_dataset(data, tmp_path / "split"), data, tmp_path / "tfrecords")
    model = ModelConfig(base="mnist_cnn")
    base = build_base_model(model, tfrecords, 0, tmp_path / "base")
    wrapped = freeze_and_wrap_model(base, model, len(tfrecords.label_names), 0, tmp_path / "wrapped")
    (tmp_path / "wrapped.json").write_text(wrapped.model_dump_json())
    (tmp_path / "tfrecords.json").write_text(tfrecords.model_dump_json())
    (tmp_path / "driver.py").write_text(REPLICA_DRIVER)
    epochs, root = 6, tmp_path / "training"
    command = [
        sys.executable,
        str(tmp_path / "driver.py"),
        str(tmp_path / "wrapped.json"),
        str(tmp_path / "tfrecords.json"),
        str(root),
        str(epochs),
    ]

    first = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while _history_lines(root) < 2:  # two epochs checkpointed, the third training
        assert first.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "training never reached its third epoch"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (root / "train" / "model.keras").exists()

    second = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert 2 <= result["resumed_from_epoch"] < epochs
    assert result["max_abs_difference"] <= 1e-5
    history = pq.read_table(root / "train" / "history.parquet").to_pydict()
    assert history["epoch"] == list(range(1, epochs + 1))
