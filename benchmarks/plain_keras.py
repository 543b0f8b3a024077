"""The plain Keras baseline for benchmarks/run.py: the same CNN, arrays in memory, model.fit.

    .venv/bin/python benchmarks/plain_keras.py digits|mnist [--epochs N] [--batch-size B] [--seed S]

Prints one JSON line: wall_seconds (from the script's start, imports and data loading included),
fit_seconds, train_examples, images_per_second (train_examples * epochs / fit_seconds, validation
included as in convflow's train stage), best_epoch_images_per_second (its fastest epoch) and
test_accuracy.

digits: scikit-learn's 8x8 digits scaled to 0..255 and resized to 28x28, a random 80/10/10 split.
mnist: the IDX files of ../shared/data/mnist; t10k is the test set, 1/9 of train is validation
(convflow carves validation from train with fractions 0.8 : 0.1, i.e. the same 1/9).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def read_idx_gz(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped) as an array of its header's shape."""
    payload = gzip.decompress(path.read_bytes())
    ndim = payload[3]
    dims = np.frombuffer(payload, ">u4", count=ndim, offset=4)
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _split(images, labels, fractions, seed):
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum([int(round(f * len(labels))) for f in fractions[:-1]])
    return [(images[part], labels[part]) for part in np.split(order, bounds)]


def load_digits(seed: int):
    """(train, validation, test) of (uint8 N x 28 x 28 x 1, int64 labels)."""
    import tensorflow as tf
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0))[..., np.newaxis]
    images = tf.image.resize(images, (28, 28), method="bilinear").numpy().round().clip(0, 255).astype(np.uint8)
    return _split(images, digits.target.astype(np.int64), (0.8, 0.1, 0.1), seed)


def load_mnist(seed: int):
    train_images = read_idx_gz(MNIST_DIR / "train-images-idx3-ubyte.gz")[..., np.newaxis]
    train_labels = read_idx_gz(MNIST_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
    test = (
        read_idx_gz(MNIST_DIR / "t10k-images-idx3-ubyte.gz")[..., np.newaxis],
        read_idx_gz(MNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )
    train, validation = _split(train_images, train_labels, (8 / 9, 1 / 9), seed)
    return train, validation, test


def mnist_cnn(input_shape, num_classes: int):
    """convflow's mnist_cnn seed (build_base._seed_cnn) plus its logits head, in plain Keras."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(32, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(1024, activation="relu"),
            layers.Dense(num_classes),
        ]
    )


def train_and_test(data, epochs: int, batch_size: int, seed: int) -> dict:
    import keras

    (x_train, y_train), validation, (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = mnist_cnn(x_train.shape[1:], 10)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epoch_seconds = []

    class EpochTimer(keras.callbacks.Callback):  # as convflow's history log times each epoch
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    started = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=validation,
        verbose=0,
        callbacks=[EpochTimer()],
    )
    fit_seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return {
        "train_examples": len(y_train),
        "test_examples": len(y_test),
        "fit_seconds": round(fit_seconds, 3),
        "images_per_second": round(len(y_train) * epochs / fit_seconds, 1),
        "best_epoch_images_per_second": round(len(y_train) / min(epoch_seconds), 1),
        "test_accuracy": float(accuracy),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaders = {"digits": load_digits, "mnist": load_mnist}
    result = {
        "dataset": args.dataset,
        **train_and_test(loaders[args.dataset](args.seed), args.epochs, args.batch_size, args.seed),
    }
    result["wall_seconds"] = round(time.perf_counter() - STARTED, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
