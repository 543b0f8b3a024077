"""The base models convflow can build, as plain data: names, minimum input sizes, preprocessing.

Kept free of TensorFlow so that `convflow validate` can check a pipeline against it quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How a tf.keras.applications base expects its pixels (its own `preprocess_input`):
# "tf" scales to [-1, 1], "torch" to ImageNet mean/std, "caffe" subtracts BGR means,
# "raw" takes 0..255 as they are (EfficientNet and ConvNeXt rescale inside themselves).
Preprocessing = Literal["unit", "tf", "torch", "caffe", "raw"]


@dataclass(frozen=True)
class BaseSpec:
    """What convflow knows about one base model before building it."""

    name: str
    kind: Literal["seed", "application"]
    min_size: int
    preprocessing: Preprocessing
    default_pooling: Literal["avg", "flatten"]
    application: str | None = None
    takes_alpha: bool = False
    imagenet_channels: int = 3


SEED_CNNS: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec("mnist_cnn", "seed", 4, "unit", "flatten"),
        BaseSpec("convnet", "seed", 4, "unit", "flatten"),
        BaseSpec("augment_cnn", "seed", 8, "unit", "flatten"),
        BaseSpec("cifar_cnn", "seed", 4, "unit", "flatten"),
    )
}

APPLICATIONS: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec("mobilenet", "application", 32, "tf", "avg", "MobileNet", takes_alpha=True),
        BaseSpec("mobilenet_v2", "application", 32, "tf", "avg", "MobileNetV2", takes_alpha=True),
        BaseSpec("mobilenet_v3_small", "application", 32, "raw", "avg", "MobileNetV3Small", takes_alpha=True),
        BaseSpec("mobilenet_v3_large", "application", 32, "raw", "avg", "MobileNetV3Large", takes_alpha=True),
        BaseSpec("vgg16", "application", 32, "caffe", "avg", "VGG16"),
        BaseSpec("vgg19", "application", 32, "caffe", "avg", "VGG19"),
        BaseSpec("inception_v3", "application", 75, "tf", "avg", "InceptionV3"),
        BaseSpec("resnet50", "application", 32, "caffe", "avg", "ResNet50"),
        BaseSpec("resnet50_v2", "application", 32, "tf", "avg", "ResNet50V2"),
        BaseSpec("resnet101_v2", "application", 32, "tf", "avg", "ResNet101V2"),
        BaseSpec("densenet121", "application", 32, "torch", "avg", "DenseNet121"),
        BaseSpec("efficientnet_b0", "application", 32, "raw", "avg", "EfficientNetB0"),
        BaseSpec("xception", "application", 71, "tf", "avg", "Xception"),
    )
}

BASES: dict[str, BaseSpec] = {**SEED_CNNS, **APPLICATIONS}


def get_base_spec(name: str) -> BaseSpec:
    """Return the spec of base model `name`.

    Raises:
        ValueError: the name is not a known base.
    """
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"unknown base model {name!r}; expected one of {sorted(BASES)}") from None
