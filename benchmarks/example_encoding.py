"""TFRecord encoding, protobuf message vs hand encoder (issue 30): encode alone, then to_tfrecords'
whole stage with each. The message is writer.encode_example (example_proto's tf.train.Example);
the hand encoder is writer.py as of HAND_COMMIT, which framed the protobuf bytes itself.

    .venv/bin/python benchmarks/example_encoding.py [repeats]

Stage inputs: MNIST (70,000 28x28 in memory: threads, records encoded in the stage's process),
the flowers photos at the flowers pipeline's 96 px and as JPEG records at their own 128 px (kept as
they are: the least work an image file costs), and 10,000 generated 64x64 JPEGs (worker processes).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HAND_COMMIT = "3ee5f40eba81c93e6a1e94afae498184daf4af7b"


def load_hand_encoder(scratch: Path):
    """writer.py as of HAND_COMMIT, importable (as hand_writer) here and in spawned worker processes."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{HAND_COMMIT}:convflow/tfrecords/writer.py"], capture_output=True, check=True
    ).stdout
    (scratch / "hand_writer.py").write_bytes(source)
    sys.path.insert(0, str(scratch))  # spawned workers get this sys.path
    return importlib.import_module("hand_writer").encode_example


def write_part_with(encode, job, images, compression):
    """parts.write_part with the given encoder."""
    from convflow.tfrecords.writer import ShardFile

    with ShardFile(job.path, compression) as part:
        for label, example_id, source in zip(job.labels, job.example_ids, job.sources):
            part.write(encode(images.one(source), label, example_id))
    return part.part_digests[0], part.records


def generate_jpegs(folder: Path, count: int, size: int = 64) -> Path:
    """`count` photo-like JPEGs in 10 class folders: a smooth random colour field with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(field, np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        path = folder / f"c{index % 10}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return folder


def micro(encoders: dict, repeats: int) -> None:
    """Microseconds per encode_example, best of `repeats` loops of 20,000 each, alternated."""
    print(f"encode alone, us per record (best of {repeats} loops of 20,000, alternated)")
    for size in (784, 64 * 64 * 3, 96 * 96 * 3):
        image = bytes(range(256)) * (size // 256) + bytes(size % 256)
        times = {name: [] for name in encoders}
        for _, (name, encode) in itertools.product(range(repeats), encoders.items()):
            started = time.perf_counter()
            for index in range(20_000):
                encode(image, index % 10, f"c{index % 10}/{index:05d}.jpg")
            times[name].append((time.perf_counter() - started) / 20_000 * 1e6)
        hand, message = min(times["hand"]), min(times["message"])
        print(f"  {size:>6} B image   hand {hand:6.2f}   message {message:6.2f}   ratio {message / hand:.2f}")


def cpu_seconds() -> float:
    """CPU seconds of this process and its worker processes so far: unlike wall time, barely moved
    by other work on the machine."""
    import psutil

    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(times.user + times.system for times in (process.cpu_times() for process in processes))


def stage(encoders: dict, inputs: dict, scratch: Path, repeats: int) -> None:
    """Wall and CPU seconds of write_tfrecords per input and encoder, runs alternated after a warm-up."""
    from convflow.config.schema import DataConfig
    from convflow.tasks import to_tfrecords
    from convflow.tasks.download_and_split import split_dataset

    print(f"to_tfrecords, seconds: min (median) of {repeats} runs each, alternated")
    for name, fields in inputs.items():
        data = DataConfig(**fields)
        split_set = split_dataset(data, scratch / f"split-{name}")
        wall, cpu = ({encoder: [] for encoder in encoders} for _ in range(2))
        for run, encoder in enumerate(["message"] + [encoder for _ in range(repeats) for encoder in encoders]):
            to_tfrecords.encode_example = encoders[encoder]
            to_tfrecords.write_part = functools.partial(write_part_with, encoders[encoder])
            started, used = time.perf_counter(), cpu_seconds()
            tfrecords = to_tfrecords.write_tfrecords(split_set, data, scratch / "tfr")
            if run:  # the first run warms the page cache and starts the worker processes
                wall[encoder].append(time.perf_counter() - started)
                cpu[encoder].append(cpu_seconds() - used)
            shutil.rmtree(scratch / "tfr")
        print(f"  {name:<24} {sum(tfrecords.counts.values()):>6} images, {tfrecords.record_format}")
        for kind, times in (("wall", wall), ("cpu", cpu)):
            hand, message = (min(times[encoder]) for encoder in ("hand", "message"))
            print(
                f"    {kind:<4}  hand {hand:6.2f} ({statistics.median(times['hand']):6.2f})   message {message:6.2f} "
                f"({statistics.median(times['message']):6.2f})   ratio {message / hand:.3f} "
                f"({statistics.median(times['message']) / statistics.median(times['hand']):.3f})"
            )


def main(repeats: int) -> None:
    from convflow.tfrecords.writer import encode_example

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        encoders = {"hand": load_hand_encoder(scratch), "message": encode_example}
        image = bytes(range(256)) * 48
        for label, example_id in [(0, ""), (300, "chat/été.jpg"), (-1, "x" * 200)]:
            if encoders["hand"](image, label, example_id) != encode_example(image, label, example_id):
                raise SystemExit(f"the encoders differ on label {label}, id {example_id!r}")
        print("the encoders' bytes are identical")
        micro(encoders, repeats)
        generated = generate_jpegs(scratch / "generated", 10_000)
        inputs = {
            "mnist 28px": dict(source=f"idx:{DATA / 'mnist'}", image_size=(28, 28), channels=1),
            "flowers 96px": dict(source=f"folder:{DATA / 'flowers'}", image_size=(96, 96), channels=3),
            "flowers 128px jpeg as-is": dict(
                source=f"folder:{DATA / 'flowers'}", image_size=(128, 128), channels=3, record_format="jpeg"
            ),
            "generated 64px jpegs": dict(source=f"folder:{generated}", image_size=(64, 64), channels=3),
        }
        stage(encoders, inputs, scratch, repeats)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
