"""The train stage's recipe: optimizer, learning-rate schedule, loss, class weights and augmentation
built from train.* settings, each from Keras' own parts (schedules, AdamW, preprocessing layers)."""

from __future__ import annotations

import numpy as np

from convflow.config.schema import LearningRateSchedule, TrainConfig
from convflow.core.records import TFRecordSet
from convflow.tfrecords import features

# Layers that change one image at a time (applied per batch inside tf.data), by config name.
IMAGE_LAYERS = ("flip", "rotation", "zoom", "contrast", "randaugment")
# Layers that blend two images and their labels.
MIXING_LAYERS = ("mixup", "cutmix")


def learning_rate(schedule: LearningRateSchedule, rate: float, epochs: int, steps_per_epoch: int):
    """The optimizer's learning rate: a number, or a Keras schedule over the phase's steps.
    reduce_on_plateau starts constant; its callback (plateau_callbacks) lowers it."""
    from keras.optimizers import schedules

    if schedule.kind == "cosine":
        warmup = schedule.warmup_epochs * steps_per_epoch
        decay = max(1, epochs * steps_per_epoch - warmup)
        if not warmup:
            return schedules.CosineDecay(rate, decay_steps=decay)
        return schedules.CosineDecay(0.0, decay_steps=decay, warmup_target=rate, warmup_steps=warmup)
    if schedule.kind == "step":
        return schedules.ExponentialDecay(rate, schedule.step_epochs * steps_per_epoch, schedule.factor, staircase=True)
    return rate


def plateau_callbacks(schedule: LearningRateSchedule) -> list:
    """ReduceLROnPlateau for the reduce_on_plateau schedule; no callback for the others."""
    import keras

    if schedule.kind != "reduce_on_plateau":
        return []
    return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=schedule.factor, patience=schedule.patience)]


def optimizer(settings: TrainConfig, rate):
    import keras

    if settings.optimizer == "adamw":
        decay = {} if settings.weight_decay is None else {"weight_decay": settings.weight_decay}
        return keras.optimizers.AdamW(learning_rate=rate, **decay)
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    return optimizers[settings.optimizer](learning_rate=rate)


def one_hot_labels(settings: TrainConfig) -> bool:
    """Label smoothing and label mixing need one-hot (float) labels; otherwise integer labels, as before."""
    return settings.label_smoothing > 0 or settings.mixes_labels


def loss_and_metrics(settings: TrainConfig, outputs: int):
    """(loss, metrics) for a softmax head of `outputs` classes or a binary head (outputs == 1)."""
    import keras

    if outputs == 1:  # one logit for the second class
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=settings.label_smoothing)
        return loss, [keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)]
    if one_hot_labels(settings):
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=settings.label_smoothing)
        return loss, [keras.metrics.CategoricalAccuracy(name="accuracy")]
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]


def image_augmentation(settings: TrainConfig):
    """The per-image layers of train.augment as one Keras model, or None."""
    import keras
    from keras import layers

    seed = settings.seed
    build = {
        "flip": lambda _: layers.RandomFlip("horizontal", seed=seed),
        "rotation": lambda value: layers.RandomRotation(value, seed=seed),
        "zoom": lambda value: layers.RandomZoom(value, seed=seed),
        "contrast": lambda value: layers.RandomContrast(value, seed=seed),
        "randaugment": lambda value: layers.RandAugment(value_range=(0, 255), factor=value, seed=seed),
    }
    steps = [
        build[name](value) for step in settings.augment_steps for name, value in step.items() if name in IMAGE_LAYERS
    ]
    return keras.Sequential(steps, name="augmentation") if steps else None


def label_transform(settings: TrainConfig, classes: int, binary: bool):
    """A tf.data map over batches (images, int labels): one-hot labels when the loss needs them, then
    MixUp and CutMix, which blend images and labels alike; None when labels stay integers."""
    import tensorflow as tf
    from keras import layers

    if binary or not one_hot_labels(settings):
        return None
    mixers = {
        "mixup": lambda value: layers.MixUp(alpha=value, seed=settings.seed),
        "cutmix": lambda value: layers.CutMix(factor=value, seed=settings.seed),
    }
    mixing = [mixers[name](value) for step in settings.augment_steps for name, value in step.items() if name in mixers]

    def transform(images, labels, training: bool):
        data = {"images": images, "labels": tf.one_hot(labels, classes)}
        for layer in mixing if training else []:
            data = layer(data, training=True)
        return data["images"], data["labels"]

    return transform


def class_weights(tfrecords: TFRecordSet) -> dict[int, float]:
    """train.class_weight balanced: n / (classes x count) per class of the training split, as
    scikit-learn's compute_class_weight("balanced") computes it. Reads the labels alone."""
    import tensorflow as tf

    shards = tfrecords.shards["train"]
    spec = {features.LABEL: features.feature_spec()[features.LABEL]}
    records = tf.data.TFRecordDataset(shards, compression_type=features.compression_type(shards))
    labels = records.batch(4096).map(lambda batch: tf.io.parse_example(batch, spec)[features.LABEL])
    counts = np.bincount(np.concatenate([batch.numpy() for batch in labels]), minlength=len(tfrecords.label_names))
    total, classes = counts.sum(), len(counts)
    return {label: float(total / (classes * count)) if count else 0.0 for label, count in enumerate(counts)}
