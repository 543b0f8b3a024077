"""What a data source holds, for `convflow init`: classes and their counts, predefined splits, image
sizes and channels, unusable files. Read through the same loaders a run uses (convflow.data.sources), so
what init counts is what the run will train on."""

from __future__ import annotations

import collections
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from convflow.config.schema import SOURCE_SCHEMES, DataConfig
from convflow.data.sources import DataError, LoadedSource, load_source

GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
# Files whose mode is read to tell grayscale from colour: enough to find colour in a mixed folder.
CHANNEL_SAMPLE = 200


@dataclass(frozen=True)
class SourceSurvey:
    """One source as convflow's loaders read it."""

    source: str  # scheme:location, the location absolute for path schemes
    class_counts: dict[str, int]
    split_counts: dict[str, int]  # splits the source defines (train/ folders, IDX t10k): examples each
    typical_size: tuple[int, int]  # median height, width
    shapes_vary: bool  # the images' aspect ratios differ
    channels: int
    unusable: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.class_counts.values())


def source_of(argument: str) -> str:
    """SOURCE as `convflow init` takes it (scheme:location, or a bare path) as scheme:absolute-location.

    Raises:
        DataError: a bare argument that is no path, or an unknown scheme.
    """
    scheme, sep, rest = argument.partition(":")
    if sep and scheme in SOURCE_SCHEMES and rest:
        return f"{scheme}:{Path(rest).expanduser().resolve()}" if scheme in ("folder", "idx", "parquet") else argument
    path = Path(argument).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return f"parquet:{path.resolve()}"
    if path.is_dir():
        return f"{_folder_scheme(path)}:{path.resolve()}"
    raise DataError(
        f"SOURCE {argument!r}: no such file or folder; give a folder of images, IDX files, a Parquet "
        "table, or folder:PATH | idx:PATH | parquet:PATH | tfds:NAME | sklearn:digits"
    )


def _folder_scheme(path: Path) -> str:
    names = [child.name for child in path.iterdir()]
    if any("-idx3-ubyte" in name for name in names):
        return "idx"
    if names and not any(child.is_dir() for child in path.iterdir()) and any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "folder"


def survey_source(source: str) -> SourceSurvey:
    """Read `source` (scheme:location) through convflow's loaders and describe it.

    Raises:
        DataError: the source is missing, unreadable, or not a classification dataset convflow can use.
    """
    try:
        data = DataConfig(source=source, image_size=(32, 32), channels=3)
    except ValidationError as error:
        raise DataError(f"SOURCE {source!r}: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    with tempfile.TemporaryDirectory(prefix="convflow-init-") as scratch:  # tfds and Parquet write images here
        loaded = load_source(data, Path(scratch))
        height_width, shapes_vary, channels = _image_shape(loaded)
    counts = collections.Counter(loaded.label_names[label] for label in loaded.labels.tolist())
    splits = collections.Counter(split for split in loaded.predefined_split if split is not None)
    return SourceSurvey(
        source=source,
        class_counts={name: counts[name] for name in loaded.label_names},
        split_counts=dict(splits),
        typical_size=height_width,
        shapes_vary=shapes_vary,
        channels=channels,
        unusable=list(loaded.skipped),
    )


def _image_shape(loaded: LoadedSource) -> tuple[tuple[int, int], bool, int]:
    """Median (height, width), whether aspect ratios differ, and channels (1 only if every sampled image is gray)."""
    if loaded.images is not None:
        return tuple(loaded.images.shape[1:3]), False, int(loaded.images.shape[3])
    heights = [height for height, _ in loaded.sizes]
    widths = [width for _, width in loaded.sizes]
    median = (int(statistics.median(heights)), int(statistics.median(widths)))
    ratios = {round(height / width, 2) for height, width in loaded.sizes}
    channels = loaded.channels if loaded.files is None else _channels(loaded.files)  # TFDS: no files
    return median, len(ratios) > 1, channels


def _channels(files: list[str]) -> int:
    from convflow.data.imaging import open_image

    step = max(1, len(files) // CHANNEL_SAMPLE)
    for path in files[::step]:
        with open_image(path) as image:
            if image.mode not in GRAYSCALE_MODES:
                return 3
    return 1
