"""In-process: write (all cores) and read rates and size of TFRecords of MNIST and of 1,000
flowers photos at 96 and 224 px, as raw uint8 (uncompressed: convflow's default; GZIP), PNG and
JPEG records: the measurement behind features.py's choice of layout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from common import DATA, Row, images_per_second, import_code_under_test

TITLE = "TFRecord layouts: write and read images/s (baseline: raw uint8, uncompressed)"
# name -> (image encoding, TFRecord compression); "raw" is convflow's own writer and reader.
LAYOUTS = {
    "raw (default)": ("raw", "none"),
    "raw, gzip": ("raw", "gzip"),
    "png": ("png", "none"),
    "jpeg q95 (lossy)": ("jpeg", "none"),
}
LAYOUT_SHARD = 1_000


def layout_images() -> dict[str, np.ndarray]:
    """MNIST train (60,000 at 28x28x1) and 1,000 flowers photos at 96 and at 224 px."""
    from convflow.data import imaging
    from convflow.data.sources import read_idx

    photos = sorted(str(path) for path in (DATA / "flowers").rglob("*.jpg"))[::4][:1_000]
    return {
        "mnist 28x28x1": read_idx(DATA / "mnist" / "train-images-idx3-ubyte.gz")[..., None],
        "flowers 96x96x3": np.stack([imaging.load_file(path, (96, 96), 3, "stretch") for path in photos]),
        "flowers 224x224x3": np.stack([imaging.load_file(path, (224, 224), 3, "stretch") for path in photos]),
    }


def write_layout(images: np.ndarray, encoding: str, compression: str, directory: Path) -> tuple[float, list[str]]:
    """Write `images` in shards on all cores, as to_tfrecords does; (images/s, shard paths)."""
    import concurrent.futures

    import tensorflow as tf

    from convflow.tasks.to_tfrecords import _write_shard
    from convflow.tfrecords import features

    directory.mkdir(parents=True)
    starts = range(0, len(images), LAYOUT_SHARD)
    paths = [
        str(
            directory / f"s{start:06d}.n{len(images[start : start + LAYOUT_SHARD])}{features.shard_suffix(compression)}"
        )
        for start in starts
    ]

    def encoded(path: str, chunk: np.ndarray) -> None:
        encode = tf.io.encode_png if encoding == "png" else lambda image: tf.io.encode_jpeg(image, quality=95)
        with tf.io.TFRecordWriter(path) as writer:
            for image in chunk:
                feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode(image).numpy()]))
                writer.write(
                    tf.train.Example(features=tf.train.Features(feature={features.IMAGE: feature})).SerializeToString()
                )

    def write(path: str, start: int) -> None:
        chunk = images[start : start + LAYOUT_SHARD]
        if encoding == "raw":
            _write_shard(
                Path(path), chunk, np.zeros(len(chunk), np.int64), [str(i) for i in range(len(chunk))], compression
            )
        else:
            encoded(path, chunk)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, paths, starts))
    return len(images) / (time.perf_counter() - started), paths


def encoded_dataset(paths: list[str], shape: tuple[int, ...], batch_size: int):
    """PNG/JPEG records decoded per image: the same interleave, batching and prefetch as read_dataset."""
    import tensorflow as tf

    from convflow.tfrecords import features

    spec = {features.IMAGE: tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized):
        image = tf.io.parse_single_example(serialized, spec)[features.IMAGE]
        return tf.ensure_shape(tf.io.decode_image(image, channels=shape[-1], expand_animations=False), shape)

    records = tf.data.Dataset.from_tensor_slices(paths).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(paths), 4), num_parallel_calls=tf.data.AUTOTUNE
    )
    images = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return images.map(lambda batch: (tf.cast(batch, tf.float32),)).prefetch(tf.data.AUTOTUNE)


def repeat(scratch: Path) -> dict:
    import_code_under_test()
    from convflow.tfrecords.features import read_dataset

    result = {}
    for dataset, images in layout_images().items():
        for layout, (encoding, compression) in LAYOUTS.items():
            folder = scratch / dataset.replace(" ", "-") / encoding / compression
            result[f"{dataset}|{layout}|write"], paths = write_layout(images, encoding, compression, folder)
            result[f"{dataset}|{layout}|MB"] = sum(os.path.getsize(path) for path in paths) / 1e6
            reader = (
                (lambda paths=paths, shape=images.shape: read_dataset(paths, shape[1:3], shape[3], 128, cache=False))
                if encoding == "raw"
                else (lambda paths=paths, shape=images.shape: encoded_dataset(paths, shape[1:], 128))
            )
            result[f"{dataset}|{layout}|read"] = max(images_per_second(reader()) for _ in range(2))
    return result


def rows(m: dict) -> list[Row]:
    result = []
    for dataset in dict.fromkeys(key.split("|")[0] for key in m):
        default = next(iter(LAYOUTS))
        for layout in LAYOUTS:
            for measure in ("write", "read"):
                value, baseline = m[f"{dataset}|{layout}|{measure}"], m[f"{dataset}|{default}|{measure}"]
                result.append(
                    Row(
                        f"{dataset}, {layout} ({m[f'{dataset}|{layout}|MB']:.1f} MB): {measure} images/s",
                        value,
                        baseline,
                        f"{value / baseline:.2f}x",
                    )
                )
    return result
