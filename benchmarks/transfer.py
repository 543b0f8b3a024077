"""Transfer learning as the tutorial does it: a frozen MobileNet 0.25 (ImageNet weights) + head at
160 px, 10 epochs, batch 32, on ../shared/data/flowers and ../shared/data/cats_vs_dogs. plain_transfer.py
runs the base over every image in every epoch; convflow's whole run (`convflow run`, fresh artifacts,
start to exit) trains the head on the base's cached features. Then flowers again with convflow's
features cache off (images every epoch, as plain) and with train.precision mixed_bfloat16 and
mixed_float16 (the speed of each beside float32). Test accuracy is compared as the mean over seeds
0, 1 and 2 of both (convflow's two extra runs reuse its data stages and cached features)."""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml
from common import DATA, PYTHON, ROOT, Row, convflow_run, last_json, run_process, trained_record

TITLE = "transfer: frozen MobileNet 0.25 + head, convflow (cached features) vs plain Keras (10 epochs, 160 px)"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
EPOCHS, BATCH, SIZE = 10, 32, 160
# Each dataset: its folder, how photos are fitted to 160x160, its split, and the whole-run target.
DATASETS = {
    "flowers": {"folder": DATA / "flowers", "resize": "stretch", "split": (0.8, 0.1, 0.1), "target": 0.45},
    "cats_vs_dogs": {"folder": DATA / "cats_vs_dogs", "resize": "pad", "split": (0.6, 0.1, 0.3), "target": 0.7},
}
# Test accuracy at 10 epochs moves by 1-3 points with the seed alone (the head's initial weights,
# dropout, shuffling), for plain Keras and convflow alike: accuracy is compared as the mean of these.
SEEDS = (0, 1, 2)
FLOWERS_VARIANTS = {
    "no features cache": {"cache_features": False},
    "mixed_bfloat16": {"precision": "mixed_bfloat16"},
    "mixed_float16": {"precision": "mixed_float16"},
}


def _pipelines_file(path: Path, dataset: str, **train: object) -> Path:
    spec = DATASETS[dataset]
    train_fraction, validation, test = spec["split"]
    pipeline = {
        "data": {
            "source": f"folder:{spec['folder']}",
            "image_size": [SIZE, SIZE],
            "channels": 3,
            "resize": spec["resize"],
            "split": {"train": train_fraction, "validation": validation, "test": test},
        },
        "model": {"base": "mobilenet", "alpha": 0.25, "weights": str(WEIGHTS), "dropout": 0.2},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, **train},
    }
    path.write_text(yaml.safe_dump({"pipelines": {dataset: pipeline}}))
    return path


def _plain(dataset: str, seed: int = 0) -> dict:
    spec = DATASETS[dataset]
    process = run_process(
        [
            PYTHON,
            str(ROOT / "benchmarks" / "plain_transfer.py"),
            str(spec["folder"]),
            "--size",
            str(SIZE),
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            str(BATCH),
            "--resize",
            spec["resize"],
            "--split",
            *map(str, spec["split"]),
            "--seed",
            str(seed),
        ]
    )
    result = last_json(process.stdout)
    return {
        "wall": process.wall,
        "cpu": process.cpu,
        "accuracy": result["test_accuracy"],
        "epoch_ips": result["epoch_images_per_second"],
        "train_images": result["train_examples"],
    }


def _convflow(dataset: str, scratch: Path, name: str, **train: object) -> dict:
    """`convflow run` of `dataset`'s pipeline into scratch/`name`/artifacts (fresh the first time)."""
    folder = scratch / name
    folder.mkdir(exist_ok=True)
    process, summary = convflow_run(
        dataset, folder / "artifacts", _pipelines_file(folder / "pipelines.yaml", dataset, **train)
    )
    trained = trained_record(folder / "artifacts", summary)
    stages = {stage["name"]: stage["seconds"] for stage in summary["stages"]}
    import pyarrow.parquet as pq

    epoch_seconds = statistics.median(pq.read_table(trained["history_parquet"]).column("seconds").to_pylist())
    return {
        "wall": process.wall,
        "cpu": process.cpu,
        "accuracy": summary["test_accuracy"],
        "train_stage": stages["train"],
        "epoch_seconds": epoch_seconds,
        **{f"stage {name}": seconds for name, seconds in stages.items()},
    }


def repeat(scratch: Path) -> dict:
    result = {}
    for dataset in DATASETS:
        result.update({f"{dataset} plain {key}": value for key, value in _plain(dataset).items()})
        result.update({f"{dataset} cf {key}": value for key, value in _convflow(dataset, scratch, dataset).items()})
        # The other seeds: convflow's reruns in the same artifacts reuse the data stages and features.
        result[f"{dataset} plain mean accuracy"] = statistics.mean(
            [result[f"{dataset} plain accuracy"], *(_plain(dataset, seed)["accuracy"] for seed in SEEDS[1:])]
        )
        result[f"{dataset} cf mean accuracy"] = statistics.mean(
            [
                result[f"{dataset} cf accuracy"],
                *(_convflow(dataset, scratch, dataset, seed=seed)["accuracy"] for seed in SEEDS[1:]),
            ]
        )
    for name, train in FLOWERS_VARIANTS.items():
        measured = _convflow("flowers", scratch, name.replace(" ", "-"), **train)
        result.update({f"flowers {name} {key}": measured[key] for key in ("wall", "train_stage", "accuracy")})
    return result


def _dataset_rows(m: dict, dataset: str) -> list[Row]:
    plain, cf, target = f"{dataset} plain ", f"{dataset} cf ", DATASETS[dataset]["target"]
    ratio = m[cf + "wall"] / m[plain + "wall"]
    points = (m[cf + "mean accuracy"] - m[plain + "mean accuracy"]) * 100
    train_images = m[plain + "train_images"]
    stages = [
        Row(f"{dataset}: convflow {key.removeprefix(cf + 'stage ')} stage, wall s", value)
        for key, value in m.items()
        if key.startswith(cf + "stage ")
    ]
    return [
        Row(
            f"{dataset}: whole run, wall s",
            m[cf + "wall"],
            m[plain + "wall"],
            f"{ratio:.2f}x",
            f"<= {target}x",
            ratio <= target,
        ),
        Row(
            f"{dataset}: whole run, CPU s", m[cf + "cpu"], m[plain + "cpu"], f"{m[cf + 'cpu'] / m[plain + 'cpu']:.2f}x"
        ),
        Row(
            f"{dataset}: test accuracy, mean of seeds {', '.join(map(str, SEEDS))}",
            m[cf + "mean accuracy"],
            m[plain + "mean accuracy"],
            f"{points:+.2f} pt",
            "within 1 pt",
            abs(points) <= 1.0,
        ),
        Row(
            f"{dataset}: test accuracy, seed 0",
            m[cf + "accuracy"],
            m[plain + "accuracy"],
            f"{(m[cf + 'accuracy'] - m[plain + 'accuracy']) * 100:+.2f} pt",
        ),
        Row(
            f"{dataset}: training images/s per epoch (median epoch; convflow's on features)",
            train_images / m[cf + "epoch_seconds"],
            m[plain + "epoch_ips"],
            f"{train_images / m[cf + 'epoch_seconds'] / m[plain + 'epoch_ips']:.1f}x",
        ),
        Row(
            f"{dataset}: training images/s, whole train stage (features computed once included)",
            train_images * EPOCHS / m[cf + "train_stage"],
            m[plain + "epoch_ips"],
            f"{train_images * EPOCHS / m[cf + 'train_stage'] / m[plain + 'epoch_ips']:.1f}x",
        ),
        *stages,
    ]


def rows(m: dict) -> list[Row]:
    variant_rows = []
    for name in FLOWERS_VARIANTS:
        key = f"flowers {name} "
        variant_rows += [
            Row(
                f"flowers, {name}: whole run, wall s (baseline: convflow float32, cached features)",
                m[key + "wall"],
                m["flowers cf wall"],
                f"{m[key + 'wall'] / m['flowers cf wall']:.2f}x",
            ),
            Row(
                f"flowers, {name}: train stage, wall s",
                m[key + "train_stage"],
                m["flowers cf train_stage"],
                f"{m[key + 'train_stage'] / m['flowers cf train_stage']:.2f}x",
            ),
            Row(
                f"flowers, {name}: test accuracy",
                m[key + "accuracy"],
                m["flowers cf accuracy"],
                f"{(m[key + 'accuracy'] - m['flowers cf accuracy']) * 100:+.2f} pt",
            ),
        ]
    return [*_dataset_rows(m, "flowers"), *_dataset_rows(m, "cats_vs_dogs"), *variant_rows]
