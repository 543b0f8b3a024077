"""One serving function per model: training traces it while the frozen base computes features,
evaluate scores the test split through it, and export saves that same trace."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf
from test_cached_features import _softmax, _test_images, built  # noqa: F401  (fixture)
from test_transfer import rgb_tfrecords  # noqa: F401  (fixture)

from convflow.config.schema import EvaluateConfig, TrainConfig
from convflow.modeling import serving
from convflow.modeling.classifier import load_classifier
from convflow.tasks.evaluate import evaluate_model
from convflow.tasks.export_savedmodel import export_model
from convflow.tasks.train import train_model


def test_model_is_traced_once_for_evaluate_and_export(tmp_path, rgb_tfrecords, built):  # noqa: F811
    _, wrapped = built
    trained = train_model(
        wrapped,
        rgb_tfrecords,
        TrainConfig(epochs=2, batch_size=16),
        tmp_path / "ckpt",
        tmp_path / "train",
        feature_cache=tmp_path / "features",
    )
    model = load_classifier(trained.model_path)  # the object training saved, as evaluate gets it
    serve = serving.serving_function(model, rgb_tfrecords)
    assert serve.experimental_get_tracing_count() == 1  # traced during training, not here

    evaluation = evaluate_model(trained, rgb_tfrecords, EvaluateConfig(), tmp_path / "evaluate")
    assert serving.serving_function(model, rgb_tfrecords) is serve and serve.experimental_get_tracing_count() == 1
    exported = export_model(trained, rgb_tfrecords, "rgb", tmp_path / "export", evaluation)
    # tf.saved_model.save retraces once inside its save context (a different cache key, a cheaper
    # trace); the export adds no trace of its own
    assert serve.experimental_get_tracing_count() == 2

    # what evaluate recorded is the Keras model's answer, and the SavedModel reloaded elsewhere agrees
    predictions = pq.read_table(evaluation.predictions_parquet).to_pydict()
    images = _test_images(rgb_tfrecords)
    np.testing.assert_allclose(np.asarray(predictions["probabilities"]), _softmax(np.asarray(model(images))), atol=1e-6)
    assert exported.max_abs_difference <= 1e-5
    loaded = tf.saved_model.load(exported.saved_model)
    assert list(loaded.signatures) == ["serving_default"]


def test_another_model_or_other_data_gets_its_own_function(rgb_tfrecords, built):  # noqa: F811
    _, wrapped = built
    first, second = load_classifier(wrapped.model_path), load_classifier(wrapped.model_path)
    assert first is second  # the same file: the same object
    serve = serving.serving_function(first, rgb_tfrecords)
    renamed = rgb_tfrecords.model_copy(update={"label_names": [f"class {name}" for name in rgb_tfrecords.label_names]})
    for_renamed = serving.serving_function(first, renamed)
    assert for_renamed is not serve
    classes = for_renamed(tf.zeros([1, 8, 8, 3], tf.uint8))["classes"].numpy()  # resized inside the graph
    assert classes[0].decode().startswith("class ")
