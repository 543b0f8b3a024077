"""The "Data and model checks" section: every figure check_data recorded, the offending files named,
with thumbnails, and below them every figure of evaluate's gate (model_checks.parquet). A page of
its own for a run the checks blocked (it writes no other report), and a section of report.html for
a run that trained."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from markupsafe import Markup

from convflow.data.imaging import upright
from convflow.reporting.figures import image_grid, render_page

# Thumbnails shown per check row, and in all: a blocked drop can name thousands of files.
THUMBNAILS_PER_ROW = 8
THUMBNAILS_IN_ALL = 64
THUMBNAIL_SIZE = (96, 96)


def checks_context(
    results_parquet: str, splits_parquet: str, images_npy: str | None = None, model_checks_parquet: str | None = None
) -> dict:
    """What the checks section shows: the rows that did not pass first, each figure as text, and
    thumbnails of the files the failing rows name; then the model checks' rows, when the run
    trained a model (`model_checks_parquet`)."""
    rows = _worst_first(pq.read_table(results_parquet).to_pylist())
    sources = _sources(splits_parquet)
    shown, thumbnails = 0, []
    for row in rows:
        if row["verdict"] == "pass" or not row["files"] or shown >= THUMBNAILS_IN_ALL:
            continue
        names = row["files"][: min(THUMBNAILS_PER_ROW, THUMBNAILS_IN_ALL - shown)]
        images = [_thumbnail(sources.get(name), images_npy) for name in names]
        thumbnails.append((f"{row['check']} {row['subject']}", image_grid(np.stack(images), names)))
        shown += len(names)
    return {
        "rows": [
            [
                row["check"],
                row["subject"],
                row["verdict"],
                *(_figure(row[key]) for key in ("value", "baseline", "threshold")),
                row["detail"],
            ]
            for row in rows
        ],
        "files": [
            (f"{row['check']} {row['subject']}", row["files"])
            for row in rows
            if row["verdict"] != "pass" and row["files"]
        ],
        "thumbnails": thumbnails,
        "counts": {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("block", "warn", "pass")},
        "model_rows": model_check_rows(model_checks_parquet) if model_checks_parquet else [],
    }


def model_check_rows(model_checks_parquet: str) -> list[list[str]]:
    """The model checks' table as the report shows it, the rows that did not pass first: per class
    recall, the reference set, embedding drift, each beside production's figure and the threshold."""
    return [
        [
            row["check"],
            row["subject"],
            row["verdict"],
            *(_figure(row[key]) for key in ("value", "baseline", "threshold")),
            row["detail"],
        ]
        for row in _worst_first(pq.read_table(model_checks_parquet).to_pylist())
    ]


def _worst_first(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: {"block": 0, "warn": 1, "pass": 2}[row["verdict"]])


def render_checks_page(pipeline: str, run_id: str, verdict: str, reason: str, context: dict) -> str:
    """checks.html: the page of a run its data checks blocked."""
    return render_page(
        "checks.html.j2", pipeline=pipeline, run_id=run_id, verdict=verdict, reason=reason, checks=context
    )


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _sources(splits_parquet: str) -> dict[str, object]:
    """example id -> its image file (or its row of images.npy)."""
    table = pq.read_table(splits_parquet, columns=["example_id", "path"]).to_pydict()
    return {
        example_id: path if path is not None else row
        for row, (example_id, path) in enumerate(zip(table["example_id"], table["path"]))
    }


def _thumbnail(source: object, images_npy: str | None) -> np.ndarray:
    """The image at THUMBNAIL_SIZE (RGB, padded); black when it cannot be read any more."""
    from PIL import Image, ImageOps

    try:
        if isinstance(source, str):
            with Image.open(source) as image:
                image.draft("RGB", THUMBNAIL_SIZE)
                picture = upright(image).convert("RGB")  # as the model saw it: phone photos turned
        elif source is not None and images_npy:
            pixels = np.load(images_npy, mmap_mode="r")[source]
            picture = Image.fromarray(np.asarray(pixels).squeeze()).convert("RGB")
        else:
            raise OSError("no source")
        return np.asarray(ImageOps.pad(picture, THUMBNAIL_SIZE, color=0))
    except OSError:
        return np.zeros((*THUMBNAIL_SIZE, 3), np.uint8)


def checks_section(context: dict) -> Markup:
    return Markup(render_page("checks_section.html.j2", checks=context))
