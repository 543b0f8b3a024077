"""Data at scale (issue 23). Folders of 10,000, 50,000 and 200,000 generated 128x128 JPEGs through
download_and_split + to_tfrecords in a subprocess: wall time, images/s, peak RSS of the process tree
(its worker processes included) and shard bytes, beside one decode pass of
keras.utils.image_dataset_from_directory over the same folder. Then one epoch's input rate
(features.read_dataset, cache off) from shards dropped from the page cache first, for raw, JPEG and
PNG records at 64 and 224 px: the measurement behind features.choose_record_format's rule.

The folders are generated once under SCALE_ROOT (outside the repository) and reused.
"""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from common import CODE, DATA, PYTHON, Row, images_per_second, import_code_under_test, last_json

TITLE = "Data at scale: bounded memory, data-stage rate, record formats read from disk"
SCALE_ROOT = Path(os.environ.get("CONVFLOW_SCALE_ROOT", tempfile.gettempdir())) / "convflow-scale"
SIZES = tuple(int(size) for size in os.environ.get("CONVFLOW_SCALE_SIZES", "10000,50000,200000").split(","))
CLASSES = 10
DISTINCT = 20_000  # images drawn; the rest are byte-distinct copies of these
READ_IMAGES = {64: 20_000, 224: 4_000}  # per cold-read row: enough for several seconds of reading
RSS_GOAL = 1.10
RATE_GOAL = 0.8

DATA_STAGES = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import tensorflow  # imported before the clock starts, as the keras pass imports keras
    from convflow.config.schema import DataConfig
    from convflow.tasks.download_and_split import split_dataset
    from convflow.tasks.to_tfrecords import write_tfrecords

    data = DataConfig(source=f"folder:{sys.argv[1]}", image_size=(128, 128), channels=3)
    started = time.perf_counter()
    split_set = split_dataset(data, Path(sys.argv[2]) / "split")
    split_s = time.perf_counter() - started
    tfrecords = write_tfrecords(split_set, data, Path(sys.argv[2]) / "tfrecords")
    print(json.dumps({"images": sum(tfrecords.counts.values()), "split_s": split_s,
                      "seconds": time.perf_counter() - started, "format": tfrecords.record_format,
                      "shard_bytes": sum(tfrecords.file_sizes.values())}))
""")

KERAS_PASS = textwrap.dedent("""
    import json, sys, time
    import keras
    started = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(sys.argv[1], image_size=(128, 128), batch_size=256,
                                                       shuffle=False, verbose=False)
    images = sum(int(batch.shape[0]) for batch, _ in dataset)
    print(json.dumps({"images": images, "seconds": time.perf_counter() - started}))
""")


def _image(index: int) -> bytes:
    """A photo-like 128x128 JPEG: a smooth random colour field with texture, distinct per index."""
    from PIL import Image

    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((128, 128), Image.BICUBIC)
    pixels = np.asarray(field, np.int16) + rng.integers(-12, 13, (128, 128, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_images(folder: str, indices: range) -> None:
    """Images below DISTINCT are drawn; the others copy one of those with the index in a JPEG comment:
    distinct bytes (and content hashes), the same decoding work, a hundredth of the time to make."""
    for index in indices:
        path = Path(folder) / f"c{index % CLASSES}" / f"{index:07d}.jpg"
        if path.exists():
            continue
        if index < DISTINCT:
            path.write_bytes(_image(index))
            continue
        original = (Path(folder) / f"c{index % DISTINCT % CLASSES}" / f"{index % DISTINCT:07d}.jpg").read_bytes()
        comment = str(index).encode()
        path.write_bytes(original[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + original[2:])


def _generate(folder: Path, indices: range) -> None:
    chunks = [range(start, min(start + 5_000, indices.stop)) for start in range(indices.start, indices.stop, 5_000)]
    with concurrent.futures.ProcessPoolExecutor(
        os.cpu_count(), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        list(pool.map(_write_images, [str(folder)] * len(chunks), chunks))


def image_folder(size: int) -> Path:
    """SCALE_ROOT/images-<size>: the first `size` images of the largest folder, linked, not copied."""
    largest = SCALE_ROOT / f"images-{max(SIZES)}"
    if not (largest / "complete").exists():
        for label in range(CLASSES):
            (largest / f"c{label}").mkdir(parents=True, exist_ok=True)
        _generate(largest, range(0, min(DISTINCT, max(SIZES))))
        _generate(largest, range(min(DISTINCT, max(SIZES)), max(SIZES)))
        (largest / "complete").write_text("")
    folder = SCALE_ROOT / f"images-{size}"
    if not (folder / "complete").exists():
        for index in range(size):
            target = folder / f"c{index % CLASSES}" / f"{index:07d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(largest / target.relative_to(folder), target)
        (folder / "complete").write_text("")
    return folder


def tree_peak_rss(command: list[str]) -> tuple[dict, float, float]:
    """Run `command` (importing the code under test); its last JSON line, the peak of the summed
    RSS of it and its children, sampled every 0.1 s, in MB, and the CPU seconds they used (user and
    system, imports included: a measure that other work on the machine does not move)."""
    import resource

    import psutil

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    env = {**os.environ, "PYTHONPATH": str(CODE.folder)}
    cpu_before = cpu_seconds()
    process = subprocess.Popen(
        command, cwd=CODE.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(member.memory_info().rss for member in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{command[:3]} exited {process.returncode}:\n{stderr[-3000:]}")
    return last_json(stdout), peak[0] / 2**20, cpu_seconds() - cpu_before


def data_stages(size: int, scratch: Path) -> dict:
    folder = image_folder(size)
    ours, rss, cpu = tree_peak_rss(["nice", PYTHON, "-c", DATA_STAGES, str(folder), str(scratch / f"run-{size}")])
    keras, keras_rss, keras_cpu = tree_peak_rss(["nice", PYTHON, "-c", KERAS_PASS, str(folder)])
    assert ours["images"] == keras["images"] == size, (ours, keras)
    subprocess.run(["rm", "-rf", str(scratch / f"run-{size}")], check=True)
    return {
        f"{size}|ips": size / ours["seconds"],
        f"{size}|split_s": ours["split_s"],
        f"{size}|s": ours["seconds"],
        f"{size}|rss": rss,
        f"{size}|shard_mb": ours["shard_bytes"] / 1e6,
        f"{size}|keras_ips": size / keras["seconds"],
        f"{size}|keras_rss": keras_rss,
        f"{size}|{ours['format']}": 1.0,
        f"{size}|cpu_s": cpu,
        f"{size}|keras_cpu_s": keras_cpu,
    }


def _drop_from_page_cache(paths: list[str]) -> None:
    os.sync()  # dirty pages are not dropped
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _write_read_shards(pixels: int, record_format: str, directory: Path) -> list[str]:
    """READ_IMAGES[pixels] real photos (cats_vs_dogs, up to 500 px, repeated) at `pixels` square, in
    to_tfrecords' shards of 1,000."""
    from convflow.config.schema import DataConfig
    from convflow.tasks.to_tfrecords import ShardJob, _decode_and_write_shard
    from convflow.tfrecords import features

    photos = sorted(str(path) for path in (DATA / "cats_vs_dogs").rglob("*.jpg"))
    files = [photos[index % len(photos)] for index in range(READ_IMAGES[pixels])]
    data = DataConfig(source="sklearn:digits", image_size=(pixels, pixels), channels=3)
    directory.mkdir(parents=True)
    paths = []
    for number, start in enumerate(range(0, len(files), 1_000)):
        chunk = files[start : start + 1_000]
        path = directory / features.shard_name("train", number, 0, len(chunk), record_format, "none")
        _decode_and_write_shard(
            ShardJob(str(path), list(range(len(chunk))), [0] * len(chunk), [str(i) for i in range(len(chunk))], chunk),
            None,
            data,
            record_format,
        )
        paths.append(str(path))
    return paths


def cold_reads(scratch: Path) -> dict:
    from convflow.tfrecords import features

    result = {}
    for pixels in READ_IMAGES:
        for record_format in features.RECORD_FORMATS:
            paths = _write_read_shards(pixels, record_format, scratch / f"read-{pixels}-{record_format}")
            _drop_from_page_cache(paths)
            result[f"read|{pixels}|{record_format}"] = images_per_second(
                features.read_dataset(paths, (pixels, pixels), 3, 128, cache=False)
            )
            result[f"read|{pixels}|{record_format}|kb"] = sum(map(os.path.getsize, paths)) / READ_IMAGES[pixels] / 1e3
    return result


def repeat(scratch: Path) -> dict:
    import_code_under_test()
    result = cold_reads(scratch)
    for size in SIZES:
        result.update(data_stages(size, scratch))
    return result


def rows(m: dict) -> list[Row]:
    return [*_stage_rows(m), *_read_rows(m)]


def _stage_rows(m: dict) -> list[Row]:
    sizes = sorted({int(key.split("|")[0]) for key in m if key.endswith("|ips")})
    smallest, result = sizes[0], []
    for size in sizes:
        chosen = next(fmt for fmt in ("raw", "jpeg", "png") if f"{size}|{fmt}" in m)
        rate, keras = m[f"{size}|ips"], m[f"{size}|keras_ips"]
        result.append(
            Row(
                f"{size:,} images: data stages images/s ({m[f'{size}|s']:.0f} s, download_and_split "
                f"{m[f'{size}|split_s']:.0f} s; {chosen} records, {m[f'{size}|shard_mb']:,.0f} MB of shards) "
                "vs image_dataset_from_directory's decode pass",
                rate,
                keras,
                f"{rate / keras:.2f}x",
                f">= {RATE_GOAL}x",
                rate / keras >= RATE_GOAL,
            )
        )
        rss, base = m[f"{size}|rss"], m[f"{smallest}|rss"]
        result.append(
            Row(
                f"{size:,} images: peak RSS MB of the process tree (keras pass: "
                f"{m[f'{size}|keras_rss']:,.0f} MB) vs at {smallest:,}",
                rss,
                base,
                f"{rss / base:.2f}x",
                f"<= {RSS_GOAL:.2f}x",
                rss / base <= RSS_GOAL,
            )
        )
    return result


def _read_rows(m: dict) -> list[Row]:
    from convflow.tfrecords import features

    import_code_under_test()
    result = []
    for pixels in READ_IMAGES:
        rates = {fmt: m[f"read|{pixels}|{fmt}"] for fmt in features.RECORD_FORMATS}
        sizes = {fmt: m[f"read|{pixels}|{fmt}|kb"] for fmt in features.RECORD_FORMATS}
        fastest = max(rates, key=rates.get)
        near = [fmt for fmt in rates if rates[fmt] >= rates[fastest] / 1.1]
        best = min(near, key=sizes.get)  # the smaller of those within 10% of the fastest
        auto = features.choose_record_format("auto", (pixels, pixels), 3, 10**8)  # a dataset beyond the cache
        shown = ", ".join(f"{fmt} {rates[fmt]:,.0f}/s ({sizes[fmt]:,.1f} KB/image)" for fmt in rates)
        result.append(
            Row(
                f"{pixels} px, one epoch from dropped pages: {shown}; auto picks {auto}",
                rates[auto],
                rates["raw"],
                f"{rates[auto] / rates['raw']:.2f}x",
                f"auto = {best}",
                auto == best,
            )
        )
    return result
