"""Stage 7, export_savedmodel: a TF-Serving SavedModel whose signature takes raw uint8 images (the
promote task after it makes a gate-passing one the production model).

The signature is convflow/modeling/serving.py's function, which resizes and rescales inside the graph, so
clients send images as they have them; evaluate scored the test split through the same function.
Before promotion, the SavedModel is reloaded in a fresh Python process (nothing of the exporting
process's objects or registrations can help it load) and its probabilities on the test split must
equal the Keras model's, as the evaluate stage recorded them. That process is started first and
imports TensorFlow while this one writes the export; the training flow's stage runner starts it
even earlier, once a stage has missed its cache (flows/sequences.py).

`python -m convflow.modeling.export_check` is that fresh process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convflow.core.context import RunContext
from convflow.core.records import Evaluation, ExportedModel, TFRecordSet, TrainedModel
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.modeling.classifier import load_classifier, serve_split
from convflow.modeling.export_check import FRESH_PROCESS, FreshProcessCheck
from convflow.modeling.serving import serving_function
from convflow.runtime.process_caches import take_prestarted

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
    batches = read_dataset(
        tfrecords.shards["test"], tfrecords.image_size, tfrecords.channels, 1024, cache=False, with_ids=True
    )
    images, rows = [], []
    for batch_images, _, batch_ids in batches:
        images.append(batch_images.numpy().astype(np.uint8))
        rows += [row_of[example_id.decode()] for example_id in batch_ids.numpy()]
    return np.concatenate(images), np.asarray(predictions["probabilities"], np.float64)[rows]


def export_model(
    trained: TrainedModel, tfrecords: TFRecordSet, name: str, output_dir: Path, evaluation: Evaluation | None = None
) -> ExportedModel:
    """Export `trained` as output_dir/<name>/1/ and check it, reloaded in a fresh process, against
    the Keras model's probabilities on the test split (`evaluation`'s, when given).

    Raises:
        ExportMismatch: the reloaded SavedModel's probabilities differ by more than TOLERANCE.
    """
    with take_prestarted(FRESH_PROCESS, FreshProcessCheck) as fresh_process:  # TF already imported
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
def export_savedmodel(
    trained: TrainedModel, evaluation: Evaluation, tfrecords: TFRecordSet, run: RunContext
) -> ExportedModel:
    """Prefect task over export_model; promotion is a task of its own after it (tasks/promote.py)."""
    return export_model(trained, tfrecords, run.pipeline, run.stage_dir("export_savedmodel"), evaluation)
