"""Freeze and wrap, train the head, fine-tune the top: what changes and what must not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from convflow.config.schema import DataConfig, FineTuneConfig, ModelConfig, TrainConfig
from convflow.tasks.build_base import build_base_model
from convflow.tasks.download_and_split import split_dataset
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.to_tfrecords import write_tfrecords
from convflow.tasks.train import train_model

# Real ImageNet features (see ../shared/data/README.md); random MobileNet features at 32x32 are
# mostly dead ReLUs, which would leave the head's kernel without gradient.
MOBILENET_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def _mobilenet(**extra) -> ModelConfig:
    return ModelConfig(base="mobilenet", alpha=0.25, weights=str(MOBILENET_WEIGHTS), **extra)


@pytest.fixture(scope="module")
def rgb_tfrecords(tmp_path_factory):
    """Two colour classes of 32x32 images: reddish and bluish, with noise so each is unique."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / "images" / label).mkdir(parents=True)
        for index in range(40):
            pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            pixels[..., channel] += 120
            Image.fromarray(pixels).save(root / "images" / label / f"{index}.png")
    data = DataConfig(source=f"folder:{root / 'images'}", image_size=(32, 32), channels=3)
    split_set = split_dataset(data, root / "split")
    return write_tfrecords(split_set, data, root / "tfrecords")


def _weights_by_layer(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.array(weight) for weight in layer.weights] for layer in model.layers if layer.weights}


def _wrapped(tmp_path, tfrecords, model_config):
    base = build_base_model(model_config, tfrecords, seed=0, output_dir=tmp_path / "base")
    return freeze_and_wrap_model(base, model_config, len(tfrecords.label_names), 0, tmp_path / "wrapped")


def _load(path):
    import keras

    import convflow.modeling.layers  # noqa: F401

    return keras.models.load_model(path, compile=False)


def test_head_training_leaves_frozen_base_bit_identical(tmp_path, rgb_tfrecords):
    config = _mobilenet()
    wrapped = _wrapped(tmp_path, rgb_tfrecords, config)
    assert wrapped.base_frozen and wrapped.trainable_params < wrapped.total_params
    before = _load(wrapped.model_path)
    trained = train_model(
        wrapped, rgb_tfrecords, TrainConfig(epochs=2, batch_size=16), tmp_path / "ckpt", tmp_path / "train"
    )
    after = _load(trained.model_path)
    base_before = _weights_by_layer(before.get_layer("base"))
    base_after = _weights_by_layer(after.get_layer("base"))
    assert base_before.keys() == base_after.keys()
    for name, weights in base_before.items():  # kernels and BatchNorm moving statistics alike
        for old, new in zip(weights, base_after[name]):
            np.testing.assert_array_equal(old, new, err_msg=name)
    head_before, head_after = before.get_layer("logits").get_weights(), after.get_layer("logits").get_weights()
    assert not np.array_equal(head_before[0], head_after[0])


def test_fine_tuning_changes_only_the_unfrozen_top(tmp_path, rgb_tfrecords):
    fine_tune = FineTuneConfig(epochs=1, unfreeze_top=6, learning_rate=1e-3)
    config = _mobilenet(fine_tune=fine_tune)
    wrapped = _wrapped(tmp_path, rgb_tfrecords, config)
    before = _load(wrapped.model_path).get_layer("base")
    trained = train_model(
        wrapped, rgb_tfrecords, TrainConfig(epochs=1, batch_size=16), tmp_path / "ckpt", tmp_path / "train", fine_tune
    )
    assert trained.epochs == 2
    after = _load(trained.model_path).get_layer("base")
    top = {layer.name for layer in before.layers[-6:]}
    changed = set()
    for layer_before, layer_after in zip(before.layers, after.layers):
        for old, new in zip(layer_before.weights, layer_after.weights):
            if not np.array_equal(np.array(old), np.array(new)):
                changed.add(layer_before.name)
                if "moving" in old.path:
                    pytest.fail(f"BatchNorm statistics {old.path} changed: the base must run in inference mode")
    assert changed, "fine-tuning changed nothing"
    assert changed <= top, f"layers below the top 6 changed: {sorted(changed - top)}"


def test_fine_tune_from_unknown_layer_is_a_clear_error(tmp_path, rgb_tfrecords):
    fine_tune = FineTuneConfig(epochs=1, from_layer="no_such_layer")
    config = _mobilenet(fine_tune=fine_tune)
    wrapped = _wrapped(tmp_path, rgb_tfrecords, config)
    with pytest.raises(ValueError, match="from_layer 'no_such_layer' is not a layer of the base"):
        train_model(
            wrapped,
            rgb_tfrecords,
            TrainConfig(epochs=1, batch_size=16),
            tmp_path / "ckpt",
            tmp_path / "train",
            fine_tune,
        )


def test_binary_head_trains_evaluates_and_exports(tmp_path, rgb_tfrecords):
    from convflow.config.schema import EvaluateConfig
    from convflow.tasks.evaluate import evaluate_model
    from convflow.tasks.export_savedmodel import export_model

    config = _mobilenet(binary_head=True)
    wrapped = _wrapped(tmp_path, rgb_tfrecords, config)
    assert _load(wrapped.model_path).output_shape == (None, 1)
    trained = train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=3, batch_size=16, learning_rate=0.01),
        tmp_path / "ckpt",
        tmp_path / "train",
    )
    losses = pq.read_table(trained.history_parquet).column("loss").to_pylist()
    assert losses[-1] < losses[0]  # binary cross-entropy on the one logit goes down
    evaluation = evaluate_model(trained, rgb_tfrecords, EvaluateConfig(), tmp_path / "evaluate")
    probabilities = np.stack(pq.read_table(evaluation.predictions_parquet).column("probabilities").to_pylist())
    assert probabilities.shape[1] == 2
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    exported = export_model(trained, rgb_tfrecords, "binary", tmp_path / "export")
    assert exported.max_abs_difference <= 1e-5


def test_binary_head_needs_two_classes(tmp_path):
    import keras

    from convflow.tasks.freeze_and_wrap import wrap

    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()], name="base")
    with pytest.raises(ValueError, match="binary_head needs exactly two classes; the data has 3"):
        wrap(base, ModelConfig(base="mnist_cnn", binary_head=True), num_classes=3, seed=0)
