"""The export check: a SavedModel's probabilities against the Keras model's, within TOLERANCE.

`python -m convflow.modeling.export_check` is the fresh process export_savedmodel starts: it
imports TensorFlow at once, then reads the SavedModel path and a .npz of images and expected
probabilities from stdin (one per line) and prints the largest difference. It imports nothing
else of convflow (no Prefect, no Keras custom layers), so it starts fast and proves the
SavedModel loads on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 1e-5


class ExportMismatch(RuntimeError):
    """The reloaded SavedModel does not reproduce the Keras model's predictions."""


def verify_saved_model(saved_model: Path, images: np.ndarray, expected: np.ndarray) -> float:
    """Largest |SavedModel - expected| probability over `images`.

    Raises:
        ExportMismatch: above TOLERANCE.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # keep referenced while calling its signature
    serve = loaded.signatures["serving_default"]
    outputs = [
        serve(images=tf.constant(images[start : start + 512]))["probabilities"].numpy()
        for start in range(0, len(images), 512)
    ]
    difference = float(np.abs(np.concatenate(outputs) - expected).max())
    if difference > TOLERANCE:
        raise ExportMismatch(f"{saved_model}: SavedModel probabilities differ from Keras by {difference:.2e}")
    return difference


class FreshProcessCheck:
    """A Python process that imports TensorFlow as soon as it starts, then checks one SavedModel.

    Used as a context manager: leaving it early (the export failed) stops the process.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "convflow.modeling.export_check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> FreshProcessCheck:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the process if it has not finished (the export failed, or never came)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def verify(self, saved_model: Path, images: np.ndarray, expected: np.ndarray) -> float:
        """The largest |SavedModel - expected| probability, as the fresh process found it.

        Raises:
            ExportMismatch: above TOLERANCE, or the SavedModel did not load there.
        """
        check = saved_model.parent / "verify.npz"
        np.savez(check, images=images, expected=expected)
        try:
            stdout, stderr = self.process.communicate(f"{saved_model}\n{check}\n")
        finally:
            check.unlink()
        if self.process.returncode != 0:
            raise ExportMismatch(
                stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {self.process.returncode}"
            )
        return float(stdout.strip().splitlines()[-1])


FRESH_PROCESS = "export-check"  # process_caches' name for the export check's process


# The process starts ahead of the export, beside the stages before it, and must take only the CPU
# they leave idle (on 2 cores its TensorFlow import slowed the frozen base's feature pass); its
# check, once those stages are done, runs alone anyway.
BACKGROUND_NICENESS = 10


def main() -> None:
    os.nice(BACKGROUND_NICENESS)
    import tensorflow as tf  # imported, and its runtime started, while the exporting process still writes

    # One small convolution starts TensorFlow's eager runtime, thread pools and oneDNN, which
    # the first call of the SavedModel would otherwise wait for.
    tf.nn.conv2d(tf.ones([1, 8, 8, 3]), tf.ones([3, 3, 3, 4]), 1, "SAME").numpy()
    saved_model, check_npz = (sys.stdin.readline().strip() for _ in range(2))
    check = np.load(check_npz)
    print(verify_saved_model(Path(saved_model), check["images"], check["expected"]))


if __name__ == "__main__":
    main()
