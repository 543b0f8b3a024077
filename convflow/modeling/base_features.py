"""The frozen base's features, computed once: the head phase trains on them instead of images.

With a frozen base (inference mode) and no augmentation, the base's output for an image is the same
in every epoch, so running the base over every image in every epoch (as the tutorials do) repeats
the same work `epochs` times. Here the model's frozen front (the base and the pooling after it,
which has no weights) runs once per split; its outputs are stored as float16 (the accuracy it costs
is measured in benchmarks/RESULTS.md) in a cache keyed by the base's fingerprint and the TFRecords'
fingerprint, so variants and reruns with the same base and data reuse them. The head (dropout +
dense) is made of the wrapped model's own layer objects, so training it trains the wrapped model,
which is then saved whole: evaluation, export and serving see base + head as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convflow.core.hashing import hash_json
from convflow.core.records import TFRecordSet, WrappedModel
from convflow.core.storage import atomic_file, locked
from convflow.tfrecords import features

FEATURE_DTYPE = np.float16
# The last layer of the frozen front, in the order wrap() builds a classifier: the pooling when
# the base's output is a feature map, else the base itself.
FRONT_LAYERS = ("pool", "base")
# Images per call of the base while extracting: large batches amortise each call's overhead.
EXTRACT_BATCH = 256


@dataclass
class SplitFeatures:
    features: np.ndarray  # float16, examples x feature size, in the shards' order
    labels: np.ndarray  # int64


def applies(wrapped: WrappedModel, augment: bool, cache_features: bool) -> bool:
    """Whether the head phase can train on cached features: a frozen base, no augmentation, not turned off."""
    return cache_features and wrapped.base_frozen and not augment


def split_front_and_head(model):
    """(the frozen front as a model from images to features, the head as a model from features to logits).

    The head model calls the classifier's own head layers, so fitting it updates the classifier.

    Raises:
        ValueError: the model has neither a "pool" nor a "base" layer (not built by freeze_and_wrap).
    """
    import keras

    names = [layer.name for layer in model.layers]
    last_front = next((name for name in FRONT_LAYERS if name in names), None)
    if last_front is None:
        raise ValueError(f"cannot cache features: the model has no {' or '.join(FRONT_LAYERS)} layer ({names})")
    front = keras.Model(model.inputs, model.get_layer(last_front).output, name="frozen_front")
    features_input = keras.Input(shape=front.output_shape[1:], name="features")
    outputs = features_input
    for layer in model.layers[names.index(last_front) + 1 :]:
        outputs = layer(outputs)
    return front, keras.Model(features_input, outputs, name="head")


def cache_dir(
    artifacts_root: Path, pipeline: str, wrapped: WrappedModel, tfrecords: TFRecordSet, precision: str
) -> Path:
    """Where one base's features over one set of TFRecords are kept (`<pipeline>/feature-cache/<key>`)."""
    front = wrapped.features_fingerprint or wrapped.fingerprint
    key = hash_json([front, tfrecords.fingerprint, precision, str(FEATURE_DTYPE)])[:24]
    return artifacts_root / pipeline / "feature-cache" / key


def feature_function(front, tfrecords: TFRecordSet):
    """The front as one traced function for batches of any size: a split's last, smaller batch and
    the next split reuse the trace (a retrace costs about as much as a few hundred images)."""
    import tensorflow as tf

    height, width = tfrecords.image_size
    signature = [tf.TensorSpec([None, height, width, tfrecords.channels], tf.float32)]
    return tf.function(lambda images: tf.cast(front(images, training=False), tf.float16), input_signature=signature)


def _extract(infer, tfrecords: TFRecordSet, split: str) -> SplitFeatures:
    dataset = features.read_dataset(
        tfrecords.shards[split], tfrecords.image_size, tfrecords.channels, EXTRACT_BATCH, cache=False
    )
    outputs, labels = [], []
    for images, batch_labels in dataset:
        outputs.append(infer(images).numpy())
        labels.append(batch_labels.numpy())
    return SplitFeatures(np.concatenate(outputs).astype(FEATURE_DTYPE), np.concatenate(labels))


def load_or_extract(infer, tfrecords: TFRecordSet, split: str, folder: Path, log=print) -> SplitFeatures:
    """The front's features (`infer`: feature_function) of one split: read from `folder` when there, else
    computed and stored there.

    Two trainings of the same base and data extracting at once take turns (the folder's lock); each
    file is written atomically, so a killed extraction leaves nothing that looks complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    features_path, labels_path = folder / f"{split}.features.npy", folder / f"{split}.labels.npy"
    with locked(folder / split):
        if features_path.exists() and labels_path.exists():
            cached = SplitFeatures(np.load(features_path), np.load(labels_path))
            log(f"{split}: features of {len(cached.labels):,} images read from {folder}")
            return cached
        started = time.perf_counter()
        extracted = _extract(infer, tfrecords, split)
        for path, values in ((features_path, extracted.features), (labels_path, extracted.labels)):
            with atomic_file(path) as temporary, open(temporary, "wb") as handle:
                np.save(handle, values)
    seconds = time.perf_counter() - started
    log(
        f"{split}: features of {len(extracted.labels):,} images computed in {seconds:.1f} s "
        f"({len(extracted.labels) / seconds:.0f} images/s), {extracted.features.nbytes / 1e6:.1f} MB cached"
    )
    return extracted


def feature_dataset(split: SplitFeatures, batch_size: int, shuffle_buffer: int = 0, seed: int = 0):
    """Batches of (float32 features, labels), shuffled per epoch as read_dataset shuffles images."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((split.features, split.labels))
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda values, labels: (tf.cast(values, tf.float32), labels))
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(features.untuned_options())
