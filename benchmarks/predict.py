"""`convflow predict` over a folder of PNGs (digits-cnn's production model, its serving signature)
against a plain script that decodes the same files and calls the Keras model's `predict`: images/s
of each whole process, start-up included (goal: at least 0.9x plain)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from common import CONVFLOW, PYTHON, Row, convflow_run, last_json, run_process

TITLE = "convflow predict: images/s over a folder of PNGs (baseline: plain Keras model.predict)"
IMAGES = 5_000
GOAL = 0.9

PLAIN_PREDICT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import keras
    from PIL import Image

    started = time.perf_counter()
    model = keras.models.load_model(sys.argv[1], compile=False)
    files = sorted(Path(sys.argv[2]).glob("*.png"))
    images = np.stack([np.asarray(Image.open(path).convert("L"), np.uint8)[..., None] for path in files])
    probabilities = keras.ops.softmax(model.predict(images.astype("float32"), batch_size=64, verbose=0))
    print(json.dumps({"images": len(files), "seconds": time.perf_counter() - started}))
""")


def write_images(folder: Path) -> None:
    """IMAGES digits at 28x28 (the model's input size, so neither side resizes) as 8-bit PNGs, each a
    little different (noise), as a folder of scans."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(IMAGES):
        noise = rng.integers(0, 8, size=digits.shape[1:], dtype=np.uint8)
        image = Image.fromarray(np.clip(digits[index % len(digits)] + noise, 0, 255))
        image.resize((28, 28), Image.BILINEAR).save(folder / f"{index:05d}.png")


def repeat(scratch: Path) -> dict:
    """Train digits-cnn once, then score the folder both ways (each a fresh process)."""
    artifacts = scratch / "artifacts"
    _, summary = convflow_run("digits-cnn", artifacts)
    folder = scratch / "images"
    write_images(folder)
    model = Path(summary["saved_model"]).parents[2] / "train" / "model.keras"
    ours = run_process(
        [
            CONVFLOW,
            "predict",
            "digits-cnn",
            str(folder),
            "--artifacts",
            str(artifacts),
            "--output",
            str(scratch / "out.parquet"),
            "--json",
        ]
    )
    plain = run_process([PYTHON, "-c", PLAIN_PREDICT, str(model), str(folder)])
    assert last_json(ours.stdout)["scored"] == IMAGES and last_json(plain.stdout)["images"] == IMAGES
    return {
        "convflow_ips": IMAGES / ours.wall,
        "plain_ips": IMAGES / plain.wall,
        "convflow_rss": ours.peak_rss_mb,
        "plain_rss": plain.peak_rss_mb,
    }


def rows(m: dict) -> list[Row]:
    ratio = m["convflow_ips"] / m["plain_ips"]
    return [
        Row(
            f"images/s, {IMAGES:,} PNGs, whole process",
            m["convflow_ips"],
            m["plain_ips"],
            f"{ratio:.2f}x",
            f">= {GOAL}x",
            ratio >= GOAL,
        ),
        Row("peak RSS, MB", m["convflow_rss"], m["plain_rss"], f"{m['convflow_rss'] / m['plain_rss']:.2f}x"),
    ]
