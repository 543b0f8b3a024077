"""The plain Keras transfer-learning baseline for benchmarks/run.py (section transfer), as the
TensorFlow tutorial trains it: a frozen MobileNet (alpha 0.25, ImageNet weights from ../shared/weights)
+ GlobalAveragePooling + Dropout 0.2 + Dense, run over every image in every epoch.

    .venv/bin/python benchmarks/plain_transfer.py FOLDER [--size 160] [--epochs 10] [--batch-size 32]
                                                  [--resize stretch|pad] [--split 0.8 0.1 0.1] [--seed 0]

Photos are decoded and resized once and kept in memory (tf.data cache), as a careful user would;
the split of each photo comes from its content hash by the rule convflow uses (a folder's own
train/ and validation/ are kept, the rest carved by the fractions), so both test on the same photos.
Prints one JSON line: wall_seconds (from the script's start), fit_seconds, images_per_second
(train images x epochs / fit seconds), epoch_images_per_second (train images / the median epoch)
and test_accuracy.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
SPLITS = ("train", "validation", "test")


def split_of(path: Path, predefined: str | None, fractions: dict[str, float], carved: list[str]) -> str:
    """convflow's rule: a predefined split is kept; the others share train's photos by content hash."""
    if predefined is not None and predefined not in carved:
        return predefined
    position = int(hashlib.sha256(path.read_bytes()).hexdigest()[:15], 16) / 16**15 * sum(fractions[n] for n in carved)
    for name in carved:
        position -= fractions[name]
        if position < 0:
            return name
    return carved[-1]


def list_photos(folder: Path, fractions: dict[str, float]) -> tuple[dict[str, list], list[str]]:
    """{split: [(path, label)]} and the class names (a folder per class, optionally under split folders)."""
    roots = {name: folder / name for name in SPLITS if (folder / name).is_dir()} or {None: folder}
    classes = sorted(path.name for path in next(iter(roots.values())).iterdir() if path.is_dir())
    carved = [name for name in SPLITS if name == "train" or name not in roots]
    photos: dict[str, list] = {name: [] for name in SPLITS}
    for predefined, root in roots.items():
        for label, name in enumerate(classes):
            for path in sorted((root / name).glob("*.jpg")):
                photos[split_of(path, predefined, fractions, carved)].append((str(path), label))
    return photos, classes


def dataset(photos: list, size: int, resize: str, batch_size: int, shuffle: bool, seed: int = 0):
    import tensorflow as tf

    paths, labels = zip(*photos)

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize_with_pad(image, size, size) if resize == "pad" else tf.image.resize(image, (size, size))
        return image, label

    images = tf.data.Dataset.from_tensor_slices((list(paths), list(labels))).map(load, tf.data.AUTOTUNE).cache()
    if shuffle:
        images = images.shuffle(len(photos), seed=seed, reshuffle_each_iteration=True)
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def frozen_mobilenet(size: int, num_classes: int):
    import keras
    from keras import layers

    base = keras.applications.MobileNet(
        input_shape=(size, size, 3), alpha=0.25, include_top=False, weights=str(WEIGHTS)
    )
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    features = base(layers.Rescaling(1 / 127.5, offset=-1)(inputs), training=False)
    features = layers.Dropout(0.2)(layers.GlobalAveragePooling2D()(features))
    return keras.Model(inputs, layers.Dense(num_classes)(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resize", choices=["stretch", "pad"], default="stretch")
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1))
    parser.add_argument("--seed", type=int, default=0, help="seeds the head's weights, dropout and shuffling")
    args = parser.parse_args()
    import keras

    photos, classes = list_photos(args.folder, dict(zip(SPLITS, args.split)))
    keras.utils.set_random_seed(args.seed)
    model = frozen_mobilenet(args.size, len(classes))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epoch_seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    train = dataset(photos["train"], args.size, args.resize, args.batch_size, shuffle=True, seed=args.seed)
    validation = dataset(photos["validation"], args.size, args.resize, args.batch_size, shuffle=False)
    started = time.perf_counter()
    model.fit(train, validation_data=validation, epochs=args.epochs, verbose=0, callbacks=[EpochTimer()])
    fit_seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(dataset(photos["test"], args.size, args.resize, 256, shuffle=False), verbose=0)
    print(
        json.dumps(
            {
                "train_examples": len(photos["train"]),
                "test_examples": len(photos["test"]),
                "fit_seconds": round(fit_seconds, 3),
                "images_per_second": round(len(photos["train"]) * args.epochs / fit_seconds, 1),
                "epoch_images_per_second": round(len(photos["train"]) / statistics.median(epoch_seconds), 1),
                "test_accuracy": float(accuracy),
                "wall_seconds": round(time.perf_counter() - STARTED, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
