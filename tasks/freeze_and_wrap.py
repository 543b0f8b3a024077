"""Stage 4, freeze_and_wrap: base (frozen when pretrained) + pooling + dropout + dense head."""

from __future__ import annotations

from pathlib import Path

from convflow.config.model_zoo import get_base_spec
from convflow.config.schema import ModelConfig
from convflow.core.context import RunContext
from convflow.core.hashing import hash_json
from convflow.core.records import BaseNetwork, WrappedModel
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output


def _pooling(kind: str):
    from keras import layers

    return {
        "avg": layers.GlobalAveragePooling2D,
        "max": layers.GlobalMaxPooling2D,
        "flatten": layers.Flatten,
    }[kind](name="pool")


def wrap(base, model: ModelConfig, num_classes: int, seed: int):
    """Return an uncompiled classifier over `base` that outputs logits.

    A frozen base is called with training=False so its BatchNorm layers stay in inference
    mode even when the head trains (and later when the base is unfrozen for fine-tuning).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    base.trainable = not model.frozen
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    features = base(inputs, training=False) if model.frozen else base(inputs)
    if len(features.shape) == 4:
        features = _pooling(model.pooling or get_base_spec(model.base).default_pooling)(features)
    if model.dropout:
        features = layers.Dropout(model.dropout, name="head_dropout")(features)
    if model.binary_head and num_classes != 2:
        raise ValueError(f"model.binary_head needs exactly two classes; the data has {num_classes}")
    logits = layers.Dense(1 if model.binary_head else num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name=f"convflow_{model.base}")


def count_params(weights) -> int:
    return int(sum(int(weight.numpy().size) for weight in weights))


def freeze_and_wrap_model(
    base_model: BaseNetwork, model: ModelConfig, num_classes: int, seed: int, output_dir: Path
) -> WrappedModel:
    """Load the base, freeze it when pretrained, add the head and save the untrained classifier."""
    import keras

    import convflow.modeling.layers  # noqa: F401  (registers custom layers for loading)

    base = keras.models.load_model(base_model.model_path, compile=False)
    classifier = wrap(base, model, num_classes, seed)
    with staged_output(output_dir) as staging:
        classifier.save(staging / "wrapped.keras")
    return WrappedModel(
        output_dir=str(output_dir),
        model_path=str(output_dir / "wrapped.keras"),
        base_frozen=model.frozen,
        trainable_params=count_params(classifier.trainable_weights),
        total_params=count_params(classifier.weights),
        fingerprint=hash_json([base_model.fingerprint, model, num_classes, seed])[:24],
        features_fingerprint=hash_json(
            [base_model.fingerprint, model.pooling or get_base_spec(model.base).default_pooling]
        )[:24],
    )


@stage_task()
def freeze_and_wrap(
    base_model: BaseNetwork, model: ModelConfig, num_classes: int, seed: int, run: RunContext
) -> WrappedModel:
    """Prefect task over freeze_and_wrap_model."""
    return freeze_and_wrap_model(base_model, model, num_classes, seed, run.stage_dir("freeze_and_wrap"))
