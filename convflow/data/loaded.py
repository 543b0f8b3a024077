"""What reading a source gives, before splitting: every source's loader returns a LoadedSource."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class LoadedSource:
    """Examples of one source, before splitting.

    At most one of `images` (N x H x W x C uint8) and `files` is set; neither for TFDS, whose
    examples to_tfrecords streams from the dataset again. `digests` (N x 32 uint8), where set,
    holds the sha256 of each example's bytes as read (folders, TFDS); download_and_split hashes
    the others. `sizes` holds each image's (height, width) as found.
    """

    labels: np.ndarray
    label_names: list[str]
    example_ids: list[str]
    images: np.ndarray | None = None
    files: list[str] | None = None
    sizes: list[tuple[int, int]] | np.ndarray = field(default_factory=list)
    predefined_split: list[str | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    digests: np.ndarray | None = None
    channels: int | None = None  # of a TFDS source's images (the others' are in `images` or `files`)
