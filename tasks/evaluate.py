"""Stage 6, evaluate: test-split metrics (scikit-learn), predictions, confusion matrix and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from convflow.catalog import schemas
from convflow.catalog.registry import Production
from convflow.config.schema import EvaluateConfig
from convflow.core.context import RunContext
from convflow.core.records import Evaluation, TFRecordSet, TrainedModel, WrappedModel
from convflow.core.stage import stage_task
from convflow.core.storage import staged_output
from convflow.modeling.classifier import load_classifier, predict_split, probabilities_from_logits, serve_split
from convflow.modeling.serving import serving_function

# Test images kept for the report (sample predictions, worst mistakes, feature maps).
REPORT_SAMPLES = 16


def _metrics_table(labels, probabilities, loss: float, label_names: list[str], top_k: int) -> pa.Table:
    from sklearn import metrics

    classes = list(range(len(label_names)))
    predicted = probabilities.argmax(axis=1)
    binary = len(classes) == 2  # scikit-learn takes the positive class's score alone there
    k = 1 if binary else min(top_k, len(classes) - 1)
    scores = probabilities[:, 1] if binary else probabilities
    rows = [
        {"metric": "accuracy", "class_name": None, "value": metrics.accuracy_score(labels, predicted)},
        {"metric": "loss", "class_name": None, "value": loss},
        {
            "metric": f"top_{k}_accuracy",
            "class_name": None,
            "value": metrics.top_k_accuracy_score(labels, scores, k=k, labels=classes),
        },
    ]
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    for index, name in enumerate(label_names):
        for metric, values in (("precision", precision), ("recall", recall), ("f1", f1), ("support", support)):
            rows.append({"metric": metric, "class_name": name, "value": float(values[index])})
    return pa.Table.from_pylist(rows, schema=schemas.METRICS_SCHEMA)


def _gate(
    accuracy: float, evaluate: EvaluateConfig, production: Production | None, production_accuracy: float | None
) -> tuple[bool, str]:
    if accuracy < evaluate.min_accuracy:
        return False, f"test accuracy {accuracy:.4f} < min_accuracy {evaluate.min_accuracy}"
    if production is None:
        return True, f"test accuracy {accuracy:.4f} ≥ min_accuracy {evaluate.min_accuracy}; no production model yet"
    floor = production_accuracy - evaluate.max_regression
    verdict = f"production v{production.version} scores {production_accuracy:.4f} on the same test split"
    if accuracy < floor:
        return (
            False,
            f"test accuracy {accuracy:.4f} < {floor:.4f} ({verdict}, max_regression {evaluate.max_regression})",
        )
    return True, f"test accuracy {accuracy:.4f} ≥ min_accuracy {evaluate.min_accuracy} and ≥ {floor:.4f} ({verdict})"


def class_recalls(labels: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Each class's recall on the split: the share of its examples predicted as it (0 with none)."""
    return {
        name: float((predicted[labels == index] == index).mean()) if (labels == index).any() else 0.0
        for index, name in enumerate(label_names)
    }


def _class_gate(
    recalls: dict[str, float], evaluate: EvaluateConfig, production_recalls: dict[str, float] | None
) -> list[str]:
    """Why the per-class gate fails, a reason per class (none: it passes or is not set)."""
    reasons = []
    if evaluate.min_class_recall is not None:
        reasons += [
            f"{name} recall {recall:.4f} < min_class_recall {evaluate.min_class_recall}"
            for name, recall in recalls.items()
            if recall < evaluate.min_class_recall
        ]
    if evaluate.max_class_regression is not None and production_recalls is not None:
        reasons += [
            f"{name} recall {recall:.4f} < production's {production_recalls[name]:.4f} - max_class_regression "
            f"{evaluate.max_class_regression}"
            for name, recall in recalls.items()
            if name in production_recalls and recall < production_recalls[name] - evaluate.max_class_regression
        ]
    return reasons


def saved_model_predictions(saved_model: str, images: np.ndarray) -> np.ndarray:
    """The class a SavedModel's serving signature predicts for each raw uint8 image."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)  # keep referenced while calling its signature
    serve = loaded.signatures["serving_default"]
    return np.concatenate(
        [
            serve(images=tf.constant(images[start : start + 512]))["probabilities"].numpy().argmax(axis=1)
            for start in range(0, len(images), 512)
        ]
    )


def score_untrained(wrapped: WrappedModel, tfrecords: TFRecordSet) -> tuple[float, float]:
    """The tutorials' "initial accuracy": (test accuracy, test loss) of the wrapped model before
    training; its head is random, so about chance."""
    from sklearn.metrics import log_loss

    _, labels, _, logits = predict_split(wrapped.model_path, tfrecords, "test")
    probabilities = probabilities_from_logits(logits)
    loss = float(log_loss(labels, probabilities, labels=list(range(len(tfrecords.label_names)))))
    return float((probabilities.argmax(axis=1) == labels).mean()), loss


def first_conv_feature_maps(model, image: np.ndarray, limit: int = 16) -> np.ndarray:
    """The first convolution's activations for one image, as the tutorials draw them (H, W, filters)."""
    import keras

    base = model.get_layer("base")
    conv = next((layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)), None)
    if conv is None:
        return np.zeros((0, 0, 0), np.float32)
    probe = keras.Model(base.inputs[0], conv.output)
    return np.asarray(probe(image[np.newaxis].astype(np.float32), training=False))[0, ..., :limit]


def _report_samples(images, labels, probabilities) -> dict[str, np.ndarray]:
    """The first test images and the most confident mistakes, for the report."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:REPORT_SAMPLES]
    first = np.arange(min(REPORT_SAMPLES, len(labels)))
    return {
        "sample_images": images[first],
        "sample_labels": labels[first],
        "sample_predicted": predicted[first],
        "mistake_images": images[worst],
        "mistake_labels": labels[worst],
        "mistake_predicted": predicted[worst],
        "mistake_confidence": probabilities[worst, predicted[worst]],
    }


def _predictions_table(ids, labels: np.ndarray, probabilities: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "example_id": ids,
            "label": labels.astype(np.int64),
            "predicted": probabilities.argmax(axis=1).astype(np.int64),
            "confidence": probabilities.max(axis=1).astype(np.float32),
            "probabilities": list(probabilities.astype(np.float32)),
        },
        schema=schemas.PREDICTIONS_SCHEMA,
    )


def evaluate_model(
    trained: TrainedModel,
    tfrecords: TFRecordSet,
    settings: EvaluateConfig,
    output_dir: Path,
    production: Production | None = None,
) -> Evaluation:
    """Score the trained model on the test split; gate on min_accuracy and on the production
    model's accuracy on the same split (max_regression), then on each class's recall
    (min_class_recall, and max_class_regression against production's on the same split)."""
    from sklearn.metrics import confusion_matrix, log_loss

    model = load_classifier(trained.model_path)
    images, labels, ids, probabilities = serve_split(serving_function(model, tfrecords), tfrecords, "test")
    classes = list(range(len(tfrecords.label_names)))
    loss = float(log_loss(labels, probabilities, labels=classes))
    metrics = _metrics_table(labels, probabilities, loss, tfrecords.label_names, settings.top_k)
    accuracy = float(metrics.column("value")[0].as_py())
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), labels=classes)
    recalls = class_recalls(labels, probabilities.argmax(axis=1), tfrecords.label_names)
    production_accuracy = production_recalls = None
    if production:
        production_predicted = saved_model_predictions(production.saved_model, images)
        production_accuracy = float((production_predicted == labels).mean())
        production_recalls = class_recalls(labels, production_predicted, tfrecords.label_names)
    passed, reason = _gate(accuracy, settings, production, production_accuracy)
    class_failures = _class_gate(recalls, settings, production_recalls)
    if passed and class_failures:
        passed, reason = False, "; ".join(class_failures)
    with staged_output(output_dir) as staging:
        schemas.write_parquet(metrics, staging / "metrics.parquet")
        schemas.write_parquet(_predictions_table(ids, labels, probabilities), staging / "predictions.parquet")
        (staging / "confusion.json").write_text(
            json.dumps({"labels": tfrecords.label_names, "matrix": confusion.tolist()})
        )
        samples = _report_samples(images, labels, probabilities)
        samples["feature_maps"] = first_conv_feature_maps(model, images[0])
        np.savez_compressed(staging / "samples.npz", **samples)
    return Evaluation(
        output_dir=str(output_dir),
        metrics_parquet=str(output_dir / "metrics.parquet"),
        predictions_parquet=str(output_dir / "predictions.parquet"),
        confusion_json=str(output_dir / "confusion.json"),
        samples_npz=str(output_dir / "samples.npz"),
        test_accuracy=accuracy,
        test_loss=loss,
        passed_gate=passed,
        gate_reason=reason,
        production_version=production.version if production else None,
        production_accuracy=production_accuracy,
        class_recalls=recalls,
        production_class_recalls=production_recalls,
    )


@stage_task()
def evaluate(
    trained: TrainedModel,
    tfrecords: TFRecordSet,
    settings: EvaluateConfig,
    production: Production | None,
    run: RunContext,
) -> Evaluation:
    """Prefect task over evaluate_model; `production` (or None) is part of the cache key."""
    return evaluate_model(trained, tfrecords, settings, run.stage_dir("evaluate"), production)
