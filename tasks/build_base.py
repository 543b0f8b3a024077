"""Stage 3, build_base: a seed CNN or a tf.keras.applications base, with its preprocessing inside."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

from convflow.config.model_zoo import BaseSpec, get_base_spec
from convflow.config.schema import ModelConfig
from convflow.core.context import RunContext
from convflow.core.hashing import hash_json, sha256_file
from convflow.core.object_store import local_copy
from convflow.core.records import BaseNetwork, TFRecordSet
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output

IMAGENET_MEANS_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
WEIGHTS_HOST = ("storage.googleapis.com", 443)
# (filters, kernel size) of the two convolutions: the MNIST tutorial's CNN and the low-level ConvNet's.
TWO_CONV_CNNS = {"mnist_cnn": ((32, 5), (64, 5)), "convnet": ((32, 5), (64, 3))}


class WeightsError(ValueError):
    """Weights that cannot be loaded: a missing or wrong file, or imagenet while offline."""


def _seed_cnn(name: str, inputs):
    """The tutorials' CNNs, up to (not including) their classification layer."""
    import keras
    from keras import layers

    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if name in TWO_CONV_CNNS:  # conv + pool twice, then a dense layer of 1024
        for filters, kernel in TWO_CONV_CNNS[name]:
            x = layers.Conv2D(filters, kernel, padding="same", activation="relu")(x)
            x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        return layers.Dense(1024, activation="relu")(x)
    if name == "augment_cnn":
        for filters in (16, 32, 64):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(0.2)(x)
        x = layers.Flatten()(x)
        return layers.Dense(128, activation="relu")(x)
    if name == "cifar_cnn":
        max_norm = keras.constraints.MaxNorm(3)
        x = layers.Conv2D(32, 3, padding="same", activation="relu", kernel_constraint=max_norm)(x)
        x = layers.Dropout(0.3)(x)
        x = layers.Conv2D(32, 3, padding="same", activation="relu", kernel_constraint=max_norm)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        return layers.Dense(512, activation="relu", kernel_constraint=max_norm)(x)
    raise ValueError(f"unknown seed CNN {name!r}")


def _preprocess(spec: BaseSpec, inputs):
    """The application's own `preprocess_input`, as layers, so the saved model takes raw pixels."""
    from keras import layers

    from convflow.modeling.layers import ReverseChannels

    if spec.preprocessing == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(inputs)
    if spec.preprocessing == "torch":
        x = layers.Rescaling(1.0 / 255)(inputs)
        variance = [std**2 for std in IMAGENET_STD_RGB]
        return layers.Normalization(mean=IMAGENET_MEAN_RGB, variance=variance, name="preprocess")(x)
    if spec.preprocessing == "caffe":
        x = ReverseChannels()(inputs)
        return layers.Normalization(mean=IMAGENET_MEANS_BGR, variance=(1.0, 1.0, 1.0), name="preprocess")(x)
    return inputs


def resolve_run_weights(weights: str, artifacts_root: str | Path) -> Path:
    """The trained Keras model that `run:<pipeline>[@<run-id>]` names: the pipeline's production
    model, or the given run's.

    Raises:
        WeightsError: no such production model or run, or its model file is gone.
    """
    from convflow.catalog import registry, tables

    pipeline, _, run_id = weights.removeprefix("run:").partition("@")
    if run_id:
        runs = tables.read_catalog(artifacts_root).to_pylist()
        rows = [r for r in runs if r["pipeline"] == pipeline and r["run_id"] == run_id]
        if not rows:
            raise WeightsError(
                f"model.weights: {weights!r}: no run {run_id!r} of pipeline {pipeline!r} in "
                f"{tables.catalog_location(artifacts_root)}"
            )
        path = rows[-1]["model"]
    else:
        production = registry.current(artifacts_root, pipeline)
        if production is None:
            raise WeightsError(
                f"model.weights: {weights!r}: pipeline {pipeline!r} has no production model under "
                f"{registry.models_location(artifacts_root, pipeline)}; run it first"
            )
        path = production.model
    try:
        local = local_copy(path)
    except FileNotFoundError:
        local = Path("/nonexistent")
    if not local.is_file():
        raise WeightsError(f"model.weights: {weights!r}: its model file {path} is gone")
    return local


def weights_fingerprint(model: ModelConfig, artifacts_root: str | Path) -> str:
    """What model.weights points at now, for build_base's cache key: a weights file's or a
    run's model's content hash, or the keyword itself."""
    if model.weights.startswith("run:"):
        return sha256_file(resolve_run_weights(model.weights, artifacts_root))
    if model.weights not in ("imagenet", "none") and Path(model.weights).is_file():
        return sha256_file(model.weights)
    return model.weights


def _base_from_run(model: ModelConfig, input_shape: tuple[int, int, int], artifacts_root: str | Path):
    import keras

    import convflow.modeling.layers  # noqa: F401  (registers custom layers for loading)

    source = keras.models.load_model(resolve_run_weights(model.weights, artifacts_root), compile=False)
    base = source.get_layer("base")
    if tuple(base.input_shape[1:]) != tuple(input_shape):
        raise WeightsError(
            f"model.weights: {model.weights!r} takes images {tuple(base.input_shape[1:])}, "
            f"this pipeline gives {tuple(input_shape)}: set data.image_size and data.channels to match"
        )
    base.trainable = True
    return base


def _check_weights_reachable(model: ModelConfig) -> None:
    if model.weights == "imagenet":
        try:
            with socket.create_connection(WEIGHTS_HOST, timeout=3):
                return
        except OSError:
            raise WeightsError(
                f"model.weights: imagenet needs to download {model.base} weights and this machine is "
                f"offline; put the .h5 file in ~/.keras/models/ or set model.weights to its path"
            ) from None
    elif model.weights != "none" and not model.weights.startswith("run:") and not Path(model.weights).is_file():
        raise WeightsError(f"model.weights: file {model.weights} does not exist")


def _application(spec: BaseSpec, model: ModelConfig, inputs):
    """The application built on `inputs` after its preprocessing, so its layers sit directly in
    the base (fine-tuning unfreezes "the top N layers" of this one flat list)."""
    import keras

    constructor = getattr(keras.applications, spec.application)
    weights = None if model.weights == "none" else model.weights
    kwargs = {"alpha": model.alpha} if model.alpha is not None else {}
    try:
        return constructor(
            include_top=False,
            weights=weights,
            input_tensor=_preprocess(spec, inputs),
            input_shape=tuple(inputs.shape[1:]),
            **kwargs,
        ).output
    except (ValueError, OSError, zipfile.BadZipFile) as error:  # .keras files are zips
        raise WeightsError(f"model.weights: cannot load {model.weights} into {spec.name}: {error}") from error


def make_base(
    model: ModelConfig, input_shape: tuple[int, int, int], seed: int, artifacts_root: str | Path | None = None
):
    """Build the base network as a Keras model named "base" taking float 0..255 images.

    Raises:
        WeightsError: imagenet offline, or weights (file or run) that are missing or do not fit.
    """
    import keras

    spec = get_base_spec(model.base)
    _check_weights_reachable(model)
    keras.utils.set_random_seed(seed)
    if model.weights.startswith("run:"):
        return _base_from_run(model, input_shape, artifacts_root or "artifacts")
    inputs = keras.Input(shape=input_shape, name="image")
    if spec.kind == "seed":
        outputs = _seed_cnn(spec.name, inputs)
    else:
        outputs = _application(spec, model, inputs)
    base = keras.Model(inputs, outputs, name="base")
    if spec.kind == "seed" and model.pretrained:
        try:
            base.load_weights(model.weights)
        except (ValueError, OSError, zipfile.BadZipFile) as error:  # .keras files are zips
            raise WeightsError(f"model.weights: cannot load {model.weights} into {spec.name}: {error}") from error
    return base


def build_base_model(
    model: ModelConfig, tfrecords: TFRecordSet, seed: int, output_dir: Path, artifacts_root: str | Path | None = None
) -> BaseNetwork:
    """Build and save the base network for images of `tfrecords`' size and channels."""
    input_shape = (*tfrecords.image_size, tfrecords.channels)
    base = make_base(model, input_shape, seed, artifacts_root)
    with staged_output(output_dir) as staging:
        base.save(staging / "base.keras")
    weights_hash = weights_fingerprint(model, artifacts_root or "artifacts")
    return BaseNetwork(
        output_dir=str(output_dir),
        model_path=str(output_dir / "base.keras"),
        base=model.base,
        input_shape=input_shape,
        pretrained=model.pretrained,
        fingerprint=hash_json([model, input_shape, seed, weights_hash])[:24],
    )


@stage_task(retries=2, retry_delay_seconds=[10, 60])
def build_base(
    model: ModelConfig, weights_fingerprint: str, tfrecords: TFRecordSet, seed: int, run: RunContext
) -> BaseNetwork:
    """Prefect task over build_base_model; `weights_fingerprint` keys the cache on the weights' content."""
    return build_base_model(model, tfrecords, seed, run.stage_dir("build_base"), run.artifacts_root)
