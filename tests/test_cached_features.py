"""The head phase on the frozen base's cached features: the same model as base + head, computed once."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_transfer import _load, _mobilenet, _weights_by_layer, rgb_tfrecords  # noqa: F401  (fixture)

from convflow.config.schema import FineTuneConfig, TrainConfig
from convflow.modeling import base_features
from convflow.tasks.build_base import build_base_model
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model
from convflow.tasks.train import train_model
from convflow.tfrecords.features import read_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory, rgb_tfrecords):  # noqa: F811
    """The built MobileNet 0.25 base and its frozen, wrapped classifier (avg pooling, dropout 0.2)."""
    folder = tmp_path_factory.mktemp("built")
    config = _mobilenet(dropout=0.2)
    base = build_base_model(config, rgb_tfrecords, seed=0, output_dir=folder / "base")
    wrapped = freeze_and_wrap_model(base, config, len(rgb_tfrecords.label_names), 0, folder / "wrapped")
    return base, wrapped


def _test_images(tfrecords) -> np.ndarray:
    batches = read_dataset(tfrecords.shards["test"], tfrecords.image_size, tfrecords.channels, 256, cache=False)
    return np.concatenate([images.numpy() for images, _ in batches])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_model_trained_on_cached_features_is_base_plus_head(tmp_path, rgb_tfrecords, built):  # noqa: F811
    base_record, wrapped = built
    cache = tmp_path / "feature-cache"
    trained = train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=3, batch_size=16, learning_rate=0.01),
        tmp_path / "ckpt",
        tmp_path / "train",
        feature_cache=cache,
    )
    assert trained.head_trained_on == "cached features"
    stored = np.load(cache / "train.features.npy")
    assert stored.dtype == np.float16 and stored.shape == (rgb_tfrecords.counts["train"], 256)
    losses = pq.read_table(trained.history_parquet).column("loss").to_pylist()
    assert len(losses) == 3 and losses[-1] < losses[0]

    model, built_base = _load(trained.model_path), _load(base_record.model_path)
    images = _test_images(rgb_tfrecords)
    end_to_end = _softmax(np.asarray(model(images, training=False)))
    pooled = np.asarray(built_base(images, training=False)).mean(axis=(1, 2))  # GlobalAveragePooling2D
    kernel, bias = model.get_layer("logits").get_weights()
    np.testing.assert_allclose(end_to_end, _softmax(pooled @ kernel + bias), atol=1e-5)

    trained_base, built_weights = _weights_by_layer(model.get_layer("base")), _weights_by_layer(built_base)
    assert trained_base.keys() == built_weights.keys()
    for name, weights in built_weights.items():  # kernels and BatchNorm moving statistics alike
        for built_value, trained_value in zip(weights, trained_base[name]):
            np.testing.assert_array_equal(built_value, trained_value, err_msg=name)


def test_cached_features_are_reused_and_images_path_when_augmenting(tmp_path, rgb_tfrecords, built):  # noqa: F811
    _, wrapped = built
    cache = tmp_path / "feature-cache"
    train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=1, batch_size=16),
        tmp_path / "a",
        tmp_path / "train-a",
        feature_cache=cache,
    )
    written = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npy")}
    assert set(written) == {
        "train.features.npy",
        "train.labels.npy",
        "validation.features.npy",
        "validation.labels.npy",
    }
    again = train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=2, batch_size=16),
        tmp_path / "b",
        tmp_path / "train-b",
        feature_cache=cache,
    )
    assert again.head_trained_on == "cached features"
    assert {path.name: path.stat().st_mtime_ns for path in cache.glob("*.npy")} == written

    for settings in (
        TrainConfig(epochs=1, batch_size=16, augment=True),
        TrainConfig(epochs=1, batch_size=16, cache_features=False),
    ):
        on_images = train_model(
            wrapped, rgb_tfrecords, settings, tmp_path / "c", tmp_path / "train-c", feature_cache=tmp_path / "unused"
        )
        assert on_images.head_trained_on == "images"
        assert not (tmp_path / "unused").exists()


def test_fine_tuning_after_cached_head_trains_on_images(tmp_path, rgb_tfrecords, built):  # noqa: F811
    _, wrapped = built
    fine_tune = FineTuneConfig(epochs=1, unfreeze_top=6, learning_rate=1e-4)
    trained = train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=1, batch_size=16),
        tmp_path / "ckpt",
        tmp_path / "train",
        fine_tune,
        feature_cache=tmp_path / "cache",
    )
    phases = pq.read_table(trained.history_parquet).column("phase").to_pylist()
    assert trained.head_trained_on == "cached features" and phases == ["head", "fine_tune"]


def test_front_and_head_split_needs_a_convflow_wrapper():
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))
    with pytest.raises(ValueError, match="cannot cache features: the model has no pool or base layer"):
        base_features.split_front_and_head(model)


def test_recipe_settings_hold_on_cached_features(tmp_path, rgb_tfrecords, built):  # noqa: F811
    """Label smoothing, class weights, a schedule and early stopping train the head on features as on images;
    early stopping keeps the best epoch's head."""
    _, wrapped = built
    settings = TrainConfig(
        epochs=6,
        batch_size=16,
        learning_rate=0.05,
        label_smoothing=0.1,
        class_weight="balanced",
        schedule="step",
        early_stopping={"patience": 1, "metric": "val_loss"},
        checkpoint_seconds=0,
    )

    trained = train_model(wrapped, rgb_tfrecords, settings, tmp_path / "ckpt", tmp_path / "train")

    assert trained.head_trained_on == "cached features"
    history = pq.read_table(trained.history_parquet).to_pydict()
    assert trained.best_epoch == int(np.argmin(history["val_loss"])) + 1
    assert trained.stopped_epoch in (None, trained.best_epoch + 1)
    import keras

    model, smoothed = (
        _load(trained.model_path),
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    )
    batches = read_dataset(rgb_tfrecords.shards["validation"], rgb_tfrecords.image_size, 3, 256, cache=False)
    images, labels = (np.concatenate(parts) for parts in zip(*((x.numpy(), y.numpy()) for x, y in batches)))
    loss = float(smoothed(np.eye(2)[labels], model(images, training=False)))
    assert loss == pytest.approx(history["val_loss"][trained.best_epoch - 1], rel=1e-3)  # the best epoch's head
