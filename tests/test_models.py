"""Stages 3 and 4, build_base and freeze_and_wrap: seed CNNs and small application bases, no downloads."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

import convflow.modeling.layers  # noqa: F401  (registers ReverseChannels for loading)
from conftest import REPO, write_yaml
from convflow.config.errors import ConfigError
from convflow.config.load import load_pipeline
from convflow.config.schema import ModelConfig
from convflow.core.records import TFRecordSet
from convflow.tasks.build_base import WeightsError, build_base_model, make_base
from convflow.tasks.freeze_and_wrap import freeze_and_wrap_model

SHARED_MOBILENET = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def shapes_only(image_size, channels, num_classes=3) -> TFRecordSet:
    """A TFRecordSet that only states image size and channels: all that build_base reads."""
    return TFRecordSet(
        output_dir="unused",
        shards={},
        counts={},
        image_size=image_size,
        channels=channels,
        label_names=[f"class{i}" for i in range(num_classes)],
        data_fingerprint="-",
        fingerprint="-",
    )


def build_and_wrap(model: ModelConfig, image_size, channels, tmp_path, num_classes=3, seed=0):
    base = build_base_model(model, shapes_only(image_size, channels, num_classes), seed, tmp_path / "build_base")
    wrapped = freeze_and_wrap_model(base, model, num_classes, seed, tmp_path / "freeze_and_wrap")
    return base, wrapped, keras.models.load_model(wrapped.model_path, compile=False)


def test_mnist_cnn_trains_its_base(digits_wrapped, digits_tfrecords):
    classifier = keras.models.load_model(digits_wrapped.model_path, compile=False)
    base = classifier.get_layer("base")

    assert digits_wrapped.base_frozen is False
    assert base.trainable and all(weight.trainable for weight in base.weights)
    assert digits_wrapped.trainable_params == digits_wrapped.total_params == classifier.count_params()
    assert classifier.input_shape == (None, 12, 12, 1)
    assert classifier.output_shape == (None, 10)
    logits = classifier(np.zeros((2, 12, 12, 1), np.float32), training=False).numpy()
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


def test_build_base_record(tmp_path):
    model = ModelConfig(base="mnist_cnn")
    base = build_base_model(model, shapes_only((12, 12), 1), 0, tmp_path / "build_base")

    assert base.model_path == str(tmp_path / "build_base" / "base.keras")
    assert base.input_shape == (12, 12, 1) and base.pretrained is False and base.base == "mnist_cnn"
    assert base.damaged_files() == []
    loaded = keras.models.load_model(base.model_path, compile=False)
    assert loaded.name == "base" and loaded.output_shape == (None, 1024)
    assert [path.name for path in tmp_path.iterdir()] == ["build_base"]  # no .tmp- folder left


def test_same_seed_same_weights(tmp_path):
    model = ModelConfig(base="mnist_cnn")
    _, first, a = build_and_wrap(model, (12, 12), 1, tmp_path / "a", seed=3)
    _, second, b = build_and_wrap(model, (12, 12), 1, tmp_path / "b", seed=3)
    _, other, c = build_and_wrap(model, (12, 12), 1, tmp_path / "c", seed=4)

    assert first.fingerprint == second.fingerprint != other.fingerprint
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not all(np.array_equal(x.numpy(), z.numpy()) for x, z in zip(a.weights, c.weights))


def test_frozen_application_base(tmp_path):
    model = ModelConfig(base="mobilenet", alpha=0.25, weights="none", freeze=True)
    base, wrapped, classifier = build_and_wrap(model, (32, 32), 3, tmp_path, num_classes=3)
    inner = classifier.get_layer("base")

    assert wrapped.base_frozen is True
    assert inner.trainable is False
    assert inner.weights and not any(weight.trainable for weight in inner.weights)
    # only the dense head trains: 256 pooled MobileNet(alpha=0.25) features -> 3 logits
    assert sorted(w.path for w in classifier.trainable_weights) == ["logits/bias", "logits/kernel"]
    assert wrapped.trainable_params == 256 * 3 + 3
    assert wrapped.total_params == classifier.count_params() > wrapped.trainable_params
    assert classifier.output_shape == (None, 3)

    # the frozen base runs BatchNorm in inference mode even when the classifier trains
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        classifier(images, training=True).numpy(), classifier(images, training=False).numpy(), atol=1e-5
    )


def test_pretrained_seed_cnn_loads_its_weights_and_freezes(tmp_path):
    source = make_base(ModelConfig(base="mnist_cnn"), (12, 12, 1), seed=5)
    weights_file = tmp_path / "seed.weights.h5"
    source.save_weights(weights_file)
    model = ModelConfig(base="mnist_cnn", weights=str(weights_file))

    base, wrapped, classifier = build_and_wrap(model, (12, 12), 1, tmp_path / "run", seed=0)

    assert base.pretrained and wrapped.base_frozen  # frozen by default when pretrained
    for loaded, saved in zip(classifier.get_layer("base").weights, source.weights):
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())
    assert sorted(w.path for w in classifier.trainable_weights) == ["logits/bias", "logits/kernel"]


def test_shared_mobilenet_weights_load(tmp_path):
    """The real ImageNet MobileNet(alpha=0.25) in ../shared/weights, at the smallest input it takes."""
    model = ModelConfig(base="mobilenet", alpha=0.25, weights=str(SHARED_MOBILENET))
    base, wrapped, classifier = build_and_wrap(model, (32, 32), 3, tmp_path)
    reference = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=str(SHARED_MOBILENET), input_shape=(32, 32, 3)
    )

    assert wrapped.base_frozen and base.pretrained
    loaded = classifier.get_layer("base").weights  # the application's layers, after a weightless rescaling
    assert len(loaded) == len(reference.weights)
    for weight, expected in zip(loaded, reference.weights):
        np.testing.assert_array_equal(weight.numpy(), expected.numpy())


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "base.h5"
    model = ModelConfig(base="mnist_cnn", weights=str(missing))
    with pytest.raises(WeightsError, match=re.escape(f"model.weights: file {missing} does not exist")):
        build_base_model(model, shapes_only((12, 12), 1), 0, tmp_path / "build_base")
    assert not (tmp_path / "build_base").exists()


def test_weights_that_do_not_fit(tmp_path):
    weights_file = tmp_path / "small.weights.h5"
    make_base(ModelConfig(base="mnist_cnn"), (12, 12, 1), seed=0).save_weights(weights_file)
    model = ModelConfig(base="mnist_cnn", weights=str(weights_file))
    with pytest.raises(WeightsError, match=re.escape(f"cannot load {weights_file} into mnist_cnn")):
        make_base(model, (16, 16, 1), seed=0)  # a bigger image: the dense layer's shape differs


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_corrupt_weights_file(tmp_path, suffix):
    """A file that is not a weights file at all is a WeightsError naming it, whatever its suffix."""
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"this is not a weights file")
    with pytest.raises(WeightsError, match=re.escape(str(corrupt))):
        make_base(ModelConfig(base="mnist_cnn", weights=str(corrupt)), (12, 12, 1), seed=0)


def test_run_weights_without_such_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty artifacts root: no run of any pipeline
    with pytest.raises(WeightsError, match=re.escape("model.weights: 'run:digits-cnn'")):
        make_base(ModelConfig(base="mnist_cnn", weights="run:digits-cnn"), (12, 12, 1), seed=0)


@pytest.mark.parametrize("base", ["vgg16", "densenet121"])
def test_a_one_channel_pipeline_that_validates_also_builds(tmp_path, tiny_document, base):
    """vgg16 (caffe) and densenet121 (torch) normalise three channels; a one-channel pipeline on
    them must be refused by the config, or build. Today it validates, then build_base fails
    inside Keras with a broadcasting error."""
    tiny = tiny_document["pipelines"]["tiny"]
    tiny["model"] = {"base": base}
    tiny["data"]["image_size"] = [32, 32]
    path = write_yaml(tmp_path / "pipelines.yaml", tiny_document)
    try:
        spec = load_pipeline(path, "tiny")
    except ConfigError as error:
        assert "channels" in str(error)
        return
    base_model = make_base(spec.model, (32, 32, 1), seed=0)
    assert base_model.output_shape[-1] > 0
