"""The trained classifier in a process: loaded once per file, and run, or run through its serving
function, over one split of the TFRecords."""

from __future__ import annotations

import numpy as np

from convflow.core.records import TFRecordSet
from convflow.runtime.process_caches import recalled_classifier, remember_classifier
from convflow.tfrecords import features


def _graph_forward(model):
    """The model's inference pass as one TensorFlow graph: Grappler fuses each convolution with its
    bias and activation there, which eager calls cannot (faster, identical logits; benchmarks/RESULTS.md).
    The last, smaller batch is traced once more."""
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def load_classifier(model_path: str):
    """The Keras classifier at `model_path`; the same object again while that file is unchanged."""
    import keras

    import convflow.modeling.layers  # noqa: F401  (registers custom layers for loading)

    remembered = recalled_classifier(model_path)
    if remembered is not None:
        return remembered
    model = keras.models.load_model(model_path, compile=False)
    remember_classifier(model_path, model)
    return model


def predict_split(model_path: str, tfrecords: TFRecordSet, split: str, batch_size: int = 256):
    """Run the Keras model at `model_path` over one split: (images uint8, labels, example ids, logits)."""
    return predict_with(load_classifier(model_path), tfrecords, split, batch_size)


def predict_with(model, tfrecords: TFRecordSet, split: str, batch_size: int = 256):
    """Run a loaded Keras model over one split: (images uint8, labels, example ids, logits)."""
    import tensorflow as tf

    forward = _graph_forward(model)
    return _over_split(lambda pixels: np.asarray(forward(tf.cast(pixels, tf.float32))), tfrecords, split, batch_size)


def serve_split(serve, tfrecords: TFRecordSet, split: str, batch_size: int = 256):
    """Run a serving function (convflow/modeling/serving.py) over one split: (images uint8, labels, example ids,
    probabilities float64). The export stage saves that same function, so this is what the
    SavedModel must answer."""
    images, labels, ids, probabilities = _over_split(
        lambda pixels: serve(pixels)["probabilities"].numpy(), tfrecords, split, batch_size
    )
    probabilities = probabilities.astype(np.float64)
    # float32 rows sum to 1 within ~1e-7; scikit-learn's log_loss wants float64's precision
    return images, labels, ids, probabilities / probabilities.sum(axis=1, keepdims=True)


def _over_split(score, tfrecords: TFRecordSet, split: str, batch_size: int):
    """(images uint8, labels, example ids, score(uint8 image batch) stacked) over one split, in shard order."""
    import tensorflow as tf

    dataset = features.read_dataset(
        tfrecords.shards[split], tfrecords.image_size, tfrecords.channels, batch_size, cache=False, with_ids=True
    )
    images, labels, ids, outputs = [], [], [], []
    for batch_images, batch_labels, batch_ids in dataset:
        pixels = tf.cast(batch_images, tf.uint8)  # whole numbers 0..255 already: exact
        outputs.append(score(pixels))
        images.append(pixels.numpy())
        labels.append(batch_labels.numpy())
        ids += [value.decode() for value in batch_ids.numpy()]
    return np.concatenate(images), np.concatenate(labels), ids, np.concatenate(outputs)


def probabilities_from_logits(logits: np.ndarray) -> np.ndarray:
    """Class probabilities: softmax over the logits, or [1 - p, p] for a binary head's one logit."""
    logits = logits.astype(np.float64)
    if logits.shape[1] == 1:
        positive = 1.0 / (1.0 + np.exp(-logits))
        return np.concatenate([1.0 - positive, positive], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
