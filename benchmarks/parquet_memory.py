"""A labelled Parquet table of over 1 GB of PNG bytes through download_and_split and to_tfrecords
(the `parquet:` source, read in record batches): peak RSS against the 1.5 GB goal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from common import PYTHON, Row, last_json, run_process

TITLE = "parquet: source, a table over 1 GB through the data stages: peak RSS"
TARGET_BYTES = 1_100_000_000
GOAL_MB = 1536
ROWS_PER_BATCH = 200

DATA_STAGES = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from convflow.config.schema import DataConfig
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    started = time.perf_counter()
    data = DataConfig(source=f"parquet:{sys.argv[1]}", image_size=(32, 32), channels=3)
    split_set = split_dataset(data, Path(sys.argv[2]) / "split")
    tfrecords = write_tfrecords(split_set, data, Path(sys.argv[2]) / "tfrecords")
    print(json.dumps({"rows": sum(tfrecords.counts.values()), "seconds": time.perf_counter() - started}))
""")


def write_table(path: Path, target_bytes: int) -> tuple[int, int]:
    """Random-noise RGB PNGs (they do not compress) with two labels, written batch by batch until
    the file passes `target_bytes`; (rows, bytes)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.binary()), ("label", pa.string())])
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        while path.stat().st_size < target_bytes if path.exists() else True:
            images = []
            for _ in range(ROWS_PER_BATCH):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "PNG")
                images.append(buffer.getvalue())
            labels = ["even" if (rows + i) % 2 == 0 else "odd" for i in range(ROWS_PER_BATCH)]
            writer.write_table(pa.table({"image": images, "label": labels}, schema=schema))
            rows += ROWS_PER_BATCH
    return rows, path.stat().st_size


def _data_stages(scratch: Path, name: str, target_bytes: int) -> dict:
    table = scratch / f"{name}.parquet"
    rows, size = write_table(table, target_bytes)
    process = run_process([PYTHON, "-c", DATA_STAGES, str(table), str(scratch / name)])
    result = last_json(process.stdout)
    assert result["rows"] == rows
    return {
        f"{name}_gb": size / 1e9,
        f"{name}_rows": rows,
        f"{name}_rss_mb": process.peak_rss_mb,
        f"{name}_seconds": result["seconds"],
    }


def repeat(scratch: Path) -> dict:
    """The data stages over a table of a quarter of the size, then over the whole: memory must not
    grow with the table."""
    return {**_data_stages(scratch, "quarter", TARGET_BYTES // 4), **_data_stages(scratch, "large", TARGET_BYTES)}


def rows(m: dict) -> list[Row]:
    return [
        Row(f"table size, GB ({m['large_rows']:,.0f} rows of 224x224 PNG bytes)", m["large_gb"]),
        Row(
            "download_and_split + to_tfrecords, peak RSS MB (largest process; baseline: a table of a quarter "
            "of the size)",
            m["large_rss_mb"],
            m["quarter_rss_mb"],
            f"{m['large_rss_mb'] / m['quarter_rss_mb']:.2f}x",
            f"< {GOAL_MB}",
            m["large_rss_mb"] < GOAL_MB,
        ),
        Row(
            "download_and_split + to_tfrecords, wall s (baseline: a quarter of the size)",
            m["large_seconds"],
            m["quarter_seconds"],
            f"{m['large_seconds'] / m['quarter_seconds']:.2f}x",
        ),
    ]
