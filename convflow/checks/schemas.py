"""The data checks' two Parquet tables, with field descriptions: the per-image properties (kept
with each promoted model as the next run's baseline) and the check results of a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

# The per-image table's file name in to_tfrecords' folder and in a promoted model's version folder.
IMAGE_PROPERTIES = "image_properties.parquet"
# Files a result row names; its detail says how many there were in all.
MAX_FILES = 20


def _schema(*fields: tuple[str, pa.DataType, str], nullable: tuple[str, ...] = (), table: str) -> pa.Schema:
    """A schema whose fields and table carry a `description` in their metadata, as catalog/schemas.py's."""
    return pa.schema(
        [
            pa.field(name, dtype, nullable=name in nullable, metadata={"description": description})
            for name, dtype, description in fields
        ],
        metadata={"description": table},
    )


IMAGE_PROPERTIES_SCHEMA = _schema(
    ("example_id", pa.string(), "Joins splits.parquet: the example's id within its source (file path or index)."),
    ("split", pa.string(), "train, validation or test."),
    ("label", pa.string(), "Class name (names, not indices, so that runs with different class sets compare)."),
    ("sha256", pa.string(), "sha256 of the example's source bytes: identical content has the same digest."),
    ("width", pa.int32(), "Width in pixels as decoded, before resizing."),
    ("height", pa.int32(), "Height in pixels as decoded, before resizing."),
    ("channels", pa.int8(), "Channels as decoded: the bands of its mode (L 1, RGB 3, RGBA and CMYK 4)."),
    ("mode", pa.string(), "The Pillow mode the image was decoded from (RGB, L, P, CMYK, ...)."),
    (
        "brightness",
        pa.float32(),
        "Mean luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B), 0-255, at the model's size: this figure and "
        "those below describe the pixels the model sees.",
    ),
    ("contrast", pa.float32(), "Standard deviation of luma, 0-255."),
    ("mean_r", pa.float32(), "Mean of the red channel, 0-255 (grayscale: the gray mean)."),
    ("mean_g", pa.float32(), "Mean of the green channel, 0-255 (grayscale: the gray mean)."),
    ("mean_b", pa.float32(), "Mean of the blue channel, 0-255 (grayscale: the gray mean)."),
    ("sharpness", pa.float32(), "Variance of the 4-neighbour Laplacian of luma over interior pixels; blur lowers it."),
    (
        "dhash",
        pa.uint64(),
        "64-bit difference hash of luma (9 x 8 box thumbnail, a bit set where a cell is "
        "brighter than its right neighbour): near copies differ in few bits.",
    ),
    table="One row per example: the image properties the data checks compare with production's, computed where "
    "the image is decoded. The promoted model keeps its run's table as the next run's baseline.",
)

CHECK_RESULTS_SCHEMA = _schema(
    (
        "check",
        pa.string(),
        "Data checks (checks.parquet): class_set, class_balance, min_count, label_conflicts, leakage or drift; model "
        "checks (model_checks.parquet): class_recall, reference_set or embedding_drift.",
    ),
    (
        "subject",
        pa.string(),
        "What the figure is about: a class, `class / split`, `split ~ earlier split`, a "
        "property, `property / class`, or the production version whose test split or embeddings it compares with.",
    ),
    (
        "value",
        pa.float64(),
        "This run's figure: an example count (class_set, min_count, label_conflicts), a class "
        "share (class_balance), the share of a split with near copies (leakage), a Kolmogorov-Smirnov statistic "
        "(drift), the model's recall of a class (class_recall), its accuracy on production's test split "
        "(reference_set), or the permutation p-value of the embeddings' MMD² (embedding_drift; the MMD² is in "
        "detail). Null when the check could not run (detail says why).",
    ),
    (
        "baseline",
        pa.float64(),
        "Production's figure where there is one (class_set: its count; class_balance: its share; class_recall: its "
        "recall on the same split; reference_set: its accuracy on its own test split); null otherwise.",
    ),
    (
        "threshold",
        pa.float64(),
        "The limit held to: a minimum for min_count, class_recall, reference_set and embedding_drift (alpha), the "
        "largest allowed change of share for class_balance, a maximum otherwise; null for class_set, and where no "
        "limit is set.",
    ),
    ("verdict", pa.string(), "pass, warn or block (a check set to warn never blocks)."),
    ("detail", pa.string(), "The figure in words, with what it was compared to."),
    (
        "files",
        pa.list_(pa.string()),
        f"Example ids of the offending images, at most {MAX_FILES}; leakage names "
        "pairs, each held-out image followed by its near copy.",
    ),
    nullable=("value", "baseline", "threshold"),
    table="One row per data check (checks.parquet) or model check (model_checks.parquet) and subject of a run, "
    "passing or not.",
)


def image_properties_table(
    example_ids: Sequence[str],
    splits: Sequence[str],
    labels: Sequence[str],
    sha256: Sequence[str],
    properties: Sequence[Mapping[str, object]],
) -> pa.Table:
    """The per-image table: image_properties() of each example, beside its id, split, label and digest."""
    columns: dict[str, object] = {"example_id": example_ids, "split": splits, "label": labels, "sha256": sha256}
    for name in IMAGE_PROPERTIES_SCHEMA.names[4:]:
        columns[name] = [row[name] for row in properties]
    return pa.Table.from_pydict(columns, schema=IMAGE_PROPERTIES_SCHEMA)
