"""Readers for each `data.source` scheme: sklearn:digits, idx:PATH, folder:PATH, tfds:NAME.

Each reader returns a `LoadedSource`: either one uint8 array of equally sized images, or a list of
image files; plus labels, label names and any predefined split (idx train/t10k, train/ test/
folders, TFDS splits).
"""

from __future__ import annotations

import array
import concurrent.futures
import difflib
import gzip
import hashlib
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convflow.config.schema import DataConfig
from convflow.core.errors import DataError
from convflow.data.imaging import inspect_image_file
from convflow.data.loaded import SPLIT_NAMES, LoadedSource
from convflow.data.parquet_source import fingerprint_files, load_parquet
from convflow.runtime.parallel import CHUNK, PROCESSES_FROM, ordered_map
from convflow.runtime.progress import StageProgress

NETWORK_PROBE = ("storage.googleapis.com", 443)
TFDS_HASH_CHUNK = 256  # TFDS examples held at a time while hashing


@dataclass(frozen=True)
class TfdsExample:
    """One example of a TFDS source, as read from the dataset."""

    example_id: str
    image: np.ndarray
    label: int
    split: str | None


def source_fingerprint(data: DataConfig) -> str:
    """A cheap fingerprint of the source as it is on disk now (names, sizes, mtimes).

    It joins the download stage's cache key, so new or changed files re-run that stage.
    """
    digest = hashlib.sha256(data.source.encode())
    if data.scheme in ("folder", "idx"):
        root = Path(data.location)
        if root.exists():
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if data.scheme == "parquet":
        digest.update("\n".join(fingerprint_files(data.location)).encode())
    if data.scheme == "tfds" and data.data_dir:
        digest.update(data.data_dir.encode())
    return digest.hexdigest()[:24]


def load_source(data: DataConfig, scratch_dir: Path) -> LoadedSource:
    """Read the examples of `data.source`; sources that need files of their own (tfds) write
    them under `scratch_dir`.

    Raises:
        DataError: the source is missing, empty, has one class, or a file is unusable.
    """
    readers = {
        "sklearn": _load_sklearn,
        "idx": _load_idx,
        "folder": _load_folder,
        "tfds": _load_tfds,
        "parquet": load_parquet,
    }
    loaded = readers[data.scheme](data, scratch_dir)
    if len(loaded.labels) == 0:
        raise DataError(f"{data.source}: no usable examples")
    present = np.unique(loaded.labels)
    if len(present) < 2:
        raise DataError(f"{data.source}: only one class ({loaded.label_names[present[0]]!r}); need at least two")
    if data.label_names is not None:
        if len(data.label_names) != len(loaded.label_names):
            out_of_range = (
                f": label {int(present[-1])} is out of range (0..{len(data.label_names) - 1})"
                if present[-1] >= len(data.label_names)
                else ""
            )
            raise DataError(
                f"data.label_names has {len(data.label_names)} names but {data.source} has "
                f"{len(loaded.label_names)} classes{out_of_range}"
            )
        loaded.label_names = list(data.label_names)
    absent = [name for label, name in enumerate(loaded.label_names) if label not in set(present.tolist())]
    if absent:
        raise DataError(
            f"{data.source}: no example of class(es) {absent}; labels must run from 0 to "
            f"{len(loaded.label_names) - 1} without gaps"
        )
    return loaded


def _load_sklearn(data: DataConfig, scratch_dir: Path) -> LoadedSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 intensities, scaled to the 0..255 of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    return LoadedSource(
        labels=labels,
        label_names=[str(name) for name in digits.target_names],
        example_ids=[f"digits-{index:05d}" for index in range(len(labels))],
        images=images,
        predefined_split=[None] * len(labels),
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array.

    Raises:
        DataError: the file is not an IDX file or is truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            payload = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read IDX file: {error}") from error
    if len(payload) < 4 or payload[:2] != b"\x00\x00" or payload[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = payload[3]
    if len(payload) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated: the header announces {ndim} dimensions but ends early")
    dims = struct.unpack(f">{ndim}I", payload[4 : 4 + 4 * ndim])
    body = np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated: header says {dims}, found {body.size} bytes of data")
    return body.reshape(dims)


def _find_idx(root: Path, prefix: str, kind: str) -> Path | None:
    for suffix in (".gz", ""):
        for name in (f"{prefix}-{kind}-ubyte{suffix}", f"{prefix}-{kind.replace('-', '.')}-ubyte{suffix}"):
            if (root / name).exists():
                return root / name
    return None


def _load_idx(data: DataConfig, scratch_dir: Path) -> LoadedSource:
    root = Path(data.location)
    if not root.is_dir():
        raise DataError(f"idx source folder {root} does not exist")
    images, labels, splits, ids = [], [], [], []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        image_file = _find_idx(root, prefix, "images-idx3")
        label_file = _find_idx(root, prefix, "labels-idx1")
        if image_file is None and label_file is None:
            continue
        if image_file is None or label_file is None:
            raise DataError(f"{root}: {prefix} images and labels must both be present")
        part_images, part_labels = read_idx(image_file), read_idx(label_file)
        if len(part_images) != len(part_labels):
            raise DataError(f"{image_file}: {len(part_images)} images but {len(part_labels)} labels in {label_file}")
        images.append(part_images)
        labels.append(part_labels.astype(np.int64))
        splits += [split] * len(part_labels)
        ids += [f"{prefix}-{index:05d}" for index in range(len(part_labels))]
    if not images:
        raise DataError(f"{root}: no train-images-idx3-ubyte(.gz) or t10k-images-idx3-ubyte(.gz) found")
    all_labels = np.concatenate(labels)
    num_classes = int(all_labels.max()) + 1
    return LoadedSource(
        labels=all_labels,
        label_names=[str(index) for index in range(num_classes)],
        example_ids=ids,
        images=np.concatenate(images)[..., np.newaxis],
        predefined_split=splits,
    )


def _class_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _load_folder(data: DataConfig, scratch_dir: Path) -> LoadedSource:
    root = Path(data.location)
    if not root.is_dir():
        raise DataError(f"folder source {root} does not exist")
    split_dirs = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    layout = split_dirs or {None: root}
    class_names = sorted({folder.name for split_root in layout.values() for folder in _class_folders(split_root)})
    if not class_names:
        raise DataError(f"{root}: no class sub-folders found")
    for split in ("train", "test"):
        missing = [name for name in class_names if split in split_dirs and not (split_dirs[split] / name).is_dir()]
        if missing:
            raise DataError(
                f"split {split!r} has no example of class(es) {missing}: {split_dirs[split]} has no folder for them"
            )
    loaded = LoadedSource(labels=np.zeros(0, np.int64), label_names=class_names, example_ids=[], files=[])
    folders = [
        (split, label, split_root / name)
        for split, split_root in layout.items()
        for label, name in enumerate(class_names)
        if (split_root / name).is_dir()
    ]
    loaded.labels = _scan_class_folders(folders, root, loaded)
    return loaded


def _scan_class_folders(folders: list[tuple[str | None, int, Path]], root: Path, loaded: LoadedSource) -> np.ndarray:
    """Check and hash every file of the class folders in one pass over all cores; add the usable
    ones to `loaded` (the others to its skipped list); return their labels.

    Per image this keeps its path, example id and split, and packed arrays of its digest, size and
    label (about 250 bytes an image in all), not Python objects for each of them."""
    files = {folder: _image_files(folder) for *_, folder in folders}
    total = sum(map(len, files.values()))
    listed = ((split, label, folder, path) for split, label, folder in folders for path in files[folder])
    paths = (path for *_, folder in folders for path in files[folder])
    in_workers = total >= PROCESSES_FROM
    # a few hundred files a worker process's task: one pickled message per chunk, not per file
    inspected = ordered_map(inspect_image_file, paths, chunk=256 if in_workers else CHUNK, processes=in_workers)
    usable: dict[Path, int] = dict.fromkeys((folder for *_, folder in folders), 0)
    labels, sizes, digests = array.array("q"), array.array("i"), bytearray()
    prefix = len(str(root)) + 1
    progress = StageProgress("download_and_split", total)
    for (split, label, folder, path), (problem, size, digest) in zip(listed, inspected):
        progress.update(progress.done + 1)
        if problem:
            loaded.skipped.append(f"{path}: {problem}")
            continue
        loaded.files.append(path)
        loaded.example_ids.append(path[prefix:])
        loaded.predefined_split.append(split)
        sizes.extend(size)
        digests += digest
        labels.append(label)
        usable[folder] += 1
    progress.finish()
    empty = next((folder for folder, count in usable.items() if count == 0), None)
    if empty is not None:
        raise DataError(f"class folder {empty} has no usable image")
    loaded.sizes = np.frombuffer(sizes, np.int32).reshape(-1, 2)
    loaded.digests = np.frombuffer(digests, np.uint8).reshape(-1, 32)
    return np.frombuffer(labels, np.int64).copy()


def _image_files(folder: Path) -> list[str]:
    """The files of a class folder and of its sub-folders at any depth (hidden files and folders, and
    links to folders, left out), sorted by their path inside the class folder: a flat folder's by name."""
    relative: list[str] = []
    pending = [""]
    while pending:
        inside = pending.pop()
        with os.scandir(os.path.join(folder, inside)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(os.path.join(inside, entry.name))
                elif entry.is_file():
                    relative.append(os.path.join(inside, entry.name))
    return [os.path.join(folder, path) for path in sorted(relative)]


def _network_available(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(NETWORK_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def _tfds_builder(data: DataConfig):
    import tensorflow_datasets as tfds

    name = data.location
    try:
        builder = tfds.builder(name, data_dir=data.data_dir)
    except Exception as error:  # tfds raises DatasetNotFoundError and friends
        # Its message goes on to list every dataset in the catalog: keep the first line, suggest close names.
        close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise DataError(f"tfds dataset {name!r} not found in the TFDS catalog: {reason}{hint}") from None
    if not builder.is_prepared():
        # Offline, download_and_prepare retries for minutes before failing: ask the network first.
        if not _network_available():
            raise DataError(
                f"tfds dataset {name!r} is not in {builder.data_dir} and this machine is offline. "
                f"Pre-download it on a machine with network: "
                f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR')"
                f'.download_and_prepare()"`, copy DIR here and set data.data_dir: DIR'
            )
        builder.download_and_prepare()
    return builder


def iter_tfds_examples(data: DataConfig) -> Iterator[TfdsExample]:
    """The examples of a `tfds:` source, split by split in the dataset's own order (the same on
    every pass: download_and_split hashes them, to_tfrecords writes them)."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(data)
    image_key, label_key = _tfds_keys(builder)
    for expression, split in _tfds_split_plan(builder, data).items():
        for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=expression, shuffle_files=False))):
            yield TfdsExample(f"{expression}/{index}", example[image_key], int(example[label_key]), split)


def _load_tfds(data: DataConfig, scratch_dir: Path) -> LoadedSource:
    """Labels, splits and content hashes of a TFDS source; no image files (to_tfrecords streams the
    examples again, straight into shards)."""
    builder = _tfds_builder(data)
    _, label_key = _tfds_keys(builder)
    loaded = LoadedSource(
        labels=np.zeros(0, np.int64), label_names=list(builder.info.features[label_key].names), example_ids=[]
    )
    labels: list[int] = []
    digests = bytearray()
    examples = iter_tfds_examples(data)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        while chunk := list(itertools.islice(examples, TFDS_HASH_CHUNK)):
            digests += b"".join(pool.map(lambda example: png_sha256(example.image), chunk))
            for example in chunk:
                loaded.sizes.append(tuple(example.image.shape[:2]))
                loaded.channels = max(loaded.channels or 0, example.image.shape[2] if example.image.ndim == 3 else 1)
                loaded.example_ids.append(example.example_id)
                loaded.predefined_split.append(example.split)
                labels.append(example.label)
    loaded.labels = np.asarray(labels, np.int64)
    loaded.digests = np.frombuffer(digests, np.uint8).reshape(-1, 32)
    return loaded


def png_sha256(image: np.ndarray) -> bytes:
    """The sha256 of the PNG file Pillow makes of `image`: a TFDS example's content hash, the same as
    when each example was saved as such a file, so splits assigned by hash stay where they were."""
    import io

    from PIL import Image

    pixels = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return hashlib.sha256(buffer.getvalue()).digest()


def _tfds_keys(builder) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    features = builder.info.features
    image_key = next((key for key, feature in features.items() if isinstance(feature, tfds.features.Image)), None)
    label_key = next((key for key, feature in features.items() if isinstance(feature, tfds.features.ClassLabel)), None)
    if image_key is None or label_key is None:
        raise DataError(f"tfds dataset {builder.name!r} has no Image and ClassLabel features: {list(features)}")
    return image_key, label_key


def _tfds_split_plan(builder, data: DataConfig) -> dict[str, str | None]:
    """TFDS split expression -> convflow split (None: carve it by the config's fractions)."""
    if data.tfds_split:
        return {expression: split for split, expression in data.tfds_split.items()}
    names = list(builder.info.splits) or ["train", "test"]  # no split metadata under tfds mock_data
    return {name: name if name in SPLIT_NAMES else None for name in names}
