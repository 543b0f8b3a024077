"""Stage 7, export_savedmodel: a TF-Serving SavedModel whose signature takes raw uint8 images (the
promote task after it makes a gate-passing one the production model).

The signature is convflow/modeling/serving.py's function, which resizes and rescales inside the graph, so
clients send images as they have them; evaluate scored the test split through the same function.
Before promotion, the SavedModel is reloaded in a fresh Python process (nothing of the exporting
process's objects or registrations can help it load) and its probabilities on the test split must
equal the Keras model's, as the evaluate stage recorded them. That process is started first and
imports TensorFlow while this one writes the export; the training flow starts it even
earlier, while evaluate runs, when it has just trained a new model (`prestarted_fresh_process`).

`python -m convflow.modeling.export_check` is that fresh process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from convflow.runtime import fast_start
from convflow.core.storage import staged_output
from convflow.tasks.evaluate import load_classifier, serve_split
from convflow.core.records import Evaluation, ExportedModel, TFRecordSet, TrainedModel
from convflow.modeling.serving import serving_function
from convflow.core.stage import RunContext, stage_task
from convflow.modeling.export_check import ExportMismatch

MODEL_VERSION = 1


def _serving_archive(model, tfrecords: TFRecordSet):
    import keras

    archive = keras.export.ExportArchive()
    # The function evaluate scored the test split with, already traced when evaluate ran here.
    # ExportArchive saves the variables it uses. `archive.track(model)` is left out: it walks the
    # whole model for lookup tables (an image classifier has none) and traces each Keras model's
    # own default signature, which no one serves: seconds of an export on a CPU.
    archive.add_endpoint(name="serving_default", fn=serving_function(model, tfrecords))
    return archive


def _test_split_expectations(
    trained: TrainedModel, tfrecords: TFRecordSet, evaluation: Evaluation | None
) -> tuple[np.ndarray, np.ndarray]:
    """The test split's uint8 images and the Keras model's probabilities for them: from the
    evaluate stage's predictions.parquet when given (no second pass of the model), else computed."""
    if evaluation is None:
        model = load_classifier(trained.model_path)
        images, _, _, probabilities = serve_split(serving_function(model, tfrecords), tfrecords, "test")
        return images, probabilities
    import pyarrow.parquet as pq

    from convflow.tfrecords.features import read_dataset

    predictions = pq.read_table(evaluation.predictions_parquet, columns=["example_id", "probabilities"]).to_pydict()
    row_of = {example_id: row for row, example_id in enumerate(predictions["example_id"])}
    batches = read_dataset(tfrecords.shards["test"], tfrecords.image_size, tfrecords.channels, 1024, cache=False,
                           with_ids=True)
    images, rows = [], []
    for batch_images, _, batch_ids in batches:
        images.append(batch_images.numpy().astype(np.uint8))
        rows += [row_of[example_id.decode()] for example_id in batch_ids.numpy()]
    return np.concatenate(images), np.asarray(predictions["probabilities"], np.float64)[rows]


class FreshProcessCheck:
    """A Python process that imports TensorFlow as soon as it starts, then checks one SavedModel.

    Used as a context manager: leaving it early (the export failed) stops the process.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "convflow.modeling.export_check"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
            raise ExportMismatch(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {self.process.returncode}")
        return float(stdout.strip().splitlines()[-1])


FRESH_PROCESS = "export-check"  # fast_start's name for the export check's process


def prestarted_fresh_process(enabled: bool = True):
    """Start the export check's fresh process now, for an export stage run inside this block, so
    its TensorFlow import overlaps the stages before it (fast_start.prestarted)."""
    return fast_start.prestarted(FRESH_PROCESS, FreshProcessCheck, enabled)


def export_model(
    trained: TrainedModel, tfrecords: TFRecordSet, name: str, output_dir: Path, evaluation: Evaluation | None = None
) -> ExportedModel:
    """Export `trained` as output_dir/<name>/1/ and check it, reloaded in a fresh process, against
    the Keras model's probabilities on the test split (`evaluation`'s, when given).

    Raises:
        ExportMismatch: the reloaded SavedModel's probabilities differ by more than TOLERANCE.
    """
    with fast_start.take_prestarted(FRESH_PROCESS, FreshProcessCheck) as fresh_process:  # TF already imported
        images, expected = _test_split_expectations(trained, tfrecords, evaluation)
        model = load_classifier(trained.model_path)
        relative = Path(name) / str(MODEL_VERSION)
        with staged_output(output_dir) as staging:
            _serving_archive(model, tfrecords).write_out(str(staging / relative), verbose=False)
            difference = fresh_process.verify(staging / relative, images, expected)
    return ExportedModel(
        output_dir=str(output_dir), saved_model=str(output_dir / relative), max_abs_difference=difference
    )


@stage_task()
def export_savedmodel(trained: TrainedModel, evaluation: Evaluation, tfrecords: TFRecordSet, run: RunContext) -> ExportedModel:
    """Prefect task over export_model; promotion is a task of its own after it (tasks/promote.py)."""
    return export_model(trained, tfrecords, run.pipeline, run.stage_dir("export_savedmodel"), evaluation)
